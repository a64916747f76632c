"""fastrft: kernel-level RL fine-tuning of language models with dynamic (refiner) constraints."""
from fastrft.loss import FusedRFTLoss, FusedRFTOutput, fused_rft_loss, token_logprobs

__all__ = ["FusedRFTLoss", "FusedRFTOutput", "fused_rft_loss", "token_logprobs"]
__version__ = "0.1.0"
