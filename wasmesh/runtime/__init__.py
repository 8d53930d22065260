"""wasmesh.runtime."""
