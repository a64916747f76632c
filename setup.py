"""Builds the C++ diff extension (csrc/). A plain CPython extension, no PyTorch ABI. It is required: a failed build
fails the install (fastrft.diff's pure-Python twin runs only with FASTRFT_PURE_PYTHON_DIFF=1)."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "fastrft._diff",
            sources=["csrc/diff.cpp"],
            extra_compile_args=["-O3", "-std=c++17", "-pthread"],
            extra_link_args=["-pthread"],
            language="c++",
        )
    ]
)
