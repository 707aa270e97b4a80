"""Build hook for the one native extension (``condu_merge.kernels._native``, plain C, no
dependencies). Project metadata lives in pyproject.toml; this file only adds the extension.

The extension is optional: without a C compiler the build prints a warning and the package
installs without it (the numba and torch backends still run, with the same results)."""

from setuptools import Extension, setup

native = Extension(
    "condu_merge.kernels._native",
    sources=["condu_merge/kernels/_native.c"],
    extra_compile_args=["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-strict-aliasing"],
    extra_link_args=["-pthread"],
    optional=True,
)

setup(ext_modules=[native])
