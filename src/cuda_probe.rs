//! Whether the CUDA driver and NVRTC libraries can be opened, asked without touching
//! cudarc's loader.
//!
//! cudarc either loads its libraries at run time (its `dynamic-loading` mode, the one this
//! crate asks for) or has them linked in (its `dynamic-linking` / `static-linking` modes,
//! which another crate in the same build, candle among them, may select). Which mode
//! wins is decided in cudarc's build script, after this crate is configured, and cudarc's
//! own presence probe exists only in the loading mode. So this crate opens the libraries
//! itself under names cudarc's loader also tries: whenever this probe finds one, so does
//! cudarc, and in the linked modes the library is already part of the process, so the
//! probe finds it too. A failed probe means "no CUDA here", never a panic.

use std::ffi::OsStr;

use cudarc::driver::sys::CUDA_VERSION;

/// The CUDA major version of the bindings cudarc was built with (13 for 13.0).
const CUDA_MAJOR: u32 = CUDA_VERSION / 1000;

/// File names of the driver library, most specific first.
fn driver_names() -> Vec<String> {
    if cfg!(windows) {
        vec!["nvcuda.dll".into()]
    } else {
        // The driver's soname first: machines without the toolkit often lack the
        // unversioned development link.
        vec!["libcuda.so.1".into(), "libcuda.so".into()]
    }
}

/// File names of the NVRTC library for the bindings' CUDA major version.
fn nvrtc_names() -> Vec<String> {
    if cfg!(windows) {
        vec![format!("nvrtc64_{CUDA_MAJOR}0_0.dll")]
    } else {
        vec![format!("libnvrtc.so.{CUDA_MAJOR}"), "libnvrtc.so".into()]
    }
}

/// Whether any of `names` can be opened by the dynamic loader.
fn any_opens(names: &[String]) -> bool {
    names.iter().any(|name| {
        // SAFETY: opening a vendor library runs its initialisers, which is what using it
        // does anyway; the handle is closed again at once.
        unsafe { libloading::Library::new(OsStr::new(name)) }.is_ok()
    })
}

/// Whether the CUDA driver library can be opened.
pub(crate) fn driver_present() -> bool {
    any_opens(&driver_names())
}

/// Whether the NVRTC library can be opened.
pub(crate) fn nvrtc_present() -> bool {
    any_opens(&nvrtc_names())
}

/// The driver library's usual file name, for messages.
pub(crate) fn driver_name() -> String {
    driver_names().remove(0)
}

/// The NVRTC library's usual file names, for messages.
pub(crate) fn nvrtc_name() -> String {
    nvrtc_names().join(" / ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_bindings_version() {
        // 13.0 -> "libnvrtc.so.13": the major version cudarc's loader also tries.
        let major = (CUDA_VERSION / 1000).to_string();
        assert!(
            nvrtc_name().contains(&major),
            "{} for {CUDA_VERSION}",
            nvrtc_name()
        );
        assert!(!driver_name().is_empty());
    }

    #[test]
    fn a_missing_library_is_absent_not_a_panic() {
        assert!(!any_opens(&["libforge_attn_no_such_library.so.0".into()]));
        // Whatever this machine has, asking never panics.
        let _ = (driver_present(), nvrtc_present());
    }
}
