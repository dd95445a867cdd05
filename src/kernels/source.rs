//! The embedded kernel sources and their textual include expansion for NVRTC.

use std::collections::HashSet;

use super::KernelFile;

// `KERNEL_SOURCES`, written by build.rs: every file of `kernels/` via `include_str!`.
include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));

/// Every file of `kernels/` as (file name, contents), sorted by name.
pub fn kernel_sources() -> &'static [(&'static str, &'static str)] {
    KERNEL_SOURCES
}

/// The contents of `kernels/<name>`, if that file exists.
pub fn kernel_source(name: &str) -> Option<&'static str> {
    KERNEL_SOURCES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, text)| *text)
}

/// The source of `file` with every quoted include of a `kernels/` file inlined
/// (each header once, as `#pragma once` would), so NVRTC needs no include path.
///
/// `#line` directives keep compiler messages pointing at the original file and line.
/// Angle-bracket includes are left alone (they belong to the vendor toolchain, e.g.
/// `<hip/hip_runtime.h>` in a HIP-only branch). A missing file or header becomes an
/// `#error` naming it, so the compiler log says what is missing.
pub fn full_source(file: KernelFile) -> String {
    let name = file.file_name();
    match kernel_source(name) {
        Some(text) => inline_includes(name, text, &kernel_source),
        None => format!("#error \"forge-attn: kernels/{name} is missing from this build\"\n"),
    }
}

/// Expands the quoted includes of `root` (named `root_name`) with `lookup`.
pub(crate) fn inline_includes(
    root_name: &str,
    root: &str,
    lookup: &dyn Fn(&str) -> Option<&'static str>,
) -> String {
    let mut out = String::with_capacity(root.len() * 4);
    let mut seen = HashSet::new();
    seen.insert(root_name.to_string());
    expand(root_name, root, lookup, &mut seen, &mut out);
    out
}

fn expand(
    name: &str,
    text: &str,
    lookup: &dyn Fn(&str) -> Option<&'static str>,
    seen: &mut HashSet<String>,
    out: &mut String,
) {
    out.push_str(&format!("#line 1 \"{name}\"\n"));
    for (idx, line) in text.lines().enumerate() {
        if is_pragma_once(line) {
            // Inlined exactly once already; keep the line count.
            out.push('\n');
            continue;
        }
        let Some(header) = quoted_include(line) else {
            out.push_str(line);
            out.push('\n');
            continue;
        };
        if !seen.insert(header.to_string()) {
            out.push('\n');
            continue;
        }
        match lookup(header) {
            Some(body) => {
                expand(header, body, lookup, seen, out);
                out.push_str(&format!("#line {} \"{name}\"\n", idx + 2));
            }
            None => {
                out.push_str(&format!(
                    "#error \"forge-attn: {name} includes {header}, which is not in kernels/\"\n"
                ));
            }
        }
    }
}

/// The directive after `#` (with optional blanks), or `None` for a non-directive line.
fn directive(line: &str) -> Option<&str> {
    line.trim_start().strip_prefix('#').map(str::trim_start)
}

fn is_pragma_once(line: &str) -> bool {
    directive(line)
        .and_then(|d| d.strip_prefix("pragma"))
        .is_some_and(|rest| {
            rest.starts_with(char::is_whitespace) && rest.split_whitespace().next() == Some("once")
        })
}

/// `"name"` of an `#include "name"` line.
pub(crate) fn quoted_include(line: &str) -> Option<&str> {
    let rest = directive(line)?.strip_prefix("include")?.trim_start();
    let rest = rest.strip_prefix('"')?;
    let end = rest.find('"')?;
    Some(&rest[..end])
}
