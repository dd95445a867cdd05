//! Command-line pieces the benches share: comma-separated lists and dtype names.
#![allow(dead_code)]

use forge_attn::DType;

/// The comma-separated items of `s` that `f` accepts (others are skipped).
pub fn list<T>(s: &str, f: impl Fn(&str) -> Option<T>) -> Vec<T> {
    s.split(',').filter_map(|x| f(x.trim())).collect()
}

/// A dtype by its name: `f32`, `f16` or `bf16`.
pub fn dtype(s: &str) -> Option<DType> {
    match s {
        "f32" => Some(DType::F32),
        "f16" => Some(DType::F16),
        "bf16" => Some(DType::BF16),
        _ => None,
    }
}

/// The dtypes a `--dtypes f32,bf16` argument names.
pub fn dtypes(s: &str) -> Vec<DType> {
    list(s, dtype)
}

/// The numbers a `--lens 1024,4096` argument names.
pub fn numbers(s: &str) -> Vec<usize> {
    list(s, |x| x.parse().ok())
}
