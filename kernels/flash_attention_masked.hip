// Flash attention kernels, MASK_MODE 2: generic attention: additive f32 mask (nullable), causal when p.causal != 0.
// Kernel names: flash_attention_masked_<f32|f16|bf16|tf32>_hd<bucket>[_sm90], one argument AttnParams.
// With FA_VARIANT_* defined (run-time compilation) only that variant is emitted; otherwise
// every row of flash_config.h for this vendor is.
#include "compat.h"
#include "attention_params.h"
#include "flash_attention_core.h"

#if !defined(FA_VARIANT_DT)
#if FA_HIP
#define FA_TILE_HIP(dt, hd, bm, bn, th, sm) FA_DEFINE_FLASH_KERNEL(masked, 2, dt, hd, bm, bn, th, sm)
#else
#define FA_TILE(dt, hd, bm, bn, th, sm) FA_DEFINE_FLASH_KERNEL(masked, 2, dt, hd, bm, bn, th, sm)
#define FA_TILE_SM90(dt, hd, bm, bn, th, sm) FA_DEFINE_FLASH_KERNEL_SM90(masked, 2, dt, hd, bm, bn, th, sm)
#endif
#endif

#include "flash_config.h"

#if defined(FA_VARIANT_DT)
FA_DEFINE_FLASH_VARIANT(masked, 2)
#endif
