"""wasmesh.xds."""
