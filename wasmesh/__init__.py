"""wasmesh: the Istio/Envoy Proxy-Wasm extension system in Python."""

__version__ = "0.1.0"
