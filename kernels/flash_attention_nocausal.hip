// Flash attention kernels, MASK_MODE 0: non-causal attention without a mask.
// One argument AttnParams. With FA_VARIANT_* defined (run-time compilation) only the variant
// the catalog names is emitted (src/kernels/catalog.rs spells its name); otherwise every
// FA_TILE_HIP row of flash_config.h, as flash_attention_nocausal_<f32|f16|bf16>_hd<bucket> on
// the SIMT body (the names the HSACO loader looks up).
#include "compat.h"
#include "attention_params.h"
#include "flash_entry.h"

#if defined(FA_VARIANT_DT)
FA_DEFINE_FLASH_VARIANT(0)
#elif FA_HIP
#define FA_TILE_HIP(dt, hd, bm, bn, th, sm) FA_DEFINE_FLASH_ROW(nocausal, 0, dt, hd, bm, bn, th, sm)
#include "flash_config.h"
#endif
