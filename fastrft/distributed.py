"""Data parallelism over torchrun's ranks, through torch.distributed's own engines: FSDP2 (`fully_shard`) or DDP.

    world = init_world(timeout_s)            # torchrun's environment -> the process group (gloo on CPU, nccl on CUDA)
    loss_module = shard_policy(policy, world, fsdp=True, mixed_precision=torch.bfloat16)
    with gathered(loss_module): generate(policy, ...)   # whole weights for the step's no-grad phases
    loss_module(input_ids, targets, ...).loss.backward() # FSDP2 gathers the head for the loss, reduce-scatters its grad

A `World` is this process's place in the job (rank, size) and its few collectives over Python numbers and objects;
at size 1 (no torchrun, or one process) every collective returns its input and nothing is initialised, so the
single-process trainer runs this code unchanged.

Sharding: each decoder layer (the classes the model names in `_no_split_modules`, as accelerate's FSDP auto-wrap
does) is one FSDP2 unit, and `CausalLMWithFusedLoss`, the module whose forward runs the model body and fastrft's
fused loss, is the root: it owns the embeddings, the final norm and the LM head (tied or not), so the head is gathered
for the loss and its gradient reduce-scattered by FSDP2 itself. The first forward through a sharded module fixes it as
FSDP2's root, so `shard_policy`/`shard_frozen` run one tiny forward right away (`fix_root`): the rollout's
generation, which calls the layers directly, can then never claim a layer as the root, and the optimizer is built
over the sharded parameters.

Generation, the reference and refiner passes, the old log-probs and evaluation run on whole weights: `gathered`
all-gathers every unit once and keeps it gathered for the block (TRL's `ds3_gather_for_generation`, done with FSDP2's
public unshard and reset_iter_state). Their number of forward passes differs from rank to rank (sequences end at
different lengths), which per-layer all-gathers could not survive. Peak weight memory in those phases is one whole
copy per rank; the update, where gradients, optimizer state and activations live, runs sharded.

The process group lives as long as the process (a `fastrft compare` trains run after run in it); `end_world` ends it.

Simplified: one data-parallel dimension (no tensor or pipeline parallelism, no hybrid sharding); sampling is not
batch-invariant, so the same seed gives runs that agree in distribution, not token for token, across world sizes.
"""
from __future__ import annotations

import atexit
import datetime
import inspect
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

ROOT_WARMUP_TOKENS = 2


@dataclass(frozen=True)
class World:
    """This process's rank among `size` (torchrun's RANK, WORLD_SIZE, LOCAL_RANK)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    comm_device: str = "cpu"      # where the collectives' tensors live: cuda under nccl

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the run folder and draws the progress bar."""
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        return self._all_reduce(values, "SUM")

    def max(self, values: list[float]) -> list[float]:
        return self._all_reduce(values, "MAX")

    def _all_reduce(self, values: list[float], op: str) -> list[float]:
        if self.size == 1:
            return list(values)
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
        return tensor.tolist()

    def gather(self, obj) -> list:
        """Every rank's obj, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's obj on every rank."""
        if self.size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def share(self, n: int) -> range:
        """This rank's contiguous share of n items (sizes differ by at most one, the first ranks larger)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))


SINGLE = World()


def init_world(timeout_s: float, cuda: bool | None = None) -> World:
    """The job's World from torchrun's environment, initialising the default process group (nccl where CUDA is, else
    gloo) with timeout_s on every collective, unless one exists: a rank that dies leaves the others an error, never a
    hang. Without torchrun, or with one process, the single-process World. cuda: whether the ranks compute on GPUs
    (default: when CUDA is there); False keeps a CPU run on gloo on a GPU machine."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return SINGLE
    import torch.distributed as dist

    missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={size} but {', '.join(missing)} not set: launch data-parallel runs with "
                         f"torchrun (torchrun --nproc-per-node N -m fastrft train ...)")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        gpus = torch.cuda.device_count()
        if local_rank >= gpus:
            raise ValueError(f"LOCAL_RANK={local_rank} but this node shows {gpus} CUDA device(s): "
                             + ("start at most one rank per GPU (torchrun --nproc-per-node), or give device=cpu" if gpus
                                else "give device=cpu, or run where CUDA sees a GPU"))
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # One process group for the process's life (end_world ends it): torchrun's store outlives a destroyed group,
        # and a second group over it would find the first one's stale addresses (fastrft compare trains run after run).
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank,
                 comm_device=f"cuda:{local_rank}" if cuda else "cpu")


def end_world(exit_status: int | None = None) -> None:
    """Ends the process group, if any, once every rank is done with it (gloo aborts a process whose peer tears its
    group down first). Called by the command line when a command has finished well; after a failure torchrun ends the
    other ranks itself.

    exit_status: then ends a process that had a group with that status, Python's exit handlers run and its files
    flushed, but without the interpreter's teardown: there a gloo worker thread, even after destroy_process_group,
    aborts the process now and then ("terminate called without an active exception", SIGABRT: about 1 run in 20 of
    2 CPU ranks, torch 2.13), and torchrun reports a job that finished well as failed. A process without a group
    returns."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()
    if exit_status is not None:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_status)


def launched_rank() -> int:
    """This process's rank in torchrun's job (0 without torchrun), before any process group exists."""
    return int(os.environ.get("RANK", "0"))


@contextmanager
def rank_zero_first(timeout_s: float, cuda: bool | None = None):
    """Under torchrun the block runs on rank 0 first, then on the other ranks, which find what it made (a cached
    model) instead of making it again at the same time. timeout_s, cuda: init_world's."""
    world = init_world(timeout_s, cuda)
    if not world.is_main:
        world.barrier()
    yield
    if world.is_main:
        world.barrier()


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's repeated blocks: instances of the classes its `_no_split_modules` names (transformers' own list,
    which accelerate's FSDP auto-wrap also reads)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder-layer class (_no_split_modules): fastrft cannot "
                         f"shard it per layer with FSDP2; run it with fsdp=false (plain data parallelism)")
    return layers


def _mixed_precision(param_dtype: torch.dtype | None, root: bool):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    # The root's inputs are token ids and the loss's fp32 per-token tensors: casting them would round the advantages.
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None,
                                cast_forward_inputs=not root)


def shard_policy(policy, world: World, *, fsdp: bool, mixed_precision: torch.dtype | None = None):
    """The module whose forward computes the policy's fused loss (CausalLMWithFusedLoss), distributed over the world:
    FSDP2 per decoder layer with itself as the root (fsdp=True; mixed_precision: the dtype the weights are gathered
    and computed in, gradients reduced in fp32), or DDP (fsdp=False). At size 1 the plain module."""
    from fastrft.batch import CausalLMWithFusedLoss

    module = CausalLMWithFusedLoss(policy)
    if world.size == 1:
        return module
    if not fsdp:
        from torch.nn.parallel import DistributedDataParallel

        # Buffers (rotary tables) are the same on every rank: broadcasting them each forward would be a collective
        # for nothing (torch 2.13 names the switch forward_sync_buffers, and warns at the old name).
        no_buffer_sync = {"forward_sync_buffers" if "forward_sync_buffers" in
                          inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers": False}
        return DistributedDataParallel(module, **no_buffer_sync,
                                       device_ids=[world.local_rank] if world.comm_device != "cpu" else None)
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(policy):
        fully_shard(layer, mp_policy=_mixed_precision(mixed_precision, root=False))
    fully_shard(module, mp_policy=_mixed_precision(mixed_precision, root=True))
    ids = torch.zeros(1, ROOT_WARMUP_TOKENS, dtype=torch.long, device=next(policy.parameters()).device)
    fix_root(module, ids, ids)
    return module


def shard_frozen(model, world: World):
    """A frozen model (the reference) sharded with FSDP2 per decoder layer, itself the root; used through
    `gathered`."""
    if world.size == 1:
        return model
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    fix_root(model, input_ids=torch.zeros(1, ROOT_WARMUP_TOKENS, dtype=torch.long,
                                          device=next(model.parameters()).device), use_cache=False)
    return model


def fix_root(module, *args, **kwargs) -> None:
    """Makes the sharded module FSDP2's root: a forward of it (args, kwargs: a tiny input), without gradients, then
    its weights sharded again (a root's forward keeps them gathered, for a backward that this one never has)."""
    with torch.no_grad():
        module(*args, **kwargs)
    module.reshard()


def is_sharded(module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextmanager
def gathered(module):
    """module's whole weights for the block, all-gathered once per FSDP2 unit and kept through every forward inside
    (see the module docstring); then sharded again. A module that is not sharded passes through."""
    if not is_sharded(module):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    if not hasattr(module, "reset_iter_state"):
        raise RuntimeError(f"this torch ({torch.__version__}) lacks FSDPModule.reset_iter_state, which fastrft needs "
                           f"to run generation on FSDP2-sharded weights; upgrade torch (2.13 has it)")
    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    layers = [m for m in units if m is not module]
    module.set_reshard_after_forward(False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        # Reshards every unit and forgets the block's forwards: FSDP2 would take them for the next backward's
        # (it prefetches in their order), and their number differs from rank to rank.
        module.reset_iter_state()
        for layer in layers:   # the root keeps FSDP2's root default: gathered from forward through backward
            layer.set_reshard_after_forward(True, recurse=False)


def gradient_sync(module, last: bool):
    """The micro-batch's forward and backward: DDP all-reduces only on the last of an optimizer step's micro-batches
    (no_sync before); FSDP2 reduce-scatters every one, which keeps only sharded gradients between them."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel) and not last:
        return module.no_sync()
    return nullcontext()


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of t: a DTensor's local shard, or t itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's value over every rank (a norm that FSDP2's gradients give as a DTensor), or t itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
