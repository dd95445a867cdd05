//! Launch dimensions, shared by the vendor runtimes and the kernels' callers.

/// Grid, block and dynamic shared memory of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LaunchDims {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

impl LaunchDims {
    pub fn new(grid: (u32, u32, u32), block: (u32, u32, u32), shared_bytes: u32) -> Self {
        LaunchDims {
            grid,
            block,
            shared_bytes,
        }
    }
}
