//! The HSACO code objects that build.rs compiled with hipcc (feature `rocm`).

use std::path::PathBuf;

use super::KernelFile;
use crate::error::{AttentionError, Result};

/// Directory to load `<stem>.hsaco` files from instead of the build-time paths (for a
/// binary run on another machine than the one that built it).
pub const HSACO_DIR_ENV: &str = "FORGE_ATTN_HSACO_DIR";

/// The directory build.rs compiled the code objects into, if hipcc built them.
fn built_dir() -> Option<&'static str> {
    option_env!("FORGE_ATTN_HSACO_BUILT_DIR")
}

/// The AMD targets the HSACO objects were built for (comma separated), if they were built.
pub fn hip_archs_built() -> Option<&'static str> {
    option_env!("FORGE_ATTN_HIP_ARCHS_BUILT")
}

/// Path of the prebuilt HSACO code object holding every variant of `file`:
/// `<dir>/<file stem>.hsaco`, `<dir>` being `$FORGE_ATTN_HSACO_DIR` when that variable is
/// set, else the directory build.rs compiled into. Fails with
/// [`AttentionError::KernelBuild`] when hipcc was missing at build time or the file is not
/// there.
pub fn hsaco_path(file: KernelFile) -> Result<PathBuf> {
    let err = |log: String| AttentionError::KernelBuild {
        kernel: file.file_name().to_string(),
        log,
        source: None,
    };
    let dir = match std::env::var_os(HSACO_DIR_ENV).filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => match built_dir() {
            Some(d) => PathBuf::from(d),
            None => {
                return Err(err(
                    "kernels not built: hipcc was not found at build time (install hipcc and \
                     rebuild with --features rocm)"
                        .into(),
                ))
            }
        },
    };
    let path = dir.join(format!("{}.hsaco", file.stem()));
    if !path.is_file() {
        return Err(err(format!(
            "HSACO code object {} not found (set {HSACO_DIR_ENV} to a directory holding \
             <kernel file stem>.hsaco when running away from the build machine)",
            path.display()
        )));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{all_variants, TileVendor};

    const BUNDLE_MAGIC: &[u8] = b"__CLANG_OFFLOAD_BUNDLE__";
    const ELF_MAGIC: &[u8] = b"\x7fELF";

    /// The AMD GPU code objects in an HSACO file as (target, bytes): the entries of a clang
    /// offload bundle (what `hipcc --genco` writes; host entries skipped), or the file itself
    /// when it is a bare ELF code object (target `""`).
    fn code_objects(bytes: &[u8]) -> Result<Vec<(String, &[u8])>> {
        let bad = |why: &str| AttentionError::KernelBuild {
            kernel: "hsaco".into(),
            log: format!("not a code object or offload bundle: {why}"),
            source: None,
        };
        if bytes.starts_with(ELF_MAGIC) {
            return Ok(vec![(String::new(), bytes)]);
        }
        let body = bytes
            .strip_prefix(BUNDLE_MAGIC)
            .ok_or_else(|| bad("unknown magic"))?;
        let mut pos = 0usize;
        let read_u64 = |pos: &mut usize| -> Result<u64> {
            let field = body
                .get(*pos..*pos + 8)
                .ok_or_else(|| bad("truncated header"))?;
            *pos += 8;
            let mut le = [0u8; 8];
            le.copy_from_slice(field);
            Ok(u64::from_le_bytes(le))
        };
        let count = read_u64(&mut pos)?;
        let mut objects = Vec::new();
        for _ in 0..count {
            let offset = read_u64(&mut pos)? as usize;
            let size = read_u64(&mut pos)? as usize;
            let triple_len = read_u64(&mut pos)? as usize;
            let triple = body
                .get(pos..pos.saturating_add(triple_len))
                .ok_or_else(|| bad("truncated entry"))?;
            pos += triple_len;
            let triple = String::from_utf8_lossy(triple).into_owned();
            if triple.starts_with("host") || size == 0 {
                continue;
            }
            let object = bytes
                .get(offset..offset.saturating_add(size))
                .ok_or_else(|| bad("entry out of range"))?;
            objects.push((triple, object));
        }
        Ok(objects)
    }

    /// Whether an ELF code object names the symbol `name` (a NUL-delimited string-table entry).
    fn defines_symbol(object: &[u8], name: &str) -> bool {
        let mut needle = Vec::with_capacity(name.len() + 2);
        needle.push(0);
        needle.extend_from_slice(name.as_bytes());
        needle.push(0);
        object.windows(needle.len()).any(|w| w == needle.as_slice())
    }

    #[test]
    fn bundles_are_split_into_their_code_objects() {
        let mut b = BUNDLE_MAGIC.to_vec();
        let entries: [(&[u8], &[u8]); 2] = [
            (b"host-x86_64-unknown-linux", b""),
            (b"hipv4-amdgcn-amd-amdhsa--gfx1100", b"\x7fELF\0kern\0"),
        ];
        let header =
            BUNDLE_MAGIC.len() + 8 + entries.iter().map(|(t, _)| 24 + t.len()).sum::<usize>();
        b.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        let mut offset = header;
        for (t, o) in entries {
            b.extend_from_slice(&(offset as u64).to_le_bytes());
            b.extend_from_slice(&(o.len() as u64).to_le_bytes());
            b.extend_from_slice(&(t.len() as u64).to_le_bytes());
            b.extend_from_slice(t);
            offset += o.len();
        }
        for (_, o) in entries {
            b.extend_from_slice(o);
        }
        let objs = code_objects(&b).unwrap();
        assert_eq!(objs.len(), 1);
        assert_eq!(objs[0].0, "hipv4-amdgcn-amd-amdhsa--gfx1100");
        assert!(defines_symbol(objs[0].1, "kern"));
        assert!(!defines_symbol(objs[0].1, "ker"));
        assert!(code_objects(&b[..b.len() - 3]).is_err());
        assert!(code_objects(b"garbage").is_err());
        assert_eq!(code_objects(b"\x7fELF..").unwrap().len(), 1);
    }

    /// The variables a legacy build reads name the flash objects of the one built directory.
    #[test]
    fn legacy_variables_name_the_flash_objects_of_the_built_directory() {
        let required = std::env::var("FORGE_ATTN_REQUIRE_HSACO").is_ok_and(|v| v == "1");
        let Some(dir) = built_dir() else {
            assert!(!required, "kernels not built");
            eprintln!("skipped: kernels not built");
            return;
        };
        let legacy = [
            (
                KernelFile::FlashMasked,
                option_env!("FLASH_ATTENTION_HSACO"),
            ),
            (
                KernelFile::FlashCausal,
                option_env!("FLASH_ATTENTION_CAUSAL_HSACO"),
            ),
            (
                KernelFile::FlashNoCausal,
                option_env!("FLASH_ATTENTION_NCAUSAL_HSACO"),
            ),
        ];
        for (file, var) in legacy {
            let want = PathBuf::from(dir).join(format!("{}.hsaco", file.stem()));
            assert_eq!(var.map(PathBuf::from), Some(want.clone()), "{file}");
            assert!(want.is_file(), "{}", want.display());
        }
    }

    /// Every entry point of every kernel file is in every code object hipcc built (one per
    /// target of FORGE_ATTN_HIP_ARCHS), or in the objects of FORGE_ATTN_HSACO_DIR. Skips
    /// when the kernels were not built, unless FORGE_ATTN_REQUIRE_HSACO=1.
    #[test]
    fn hsaco_defines_every_variant() {
        let required = std::env::var("FORGE_ATTN_REQUIRE_HSACO").is_ok_and(|v| v == "1");
        let overridden = std::env::var_os(HSACO_DIR_ENV).is_some_and(|d| !d.is_empty());
        let specs = all_variants(TileVendor::Hip);
        let mut checked = 0;
        for file in KernelFile::ALL {
            let path = match hsaco_path(file) {
                Ok(p) => p,
                Err(e) => {
                    assert!(!required, "{e}");
                    eprintln!("skipped: {e}");
                    return;
                }
            };
            let bytes = std::fs::read(&path).unwrap();
            let objects = code_objects(&bytes).unwrap();
            assert!(!objects.is_empty(), "{}: no code object", path.display());
            if !overridden {
                for arch in hip_archs_built().unwrap_or("").split(',') {
                    assert!(
                        objects.iter().any(|(t, _)| t.ends_with(arch)),
                        "{}: no {arch} code object",
                        path.display()
                    );
                }
            }
            for (target, object) in &objects {
                for spec in specs.iter().filter(|s| s.file == file) {
                    assert!(
                        defines_symbol(object, &spec.name),
                        "{} ({target}): no entry point {}",
                        path.display(),
                        spec.name
                    );
                    checked += 1;
                }
            }
        }
        eprintln!("checked {checked} entry points");
    }
}
