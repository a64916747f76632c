"""One rank of a data-parallel test run, launched by tests/test_distributed.py under torchrun (or alone for one rank):

    torchrun --nproc-per-node 2 tests/dist_worker.py train RUN_DIR key=value ...
    torchrun --nproc-per-node 2 tests/dist_worker.py resume RUN_DIR key=value ...
    torchrun --nproc-per-node 2 tests/dist_worker.py loss OUT.pt [fsdp2|zero3]   CausalLMWithFusedLoss sharded

A real `fastrft train` except for the rollout sampler, which samples each prompt from a seed of its own (its token
ids), so that a prompt's samples do not depend on which rank draws it or what else is in its batch: a 2-rank run then
equals a 1-rank run on the same global batch. FASTRFT_TEST_FAULT="rank:step:kill|raise|hang" makes that rank fail in
that step's reward phase; FASTRFT_TEST_RANK_OVERRIDES="rank:key=value ..." gives that rank overrides of its own.
"""
import os
import signal
import sys
import time
import zlib

import torch

from fastrft.config import load_config
from fastrft.rollout import Samples, generate
from fastrft.distributed import end_world, full_value, init_world
from fastrft.trainer import make_run, run_world, train_run


def per_prompt_generate(model, tokenizer, prompt_ids, **kwargs):
    if kwargs.get("greedy"):
        return generate(model, tokenizer, prompt_ids, **kwargs)
    out = Samples([], [], [], [])
    for ids in prompt_ids:
        torch.manual_seed(zlib.crc32(str(ids).encode()))
        one = generate(model, tokenizer, [ids], **kwargs)
        for name in ("prompt_ids", "completion_ids", "texts", "truncated"):
            getattr(out, name).extend(getattr(one, name))
    return out


def inject_fault(run, spec: str) -> None:
    rank, step, how = spec.split(":")
    if int(rank) != run.world.rank:
        return
    score = run.task.score
    saved_before = run.run_dir.path / "checkpoints" / f"step_{int(step) - 1:08d}"

    def failing_score(*args, **kwargs):
        if saved_before.is_dir():   # the previous step is over, checkpoint included: this is step `step`
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if how == "raise":
                raise RuntimeError(f"injected failure on rank {rank}")
            time.sleep(3600)   # hang
        return score(*args, **kwargs)

    run.task.score = failing_score


def run_training(mode: str, run_dir: str, overrides: list[str]) -> None:
    # FASTRFT_TEST_RANK_OVERRIDES="1:lr=0.01": that rank's command line differs (a node launched otherwise).
    rank_spec = os.environ.get("FASTRFT_TEST_RANK_OVERRIDES", "")
    if rank_spec.partition(":")[0] == os.environ.get("RANK"):
        overrides = [*overrides, *rank_spec.partition(":")[2].split()]
    if mode == "resume":
        cfg = load_config(os.path.join(run_dir, "config.yaml"), overrides, output_dir=run_dir)
    else:
        cfg = load_config(None, overrides, output_dir=run_dir)
    world = run_world(cfg)   # device=cpu: gloo, also on a GPU machine
    run = make_run(cfg, resume=mode == "resume", world=world)
    run.generate = per_prompt_generate
    if os.environ.get("FASTRFT_TEST_FAULT"):
        inject_fault(run, os.environ["FASTRFT_TEST_FAULT"])
    train_run(run)
    end_world(exit_status=0)


# DeepSpeed ZeRO-3 as the tests run it: every weight partitioned (none kept whole for being small) and released as
# soon as its module is done with it (no live or reused weights kept, no prefetch), as a large model's are. Its
# memory_efficient_linear (ZeRO-3's own F.linear) adds a bias after the matmul instead of PyTorch's fused addmm: a
# rounding that a model with biases carries to ~1e-2 of a small gradient; off, one process and two compute alike.
ZERO3 = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 0,
                               "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0,
                               "memory_efficient_linear": False}}


def start_deepspeed() -> None:
    """DeepSpeed's communication over the process group (gloo, torchrun's environment; no MPI to discover)."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


def backward(loss: torch.Tensor, module, zero3: bool) -> None:
    """loss's backward: through the ZeRO-3 engine `module` (as accelerate's backward does), else plain."""
    if zero3:
        module.backward(loss)
    else:
        loss.backward()


def full_gradients(model, zero3: bool) -> dict[str, torch.Tensor]:
    """Every trainable weight's whole gradient: gathered from ZeRO-3's partitions, or FSDP2's shards."""
    if zero3:
        from deepspeed.utils import safe_get_full_grad

        return {name: safe_get_full_grad(p).clone() for name, p in model.named_parameters() if p.requires_grad}
    return {name: full_value(p.grad).clone() for name, p in model.named_parameters() if p.requires_grad}


def fused_loss_gradients(out_path: str, engine: str = "fsdp2") -> None:
    """The gradients of CausalLMWithFusedLoss over a fixed batch: one process, or FSDP2 or a DeepSpeed ZeRO-3 engine
    over the ranks, each with its share of the rows; written by rank 0 as {name: full gradient}."""
    from torch.distributed.fsdp import fully_shard
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fastrft import CausalLMWithFusedLoss

    world = init_world(60, cuda=False)   # gloo on the CPU, as on CI, also on a GPU machine
    torch.manual_seed(0)
    tied = os.environ.get("FASTRFT_TEST_TIED", "1") == "1"
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))
    loss_module = CausalLMWithFusedLoss(model)
    batch = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 101, (4, 9), generator=batch)
    targets = torch.randint(0, 101, (4, 9), generator=batch)
    targets[:, :3] = -100
    advantages = torch.randn(4, 9, generator=batch)
    normalizer = float((targets != -100).sum())
    zero3 = engine == "zero3" and world.size > 1
    if zero3:
        import deepspeed

        start_deepspeed()   # over init_world's group
        optimizer = torch.optim.SGD(loss_module.parameters(), lr=0.0)
        loss_module = deepspeed.initialize(model=loss_module, optimizer=optimizer, config=ZERO3)[0]
        assert all(p.ds_tensor.numel() < p.ds_numel for p in model.parameters())   # partitioned
    elif world.size > 1:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(loss_module)
    rows = slice(None) if world.size == 1 else slice(2 * world.rank, 2 * world.rank + 2)
    out = loss_module(input_ids[rows], targets[rows], advantages=advantages[rows], normalizer=normalizer)
    # FSDP2 and ZeRO-3 average the gradients over the ranks; the token-mean loss wants their sum.
    backward(out.loss * world.size, loss_module, zero3)
    grads = full_gradients(model, zero3)
    if world.rank == 0:
        torch.save(grads, out_path)
    end_world(exit_status=0)


if __name__ == "__main__":
    if sys.argv[1] == "loss":
        fused_loss_gradients(*sys.argv[2:])
    else:
        run_training(sys.argv[1], sys.argv[2], sys.argv[3:])
