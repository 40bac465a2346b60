"""msn-serve: kernels."""
