//! Kernel table, naming, source expansion and compile-cache tests (no GPU needed).

use std::collections::HashSet;

use super::catalog::TraditionalKernel;
use super::source::{inline_includes, quoted_include};
use super::*;
use crate::dtype::DType;
use crate::error::AttentionError;

const BUCKETS: [usize; 9] = [32, 64, 80, 96, 128, 160, 192, 224, 256];
const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

#[test]
fn flash_table_parses_and_covers_every_dtype_and_bucket() {
    for vendor in [TileVendor::Cuda, TileVendor::Hip] {
        let tiles = flash_table(vendor).expect("kernels/flash_config.h parses");
        for dt in DTYPES {
            for hd in BUCKETS {
                let t = tiles
                    .iter()
                    .find(|t| t.dtype == dt && t.head_dim == hd)
                    .unwrap_or_else(|| panic!("no {} row for {dt} hd{hd}", vendor.macro_name()));
                assert!(t.block_m > 0 && t.block_n > 0 && t.threads > 0 && t.smem_bytes > 0);
            }
        }
    }
    assert_eq!(flash_tiles(), flash_table(TileVendor::Cuda).unwrap());
    // AMD workgroups get at most 64 KiB of LDS.
    for t in flash_table(TileVendor::Hip).unwrap() {
        assert!(t.smem_bytes <= 64 * 1024, "{t:?} exceeds 64 KiB");
    }
}

#[test]
fn malformed_table_lines_are_errors_naming_the_line() {
    let cases = [
        ("FA_TILE(f16, 64, 64, 64, 128)", "5 fields"),
        ("FA_TILE_HIP(f16, 64, 64, 64, 128, 1, 2)", "7 fields"),
        ("FA_TILE(f8, 64, 64, 64, 128, 1024)", "unknown dtype"),
        ("FA_TILE(f16, 64, 64, 0x40, 128, 1024)", "block_n"),
        ("FA_TILE(f16, 64, 64, 64, 128, 0)", "smem_bytes"),
        ("FA_TILE(f16, -64, 64, 64, 128, 1024)", "head_dim"),
        ("FA_TILE(f16, 64, 64, 64, 128, 1024", "not an FA_TILE"),
        ("FA_TILE(f16, 64, 64, 64, 128, 1024);", "not an FA_TILE"),
        ("FA_TILES(f16, 64, 64, 64, 128, 1024)", "not an FA_TILE"),
        (
            "FA_TILE(f32, 32, 64, 64, 64, 16384)",
            "duplicate FA_TILE row",
        ),
        ("garbage", "not an FA_TILE"),
    ];
    for (bad, why) in cases {
        let text = format!("// header\n#pragma once\nFA_TILE(f32, 32, 64, 64, 64, 16384)\n{bad}\n");
        match parse_flash_config(&text) {
            Err(AttentionError::KernelBuild { kernel, log, .. }) => {
                assert_eq!(kernel, "flash_config.h");
                assert!(log.contains("line 4"), "{bad}: {log}");
                assert!(log.contains(why), "{bad}: {log}");
            }
            other => panic!("{bad}: expected KernelBuild, got {other:?}"),
        }
    }
    assert!(parse_flash_config("// nothing\n").is_err());
    assert!(parse_flash_config("FA_TILE_HIP(f16, 64, 64, 64, 128, 1024)\n").is_err());
}

#[test]
fn table_accepts_comments_directives_and_both_vendors() {
    let text = "/* a\n   b */\n#ifndef FA_TILE\n#define FA_TILE(dt, hd, bm, bn, th, sm)\n#endif\n\
                  FA_TILE( bf16 ,128,64,32,128,32768 ) // x\n\
                FA_TILE(f32, 32, 64, 64, 64, 16384) /* y */\n\
                FA_TILE_HIP(f32, 32, 32, 32, 64, 8192)\n";
    let (cuda, sm90, hip) = parse_flash_config(text).expect("valid");
    assert!(sm90.is_empty());
    assert_eq!(
        cuda[0],
        FlashTile {
            dtype: DType::BF16,
            tf32: false,
            wgmma: false,
            warp_specialized: false,
            head_dim: 128,
            block_m: 64,
            block_n: 32,
            threads: 128,
            smem_bytes: 32768
        }
    );
    assert_eq!(cuda.len(), 2);
    // `tf32` rows are f32 rows of their own, named tf32, next to the f32 row of a bucket.
    let (cuda, _, _) = parse_flash_config(
        "FA_TILE(f32, 64, 64, 64, 128, 1024)\nFA_TILE(tf32, 64, 64, 32, 128, 2048)\n",
    )
    .unwrap();
    assert_eq!(cuda.len(), 2);
    assert!(cuda[1].tf32 && cuda[1].dtype == DType::F32 && !cuda[0].tf32);
    assert_eq!(cuda[1].kernel_dtype_name(), "tf32");
    assert_eq!(cuda[0].kernel_dtype_name(), "f32");
    assert!(parse_flash_config(
        "FA_TILE(tf32, 64, 64, 32, 128, 2048)\nFA_TILE(tf32, 64, 64, 32, 128, 2048)\n"
    )
    .is_err());
    assert_eq!(hip.len(), 1);
    assert_eq!(hip[0].block_m, 32);
    // Without FA_TILE_HIP rows, AMD uses the CUDA rows.
    let (cuda, _, hip) = parse_flash_config("FA_TILE(f16, 64, 64, 64, 128, 1024)\n").unwrap();
    assert_eq!(cuda, hip);
}

/// Each `(row, why)`: `text` with `row` added is refused with a KernelBuild error whose log
/// contains `why`.
fn assert_refused(text: &str, bad: &[(&str, &str)]) {
    for (row, why) in bad {
        match parse_flash_config(&format!("{text}{row}\n")) {
            Err(AttentionError::KernelBuild { log, .. }) => {
                assert!(log.contains(why), "{row}: {log}")
            }
            other => panic!("{row}: expected KernelBuild, got {other:?}"),
        }
    }
}

#[test]
fn sm90_rows_replace_their_bucket_and_are_checked() {
    let text = "FA_TILE(bf16, 64, 128, 64, 128, 1024)\nFA_TILE(bf16, 128, 128, 64, 128, 2048)\n\
                FA_TILE_SM90(bf16, 128, 128, 128, 256, 4096)\n";
    let (cuda, sm90, hip) = parse_flash_config(text).expect("valid");
    assert_eq!(cuda.len(), 2);
    assert_eq!(hip, cuda);
    assert_eq!(sm90.len(), 1);
    assert!(sm90[0].wgmma && !cuda[1].wgmma);
    assert_eq!((sm90[0].block_m, sm90[0].threads), (128, 256));
    let bad = [
        ("FA_TILE_SM90(f32, 128, 128, 128, 256, 4096)", "f16 or bf16"),
        (
            "FA_TILE_SM90(bf16, 128, 128, 128, 128, 4096)",
            "64 query rows per 128-thread",
        ),
        (
            "FA_TILE_SM90(bf16, 128, 96, 64, 192, 4096)",
            "64 query rows per 128-thread",
        ),
        (
            "FA_TILE_SM90(bf16, 128, 128, 64, 256, 4096)",
            "duplicate FA_TILE_SM90 row",
        ),
        (
            "FA_TILE_SM90(f16, 128, 128, 64, 256, 4096)",
            "no FA_TILE row",
        ),
        (
            "FA_TILE_SM90(bf16, 96, 128, 64, 256, 4096)",
            "no FA_TILE row",
        ),
    ];
    assert_refused(text, &bad);
}

#[test]
fn warp_specialized_rows_stand_in_for_an_sm90_row_and_are_checked() {
    let text = "FA_TILE(bf16, 64, 128, 64, 128, 1024)\nFA_TILE(bf16, 128, 128, 64, 128, 2048)\n\
                FA_TILE_SM90(bf16, 128, 128, 128, 256, 4096)\n";
    let table = tiles::parse_table(&format!(
        "{text}FA_TILE_SM90_WS(bf16, 128, 128, 128, 384, 8192)\n"
    ))
    .expect("valid");
    assert_eq!(table.sm90.len(), 1);
    let ws = &table.sm90_ws;
    assert_eq!(ws.len(), 1);
    assert!(ws[0].warp_specialized && !ws[0].wgmma && !table.sm90[0].warp_specialized);
    assert_eq!(
        (ws[0].block_m, ws[0].block_n, ws[0].threads),
        (128, 128, 384)
    );
    // The public parse keeps its three row sets; the warp-specialized rows are extra.
    let (cuda, sm90, _) = parse_flash_config(&format!(
        "{text}FA_TILE_SM90_WS(bf16, 128, 192, 128, 512, 8192)\n"
    ))
    .unwrap();
    assert_eq!((cuda.len(), sm90.len()), (2, 1));
    let bad = [
        ("FA_TILE_SM90_WS(f32, 128, 128, 128, 384, 8192)", "f16 or bf16"),
        ("FA_TILE_SM90_WS(bf16, 128, 128, 128, 256, 8192)", "one producer warpgroup"),
        ("FA_TILE_SM90_WS(bf16, 128, 64, 128, 256, 8192)", "one producer warpgroup"),
        ("FA_TILE_SM90_WS(bf16, 128, 256, 128, 640, 8192)", "one producer warpgroup"),
        ("FA_TILE_SM90_WS(bf16, 64, 128, 128, 384, 8192)", "no FA_TILE_SM90 row"),
        (
            "FA_TILE_SM90_WS(bf16, 128, 128, 128, 384, 8192)\nFA_TILE_SM90_WS(bf16, 128, 128, 64, 384, 8192)",
            "duplicate FA_TILE_SM90_WS row",
        ),
    ];
    assert_refused(text, &bad);
}

#[test]
fn warp_specialized_lookup_follows_the_sm90_bucket() {
    for dt in [DType::F16, DType::BF16] {
        for hd in 1..=256 {
            let sm90 = flash_tile_for_vendor(TileVendor::CudaSm90, dt, hd).unwrap();
            match flash_tile_ws(dt, hd) {
                // A warp-specialized row exactly where the bucket has a Hopper row.
                Some(ws) => {
                    assert!(sm90.wgmma, "{dt} hd{hd}");
                    assert_eq!((ws.dtype, ws.head_dim), (dt, sm90.head_dim));
                    assert_eq!(ws.threads, 2 * ws.block_m + 128);
                }
                None => assert!(
                    !sm90.wgmma,
                    "{dt} hd{hd}: Hopper row without a warp-specialized one"
                ),
            }
        }
    }
    assert!(flash_tile_ws(DType::F32, 128).is_none());
    assert!(flash_tile_ws(DType::BF16, 0).is_none());
    assert!(flash_tile_ws(DType::BF16, 257).is_none());
}

#[test]
fn sm90_lookup_uses_the_hopper_row_of_the_same_bucket() {
    let sm90 = flash_table(TileVendor::CudaSm90).expect("table parses");
    assert!(!sm90.is_empty());
    for dt in DTYPES {
        for hd in 1..=256 {
            let base = flash_tile_for_vendor(TileVendor::Cuda, dt, hd).unwrap();
            let got = flash_tile_for_vendor(TileVendor::CudaSm90, dt, hd).unwrap();
            let row = sm90
                .iter()
                .find(|t| t.dtype == dt && t.head_dim == base.head_dim);
            match row {
                Some(r) => assert_eq!(got, r, "{dt} hd{hd}"),
                None => assert_eq!(got, base, "{dt} hd{hd}"),
            }
            assert_eq!(got.head_dim, base.head_dim);
            assert_eq!(got.wgmma, row.is_some());
        }
        assert!(flash_tile_for_vendor(TileVendor::CudaSm90, dt, 0).is_none());
        assert!(flash_tile_for_vendor(TileVendor::CudaSm90, dt, 257).is_none());
    }
    // Every Hopper row covers f16 and bf16 alike, and TF32 stays on the FA_TILE rows.
    for t in sm90 {
        assert!(t.wgmma && t.dtype != DType::F32 && t.threads == 2 * t.block_m);
    }
    for hd in [32, 64, 128, 256] {
        assert_eq!(
            flash_tile_tf32(TileVendor::CudaSm90, hd),
            flash_tile_tf32(TileVendor::Cuda, hd)
        );
    }
}

#[test]
fn tile_lookup_takes_the_smallest_bucket_that_fits() {
    for vendor in [TileVendor::Cuda, TileVendor::Hip] {
        for dt in DTYPES {
            let hd_of = |d| flash_tile_for_vendor(vendor, dt, d).map(|t| t.head_dim);
            assert_eq!(hd_of(0), None);
            assert_eq!(hd_of(1), Some(32));
            assert_eq!(hd_of(32), Some(32));
            assert_eq!(hd_of(33), Some(64));
            assert_eq!(hd_of(65), Some(80));
            assert_eq!(hd_of(128), Some(128));
            assert_eq!(hd_of(129), Some(160));
            assert_eq!(hd_of(256), Some(256));
            assert_eq!(hd_of(257), None);
            assert_eq!(flash_tile_for_vendor(vendor, dt, 100).unwrap().dtype, dt);
        }
    }
    assert_eq!(
        flash_tile_for(DType::F16, 100),
        flash_tile_for_vendor(TileVendor::Cuda, DType::F16, 100)
    );
}

#[test]
fn variant_names_are_unique_and_follow_the_convention() {
    let specs = all_nvrtc_variants();
    let sm90 = flash_table(TileVendor::CudaSm90).unwrap();
    let ws = flash_table_ws().unwrap();
    assert!(!ws.is_empty());
    let tiles: Vec<FlashTile> = flash_tiles()
        .iter()
        .chain(sm90)
        .chain(ws)
        .copied()
        .collect();
    let flash_variants: usize = tiles
        .iter()
        .map(|t| FlashImpl::for_tile(t, TileVendor::Cuda).len())
        .sum();
    // Each flash variant plain and extended; decode: 27 kernels and 3 merges, plain and
    // with options.
    assert_eq!(
        specs.len(),
        // plain and `_ext` in all three files, `_paged` in the two unmasked ones
        (3 * 2 + 2) * flash_variants + 7 + 4 + 2 * (27 + 3) + 2
    );
    let mut names = HashSet::new();
    for s in &specs {
        assert!(
            names.insert(s.name.clone()),
            "duplicate entry point {}",
            s.name
        );
    }
    for file in KernelFile::FLASH {
        for t in &tiles {
            for &imp in FlashImpl::for_tile(t, TileVendor::Cuda) {
                let s = catalog::flash(file, t, imp);
                let expect = format!(
                    "flash_attention_{}_{}_hd{}{}{}",
                    file.flash_mode().unwrap(),
                    t.kernel_dtype_name(),
                    t.head_dim,
                    if t.wgmma || t.warp_specialized {
                        "_sm90"
                    } else {
                        ""
                    },
                    imp.name_suffix()
                );
                assert_eq!(s.name, expect);
                assert!(names.contains(&expect));
                assert_eq!(
                    s.arch_specific,
                    matches!(imp, FlashImpl::Wgmma | FlashImpl::WgmmaWs)
                );
                assert_eq!(s.implementation, Some(imp));
                let d: Vec<String> = s.defines.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let want = vec![
                    format!("FA_VARIANT_DT={}", t.kernel_dtype_name()),
                    format!("FA_VARIANT_HD={}", t.head_dim),
                    format!("FA_VARIANT_BM={}", t.block_m),
                    format!("FA_VARIANT_BN={}", t.block_n),
                    format!("FA_VARIANT_THREADS={}", t.threads),
                    format!("FA_VARIANT_SMEM={}", t.smem_bytes),
                    format!("FA_VARIANT_IMPL={}", imp.token()),
                    format!("FA_VARIANT_NAME={expect}"),
                ];
                assert_eq!(d, want);
                for (ext, suffix, level) in [
                    (FlashExt::Options, "_ext", "1"),
                    (FlashExt::Paged, "_paged", "2"),
                ] {
                    let x = catalog::flash_variant(file, t, imp, ext);
                    assert_eq!(x.name, format!("{expect}{suffix}"));
                    // Paged calls take no additive mask: no masked paged variant is built.
                    let listed = !(ext == FlashExt::Paged && file == KernelFile::FlashMasked);
                    assert_eq!(names.contains(&x.name), listed, "{}", x.name);
                    let mut want_x = want.clone();
                    want_x[7] = format!("FA_VARIANT_NAME={expect}{suffix}");
                    want_x.push(format!("FA_VARIANT_EXT={level}"));
                    let dx: Vec<String> =
                        x.defines.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    assert_eq!(dx, want_x);
                    assert_eq!(
                        (x.arch_specific, x.implementation),
                        (s.arch_specific, s.implementation)
                    );
                }
            }
        }
    }
    for dt in DTYPES {
        for hd in BUCKETS {
            assert!(names.contains(&format!("flash_decode_{dt}_hd{hd}")));
            assert!(names.contains(&format!("flash_decode_opt_{dt}_hd{hd}")));
            // The option variant is a compile unit of its own.
            let plain = catalog::decode(dt, hd);
            let opt = catalog::decode_with_options(dt, hd);
            assert_eq!(opt.defines[..2], plain.defines[..]);
            assert_eq!(opt.defines[2], ("FA_VARIANT_OPTS", "1".to_string()));
            assert_eq!(
                catalog::decode_combine_with_options(dt, hd).defines,
                opt.defines
            );
        }
        assert!(names.contains(&format!("flash_decode_combine_{dt}")));
        assert!(names.contains(&format!("flash_decode_combine_opt_{dt}")));
    }
    for n in [
        "attn_scores_f32",
        "attn_scores_f16",
        "attn_scores_bf16",
        "attn_softmax_rows",
        "attn_pv_f32",
        "attn_pv_f16",
        "attn_pv_bf16",
        "copy_strided_b2",
        "copy_strided_b4",
        "fill_b2",
        "fill_b4",
        "kv_append_b2",
        "kv_append_b4",
    ] {
        assert!(names.contains(n), "missing {n}");
    }
    // Every file but none is covered.
    for f in KernelFile::ALL {
        assert!(specs.iter().any(|s| s.file == f), "no variant of {f}");
    }
}

#[test]
fn tensor_core_variants_build_only_where_the_target_has_their_instructions() {
    let f16 = flash_tile_for(DType::F16, 128).unwrap();
    let tf32 = flash_tile_tf32(TileVendor::Cuda, 128).unwrap();
    let sm90 = flash_tile_for_vendor(TileVendor::CudaSm90, DType::F16, 128).unwrap();
    let f = KernelFile::FlashMasked;
    let cases = [
        (
            catalog::flash(f, f16, FlashImpl::MmaSync),
            [false, true, true, true, true],
        ),
        (
            catalog::flash(f, tf32, FlashImpl::Tf32),
            [false, true, true, true, true],
        ),
        (
            catalog::flash(f, sm90, FlashImpl::Wgmma),
            [false, false, true, true, false],
        ),
        (catalog::flash(f, f16, FlashImpl::SimtSplit), [true; 5]),
        (catalog::flash(f, sm90, FlashImpl::SimtSplit), [true; 5]),
        (catalog::decode(DType::F16, 128), [true; 5]),
    ];
    let archs = [
        "compute_75",
        "compute_80",
        "compute_90",
        "compute_90a",
        "compute_100",
    ];
    for (spec, want) in &cases {
        for (arch, &w) in archs.iter().zip(want) {
            assert_eq!(spec.builds_for(arch), w, "{} on {arch}", spec.name);
        }
    }
    assert!(!catalog::flash(f, f16, FlashImpl::MmaSync).builds_for("sm_90"));
}

#[test]
fn amd_flash_variants_are_simt_under_their_legacy_names() {
    let hip = flash_table(TileVendor::Hip).unwrap();
    let specs: Vec<KernelSpec> = all_variants(TileVendor::Hip)
        .into_iter()
        .filter(|s| KernelFile::FLASH.contains(&s.file))
        .collect();
    assert_eq!(specs.len(), 3 * hip.len());
    for s in &specs {
        assert_eq!(s.implementation, Some(FlashImpl::Simt), "{}", s.name);
        assert!(!s.arch_specific);
    }
    for file in KernelFile::FLASH {
        for t in hip {
            let name = format!(
                "flash_attention_{}_{}_hd{}",
                file.flash_mode().unwrap(),
                t.dtype,
                t.head_dim
            );
            assert!(specs.iter().any(|s| s.name == name), "missing {name}");
        }
    }
}

#[test]
fn spec_builders_share_dtype_free_units_and_never_alias_a_wrong_file() {
    let t = flash_tile_for(DType::F16, 64).unwrap();
    let odd = catalog::flash(KernelFile::Traditional, t, FlashImpl::Simt);
    assert!(!all_nvrtc_variants().iter().any(|s| s.name == odd.name));
    let a = catalog::traditional(TraditionalKernel::Softmax, DType::F16);
    let b = catalog::traditional(TraditionalKernel::Softmax, DType::BF16);
    assert_eq!(a, b);
    assert_eq!(
        catalog::traditional(TraditionalKernel::Scores, DType::BF16).defines,
        vec![("FA_VARIANT_DT", "bf16".to_string())]
    );
    assert!(catalog::fill(2).unwrap().defines.is_empty());
}

#[test]
fn every_kernel_file_is_embedded_verbatim() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut on_disk = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if path.is_file() && ["h", "hip", "cuh", "inc"].contains(&ext) {
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            let text = std::fs::read_to_string(&path).unwrap();
            assert_eq!(kernel_source(&name), Some(text.as_str()), "{name} differs");
            on_disk.push(name);
        }
    }
    on_disk.sort();
    let embedded: Vec<String> = kernel_sources()
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    assert_eq!(embedded, on_disk);
    for f in KernelFile::ALL {
        assert!(kernel_source(f.file_name()).is_some(), "{f} missing");
    }
}

#[test]
fn full_source_inlines_every_quoted_include_once() {
    for file in KernelFile::ALL {
        let src = full_source(file);
        for line in src.lines() {
            assert!(
                quoted_include(line).is_none(),
                "{file}: include left: {line}"
            );
            assert!(!line.contains("#error \"forge-attn"), "{file}: {line}");
        }
        // Every header the file reaches appears exactly once.
        for (name, _) in kernel_sources() {
            let marker = format!("#line 1 \"{name}\"");
            let n = src.lines().filter(|l| *l == marker).count();
            assert!(n <= 1, "{file}: {name} inlined {n} times");
        }
        assert!(src.starts_with(&format!("#line 1 \"{}\"", file.file_name())));
    }
}

#[test]
fn inlining_handles_nesting_repeats_and_missing_headers() {
    let lookup = |name: &str| -> Option<&'static str> {
        match name {
            "a.h" => Some("#pragma once\n#include \"b.h\"\nint a;\n"),
            "b.h" => Some("  #  pragma   once\nint b;\n"),
            _ => None,
        }
    };
    let root = "#include \"a.h\"\n# include \"b.h\"\n#include <hip/hip_runtime.h>\n#include \"zz.h\"\nint main_;\n";
    let out = inline_includes("root.hip", root, &lookup);
    assert_eq!(out.matches("int b;").count(), 1);
    assert_eq!(out.matches("int a;").count(), 1);
    assert!(!out.contains("pragma"));
    assert!(out.contains("#include <hip/hip_runtime.h>"));
    assert!(out.contains("#error \"forge-attn: root.hip includes zz.h"));
    assert!(out.find("int b;") < out.find("int a;"));
    // After a.h returns, line numbers resume at root.hip line 2.
    assert!(out.contains("#line 2 \"root.hip\""));
}

#[cfg(feature = "cuda")]
mod nvrtc_tests {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use super::super::nvrtc::*;
    use super::*;

    /// A scratch directory removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let p = std::env::temp_dir()
                .join(format!("forge-attn-{tag}-{}-{nanos}", std::process::id()));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Emits a fake PTX with one `.entry` per requested name, counting its runs.
    struct FakeCompiler {
        calls: AtomicUsize,
        entries: Vec<String>,
    }

    impl FakeCompiler {
        fn new(entries: &[&str]) -> Self {
            FakeCompiler {
                calls: AtomicUsize::new(0),
                entries: entries.iter().map(|s| s.to_string()).collect(),
            }
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl PtxCompiler for FakeCompiler {
        fn identity(&self) -> String {
            "fake 1.0".into()
        }
        fn compile(&self, job: &Job<'_>) -> crate::error::Result<String> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let mut ptx = format!("// {}\n.version 9.0\n", job.options.join(" "));
            for e in &self.entries {
                ptx.push_str(&format!(
                    ".visible .entry {e}(\n.param .align 8 .b8 p[8]\n)\n{{ ret; }}\n"
                ));
            }
            Ok(ptx)
        }
    }

    fn entries_in(dir: &std::path::Path) -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "ptx"))
            .collect()
    }

    #[test]
    fn fnv1a_matches_reference_vectors() {
        assert_eq!(fnv1a64(&[b""]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(&[b"a"]), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(&[b"foobar"]), 0x8594_4171_f739_67e8);
        assert_ne!(fnv1a64(&[b"ab", b"c"]), fnv1a64(&[b"a", b"bc"]));
    }

    #[test]
    fn options_pin_the_architecture_and_carry_the_defines() {
        let t = flash_tile_for(DType::BF16, 128).unwrap();
        let spec = catalog::flash(KernelFile::FlashCausal, t, FlashImpl::MmaSync);
        let opts = nvrtc_options(&spec, "compute_90");
        assert_eq!(opts[0], "--gpu-architecture=compute_90");
        assert!(opts.contains(&"-std=c++17".to_string()));
        assert!(opts.contains(&"-default-device".to_string()));
        assert!(opts.contains(&"-DFA_VARIANT_DT=bf16".to_string()));
        assert!(opts.contains(&"-DFA_VARIANT_HD=128".to_string()));
        assert!(opts.contains(&"-DFA_VARIANT_IMPL=mma".to_string()));
        assert!(
            opts.contains(&"-DFA_VARIANT_NAME=flash_attention_causal_bf16_hd128_mma".to_string())
        );
        assert!(opts.contains(&format!("-DFA_VARIANT_SMEM={}", t.smem_bytes)));
        // wgmma variants build for compute_90a on sm_90; the split SIMT variant of the same
        // FA_TILE_SM90 row builds for any target.
        for t in flash_table(TileVendor::CudaSm90).unwrap() {
            let spec = catalog::flash(KernelFile::FlashNoCausal, t, FlashImpl::Wgmma);
            assert!(spec.arch_specific);
            let arch_of = |a: &str| nvrtc_options(&spec, a)[0].clone();
            assert_eq!(arch_of("compute_90"), "--gpu-architecture=compute_90a");
            assert_eq!(arch_of("compute_90a"), "--gpu-architecture=compute_90a");
            assert!(nvrtc_options(&spec, "compute_90").contains(&"-DFA_VARIANT_IMPL=wgmma".into()));
            let split = catalog::flash(KernelFile::FlashNoCausal, t, FlashImpl::SimtSplit);
            assert!(!split.arch_specific);
            assert_eq!(
                nvrtc_options(&split, "compute_90")[0],
                "--gpu-architecture=compute_90"
            );
        }
    }

    #[test]
    fn architecture_choice_and_override_parsing() {
        assert_eq!(choose_arch((9, 0), &[]).unwrap(), "compute_90");
        assert_eq!(choose_arch((9, 0), &[75, 80, 90]).unwrap(), "compute_90");
        assert_eq!(
            choose_arch((8, 9), &[75, 80, 86, 90]).unwrap(),
            "compute_86"
        );
        assert!(choose_arch((6, 1), &[75, 80]).is_err());
        assert_eq!(parse_arch("sm_90").unwrap(), "compute_90");
        assert_eq!(parse_arch("compute_90a").unwrap(), "compute_90a");
        assert_eq!(parse_arch(" compute_80 ").unwrap(), "compute_80");
        for bad in ["", "90", "compute_", "compute_9", "compute_90x", "gfx1100"] {
            assert!(parse_arch(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn disk_cache_round_trip_and_corrupt_entries_are_rebuilt() {
        let dir = TempDir::new("ptx-cache");
        let spec = catalog::traditional(TraditionalKernel::Scores, DType::F16);
        let names = ["attn_scores_f16", "attn_pv_f16"];

        // First build compiles and writes one entry; a second lookup is a memory hit.
        let fake = FakeCompiler::new(&names);
        let cache = PtxCache::new(Some(dir.0.clone()));
        let ptx = cache.get(&spec, "compute_90", &fake).unwrap();
        assert!(has_entry(&ptx, "attn_scores_f16"));
        let pv = catalog::traditional(TraditionalKernel::Pv, DType::F16);
        cache.get(&pv, "compute_90", &fake).unwrap();
        assert_eq!(fake.calls(), 1, "one unit, one compile");
        let files = entries_in(&dir.0);
        assert_eq!(files.len(), 1);
        assert_eq!(read_entry(&files[0]).as_deref(), Some(&*ptx));

        // A fresh process (new cache) reads the disk entry without compiling.
        let fake2 = FakeCompiler::new(&names);
        let again = PtxCache::new(Some(dir.0.clone()))
            .get(&spec, "compute_90", &fake2)
            .unwrap();
        assert_eq!(fake2.calls(), 0);
        assert_eq!(again, ptx);

        // Another architecture is another entry.
        PtxCache::new(Some(dir.0.clone()))
            .get(&spec, "compute_80", &fake2)
            .unwrap();
        assert_eq!(fake2.calls(), 1);
        assert_eq!(entries_in(&dir.0).len(), 2);

        // Corrupt entries (truncated, garbage, empty, bad hash, unreadable) are rebuilt.
        let good = std::fs::read(&files[0]).unwrap();
        let mut flipped = good.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 0x20;
        let corruptions: Vec<Vec<u8>> = vec![
            good[..good.len() / 2].to_vec(),
            b"not a cache entry".to_vec(),
            Vec::new(),
            flipped,
            vec![0xff, 0xfe, 0x00, 0x80],
        ];
        for bad in corruptions {
            std::fs::write(&files[0], &bad).unwrap();
            let fake3 = FakeCompiler::new(&names);
            let rebuilt = PtxCache::new(Some(dir.0.clone()))
                .get(&spec, "compute_90", &fake3)
                .unwrap();
            assert_eq!(fake3.calls(), 1, "corrupt entry not rebuilt");
            assert_eq!(rebuilt, ptx);
            assert_eq!(
                read_entry(&files[0]).as_deref(),
                Some(&*ptx),
                "not rewritten"
            );
        }
        // A directory in place of the entry: read fails, write fails, the build still works.
        std::fs::remove_file(&files[0]).unwrap();
        std::fs::create_dir(&files[0]).unwrap();
        let fake4 = FakeCompiler::new(&names);
        PtxCache::new(Some(dir.0.clone()))
            .get(&spec, "compute_90", &fake4)
            .unwrap();
        assert_eq!(fake4.calls(), 1);
        // No temporary files are left behind.
        let leftovers: Vec<_> = std::fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn unwritable_cache_directory_is_skipped() {
        let dir = TempDir::new("ptx-unwritable");
        let blocker = dir.0.join("file");
        std::fs::write(&blocker, b"x").unwrap();
        // A cache "directory" below a regular file can never be created.
        let cache = PtxCache::new(Some(blocker.join("cache")));
        let fake = FakeCompiler::new(&["fill_b2"]);
        let ptx = cache
            .get(&catalog::fill(2).unwrap(), "compute_90", &fake)
            .unwrap();
        assert!(has_entry(&ptx, "fill_b2"));
        assert_eq!(fake.calls(), 1);
    }

    #[test]
    fn a_missing_entry_point_is_a_kernel_build_error() {
        let fake = FakeCompiler::new(&["something_else"]);
        let cache = PtxCache::new(None);
        match cache.get(&catalog::fill(4).unwrap(), "compute_90", &fake) {
            Err(AttentionError::KernelBuild { kernel, log, .. }) => {
                assert_eq!(kernel, "fill_b4");
                assert!(log.contains("no entry point fill_b4"), "{log}");
            }
            other => panic!("expected KernelBuild, got {other:?}"),
        }
        assert!(!has_entry(".visible .entry fill_b44(", "fill_b4"));
        assert!(has_entry(".visible .entry fill_b4(", "fill_b4"));
    }

    fn require_nvrtc() -> bool {
        if nvrtc_available() {
            return true;
        }
        let required = std::env::var("FORGE_ATTN_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "FORGE_ATTN_REQUIRE_NVRTC=1 but NVRTC could not be loaded (LD_LIBRARY_PATH={:?})",
            std::env::var("LD_LIBRARY_PATH").unwrap_or_default()
        );
        eprintln!("skipped: NVRTC (libnvrtc) not loadable; set LD_LIBRARY_PATH to run this test");
        false
    }

    #[test]
    fn nvrtc_reports_compile_errors_with_the_log() {
        if !require_nvrtc() {
            return;
        }
        let opts = vec!["--gpu-architecture=compute_80".to_string()];
        let job = Job {
            kernel: "broken",
            file: KernelFile::TensorOps,
            source: "extern \"C\" __global__ void broken() { undeclared_thing = 1; }\n",
            options: &opts,
        };
        match Nvrtc.compile(&job) {
            Err(AttentionError::KernelBuild { kernel, log, .. }) => {
                assert_eq!(kernel, "broken");
                assert!(log.contains("undeclared_thing"), "{log}");
            }
            other => panic!("expected KernelBuild, got {other:?}"),
        }
    }

    /// Compiles every variant of every kernel file with the real NVRTC for compute_90 and
    /// compute_80 (no GPU needed), bypassing all caches, and checks each entry point is in
    /// the PTX. Skips when NVRTC is not loadable, unless `FORGE_ATTN_REQUIRE_NVRTC=1`.
    #[test]
    fn nvrtc_compiles_every_variant() {
        if !require_nvrtc() {
            return;
        }
        flash_table(TileVendor::Cuda).expect("flash_config.h parses");
        let mut specs = all_nvrtc_variants();
        // FORGE_ATTN_NVRTC_FILTER=<substring> compiles only the variants whose name has it.
        if let Ok(f) = std::env::var("FORGE_ATTN_NVRTC_FILTER") {
            specs.retain(|s| s.name.contains(&f));
        }
        // One NVRTC run per compile unit (file + defines); its entry points are checked.
        let mut units: Vec<(KernelSpec, Vec<String>)> = Vec::new();
        for s in &specs {
            match units
                .iter_mut()
                .find(|(u, _)| u.file == s.file && u.defines == s.defines)
            {
                Some((_, names)) => names.push(s.name.clone()),
                None => units.push((s.clone(), vec![s.name.clone()])),
            }
        }
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let mut failures = Vec::new();
        let warnings = std::sync::Mutex::new(Vec::<String>::new());
        for arch in ["compute_90", "compute_80"] {
            let start = Instant::now();
            let next = AtomicUsize::new(0);
            let results = std::sync::Mutex::new(Vec::new());
            std::thread::scope(|scope| {
                for _ in 0..threads {
                    scope.spawn(|| loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        let Some((spec, names)) = units.get(i) else {
                            break;
                        };
                        if !spec.builds_for(arch) {
                            continue;
                        }
                        let source = full_source(spec.file);
                        let options = nvrtc_options(spec, arch);
                        let job = Job {
                            kernel: &spec.name,
                            file: spec.file,
                            source: &source,
                            options: &options,
                        };
                        let outcome = match Nvrtc.compile_with_log(&job) {
                            Ok((ptx, log)) => {
                                if !log.is_empty() {
                                    warnings.lock().unwrap().push(format!(
                                        "{arch} {} [{}]:\n{log}",
                                        spec.file,
                                        options.join(" ")
                                    ));
                                }
                                names
                                    .iter()
                                    .filter(|n| !has_entry(&ptx, n))
                                    .map(|n| format!("{arch}: {n}: entry point missing from PTX"))
                                    .collect::<Vec<_>>()
                            }
                            Err(e) => vec![format!("{arch}: {e}")],
                        };
                        results.lock().unwrap().extend(outcome);
                    });
                }
            });
            let errs = results.into_inner().unwrap();
            eprintln!(
                "nvrtc {arch}: {} units ({} variants) in {:.1}s, {} failure(s)",
                units.len(),
                specs.len(),
                start.elapsed().as_secs_f64(),
                errs.len()
            );
            failures.extend(errs);
        }
        // Warnings do not fail the check; the first few are shown.
        let warnings = warnings.into_inner().unwrap();
        if !warnings.is_empty() {
            eprintln!("{} compile unit(s) with NVRTC warnings:", warnings.len());
            for w in warnings.iter().take(3) {
                eprintln!("{}\n", truncate(w, 2000));
            }
        }
        if !failures.is_empty() {
            for f in &failures {
                eprintln!("{}\n", truncate(f, 4000));
            }
            panic!("{} NVRTC failure(s)", failures.len());
        }
    }

    /// On a CUDA device: every variant compiles through [`compile_ptx`] (memory and disk
    /// cache included) for the device's architecture, and the driver loads it (PTX -> SASS,
    /// so ptxas limits such as shared memory and registers are checked too). Prints the
    /// variants that spill to local memory.
    #[test]
    #[ignore = "needs a GPU"]
    fn every_variant_loads_on_the_cuda_device() {
        use cudarc::driver::{result, sys};
        use std::ffi::CString;

        assert!(crate::cuda_probe::driver_present(), "no CUDA driver");
        // SAFETY: plain driver calls on device 0.
        result::init().unwrap();
        let dev = result::device::get(0).unwrap();
        let ctx = unsafe { result::primary_ctx::retain(dev) }.unwrap();
        unsafe { result::ctx::set_current(ctx) }.unwrap();
        use sys::CUdevice_attribute_enum as A;
        let attr = |a| unsafe { result::device::get_attribute(dev, a) }.unwrap();
        let cc = (
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
        );
        let arch = target_arch(cc).unwrap();
        let specs: Vec<KernelSpec> = all_nvrtc_variants()
            .into_iter()
            .filter(|s| s.builds_for(&arch))
            .collect();
        eprintln!(
            "device sm_{}{}, NVRTC target {arch}, cache {:?}",
            cc.0,
            cc.1,
            cache_dir_from_env()
        );

        let start = Instant::now();
        let next = AtomicUsize::new(0);
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let ptx: Vec<std::sync::Mutex<Option<crate::error::Result<std::sync::Arc<str>>>>> =
            specs.iter().map(|_| std::sync::Mutex::new(None)).collect();
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(spec) = specs.get(i) else { break };
                    *ptx[i].lock().unwrap() = Some(compile_ptx(spec, cc));
                });
            }
        });
        eprintln!(
            "compile_ptx: {} variants in {:.1}s",
            specs.len(),
            start.elapsed().as_secs_f64()
        );

        let start = Instant::now();
        let mut failures = Vec::new();
        let mut spills = Vec::new();
        for (spec, p) in specs.iter().zip(&ptx) {
            let p = p.lock().unwrap().take().unwrap();
            let p = match p {
                Ok(p) => p,
                Err(e) => {
                    failures.push(format!("{}: {e}", spec.name));
                    continue;
                }
            };
            let image = CString::new(p.as_bytes()).unwrap();
            let module = match unsafe { result::module::load_data(image.as_ptr().cast()) } {
                Ok(m) => m,
                Err(e) => {
                    failures.push(format!("{}: cuModuleLoadData: {e:?}", spec.name));
                    continue;
                }
            };
            let name = CString::new(spec.name.as_str()).unwrap();
            match unsafe { result::module::get_function(module, name) } {
                Ok(f) => {
                    use sys::CUfunction_attribute_enum as F;
                    let fattr = |a| unsafe { result::function::get_function_attribute(f, a) };
                    let regs = fattr(F::CU_FUNC_ATTRIBUTE_NUM_REGS).unwrap_or(-1);
                    let local = fattr(F::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES).unwrap_or(-1);
                    if local != 0 {
                        spills.push(format!("{} regs={regs} local={local}B", spec.name));
                    }
                }
                Err(e) => failures.push(format!("{}: cuModuleGetFunction: {e:?}", spec.name)),
            }
            let _ = unsafe { result::module::unload(module) };
        }
        eprintln!(
            "loaded {} variants in {:.1}s",
            specs.len(),
            start.elapsed().as_secs_f64()
        );
        if !spills.is_empty() {
            eprintln!(
                "{} variant(s) use local memory:\n  {}",
                spills.len(),
                spills.join("\n  ")
            );
        }
        for f in &failures {
            eprintln!("{}\n", truncate(f, 3000));
        }
        assert!(failures.is_empty(), "{} variant(s) failed", failures.len());
    }

    fn truncate(s: &str, max: usize) -> &str {
        match s.char_indices().nth(max) {
            Some((i, _)) => &s[..i],
            None => s,
        }
    }
}

#[test]
fn every_kernel_id_names_its_catalog_variant_once() {
    let mut specs = HashSet::new();
    let mut names = HashSet::new();
    for (i, id) in KernelId::all().enumerate() {
        assert_eq!(id.index(), i);
        let spec = id.spec();
        assert_eq!(id.name(), spec.name, "{id:?}");
        // A combine kernel has one id per compile unit (bucket); every other name one id.
        if !spec.name.starts_with("flash_decode_combine") {
            assert!(names.insert(spec.name.clone()), "{} twice", spec.name);
        }
        assert!(specs.insert(spec.clone()), "{spec:?} twice");
    }
    assert_eq!(specs.len(), KernelId::COUNT);
    // Every id stands for a variant the build provides, with its defines.
    let listed: Vec<KernelSpec> = all_variants(TileVendor::Cuda);
    for id in KernelId::all() {
        let spec = id.spec();
        let same_name: Vec<&KernelSpec> = listed.iter().filter(|s| s.name == spec.name).collect();
        assert!(!same_name.is_empty(), "{} not in the catalog", spec.name);
        // The combine kernels are listed from one bucket's unit; their ids name each unit.
        if !spec.name.starts_with("flash_decode_combine") {
            assert_eq!(same_name, [&spec]);
        }
    }
}

#[test]
fn kernel_ids_map_to_the_catalog_functions() {
    for dt in DTYPES {
        for b in BUCKETS {
            for opts in [false, true] {
                let main = KernelId::decode(dt, b, opts).unwrap();
                let merge = KernelId::decode_combine(dt, b, opts).unwrap();
                let (want_main, want_merge) = if opts {
                    (
                        catalog::decode_with_options(dt, b),
                        catalog::decode_combine_with_options(dt, b),
                    )
                } else {
                    (catalog::decode(dt, b), catalog::decode_combine(dt, b))
                };
                assert_eq!(main.spec(), want_main);
                assert_eq!(merge.spec(), want_merge);
            }
        }
        for k in TraditionalKernel::ALL {
            let id = KernelId::traditional(k, dt).unwrap();
            assert_eq!(id.spec(), catalog::traditional(k, dt));
        }
    }
    for bytes in [2, 4] {
        assert_eq!(
            KernelId::copy_strided(bytes).unwrap().spec(),
            catalog::copy_strided(bytes).unwrap()
        );
        assert_eq!(
            KernelId::fill(bytes).unwrap().spec(),
            catalog::fill(bytes).unwrap()
        );
        assert_eq!(
            KernelId::kv_append(bytes).unwrap().spec(),
            catalog::kv_append(bytes).unwrap()
        );
    }
    // Outside the catalog: no id.
    assert_eq!(KernelId::decode(DType::I32, 128, false), None);
    assert_eq!(KernelId::decode(DType::F16, 100, false), None);
    assert_eq!(KernelId::decode_combine(DType::F16, 512, true), None);
    assert_eq!(
        KernelId::traditional(TraditionalKernel::Pv, DType::U32),
        None
    );
    assert_eq!(KernelId::copy_strided(8), None);
    assert_eq!(KernelId::fill(1), None);
    assert_eq!(KernelId::kv_append(3), None);
}
