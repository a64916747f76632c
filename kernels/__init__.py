"""Triton kernels of fastrft, installed as ``fastrft.kernels``. One op per file."""
