"""Adapters that put fastrft's fused loss inside other trainers.

Each adapter imports its host library only when it is used, so `import fastrft.integrations` needs nothing beyond
fastrft's own dependencies:

    from fastrft.integrations import FastRFTGRPOTrainer   # needs `pip install "fastrft[integrations]"` (TRL)
"""

__all__ = ["FastRFTGRPOTrainer"]


def __getattr__(name):
    if name == "FastRFTGRPOTrainer":
        from fastrft.integrations.trl import FastRFTGRPOTrainer

        return FastRFTGRPOTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
