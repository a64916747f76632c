"""Builds the optional C++ diff extension (csrc/). A plain CPython extension, no PyTorch ABI: where it fails
to build, fastrft falls back to its pure-Python twin."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "fastrft._diff",
            sources=["csrc/diff.cpp"],
            extra_compile_args=["-O3", "-std=c++17", "-pthread"],
            extra_link_args=["-pthread"],
            language="c++",
            optional=True,
        )
    ]
)
