"""Low-level expert GEMMs: the grouped GEMM with its padded-bmm fallback, and Triton kernels."""
