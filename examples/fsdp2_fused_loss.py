"""fastrft's fused loss in your own FSDP2 loop: examples/plain_pytorch.py's toy, data parallel over torchrun's ranks
with the weights sharded by FSDP2 (fully_shard), on a tiny Llama built from a config (no download).

The one rule: the LM head must be read inside the forward of the module FSDP2 gathers it for. fastrft's
CausalLMWithFusedLoss is that module (its forward runs the model body, then the fused loss over the model's head), so
shard the decoder layers, then it as the root: FSDP2 gathers the head (tied to the embeddings or not) for the loss
and reduce-scatters its gradient. Sampling runs on whole weights, gathered once for the block
(fastrft.distributed.gathered), because each rank decodes its own number of steps.

    torchrun --standalone --nproc-per-node 2 examples/fsdp2_fused_loss.py --steps 15    # CPU: gloo; GPU: nccl
    python examples/fsdp2_fused_loss.py --steps 15                                       # one process works too
"""
import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

import fastrft
from fastrft.distributed import end_world, fix_root, gathered

TARGET_TOKEN = 7
PAD = 0
IGNORE = -100


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() and distributed \
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")

    torch.manual_seed(args.seed)   # the same initial weights on every rank
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD,
                         bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).to(device)
    loss_module = fastrft.CausalLMWithFusedLoss(model)
    if distributed:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(loss_module)
        ids = torch.zeros(1, 2, dtype=torch.long, device=device)
        fix_root(loss_module, ids, ids)   # FSDP2's root is the first module to run forward: this one
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)   # after sharding: over the shards
    torch.manual_seed(args.seed + 1 + rank)   # each rank its own prompts and samples
    n_prompts, group, prompt_len, new_tokens = 4, 8, 4, 8

    for step in range(args.steps):
        prompts = torch.randint(3, config.vocab_size, (n_prompts, prompt_len), device=device)
        with torch.no_grad(), gathered(loss_module):
            ids = model.generate(prompts.repeat_interleave(group, dim=0), do_sample=True,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=PAD,
                                 synced_gpus=False)   # weights gathered: no rank waits for another's decoding
        reward = (ids[:, prompt_len:] == TARGET_TOKEN).float().mean(1)   # [B]
        grouped = reward.view(n_prompts, group)
        advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)

        # Position t predicts token t + 1; the prompt's tokens carry no loss.
        inputs, targets = ids[:, :-1], ids[:, 1:].clone()
        targets[:, :prompt_len - 1] = IGNORE
        token_advantages = advantages[:, None].expand_as(targets).contiguous()
        # DAPO's token mean over every rank's tokens; FSDP2 averages the gradients over the ranks, so each rank's
        # loss is scaled by world_size to make that average the gradient of the global token mean.
        tokens = torch.tensor(float((targets != IGNORE).sum()), device=device)
        if distributed:
            dist.all_reduce(tokens)
        out = loss_module(inputs, targets, advantages=token_advantages, normalizer=float(tokens))
        optimizer.zero_grad(set_to_none=True)
        (out.loss * world_size).backward()
        optimizer.step()

        mean_reward = reward.mean()
        if distributed:
            dist.all_reduce(mean_reward)
            mean_reward /= world_size
        if rank == 0:
            print(f"step {step:3d}  reward {mean_reward.item():.3f}  entropy {out.metrics['entropy']:.3f}",
                  flush=True)
    end_world(exit_status=0)   # the process group's end, and the process's: see its docstring


if __name__ == "__main__":
    main()
