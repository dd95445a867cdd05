// Tile table of the flash kernels: one row per (dtype, head-dim bucket).
//   FA_TILE(dtype, HEAD_DIM_BUCKET, BLOCK_M, BLOCK_N, THREADS, SMEM_BYTES)
// Launch: grid = (ceil(seq_q / BLOCK_M), num_heads, batch), block = THREADS,
// dynamic shared memory = SMEM_BYTES. A runtime head_dim d runs on the smallest bucket >= d.
//
// Rows are parsed textually by the host: keep each on one line, literal values only.
//
// FA_TILE rows are for CUDA (up to 227 KiB of shared memory per block).
// FA_TILE_HIP rows are for AMD, where a workgroup gets at most 64 KiB of LDS.
//
// Shared memory holds f32 for every dtype (16-bit inputs are widened once, on the way in):
//   4 * (BLOCK_M*(DP+4) + BLOCK_N*(DP+4) + BLOCK_N*DP + BLOCK_N*(BLOCK_M+4))
// for Q, K, V and P^T, where DP is the bucket rounded up to a multiple of 32
// (bucket 80 computes on 96 columns). The kernel static_asserts this fits SMEM_BYTES.
//
// Each thread owns BLOCK_M/(THREADS/16) query rows and 1/16 of the S-tile columns and of
// the head dim, so the per-thread register tile is 8 x 4 (S) and 8 x DP/16 (O) on the
// BLOCK_M=128 rows, enough reuse per shared-memory load to keep FFMA the bottleneck.
// Buckets >= 160 halve BLOCK_M so the O accumulator stays within the register file.
// (The paragraphs above describe the f32 rows and every FA_TILE_HIP row.)
//
// f16/bf16 FA_TILE rows are sized for the tensor-core kernel (flash_attention_mma.h, CUDA
// sm_80+): 4 warps; up to bucket 128 each warp owns 32 query rows (BLOCK_M = 128) and
// BLOCK_N = 64, above it 16 rows (BLOCK_M = 64) and BLOCK_N = 32 so that the O accumulator
// fits the register file. Shared memory is
//   2 * (DP + 8) * (BLOCK_M + 4 * BLOCK_N)
// (16-bit Q, double-buffered K and V; DP = bucket rounded up to 16), or, where larger, what
// the row's split SIMT entry point needs (the host's choice for unaligned inputs and CUDA
// before sm_80: BLOCK_M / 32 SIMT tiles of 32 queries x 32 keys). The kernel static_asserts both fit. On H100 (bf16, B*S = 16384),
// 32 rows per warp beat 16 by ~40% at D = 128; BLOCK_N = 128 (D = 64), BLOCK_N = 64 or
// 8 warps (D = 256) measured slower.
#pragma once

#ifndef FA_TILE
#define FA_TILE(dt, hd, bm, bn, threads, smem)
#endif
#ifndef FA_TILE_HIP
#define FA_TILE_HIP(dt, hd, bm, bn, threads, smem)
#endif
#ifndef FA_TILE_SM90
#define FA_TILE_SM90(dt, hd, bm, bn, threads, smem)
#endif
#ifndef FA_TILE_SM90_WS
#define FA_TILE_SM90_WS(dt, hd, bm, bn, threads, smem)
#endif

FA_TILE(f32, 32, 128, 64, 256, 69632)
FA_TILE(f32, 64, 128, 64, 256, 102400)
FA_TILE(f32, 80, 128, 64, 256, 135168)
FA_TILE(f32, 96, 128, 64, 256, 135168)
FA_TILE(f32, 128, 128, 64, 256, 167936)
FA_TILE(f32, 160, 64, 64, 256, 142336)
FA_TILE(f32, 192, 64, 64, 256, 166912)
FA_TILE(f32, 224, 64, 64, 256, 191488)
FA_TILE(f32, 256, 64, 64, 256, 216064)
FA_TILE(f16, 32, 128, 64, 128, 30720)
FA_TILE(f16, 64, 128, 64, 128, 55296)
FA_TILE(f16, 80, 128, 64, 128, 67584)
FA_TILE(f16, 96, 128, 64, 128, 79872)
FA_TILE(f16, 128, 128, 64, 128, 104448)
FA_TILE(f16, 160, 64, 32, 128, 67072)
FA_TILE(f16, 192, 64, 32, 128, 79360)
FA_TILE(f16, 224, 64, 32, 128, 91648)
FA_TILE(f16, 256, 64, 32, 128, 103936)
FA_TILE(bf16, 32, 128, 64, 128, 30720)
FA_TILE(bf16, 64, 128, 64, 128, 55296)
FA_TILE(bf16, 80, 128, 64, 128, 67584)
FA_TILE(bf16, 96, 128, 64, 128, 79872)
FA_TILE(bf16, 128, 128, 64, 128, 104448)
FA_TILE(bf16, 160, 64, 32, 128, 67072)
FA_TILE(bf16, 192, 64, 32, 128, 79360)
FA_TILE(bf16, 224, 64, 32, 128, 91648)
FA_TILE(bf16, 256, 64, 32, 128, 103936)
// TF32 rows: f32 inputs on the tensor cores (opt-in, sm_80+): 16 query rows per warp,
// SMEM_BYTES = (BLOCK_M + 4 * BLOCK_N) * (bucket + 4) * 4 (flash_attention_tf32.h).
FA_TILE(tf32, 32, 64, 32, 128, 27648)
FA_TILE(tf32, 64, 64, 32, 128, 52224)
FA_TILE(tf32, 80, 64, 32, 128, 64512)
FA_TILE(tf32, 96, 64, 32, 128, 76800)
FA_TILE(tf32, 128, 64, 32, 128, 101376)
FA_TILE(tf32, 160, 64, 32, 128, 125952)
FA_TILE(tf32, 192, 64, 32, 128, 150528)
FA_TILE(tf32, 224, 64, 32, 128, 175104)
FA_TILE(tf32, 256, 64, 32, 128, 199680)
// FA_TILE_SM90 rows: f16/bf16 on Hopper (compute capability 9.0 exactly), where each replaces
// the FA_TILE row of its dtype and bucket. Hopper's warpgroup MMA kernel
// (flash_attention_wgmma.h, built for compute_90a): 64 query rows per 128-thread warpgroup,
// shared memory for the kernel is
//   2 * DP * (BLOCK_M + 4 * BLOCK_N) + 1024      (DP = bucket rounded up to 64)
// and SMEM_BYTES covers that and what the row's split SIMT entry point needs (unaligned
// inputs). Measured on H100 with
// scripts/wgmma-probe.sh (bf16, B*S = 16384, H = 2048/D, S = 512..8192, TFLOP/s non-causal):
//   D = 64:  128 x 128: 244-323; 192 x 128 (384 threads): 254-337 but slower causal;
//            128 x 64: 214-271; the mma.sync row 248-305
//   D = 128: 128 x 128: 395-415; 128 x 64: 344-361; 192 x 128: 367-383 (mma.sync 348-367)
//   D = 192: 128 x 96: 293-410; 128 x 64: 306-393 (mma.sync 199-233)
//   D = 256: 128 x 64: 343-461; 128 x 32: 277-337; 64 x 64 (128 threads): 244-329
//            (mma.sync 221-260)
// Buckets 160 and 224 take the rows of 192 and 256 (their DP); 80 and 96 compute 128
// columns on the rows of 128: with the warp-specialized kernel that is still 1.4x - 1.7x the
// mma.sync row (H200, bf16, S = 512 .. 8192: D = 80 269 - 410 vs 235 - 282 TFLOP/s).
FA_TILE_SM90(f16, 64, 128, 128, 256, 92160)
FA_TILE_SM90(f16, 80, 128, 128, 256, 174080)
FA_TILE_SM90(f16, 96, 128, 128, 256, 174080)
FA_TILE_SM90(f16, 128, 128, 128, 256, 174080)
FA_TILE_SM90(f16, 160, 128, 96, 256, 197632)
FA_TILE_SM90(f16, 192, 128, 96, 256, 204800)
FA_TILE_SM90(f16, 224, 128, 64, 256, 197632)
FA_TILE_SM90(f16, 256, 128, 64, 256, 202752)
FA_TILE_SM90(bf16, 64, 128, 128, 256, 92160)
FA_TILE_SM90(bf16, 80, 128, 128, 256, 174080)
FA_TILE_SM90(bf16, 96, 128, 128, 256, 174080)
FA_TILE_SM90(bf16, 128, 128, 128, 256, 174080)
FA_TILE_SM90(bf16, 160, 128, 96, 256, 197632)
FA_TILE_SM90(bf16, 192, 128, 96, 256, 204800)
FA_TILE_SM90(bf16, 224, 128, 64, 256, 197632)
FA_TILE_SM90(bf16, 256, 128, 64, 256, 202752)
// FA_TILE_SM90_WS rows: f16/bf16 on Hopper, the warp-specialized kernel
// (flash_attention_wgmma_ws.h: a TMA producer warpgroup and BLOCK_M / 64 math warpgroups,
// THREADS = 2 * BLOCK_M + 128), for plain calls whose Q, K and V TMA can address; it takes the
// place of the FA_TILE_SM90 row of its dtype and bucket there. Shared memory is
//   2 * DP * (BLOCK_M + 4 * BLOCK_N) + 80 + 1024   (two K / V stages, mbarriers, alignment)
// Measured on H200 with scripts/wgmma_ws_probe.cu (bf16, B*S = 16384, H = 2048/D, S = 8192,
// TFLOP/s non-causal / causal; the FA_TILE_SM90 kernel in the same run):
//   D = 64:  192 x 128: 555 / 496; 128 x 128: 451 / 420 (wgmma 319 / 312)
//   D = 128: 128 x 128: 697 / 635; 128 x 192: 665 / 649; 128 x 96, 3 stages: 591 / 569
//            (wgmma 451 / 417)
//   D = 256: 128 x 64: 736 / 646 (wgmma 543 / 481)
FA_TILE_SM90_WS(f16, 64, 192, 128, 512, 91216)
FA_TILE_SM90_WS(f16, 80, 128, 128, 384, 164944)
FA_TILE_SM90_WS(f16, 96, 128, 128, 384, 164944)
FA_TILE_SM90_WS(f16, 128, 128, 128, 384, 164944)
FA_TILE_SM90_WS(f16, 160, 128, 96, 384, 197712)
FA_TILE_SM90_WS(f16, 192, 128, 96, 384, 197712)
FA_TILE_SM90_WS(f16, 224, 128, 64, 384, 197712)
FA_TILE_SM90_WS(f16, 256, 128, 64, 384, 197712)
FA_TILE_SM90_WS(bf16, 64, 192, 128, 512, 91216)
FA_TILE_SM90_WS(bf16, 80, 128, 128, 384, 164944)
FA_TILE_SM90_WS(bf16, 96, 128, 128, 384, 164944)
FA_TILE_SM90_WS(bf16, 128, 128, 128, 384, 164944)
FA_TILE_SM90_WS(bf16, 160, 128, 96, 384, 197712)
FA_TILE_SM90_WS(bf16, 192, 128, 96, 384, 197712)
FA_TILE_SM90_WS(bf16, 224, 128, 64, 384, 197712)
FA_TILE_SM90_WS(bf16, 256, 128, 64, 384, 197712)

FA_TILE_HIP(f32, 32, 64, 64, 256, 44032)
FA_TILE_HIP(f32, 64, 64, 32, 256, 43008)
FA_TILE_HIP(f32, 80, 64, 32, 256, 59392)
FA_TILE_HIP(f32, 96, 64, 32, 256, 59392)
FA_TILE_HIP(f32, 128, 32, 32, 128, 54784)
FA_TILE_HIP(f32, 160, 32, 16, 128, 44032)
FA_TILE_HIP(f32, 192, 32, 16, 128, 52224)
FA_TILE_HIP(f32, 224, 32, 16, 128, 60416)
FA_TILE_HIP(f32, 256, 16, 16, 64, 50944)
FA_TILE_HIP(f16, 32, 64, 64, 256, 44032)
FA_TILE_HIP(f16, 64, 64, 32, 256, 43008)
FA_TILE_HIP(f16, 80, 64, 32, 256, 59392)
FA_TILE_HIP(f16, 96, 64, 32, 256, 59392)
FA_TILE_HIP(f16, 128, 32, 32, 128, 54784)
FA_TILE_HIP(f16, 160, 32, 16, 128, 44032)
FA_TILE_HIP(f16, 192, 32, 16, 128, 52224)
FA_TILE_HIP(f16, 224, 32, 16, 128, 60416)
FA_TILE_HIP(f16, 256, 16, 16, 64, 50944)
FA_TILE_HIP(bf16, 32, 64, 64, 256, 44032)
FA_TILE_HIP(bf16, 64, 64, 32, 256, 43008)
FA_TILE_HIP(bf16, 80, 64, 32, 256, 59392)
FA_TILE_HIP(bf16, 96, 64, 32, 256, 59392)
FA_TILE_HIP(bf16, 128, 32, 32, 128, 54784)
FA_TILE_HIP(bf16, 160, 32, 16, 128, 44032)
FA_TILE_HIP(bf16, 192, 32, 16, 128, 52224)
FA_TILE_HIP(bf16, 224, 32, 16, 128, 60416)
FA_TILE_HIP(bf16, 256, 16, 16, 64, 50944)
