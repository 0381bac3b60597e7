"""Native CPU kernels that XLA calls through its FFI (built on first use; see each module)."""
