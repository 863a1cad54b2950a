"""Builds model/_qmatmul, the CPU kernel for quantised matmuls (model/qmatmul.cc); everything else about the
package is in pyproject.toml.

The kernel includes XLA's FFI headers, which jaxlib ships (hence jaxlib in the build requirements). The build
is optional: without a C++ compiler the install goes on, and meshlm runs the pure-JAX path
(model/qkernel.py)."""

import os

from setuptools import Extension, setup


def jaxlib_include() -> str:
    import jaxlib

    return os.path.join(os.path.dirname(jaxlib.__file__), "include")


setup(ext_modules=[Extension(
    "model._qmatmul", ["model/qmatmul.cc", "model/attention.cc"], include_dirs=[jaxlib_include()], language="c++",
    optional=True, depends=["model/workers.h"],
    # -O3 for the vector loops; the instruction sets are chosen per function in the source (AVX-512, AVX2,
    # baseline) and at run time, so the library runs on any x86-64 CPU, not only on the one that built it
    extra_compile_args=["-O3", "-std=gnu++17", "-Wno-psabi", "-Wno-return-type", "-Wno-attributes"],
)])
