//! f64 reference attention (placeholder).
