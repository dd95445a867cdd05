//! NVRTC: one kernel variant at a time to PTX, cached in memory and on disk.
//!
//! A *compile unit* is a kernel file plus its `FA_VARIANT_*` defines; every entry point it
//! emits comes from one NVRTC run (e.g. `attn_scores_f16` and `attn_pv_f16`). Units are
//! cached in memory for the process and on disk across processes:
//!
//! * directory: `$FORGE_ATTN_KERNEL_CACHE` (empty, `0` or `off` disables the disk cache),
//!   else `$XDG_CACHE_HOME/forge-attn`, else `$HOME/.cache/forge-attn`;
//! * key: FNV-1a 64 of the compiler identity (NVRTC version), the options (architecture
//!   and defines included) and the full source after include expansion;
//! * entries are written to a temporary file and renamed into place; an unreadable,
//!   empty, truncated or otherwise corrupt entry is compiled again and rewritten; a
//!   directory that cannot be written just means no disk cache.
//!
//! The target is `--gpu-architecture=compute_XY` for a device of compute capability X.Y
//! (or the newest architecture this NVRTC knows that is not newer than the device);
//! `FORGE_ATTN_NVRTC_ARCH` (e.g. `compute_90a`) overrides it.

use std::collections::HashMap;
use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::nvrtc::{result, sys};

use super::{full_source, KernelFile, KernelSpec};
use crate::error::{AttentionError, ErrorSource, Result};

/// Overrides the NVRTC target architecture (`compute_XY[a|f]`, or `sm_XY` meaning the same).
pub const ARCH_ENV: &str = "FORGE_ATTN_NVRTC_ARCH";
/// Directory of the on-disk PTX cache; empty, `0` or `off` disables it.
pub const CACHE_ENV: &str = "FORGE_ATTN_KERNEL_CACHE";

/// Whether the NVRTC library can be loaded (probed once; never panics).
pub fn nvrtc_available() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(crate::cuda_probe::nvrtc_present)
}

fn nvrtc_missing() -> AttentionError {
    AttentionError::DeviceUnavailable {
        device: "cuda".into(),
        reason: format!(
            "NVRTC ({}) could not be loaded, so CUDA kernels cannot be compiled: install \
             the NVRTC of the CUDA version this build uses (e.g. the pip wheel \
             nvidia-cuda-nvrtc) and add its lib directory to LD_LIBRARY_PATH",
            crate::cuda_probe::nvrtc_name()
        ),
        source: None,
    }
}

/// NVRTC's (major, minor) version; requires [`nvrtc_available`].
fn nvrtc_version() -> Option<(i32, i32)> {
    static VERSION: OnceLock<Option<(i32, i32)>> = OnceLock::new();
    *VERSION.get_or_init(|| {
        if !nvrtc_available() {
            return None;
        }
        let (mut major, mut minor) = (0, 0);
        // SAFETY: the library is loaded; two valid out-pointers.
        let r = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
        (r == sys::nvrtcResult::NVRTC_SUCCESS).then_some((major, minor))
    })
}

/// Virtual architectures this NVRTC can target, as `10 * major + minor` (e.g. 90).
fn supported_archs() -> &'static [i32] {
    static ARCHS: OnceLock<Vec<i32>> = OnceLock::new();
    ARCHS.get_or_init(|| {
        if !nvrtc_available() {
            return Vec::new();
        }
        let mut n = 0;
        // SAFETY: the library is loaded; valid out-pointer.
        if unsafe { sys::nvrtcGetNumSupportedArchs(&mut n) } != sys::nvrtcResult::NVRTC_SUCCESS
            || n <= 0
        {
            return Vec::new();
        }
        let mut archs = vec![0; n as usize];
        // SAFETY: the buffer holds the `n` entries NVRTC reported.
        if unsafe { sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
            != sys::nvrtcResult::NVRTC_SUCCESS
        {
            return Vec::new();
        }
        archs
    })
}

/// Parses an architecture override: `compute_90`, `compute_90a`, `sm_90` (-> `compute_90`).
pub(crate) fn parse_arch(value: &str) -> Result<String> {
    let v = value.trim();
    let digits_and_suffix = v
        .strip_prefix("compute_")
        .or_else(|| v.strip_prefix("sm_"))
        .unwrap_or("");
    let digits: String = digits_and_suffix
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let suffix = &digits_and_suffix[digits.len()..];
    if digits.len() < 2 || !matches!(suffix, "" | "a" | "f") {
        return Err(AttentionError::InvalidConfig {
            field: "FORGE_ATTN_NVRTC_ARCH",
            reason: format!("expected compute_XY (optionally with a or f), got {value:?}"),
        });
    }
    Ok(format!("compute_{digits}{suffix}"))
}

/// The `--gpu-architecture` value for a device of compute capability `cc`.
pub(crate) fn target_arch(cc: (i32, i32)) -> Result<String> {
    if let Ok(v) = std::env::var(ARCH_ENV) {
        if !v.trim().is_empty() {
            return parse_arch(&v);
        }
    }
    choose_arch(cc, supported_archs())
}

/// `compute_<cc>`, or the newest of `supported` below it (PTX runs on newer devices).
pub(crate) fn choose_arch(cc: (i32, i32), supported: &[i32]) -> Result<String> {
    let want = cc.0 * 10 + cc.1;
    if supported.is_empty() || supported.contains(&want) {
        return Ok(format!("compute_{want}"));
    }
    match supported.iter().copied().filter(|&a| a <= want).max() {
        Some(a) => Ok(format!("compute_{a}")),
        None => Err(AttentionError::KernelBuild {
            kernel: "nvrtc".into(),
            log: format!(
                "this NVRTC targets compute_{}..compute_{}; the device is sm_{want}",
                supported.iter().min().copied().unwrap_or(0),
                supported.iter().max().copied().unwrap_or(0)
            ),
            source: None,
        }),
    }
}

/// NVRTC options of a variant for `arch`; an [arch-specific](KernelSpec::arch_specific)
/// variant is built for `compute_90a` where `arch` is `compute_90`.
pub(crate) fn nvrtc_options(spec: &KernelSpec, arch: &str) -> Vec<String> {
    let arch = if spec.arch_specific && arch == "compute_90" {
        "compute_90a"
    } else {
        arch
    };
    let mut opts = vec![
        format!("--gpu-architecture={arch}"),
        "-std=c++17".to_string(),
        "-default-device".to_string(),
    ];
    opts.extend(spec.defines.iter().map(|(k, v)| format!("-D{k}={v}")));
    opts
}

/// 64-bit FNV-1a over `parts`, with a 0 byte between parts (so boundaries count).
pub(crate) fn fnv1a64(parts: &[&[u8]]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let step = |h: u64, b: u8| (h ^ u64::from(b)).wrapping_mul(PRIME);
    let mut h = OFFSET;
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            h = step(h, 0);
        }
        h = part.iter().fold(h, |h, &b| step(h, b));
    }
    h
}

/// One NVRTC run: a file's expanded source and its options.
pub(crate) struct Job<'a> {
    /// The variant that asked for it (named in errors).
    pub kernel: &'a str,
    /// Source file (its name labels compiler messages).
    pub file: KernelFile,
    /// Source with includes expanded.
    pub source: &'a str,
    /// Compiler options.
    pub options: &'a [String],
}

/// Something that turns a [`Job`] into PTX: NVRTC, or a stand-in in tests.
pub(crate) trait PtxCompiler: Sync {
    /// Names the compiler and its version; part of the disk-cache key.
    fn identity(&self) -> String;
    /// Compiles the job to PTX text.
    fn compile(&self, job: &Job<'_>) -> Result<String>;
}

/// The NVRTC library through cudarc.
pub(crate) struct Nvrtc;

fn c_chars_to_string(chars: &[c_char]) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

impl PtxCompiler for Nvrtc {
    fn identity(&self) -> String {
        match nvrtc_version() {
            Some((major, minor)) => format!("nvrtc {major}.{minor}"),
            None => "nvrtc".into(),
        }
    }

    fn compile(&self, job: &Job<'_>) -> Result<String> {
        self.compile_with_log(job).map(|(ptx, _)| ptx)
    }
}

impl Nvrtc {
    /// Compiles `job`, returning the PTX and NVRTC's log (warnings; empty when clean).
    pub(crate) fn compile_with_log(&self, job: &Job<'_>) -> Result<(String, String)> {
        if !nvrtc_available() {
            return Err(nvrtc_missing());
        }
        let build_err = |log: String| AttentionError::KernelBuild {
            kernel: job.kernel.to_string(),
            log,
            source: None,
        };
        // The same, keeping NVRTC's error as the source.
        let nvrtc_err = |log: String, e: result::NvrtcError| AttentionError::KernelBuild {
            kernel: job.kernel.to_string(),
            log,
            source: Some(ErrorSource::new(e)),
        };
        let src = CString::new(job.source)
            .map_err(|_| build_err("kernel source contains a NUL byte".into()))?;
        let name = CString::new(job.file.file_name())
            .map_err(|_| build_err("file name contains a NUL byte".into()))?;
        if job.options.iter().any(|o| o.contains('\0')) {
            return Err(build_err("a compiler option contains a NUL byte".into()));
        }
        let prog = result::create_program(&src, Some(&name))
            .map_err(|e| nvrtc_err(format!("nvrtcCreateProgram: {e:?}"), e))?;
        // SAFETY: `prog` is live until destroyed below; options are NUL-free.
        let compiled = unsafe { result::compile_program(prog, job.options) };
        // SAFETY: as above.
        let log = unsafe { result::get_program_log(prog) }
            .map(|l| c_chars_to_string(&l))
            .unwrap_or_default();
        let ptx = match compiled {
            // SAFETY: as above; the program compiled.
            Ok(()) => unsafe { result::get_ptx(prog) }
                .map(|p| (c_chars_to_string(&p), log.trim_end().to_string()))
                .map_err(|e| nvrtc_err(format!("nvrtcGetPTX: {e:?}\n{log}"), e)),
            Err(e) => Err(nvrtc_err(
                format!(
                    "{} ({e:?}) with options [{}]\n{}",
                    job.file,
                    job.options.join(" "),
                    log.trim_end()
                ),
                e,
            )),
        };
        // SAFETY: destroyed once; nothing borrows it any more.
        let _ = unsafe { result::destroy_program(prog) };
        ptx
    }
}

/// (file, defines, arch): one NVRTC run.
type UnitKey = (KernelFile, Vec<(&'static str, String)>, String);

/// Compiled units in memory, backed by an optional disk directory.
pub(crate) struct PtxCache {
    memory: Mutex<HashMap<UnitKey, Arc<str>>>,
    disk: Option<PathBuf>,
}

const ENTRY_MAGIC: &str = "forge-attn-ptx 1";

impl PtxCache {
    /// A cache writing to `disk` (none: memory only).
    pub(crate) fn new(disk: Option<PathBuf>) -> Self {
        PtxCache {
            memory: Mutex::new(HashMap::new()),
            disk,
        }
    }

    /// PTX holding `spec`'s entry point, built for `arch` on first use.
    pub(crate) fn get(
        &self,
        spec: &KernelSpec,
        arch: &str,
        compiler: &dyn PtxCompiler,
    ) -> Result<Arc<str>> {
        let key: UnitKey = (spec.file, spec.defines.clone(), arch.to_string());
        let cached = self
            .memory
            .lock()
            .map_err(|_| poisoned())?
            .get(&key)
            .cloned();
        let ptx = match cached {
            Some(p) => p,
            None => {
                // Compiled outside the lock: other units may build meanwhile.
                let p: Arc<str> = self.build(spec, arch, compiler)?.into();
                self.memory
                    .lock()
                    .map_err(|_| poisoned())?
                    .entry(key)
                    .or_insert(p)
                    .clone()
            }
        };
        if !has_entry(&ptx, &spec.name) {
            return Err(AttentionError::KernelBuild {
                kernel: spec.name.clone(),
                log: format!(
                    "{} compiled with [{}] has no entry point {}",
                    spec.file,
                    nvrtc_options(spec, arch).join(" "),
                    spec.name
                ),
                source: None,
            });
        }
        Ok(ptx)
    }

    fn build(&self, spec: &KernelSpec, arch: &str, compiler: &dyn PtxCompiler) -> Result<String> {
        let source = full_source(spec.file);
        let options = nvrtc_options(spec, arch);
        let identity = compiler.identity();
        let path = self.disk.as_ref().map(|dir| {
            let opts = options.join("\u{1f}");
            let key = fnv1a64(&[
                ENTRY_MAGIC.as_bytes(),
                identity.as_bytes(),
                arch.as_bytes(),
                opts.as_bytes(),
                source.as_bytes(),
            ]);
            let stem = spec.file.stem();
            dir.join(format!("{stem}-{key:016x}.ptx"))
        });
        if let Some(ptx) = path.as_deref().and_then(read_entry) {
            return Ok(ptx);
        }
        let ptx = compiler.compile(&Job {
            kernel: &spec.name,
            file: spec.file,
            source: &source,
            options: &options,
        })?;
        if let Some(path) = &path {
            write_entry(path, &ptx);
        }
        Ok(ptx)
    }
}

fn poisoned() -> AttentionError {
    AttentionError::KernelBuild {
        kernel: "kernel cache".into(),
        log: "cache lock poisoned by an earlier panic".into(),
        source: None,
    }
}

/// Whether `ptx` defines the kernel `name`.
pub(crate) fn has_entry(ptx: &str, name: &str) -> bool {
    ptx.match_indices(".entry ").any(|(i, m)| {
        let rest = &ptx[i + m.len()..];
        rest.strip_prefix(name)
            .is_some_and(|r| r.starts_with(|c: char| c == '(' || c.is_whitespace()))
    })
}

/// A verified entry's PTX; `None` for anything missing, unreadable or corrupt.
pub(crate) fn read_entry(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let (header, body) = text.split_once('\n')?;
    let mut fields = header.strip_prefix(ENTRY_MAGIC)?.split_whitespace();
    let len: usize = fields.next()?.parse().ok()?;
    let hash = u64::from_str_radix(fields.next()?, 16).ok()?;
    let ok = fields.next().is_none()
        && len == body.len()
        && !body.is_empty()
        && hash == fnv1a64(&[body.as_bytes()]);
    ok.then(|| body.to_string())
}

/// Writes an entry atomically (temporary file, then rename); failures are ignored.
pub(crate) fn write_entry(path: &Path, ptx: &str) {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = dir.join(format!(
        ".tmp-{}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        path.file_name().and_then(|n| n.to_str()).unwrap_or("entry")
    ));
    let contents = format!(
        "{ENTRY_MAGIC} {} {:016x}\n{ptx}",
        ptx.len(),
        fnv1a64(&[ptx.as_bytes()])
    );
    if std::fs::write(&tmp, contents).is_err() || std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// The disk-cache directory chosen by the environment (see the module docs).
pub(crate) fn cache_dir_from_env() -> Option<PathBuf> {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(v) = std::env::var_os(CACHE_ENV) {
        return match v.to_str() {
            Some("" | "0" | "off") => None,
            _ => Some(PathBuf::from(v)),
        };
    }
    if let Some(xdg) = nonempty("XDG_CACHE_HOME").map(PathBuf::from) {
        if xdg.is_absolute() {
            return Some(xdg.join("forge-attn"));
        }
    }
    nonempty("HOME").map(|h| PathBuf::from(h).join(".cache").join("forge-attn"))
}

fn global_cache() -> &'static PtxCache {
    static CACHE: OnceLock<PtxCache> = OnceLock::new();
    CACHE.get_or_init(|| PtxCache::new(cache_dir_from_env()))
}

/// Compiles the variant `spec` to PTX for a device of compute capability `cc`
/// (e.g. `(9, 0)`), or returns it from the memory or disk cache.
///
/// Errors: [`AttentionError::DeviceUnavailable`] when NVRTC cannot be loaded,
/// [`AttentionError::KernelBuild`] with NVRTC's log when the variant does not compile or
/// lacks its entry point.
pub fn compile_ptx(spec: &KernelSpec, cc: (i32, i32)) -> Result<Arc<str>> {
    if !nvrtc_available() {
        return Err(nvrtc_missing());
    }
    let arch = target_arch(cc)?;
    global_cache().get(spec, &arch, &Nvrtc)
}
