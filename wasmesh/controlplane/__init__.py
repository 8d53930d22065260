"""wasmesh.controlplane."""
