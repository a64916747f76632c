"""fastrft's fused loss in a plain PyTorch RL loop, on a tiny Llama built from a config (no download).

The task is a toy: the reward of a completion is the fraction of its tokens equal to TARGET_TOKEN. Each step samples
GROUP completions per prompt, turns rewards into group-normalised advantages (GRPO), records the behaviour
log-probs, then takes a few clipped policy-gradient steps with fastrft.FusedRFTLoss on the backbone's final hidden
states: the [tokens x vocab] logits are never formed for the loss. Simplified: no reference model (kl_coef=0), no
refiner, greedy-free sampling from the raw policy.

    python examples/plain_pytorch.py --steps 15     # needs transformers; a few seconds on a CPU
"""
import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fastrft

TARGET_TOKEN = 7
PAD = 0


def sample(model, prompts, group, max_new_tokens):
    """[P * group, prompt_len + new] ids; completions stop only at max_new_tokens (no EOS in this toy)."""
    with torch.no_grad():
        return model.generate(prompts.repeat_interleave(group, dim=0), do_sample=True, max_new_tokens=max_new_tokens,
                              min_new_tokens=max_new_tokens, pad_token_id=PAD)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD,
                         bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # The model's logit transform (Gemma 2's soft-cap, Cohere's scale; none for Llama): the loss scores the
    # distribution the model samples from.
    loss_fn = fastrft.FusedRFTLoss(model.lm_head, clip_low=0.2, clip_high=0.28, **fastrft.model_logit_transform(model))
    n_prompts, group, prompt_len, new_tokens, inner_epochs = 4, 8, 4, 8, 2

    for step in range(args.steps):
        prompts = torch.randint(3, config.vocab_size, (n_prompts, prompt_len))
        ids = sample(model, prompts, group, new_tokens)  # [B, L]
        completion = ids[:, prompt_len:]  # [B, new_tokens]
        reward = (completion == TARGET_TOKEN).float().mean(1)  # [B]
        grouped = reward.view(n_prompts, group)
        advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)

        # Position t predicts token t + 1: the hidden states at [prompt_len - 1, L - 1) score the completion.
        targets = completion  # every completion token is scored here; padding would be set to -100
        token_advantages = advantages[:, None].expand_as(targets)  # one value per token
        with torch.no_grad():
            hidden = model.model(input_ids=ids).last_hidden_state[:, prompt_len - 1:-1]  # after the final norm
            old_logprobs = fastrft.token_logprobs(hidden, model.lm_head.weight, targets)

        for _ in range(inner_epochs):
            hidden = model.model(input_ids=ids).last_hidden_state[:, prompt_len - 1:-1]  # [B, new_tokens, H]
            out = loss_fn(hidden, targets, advantages=token_advantages, old_logprobs=old_logprobs)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
        print(f"step {step:3d}  reward {reward.mean().item():.3f}  loss {out.loss.item():+.4f}  "
              f"clip_frac {out.metrics['clip_frac']:.3f}  entropy {out.metrics['entropy']:.3f}")


if __name__ == "__main__":
    main()
