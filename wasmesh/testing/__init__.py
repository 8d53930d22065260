"""wasmesh.testing."""
