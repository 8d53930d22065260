"""wasmesh.http."""
