"""wasmesh.agent."""
