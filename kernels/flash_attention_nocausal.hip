// Flash attention kernels, MASK_MODE 0: non-causal attention without a mask.
// Kernel names: flash_attention_nocausal_<f32|f16|bf16|tf32>_hd<bucket>[_sm90], one argument AttnParams.
// With FA_VARIANT_* defined (run-time compilation) only that variant is emitted; otherwise
// every row of flash_config.h for this vendor is.
#include "compat.h"
#include "attention_params.h"
#include "flash_attention_core.h"

#if !defined(FA_VARIANT_DT)
#if FA_HIP
#define FA_TILE_HIP(dt, hd, bm, bn, th, sm) FA_DEFINE_FLASH_KERNEL(nocausal, 0, dt, hd, bm, bn, th, sm)
#else
#define FA_TILE(dt, hd, bm, bn, th, sm) FA_DEFINE_FLASH_KERNEL(nocausal, 0, dt, hd, bm, bn, th, sm)
#define FA_TILE_SM90(dt, hd, bm, bn, th, sm) FA_DEFINE_FLASH_KERNEL_SM90(nocausal, 0, dt, hd, bm, bn, th, sm)
#endif
#endif

#include "flash_config.h"

#if defined(FA_VARIANT_DT)
FA_DEFINE_FLASH_VARIANT(nocausal, 0)
#endif
