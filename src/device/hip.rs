//! HIP runtime (placeholder).
