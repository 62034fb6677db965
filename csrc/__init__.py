"""C++/CUDA sources of the compiled kernels (data, built at first use)."""
