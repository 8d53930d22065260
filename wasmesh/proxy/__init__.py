"""wasmesh.proxy."""
