"""Guards shared by the callers of the Triton kernels (fastrft.loss, fastrft.diff). Triton itself is not imported
here: choosing an implementation must work where it is missing."""
import os

import torch

IMPLS = ("triton", "torch")


def triton_available(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under the interpreter (TRITON_INTERPRET=1)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def check_impl_name(impl) -> None:
    """A ValueError unless impl names an implementation ("triton" | "torch") or is None (the device's default)."""
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} or None, got {impl!r}")


def resolve_impl(impl: str | None, device: torch.device) -> str:
    """impl as given ("triton" | "torch"), or None: Triton on CUDA, the PyTorch twin elsewhere."""
    check_impl_name(impl)
    if impl is None:
        return "triton" if device.type == "cuda" else "torch"
    if impl == "triton" and not triton_available(device):
        raise ValueError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on the CPU "
                         "interpreter); use impl='torch' on the CPU")
    return impl
