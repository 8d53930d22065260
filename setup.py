"""Build hook for the optional C fast path (wasmesh/runtime/_fastpath.c).

Everything else is configured in pyproject.toml. The extension is optional: where it
cannot be compiled, wasmesh installs without it and the runtime uses its ctypes path.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "wasmesh.runtime._fastpath",
            sources=["wasmesh/runtime/_fastpath.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
