"""wasmesh.api."""
