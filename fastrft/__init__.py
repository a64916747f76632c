"""fastrft: kernel-level RL fine-tuning of language models with dynamic (refiner) constraints."""
from fastrft.batch import CausalLMWithFusedLoss
from fastrft.diff import DiffWeights, diff_mask, diff_masks, diff_weights
from fastrft.loss import (FusedRFTLoss, FusedRFTOutput, fused_rft_loss, lm_head_logprobs, model_logit_transform,
                          token_logprobs)

__all__ = [
    "CausalLMWithFusedLoss", "DiffWeights", "FusedRFTLoss", "FusedRFTOutput", "diff_mask", "diff_masks",
    "diff_weights", "fused_rft_loss",
    "lm_head_logprobs", "model_logit_transform", "token_logprobs",
]
__version__ = "0.1.0"
