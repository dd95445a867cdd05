//! Build script.
//!
//! Always: writes `$OUT_DIR/kernel_sources.rs`, which embeds every source file of
//! `kernels/` with `include_str!` (a directory listing and one small file; no compiler runs).
//!
//! With the `rocm` feature: compiles every `kernels/*.hip` to an HSACO code object with
//! `hipcc --genco` for the targets in `FORGE_ATTN_HIP_ARCHS` (comma separated, default
//! `gfx1100`; `FORGE_ATTN_HIPCC_FLAGS` adds flags), `kernels/<stem>.hip` to
//! `$OUT_DIR/hsaco/<stem>.hsaco`, and exports that directory as `FORGE_ATTN_HSACO_BUILT_DIR`
//! (read by `src/kernels/hsaco.rs`, which derives each file's name from its kernel file).
//! The three flash objects' paths are also exported under the names a legacy build reads
//! (`legacy_env_var`). Without hipcc the build warns and exports nothing; the ROCm
//! backend then reports "kernels not built" at run time. A kernel that fails to compile
//! fails the build with hipcc's log.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Kernel sources are the files in `kernels/` with one of these extensions.
const SOURCE_EXTENSIONS: [&str; 4] = ["h", "hip", "cuh", "inc"];

/// Default HIP offload targets (RX 7900 XT class).
const DEFAULT_HIP_ARCHS: &str = "gfx1100";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");

    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let kernel_dir = manifest_dir.join("kernels");
    let sources = list_sources(&kernel_dir);
    write_embedded_sources(&sources, &out_dir);

    if env::var_os("CARGO_FEATURE_ROCM").is_some() {
        build_hsaco(&kernel_dir, &sources, &out_dir);
    }
}

/// Every kernel source file in `dir`, sorted by name.
fn list_sources(dir: &Path) -> Vec<PathBuf> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => fail(&format!("cannot read {}: {e}", dir.display())),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            p.extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| SOURCE_EXTENSIONS.contains(&x))
        })
        .collect();
    files.sort();
    files
}

fn file_name(path: &Path) -> String {
    match path.file_name().and_then(|n| n.to_str()) {
        Some(n) => n.to_string(),
        None => fail(&format!(
            "kernel file name is not UTF-8: {}",
            path.display()
        )),
    }
}

/// `KERNEL_SOURCES: &[(&str, &str)]`: (file name, contents) of every kernel source.
fn write_embedded_sources(sources: &[PathBuf], out_dir: &Path) {
    let mut code = String::from(
        "/// (file name, contents) of every source file in `kernels/`, sorted by name.\n\
         pub(crate) static KERNEL_SOURCES: &[(&str, &str)] = &[\n",
    );
    for path in sources {
        let abs = path
            .to_str()
            .unwrap_or_else(|| fail(&format!("kernel path is not UTF-8: {}", path.display())));
        // `{:?}` writes a valid Rust string literal (escapes quotes and backslashes).
        let _ = writeln!(
            code,
            "    ({:?}, include_str!({:?})),",
            file_name(path),
            abs
        );
    }
    code.push_str("];\n");
    write_if_changed(&out_dir.join("kernel_sources.rs"), &code);
}

fn write_if_changed(path: &Path, contents: &str) {
    if fs::read_to_string(path).is_ok_and(|old| old == contents) {
        return;
    }
    if let Err(e) = fs::write(path, contents) {
        fail(&format!("cannot write {}: {e}", path.display()));
    }
}

/// The variable a legacy build reads a flash object's path from, for the files
/// `flash_attention_<mode>.hip`: `FLASH_ATTENTION_<MODE>_HSACO`, the masked family being
/// the unqualified `FLASH_ATTENTION_HSACO` and the non-causal one `NCAUSAL`. `None` for
/// every other file (those are found through the directory only).
fn legacy_env_var(stem: &str) -> Option<String> {
    let mode = stem.strip_prefix("flash_attention_")?;
    let word = match mode {
        "masked" => String::new(),
        "nocausal" => "NCAUSAL_".into(),
        other => format!("{}_", other.to_ascii_uppercase()),
    };
    Some(format!("FLASH_ATTENTION_{word}HSACO"))
}

fn hip_archs() -> Vec<String> {
    let raw = env::var("FORGE_ATTN_HIP_ARCHS").unwrap_or_else(|_| DEFAULT_HIP_ARCHS.into());
    let archs: Vec<String> = raw
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(String::from)
        .collect();
    if archs.is_empty() {
        fail("FORGE_ATTN_HIP_ARCHS is set but names no target (expected e.g. gfx1100,gfx90a)");
    }
    for a in &archs {
        let ok = a.starts_with("gfx")
            && a.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '+' | '-' | '_'));
        if !ok {
            fail(&format!(
                "FORGE_ATTN_HIP_ARCHS: {a:?} is not an AMD GPU target (expected e.g. gfx1100, gfx90a, gfx942)"
            ));
        }
    }
    archs
}

/// hipcc: `$HIPCC`, else on `PATH`, else under `$HIP_PATH`/`$ROCM_PATH`/`/opt/rocm`.
fn find_hipcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("HIPCC") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let on_path = env::var_os("PATH")
        .map(|paths| env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default();
    let roots = ["HIP_PATH", "ROCM_PATH"]
        .iter()
        .filter_map(env::var_os)
        .map(|r| PathBuf::from(r).join("bin"))
        .chain([PathBuf::from("/opt/rocm/bin")]);
    on_path
        .into_iter()
        .chain(roots)
        .map(|dir| dir.join("hipcc"))
        .find(|p| p.is_file())
}

/// (kernel file name, HSACO path, hipcc result).
type Outcome = (String, PathBuf, Result<(), String>);

fn build_hsaco(kernel_dir: &Path, sources: &[PathBuf], out_dir: &Path) {
    for var in [
        "FORGE_ATTN_HIP_ARCHS",
        "FORGE_ATTN_HIPCC_FLAGS",
        "HIPCC",
        "HIP_PATH",
        "ROCM_PATH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let archs = hip_archs();
    let Some(hipcc) = find_hipcc() else {
        println!(
            "cargo:warning=forge-attn: hipcc not found (PATH, $HIPCC, $HIP_PATH, $ROCM_PATH, \
             /opt/rocm): HIP kernels not built; the ROCm backend will report \"kernels not built\" \
             (after installing hipcc, `touch build.rs` or set HIPCC to rebuild them)"
        );
        return;
    };
    let hsaco_dir = out_dir.join("hsaco");
    if let Err(e) = fs::create_dir_all(&hsaco_dir) {
        fail(&format!("cannot create {}: {e}", hsaco_dir.display()));
    }
    let jobs: Vec<&PathBuf> = sources
        .iter()
        .filter(|p| p.extension().is_some_and(|x| x == "hip"))
        .collect();
    let threads = env::var("NUM_JOBS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(1)
        .clamp(1, jobs.len().max(1));

    let next = Mutex::new(0usize);
    let results: Mutex<Vec<Outcome>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = {
                    let mut n = next.lock().unwrap_or_else(|e| e.into_inner());
                    *n += 1;
                    *n - 1
                };
                let Some(src) = jobs.get(i) else { break };
                let name = file_name(src);
                let out = hsaco_dir.join(format!("{}.hsaco", name.trim_end_matches(".hip")));
                let r = run_hipcc(&hipcc, &archs, kernel_dir, src, &out);
                results
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((name, out, r));
            });
        }
    });

    let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    results.sort_by(|a, b| a.0.cmp(&b.0));
    let failures: Vec<String> = results
        .iter()
        .filter_map(|(name, _, r)| r.as_ref().err().map(|log| format!("{name}:\n{log}")))
        .collect();
    if !failures.is_empty() {
        fail(&format!(
            "hipcc failed for {} kernel file(s) (targets {}):\n{}",
            failures.len(),
            archs.join(","),
            failures.join("\n")
        ));
    }
    println!(
        "cargo:rustc-env=FORGE_ATTN_HSACO_BUILT_DIR={}",
        hsaco_dir.display()
    );
    for (name, out, _) in &results {
        if let Some(var) = legacy_env_var(name.trim_end_matches(".hip")) {
            println!("cargo:rustc-env={var}={}", out.display());
        }
    }
    println!(
        "cargo:rustc-env=FORGE_ATTN_HIP_ARCHS_BUILT={}",
        archs.join(",")
    );
}

/// Extra hipcc flags from `FORGE_ATTN_HIPCC_FLAGS` (whitespace separated), e.g.
/// `--rocm-device-lib-path=DIR` where the distribution lacks a target's device library.
fn extra_hipcc_flags() -> Vec<String> {
    env::var("FORGE_ATTN_HIPCC_FLAGS")
        .map(|f| f.split_whitespace().map(String::from).collect())
        .unwrap_or_default()
}

fn run_hipcc(
    hipcc: &Path,
    archs: &[String],
    kernel_dir: &Path,
    src: &Path,
    out: &Path,
) -> Result<(), String> {
    let mut cmd = Command::new(hipcc);
    cmd.arg("--genco");
    for a in archs {
        cmd.arg(format!("--offload-arch={a}"));
    }
    cmd.args(["-O3", "-std=c++17", "-I"])
        .arg(kernel_dir)
        .args(extra_hipcc_flags())
        .arg("-o")
        .arg(out)
        .arg(src);
    let shown = format!("{cmd:?}");
    match cmd.output() {
        Err(e) => Err(format!("{shown}: could not run hipcc: {e}")),
        Ok(o) if o.status.success() && out.is_file() => Ok(()),
        Ok(o) => Err(format!(
            "{shown}\nexit: {}\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )),
    }
}

/// Stops the build with a message (build scripts report errors by exiting non-zero).
fn fail(msg: &str) -> ! {
    eprintln!("error: forge-attn build: {msg}");
    std::process::exit(1)
}
