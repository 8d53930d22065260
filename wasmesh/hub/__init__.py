"""wasmesh.hub."""
