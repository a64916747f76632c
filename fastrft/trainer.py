"""The RFT loop: one GPU (or the CPU), one policy, one frozen reference that doubles as the online refiner.

What lives for the whole run is one `Run` (models, tokenizer, task, prompt stream, optimizer, scheduler, run folder,
attention path). `run_step(run, step)` is one step, its phases named functions over named data, top to bottom:
  1. rollout      `sample_groups`: G samples per prompt from the policy (KV cache; static cache on CUDA) ...
  2. reward       ... scored by the task's reward functions (TRL's calling convention, weighted; None drops a sample)
  3. advantages   ... into `Group`s: GRPO group normalisation, DAPO dynamic sampling (zero-variance groups dropped
                  and refilled from further prompts) and overlong shaping (mask or soft penalty)
  4. constraint   `reference_logprobs`: the reference's log-probs of the samples (the KL term, and kl_ref in every
                  mode); `refined_rows`: the refiner's corrections as weighted cross-entropy rows (fastrft.refiner)
  5. update       `update_policy`: sample rows (policy gradient) and refined rows (cross-entropy) in token-budgeted
                  micro-batches (fastrft.batch: packed through a varlen attention kernel, or padded by length in
                  tree rows: a group's samples after their prompt, read once, each refinement after its sample),
                  final hidden states only, fastrft.fused_rft_loss with the step's token count as its normaliser,
                  gradients accumulated over the micro-batches; gradient clipping; AdamW; warm-up and decay;
                  optionally several minibatch updates with stored old log-probs
and returns a `StepRecord`, which `train_run` logs, with held-out evaluation and checkpoints around it.

Data parallelism (torchrun --nproc-per-node N -m fastrft train ...; fastrft.distributed): each rank runs phases 1-4
on its own share of the step's prompts (whole groups; dynamic sampling refills each rank's share from the one prompt
stream every rank advances alike), and phase 5 is one optimizer step over every rank's rows, DAPO's token-mean
normaliser counted over all ranks, so the update does not depend on N. The policy is sharded by FSDP2 per decoder
layer (fsdp=true, the default past one rank) or replicated under DDP; the reference sharded or replicated
(ref_sharding). Metrics are reduced over the ranks and written by rank 0, which alone writes the run folder and draws
the progress bar; checkpoints are torch.distributed.checkpoint's, loadable at any world size. At one rank all of
this is the single-process loop.

Tests plug fakes in at the seams: the Run's task, its models, its `generate` (the sampler of rollouts, evaluation and
the refiner).

Simplified on purpose: the reference model is the refiner (no separate refiner checkpoint); prompts are drawn in a
seeded order, without curriculum or replay; `minibatches` splits each rank's rows (at N ranks a minibatch is the
union of the ranks' splits).
"""
from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import socket
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

# Batch, build_batch and final_hidden stay importable from here, where they used to live.
from fastrft.batch import (EAGER, SDPA, AttentionPath, Batch, Row, accumulate_gradients, build_batch,  # noqa: F401
                           check_head_matches_model, check_vocabularies, choose_attention, final_hidden, note_once,
                           rft_loss, router_loss_coef, sequence_logprobs, with_refinements)
from fastrft.checkpoint import (StopSignal, latest_checkpoint, latest_state, load_checkpoint, save_checkpoint,
                                save_traces)
from fastrft.config import ConfigError, TrainConfig, load_saved_config, save_config
from fastrft.distributed import (SINGLE, World, full_value, gathered, init_world, local_tensor, shard_frozen,
                                 shard_policy)
from fastrft.jsonl import finite_number
from fastrft.lora import adapters_disabled, add_lora, merge_lora
from fastrft.refiner import RefineResult, check_refinable, check_refine_template, refine
from fastrft.rollout import encode_prompts, eval_mode, generate, stop_token_ids
from fastrft.rundir import RunDir, as_made, check_writable_dir
from fastrft.tasks import Task, check_columns, load_rows, load_task

PHASES = ("rollout", "reward", "reference", "refine", "update")


# ----------------------------------------------------------------------------------------------- set-up helpers

def resolve_device(name: str, world: World = SINGLE) -> torch.device:
    """The run's device; under torchrun "auto" and "cuda" mean this rank's GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available")
    if device.type == "cuda" and world.size > 1:
        if device.index is not None:
            raise ValueError(f"device={name!r} under torchrun: each rank takes the GPU of its LOCAL_RANK, so give "
                             f"device=cuda or device=auto")
        return torch.device("cuda", world.local_rank)
    return device


def load_tokenizers(policy_path: str, ref_path: str):
    from transformers import AutoTokenizer

    policy_tok = _load_pretrained(AutoTokenizer, policy_path, "model")
    ref_tok = policy_tok if ref_path == policy_path else _load_pretrained(AutoTokenizer, ref_path, "ref_model")
    if policy_tok.get_vocab() != ref_tok.get_vocab() or policy_tok.eos_token_id != ref_tok.eos_token_id:
        raise ValueError(f"the policy ({policy_path}) and the reference ({ref_path}) have different tokenizers: the "
                         f"KL term and the refiner's diff compare token ids, so both must share one vocabulary")
    if policy_tok.pad_token_id is None:
        policy_tok.pad_token = policy_tok.eos_token
    return policy_tok


def load_models(cfg: TrainConfig, device: torch.device, policy_dtype: torch.dtype | None = None):
    """(policy, reference) with SDPA attention; choose_attention then moves them to a varlen kernel where one runs.
    With lora_r > 0 the policy carries LoRA adapters, and without ref_model the reference is the policy itself
    (`reference_model` switches its adapters off) unless it trains weights whole. policy_dtype: the policy's
    weights' dtype when it differs from cfg.dtype (fp32 master weights under FSDP2's mixed precision)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()   # one progress bar: the run's

    dtype = getattr(torch, cfg.dtype)
    policy = _load_model(cfg.model, "model", policy_dtype or dtype, device, "4bit" if cfg.load_in_4bit else "none",
                         "load_in_4bit")
    if cfg.disable_dropout and disable_dropout(policy):
        note_once(f"{cfg.model}'s dropout is off in training (disable_dropout=true): its rollout, its old log-probs "
                  f"and the reference run without it, so with it the KL to the reference and the PPO ratio would "
                  f"measure dropout's noise; disable_dropout=false keeps it")
    if cfg.lora_r:   # (after: lora_dropout is the adapters' own setting)
        add_lora(policy, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                 target_modules=cfg.lora_target_modules)
    # One mode for every module (new adapters' dropout included): rollout and evaluation switch the whole policy to
    # eval mode from it (fastrft.rollout.eval_mode), the update expects it.
    policy.train()
    # Weights trained whole (lora_target_modules naming the embeddings or the head) stay trained with the adapters
    # off: the policy would then no longer be the base model, and the reference is loaded apart, frozen.
    trains_whole = [name for name, p in policy.named_parameters() if p.requires_grad and "lora_" not in name]
    if cfg.lora_r and not cfg.ref_model and not trains_whole:
        ref = policy
    else:
        if cfg.lora_r and not cfg.ref_model:
            note_once(f"lora_target_modules trains {', '.join(trains_whole)} whole: the reference and the refiner are "
                      f"a frozen copy of {cfg.model} (the policy with its adapters off would move with them)")
        ref = _load_model(cfg.ref_model or cfg.model, "ref_model", dtype, device, cfg.ref_quantization,
                          "ref_quantization")
        ref.eval().requires_grad_(False)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(policy)
        if cfg.lora_r:  # frozen embeddings: re-entrant checkpoints need an input that requires grad
            policy.enable_input_require_grads()
    if cfg.liger:
        if device.type == "cuda":
            from liger_kernel.transformers import _apply_liger_kernel_to_instance

            _apply_liger_kernel_to_instance(model=policy, cross_entropy=False, fused_linear_cross_entropy=False)
        else:
            note_once("liger=true needs CUDA: Liger-Kernel's layer kernels are not applied")
    return policy, ref


def disable_dropout(model) -> int:
    """Zeroes model's dropout: its dropout modules' rates, and every float `*drop*` rate held by a module (Llama's
    attention_dropout, OPT's dropout and layerdrop, which their forwards hand their kernels) or by its config (and
    sub-configs: Falcon's and Persimmon's forwards read theirs there). The loaded model's config only: an export
    reloads the model directory's. How many it zeroed."""
    from transformers import PretrainedConfig

    configs = [model.config, *(v for v in vars(model.config).values() if isinstance(v, PretrainedConfig))]
    zeroed = 0
    for holder in (*configs, *model.modules()):
        if isinstance(holder, torch.nn.modules.dropout._DropoutNd) and holder.p:
            holder.p = 0.0
            zeroed += 1
        for name, value in vars(holder).items():
            if "drop" in name and isinstance(value, float) and value:
                setattr(holder, name, 0.0)
                zeroed += 1
    return zeroed


def _load_model(path: str, key: str, dtype, device: torch.device, quantization: str, quantization_key: str):
    """The causal LM at path on device, bitsandbytes-quantized ("8bit" | "4bit": NF4 computing in dtype) where CUDA
    is; elsewhere a note, and unquantized."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=dtype, attn_implementation=_loading_attention(path))
    if quantization != "none" and device.type != "cuda":
        note_once(f"{quantization_key} asks for {quantization} weights, which need bitsandbytes on CUDA: they stay in "
                  f"{str(dtype).removeprefix('torch.')}")
    elif quantization != "none":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=quantization == "8bit", load_in_4bit=quantization == "4bit", bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype)
        # "cuda" without an index is the current device, where the batches go too.
        kwargs["device_map"] = {"": torch.cuda.current_device() if device.index is None else device.index}
    model = _load_pretrained(AutoModelForCausalLM, path, key, **kwargs)
    return model if "device_map" in kwargs else model.to(device)


def _loading_attention(path: str) -> str:
    """The attention a model loads with: SDPA where its architecture has it, else eager (Gemma 2, GPT-OSS, Bloom),
    never a flash-attn setting saved in its config (flash-attn may be missing here; choose_attention picks the
    kernel that packs). An architecture transformers does not map to a causal LM gets SDPA, and its own error."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(path))]
    except (KeyError, OSError, ValueError):
        return SDPA
    return SDPA if getattr(model_class, "_supports_sdpa", True) else EAGER


def _load_pretrained(auto_class, path: str, key: str, **kwargs):
    """auto_class.from_pretrained(path) with a broken directory (no weights, no tokenizer files, unreadable
    files) reported as the config key and path it came from."""
    try:
        return auto_class.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ValueError(f"{key}={path!r} could not be loaded by {auto_class.__name__}: {e}") from e


def use_attention(path: AttentionPath, *models) -> None:
    """flash-attn serves generation as well, so the models keep it; flex_attention is switched on per forward."""
    if path.packed and path.attn_implementation == "flash_attention_2":
        for model in models:
            model.set_attn_implementation(path.attn_implementation)


def enable_activation_checkpointing(model) -> None:
    # transformers 5 renamed gradient_checkpointing_enable; older releases only have the old name.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def make_optimizer(cfg: TrainConfig, model, device: torch.device):
    params = [p for p in model.parameters() if p.requires_grad]
    whole = [name for name, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float16]
    if whole and cfg.lora_r:
        raise ValueError(f"dtype=float16 would train {whole[0]} whole in fp16 (lora_target_modules names it), where "
                         f"AdamW's state underflows (NaN at the first step): use dtype=bfloat16, or leave it out of "
                         f"lora_target_modules (the adapters train in fp32 over the fp16 base)")
    if whole:
        # AdamW's eps (1e-8) and squared gradients below 6e-8 round to 0 in fp16: 0/0 at the first step.
        raise ValueError("dtype=float16 would train weights in fp16 itself, where AdamW's state underflows (NaN at the "
                         "first step): use dtype=bfloat16, or float16 with LoRA adapters (lora_r > 0: they train in "
                         "fp32 over the fp16 base) or under FSDP2 (fp32 master weights)")
    if cfg.optimizer == "adamw8bit":
        if device.type == "cuda":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        note_once("optimizer=adamw8bit needs bitsandbytes on CUDA: using torch's AdamW")
    # The fused AdamW (one pass over each tensor, no temporaries) on the CPU too, with the same numbers as the
    # per-tensor loop torch otherwise picks there.
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type in ("cuda", "cpu"))


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """The multiple of cfg.lr that step (0-based) runs at: a linear warmup over warmup_steps, then constant, or a
    linear or cosine decay that reaches min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_steps = cfg.steps - cfg.warmup_steps - 1   # after the first step past the warmup (0: it is the last)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps) if decay_steps > 0 else 1.0
    if cfg.lr_schedule == "linear":
        return 1 - (1 - cfg.min_lr_ratio) * progress
    if cfg.lr_schedule == "cosine":
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def make_scheduler(cfg: TrainConfig, optimizer, start_step: int = 0):
    """The learning-rate schedule of these settings from start_step (0-based) on: a resumed run follows its
    settings (lr, lr_schedule, steps, ...), which may differ from the checkpoint's."""
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step), last_epoch=start_step - 1)


class PromptStream:
    """Training prompts in a seeded order, reshuffled each epoch; its position is part of the checkpoint."""

    def __init__(self, rows: list[dict], seed: int, epoch: int = 0, index: int = 0):
        if not rows:
            raise ValueError("the task has no training prompts")
        self.rows, self.seed, self.epoch, self.index = rows, seed, epoch, index
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[dict]:
        out = []
        for _ in range(n):
            if self.index >= len(self._order):   # (past it: a run resumed on a smaller dataset)
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.rows[self._order[self.index]])
            self.index += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}


# ----------------------------------------------------------------------------------------------- the run's data

@dataclass
class Run:
    """What lives for the whole run."""
    cfg: TrainConfig
    run_dir: RunDir
    device: torch.device
    tokenizer: Any
    policy: Any                       # the causal LM (its weights FSDP2 shards when sharded)
    ref: Any                          # the policy itself in a LoRA run without ref_model (see reference_model)
    task: Task
    stream: PromptStream
    eval_rows: list[dict]
    optimizer: Any
    scheduler: Any
    attention: AttentionPath
    max_new_tokens: int               # the rollouts' (the task's unless cfg sets it)
    refine_template: str
    start_step: int = 0               # the checkpoint's step when resumed
    skipped_steps: int = 0            # steps without an optimizer step (a non-finite loss or gradient, no group)
    generate: Callable = generate     # the sampler of rollouts, evaluation and the refiner
    world: World = SINGLE             # this process's rank in a data-parallel job
    policy_loss: Any = None           # the module whose forward is the policy's fused loss: CausalLMWithFusedLoss,
                                      # FSDP2's root or in DDP under data parallelism (default: over policy)

    def __post_init__(self):
        if self.policy_loss is None:
            self.policy_loss = shard_policy(self.policy, SINGLE, fsdp=False)

    @property
    def stores_old_logprobs(self) -> bool:
        """Several optimizer steps per rollout need the behaviour policy's log-probs, stored before the first."""
        return self.cfg.ppo_epochs > 1 or self.cfg.minibatches > 1

    def checkpoint_state(self) -> dict:
        return {"stream": self.stream.state(), "skipped_steps": self.skipped_steps, "lora": lora_settings(self.cfg)}


@dataclass
class Group:
    """One prompt's scored samples (those whose reward is not None), in sampling order."""
    row: dict                         # the prompt's dataset row
    prompt_ids: list[int]
    completion_ids: list[list[int]]   # each up to and including its stop token (EOS)
    texts: list[str]
    truncated: list[bool]
    advantages: list[float]


@dataclass
class RolloutStats:
    """What phases 1-3 saw, over every prompt drawn in the step (refills included)."""
    rewards: list[float] = field(default_factory=list)            # the scored samples' rewards, before shaping
    lengths: list[int] = field(default_factory=list)              # every sample's tokens, scored or not
    per_func: dict[str, list[float]] = field(default_factory=dict)
    none_rewards: int = 0
    degenerate: int = 0
    groups_dropped: int = 0
    prompts_drawn: int = 0

    @classmethod
    def merged(cls, parts: list[RolloutStats]) -> RolloutStats:
        """The ranks' stats as one step's (lists in rank order)."""
        out = cls()
        for part in parts:
            out.rewards += part.rewards
            out.lengths += part.lengths
            for name, values in part.per_func.items():
                out.per_func.setdefault(name, []).extend(values)
            for name in ("none_rewards", "degenerate", "groups_dropped", "prompts_drawn"):
                setattr(out, name, getattr(out, name) + getattr(part, name))
        return out


@dataclass
class UpdateStats:
    # Each the mean over the step's optimizer steps of what it measured; NaN (null in metrics.jsonl) where none
    # measured it: a step without an optimizer step, clip_frac and entropy without policy-gradient tokens.
    pg_loss: float = float("nan")
    sft_loss: float = float("nan")
    kl_loss: float = float("nan")
    router_loss: float = float("nan")   # an MoE model's router load-balancing loss (0 without one, or when off)
    clip_frac: float = float("nan")
    entropy: float = float("nan")
    grad_norm: float = float("nan")
    loss: float = float("nan")
    kl_ref: float = float("nan")      # k3 estimate of KL(policy || reference) on the sampled tokens, every mode
    optimizer_steps: int = 0
    nonfinite_updates: int = 0        # optimizer steps skipped for a non-finite loss or gradient
    micro_batches: int = 0            # forwards of the first pass over the rows

    @property
    def skipped(self) -> bool:
        return self.optimizer_steps == 0


@dataclass
class StepRecord:
    """One step's metrics; to_dict() is its line of metrics.jsonl."""
    step: int
    rollout: RolloutStats
    groups: list[Group]
    refine: RefineResult | None       # None when the refiner is off
    update: UpdateStats
    trained_tokens: int
    skipped_steps: int
    lr: float
    times_s: dict[str, float]
    step_time_s: float
    peak_mem_gb: float
    eval: dict = field(default_factory=dict)
    resumable_from: int | None = None   # the newest checkpoint's step as the record is logged (None: none yet)

    def to_dict(self) -> dict:
        rollout, update = self.rollout, self.update
        samples = [len(ids) for g in self.groups for ids in g.completion_ids]
        # A mean over no value (every sample unscored: None) is null, never 0.
        record = {"step": self.step, "reward_mean": _mean(rollout.rewards, None),
                  "reward_std": _std(rollout.rewards) if rollout.rewards else None,
                  "reward_none": rollout.none_rewards, "groups_used": len(self.groups),
                  "groups_dropped": rollout.groups_dropped, "prompts_drawn": rollout.prompts_drawn,
                  "degenerate_frac": rollout.degenerate / max(1, len(rollout.rewards) + rollout.none_rewards),
                  "response_len": _mean(rollout.lengths),
                  # each reward function's mean, weighted or not: a task's degenerate-output rates are logged this way
                  **{f"reward_{name}": _mean(values, None) for name, values in rollout.per_func.items()}}
        if samples:
            refine = self.refine or RefineResult([])
            record.update(refine_rate=refine.changed_samples / len(samples),
                          refine_failed=refine.failed,
                          changed_token_frac=refine.changed_token_frac,
                          refine_passes=refine.passes, refine_copied=refine.copies / len(samples))
            if refine.draft is not None:   # drafts on (null where none was offered)
                record["refine_draft_accepted"] = refine.draft_accepted
        record.update(pg_loss=update.pg_loss, sft_loss=update.sft_loss, kl_loss=update.kl_loss,
                      clip_frac=update.clip_frac, entropy=update.entropy, grad_norm=update.grad_norm,
                      loss=update.loss, kl_ref=update.kl_ref, nonfinite_updates=update.nonfinite_updates,
                      micro_batches=update.micro_batches, skipped_steps=self.skipped_steps, lr=self.lr)
        record.update({f"time_{phase}_s": seconds for phase, seconds in self.times_s.items()})
        record.update(tokens_per_s=self.trained_tokens / max(self.times_s["update"], 1e-9),
                      step_time_s=self.step_time_s, peak_mem_gb=self.peak_mem_gb, resumable_from=self.resumable_from)
        return {**record, **self.eval}


# ----------------------------------------------------------------------------------------------- set-up

def make_run(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, world: World = SINGLE) -> Run:
    """Everything a run needs, from cfg; resume restores the last good checkpoint of cfg.output_dir, overwrite
    replaces the run that folder holds. Bad input (config, data, model directories) fails before any model loads,
    and the run folder is written only once everything has loaded: a failed start or resume changes nothing there
    (a resume's lock file aside).
    The run holds its folder's lock (rank 0) from the moment it writes there, a resume from before it reads the
    checkpoint and the records: a run that wrote them meanwhile (and ended) would leave it a stale copy to continue
    over the newer steps. A start or resume that fails lets the folder go, unless this process held it before (a
    Run made earlier, fastrft demo's choice of folder). Every rank of a data-parallel job calls it with its World
    (init_world)."""
    run_dir = RunDir(cfg.output_dir) if cfg.output_dir else None
    held_before = run_dir is not None and run_dir.locked()
    try:
        return _load_run(cfg, resume, overwrite, world)
    except BaseException:
        if run_dir is not None and not held_before:
            run_dir.unlock()
        raise


def lost_checkpoints_refusal(run_dir: RunDir, remedy: str) -> str | None:
    """Where no checkpoint of the run in run_dir loads: None if it stopped before its first save (it may start again
    from step 0), else why it may not, naming what shows it saved one all the same (what a save leaves, the summary
    of a run that ended, records logged after a save). remedy: the caller's way to train anew."""
    shown = _shown_save(run_dir)
    return shown and (f"{run_dir.path} holds no checkpoint that loads, but the run saved one ({shown}): starting it "
                      f"again from step 0 would rewrite the records of its steps; restore its checkpoints, or "
                      f"{remedy} (nothing was changed)")


def _shown_save(run_dir: RunDir) -> str | None:
    """What in run_dir shows that its run completed a save, or None."""
    traces = save_traces(run_dir.path)
    if traces:
        return f"{traces[0]} is left of it"
    if run_dir.summary.is_file():
        return f"it ended: {run_dir.summary}"
    records = run_dir.read_metrics(torn_end_ok=True)
    resumable = max((r["resumable_from"] for r in records if r.get("resumable_from")), default=None)
    if resumable:
        return f"{run_dir.metrics} logs a checkpoint at step {resumable}"
    if any("resumable_from" in r for r in records):   # records that name their checkpoint: none was saved
        return None
    # A log written before records named their checkpoint: steps past the first save of the settings it ran under.
    ran = load_saved_config(run_dir.config)
    first_save = min(ran.save_every, ran.steps)
    logged = max((r.get("step", 0) for r in records), default=0)
    return f"{run_dir.metrics} logs step {logged}, after its first save at step {first_save}" \
        if logged > first_save else None


def _load_run(cfg: TrainConfig, resume: bool, overwrite: bool, world: World) -> Run:
    if not cfg.model:
        raise ValueError("model is not set: give the local path of the policy's initial weights (model=PATH)")
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: resume continues the run, overwrite replaces it")
    check_same_settings(cfg, resume, overwrite, world)
    run_dir = RunDir(cfg.output_dir)
    run_dir.check_writable()
    check_run_folder(run_dir, resume, overwrite)
    if resume and world.is_main:
        run_dir.lock()   # until train_run ends
    device = resolve_device(cfg.device, world)
    fsdp = cfg.fsdp if cfg.fsdp is not None else world.size > 1
    ref_sharding = cfg.ref_sharding or ("shard" if fsdp else "replicate")
    if world.size > 1:
        check_distributable(cfg, fsdp, ref_sharding, world)
    check_model_dir(cfg.model, "model")
    check_model_dir(cfg.ref_model or cfg.model, "ref_model")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    try:
        task = load_task(cfg.task, **cfg.extra)
    except ConfigError as e:   # an option the task does not take, or of the wrong type: where it was set
        raise cfg.located(e) from None
    refine_template = cfg.refine_template or task.refine_template
    if cfg.uses_refiner and cfg.refine_template is None:   # the task's own: the config checks one it is given
        check_refine_template(refine_template)
    if cfg.uses_refiner and not callable(task.parse_refinement):
        raise ValueError(f"task {cfg.task!r}: Task.parse_refinement must be a callable str -> str | None, got "
                         f"{task.parse_refinement!r}")
    columns, types = task.required_columns(), task.column_types()
    train_places: list[str] = []   # a dataset file's rows' lines, for the refiner's refusal of a row
    train_rows = load_rows(cfg.dataset, required=columns, types=types, places=train_places) if cfg.dataset \
        else task.train_rows
    eval_rows = load_rows(cfg.eval_dataset, required=columns, types=types, key="eval_dataset") if cfg.eval_dataset \
        else task.eval_rows
    max_new_tokens = cfg.max_new_tokens or task.max_new_tokens
    if cfg.overlong == "penalty" and cfg.overlong_buffer >= max_new_tokens:
        raise ValueError(f"overlong_buffer={cfg.overlong_buffer} is not below max_new_tokens={max_new_tokens}: the "
                         f"overlong penalty would fall on every sample")
    if cfg.eval_size and cfg.eval_size > len(eval_rows):
        note_once(f"eval_size={cfg.eval_size}, but the evaluation set holds {len(eval_rows)} prompts: each "
                  f"evaluation reads those {len(eval_rows)}")
    sources = [(train_rows, cfg.dataset or f"task {cfg.task!r}'s training rows"),
               (eval_rows, cfg.eval_dataset or f"task {cfg.task!r}'s evaluation rows")]
    for rows, source in sources:
        if rows is task.train_rows or rows is task.eval_rows:   # a dataset file's rows were checked as read
            check_columns(rows, source, columns, types)
        if cfg.uses_refiner and rows is train_rows:   # (evaluation does not refine)
            check_refinable([row["prompt"] for row in rows], source,
                            without_refiner="constraint=none or kl: at refine_coef=0 it still runs, for its metrics",
                            places=train_places)

    tokenizer = load_tokenizers(cfg.model, cfg.ref_model or cfg.model)
    # Said now, not mid-run: a blank prompt may encode to nothing (no BOS), chat messages need a chat template.
    for rows, source in sources:
        blank = [r["prompt"] for r in rows if isinstance(r["prompt"], str) and not r["prompt"].strip()]
        chat = next((r["prompt"] for r in rows if not isinstance(r["prompt"], str)), None)
        try:
            encode_prompts(tokenizer, blank + ([chat] if chat else []))
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
    # Under FSDP2's mixed precision the policy keeps fp32 master weights, gathered and computed in cfg.dtype.
    mixed_precision = getattr(torch, cfg.dtype) if fsdp and world.size > 1 and cfg.dtype != "float32" else None
    policy, ref = load_models(cfg, device, policy_dtype=torch.float32 if mixed_precision else None)
    check_vocabularies(tokenizer, policy, ref, policy_name=cfg.model, ref_name=cfg.ref_model or cfg.model)
    check_head_matches_model(policy, "model")
    if ref is not policy:
        check_head_matches_model(ref, "ref_model")
    router_loss_coef(policy, cfg)   # a router loss asked of a model without a router fails here, not mid-run
    path = choose_attention(cfg.packing, policy, device, cfg.max_tokens_per_batch,
                            reference=None if ref is policy else ref)
    use_attention(path, policy, ref)
    policy_loss = shard_policy(policy, world, fsdp=fsdp, mixed_precision=mixed_precision)
    if ref is not policy and ref_sharding == "shard":
        ref = shard_frozen(ref, world)
    optimizer = make_optimizer(cfg, policy, device)

    start_step, state, metrics = 0, {"stream": {"epoch": 0, "index": 0}, "skipped_steps": 0}, []
    # A run that stopped before its first checkpoint (a crash in its first steps) has nothing to resume from: it
    # starts again from step 0, its records of those steps dropped, as a resume drops those after its checkpoint.
    # One that saved a checkpoint since lost or damaged is refused: starting again would rewrite its records.
    restart = resume and not world.broadcast(latest_checkpoint(run_dir.path) is not None if world.is_main else None)
    if restart:
        refusal = world.broadcast(lost_checkpoints_refusal(run_dir, "train anew (another output_dir, or --overwrite "
                                                                    "to replace this run)") if world.is_main else None)
        if refusal:
            raise ValueError(refusal)
        note_once(f"{run_dir.path} holds no checkpoint (the run stopped before its first one was saved): it starts "
                  f"again from step 0")
    if resume and not restart:
        start_step, state = load_checkpoint(run_dir.path, model=policy, optimizer=optimizer,
                                            map_location=device, world=world)
        # The adapters' weights mean what they do at the scale they were trained at (the modules they sit on, the
        # checkpoint's loading has checked).
        trained, given = state.get("lora"), lora_settings(cfg) or {"lora_r": 0}
        changed = [f"{key}={given.get(key)!r}" for key in ("lora_r", "lora_alpha")
                   if trained and trained[key] != given.get(key)]
        if changed:
            raise ValueError(f"{run_dir.path}: its checkpoint's adapters were trained with lora_r={trained['lora_r']}, "
                             f"lora_alpha={trained['lora_alpha']!r}; resuming with {', '.join(changed)} would change "
                             f"what they compute: resume with the settings they were trained with")
        if start_step > cfg.steps:
            raise ValueError(f"{run_dir.path} is at step {start_step} already: steps={cfg.steps} would go back; give "
                             f"steps above {start_step} to continue it")
        if start_step == cfg.steps:   # its settings stay as they ran: nothing runs under these
            note_once(f"{run_dir.path} is at its last step ({start_step}) already: nothing to train (give steps above "
                      f"{start_step} to continue it)")
        # Steps logged after the checkpoint are run again: their old records go.
        metrics = run_dir.metrics_to_resume(start_step)
        for group in optimizer.param_groups:   # the optimizer's state from the checkpoint, its settings from these
            group["weight_decay"] = cfg.weight_decay
            if "fused" in optimizer.defaults:   # (a checkpoint of the per-tensor loop: the fused one from now on)
                group.update(fused=optimizer.defaults["fused"], foreach=optimizer.defaults["foreach"])
        note_schedule_change(load_saved_config(run_dir.config), cfg, start_step)
    elif world.size > 1:
        # The same weights on every rank (the seed above); a sampling stream of its own for each.
        seed = cfg.seed + 1_000_003 * world.rank
        random.seed(seed)
        torch.manual_seed(seed)
    scheduler = make_scheduler(cfg, optimizer, start_step)
    stream = PromptStream(train_rows, cfg.seed, **state["stream"])
    # Everything has loaded: only now does the run folder change (rank 0 writes it).
    run_dir.check_shared(world)
    if world.is_main:
        run_dir.create()
        run_dir.lock()   # until train_run ends
        check_run_folder(run_dir, resume, overwrite)   # again: another run may have written it meanwhile
        if overwrite:
            run_dir.clear()
        if start_step < cfg.steps or not resume:
            save_config(cfg.with_absolute_paths(), run_dir.config)
        run_dir.write_metrics(metrics)
    world.barrier()
    return Run(cfg=cfg, run_dir=run_dir, device=device, tokenizer=tokenizer, policy=policy, ref=ref, task=task,
               stream=stream,
               eval_rows=eval_rows[:cfg.eval_size] if cfg.eval_size else eval_rows, optimizer=optimizer,
               scheduler=scheduler, attention=path, max_new_tokens=max_new_tokens,
               refine_template=refine_template, start_step=start_step,
               skipped_steps=state.get("skipped_steps", 0), world=world, policy_loss=policy_loss)


def note_schedule_change(before: TrainConfig, after: TrainConfig, start_step: int) -> None:
    """Says when a resume's overrides move the learning rate its next step runs at (steps=N re-stretches a decay)."""
    old, new = before.lr * lr_factor(before, start_step), after.lr * lr_factor(after, start_step)
    if not math.isclose(old, new, rel_tol=1e-9):
        note_once(f"resuming at step {start_step + 1} with the learning-rate schedule of these settings "
                  f"(lr_schedule={after.lr_schedule} over steps={after.steps}): it runs at lr {new:.4g}, where the "
                  f"run's settings would have given {old:.4g}")


def check_same_settings(cfg: TrainConfig, resume: bool, overwrite: bool, world: World) -> None:
    """A ValueError on every rank unless every rank was given rank 0's settings (a node launched with other
    overrides would train its share under them, or hang its peers at a step they never take)."""
    if world.size == 1:
        return
    ranks = world.gather({**cfg.to_dict(), "progress": None, "--resume": resume, "--overwrite": overwrite})
    first = ranks[0]
    for rank, theirs in enumerate(ranks):
        keys = [key for key in first if theirs.get(key) != first[key]]
        if keys:
            shown = ", ".join(f"{k}: {theirs.get(k)!r} there, {first[k]!r} on rank 0" for k in keys)
            raise ValueError(f"rank {rank} was given other settings than rank 0 ({shown}): run the same command, "
                             f"with the same config and overrides, on every node")


def check_distributable(cfg: TrainConfig, fsdp: bool, ref_sharding: str, world: World) -> None:
    """Options a data-parallel run cannot take, refused with the key before anything loads."""
    share = -(-cfg.prompts_per_step // world.size) * cfg.group_size   # the most samples a rank holds
    if cfg.minibatches > share:   # each rank splits its own share: the minibatches past it would be empty
        raise ValueError(f"minibatches={cfg.minibatches} exceeds the {share} samples a rank holds of a step on "
                         f"{world.size} ranks (prompts_per_step={cfg.prompts_per_step} shared out, group_size="
                         f"{cfg.group_size} each)")
    if fsdp and cfg.load_in_4bit:
        raise ValueError("load_in_4bit=true with fsdp: FSDP2 does not shard bitsandbytes' 4-bit weights; run QLoRA "
                         "with fsdp=false (each rank holds the 4-bit base) or in one process")
    if ref_sharding == "shard" and cfg.ref_quantization != "none":
        raise ValueError(f"ref_quantization={cfg.ref_quantization} with ref_sharding=shard: FSDP2 does not shard "
                         f"bitsandbytes' quantized weights; give ref_sharding=replicate")


def check_model_dir(path: str, key: str) -> dict:
    """A local Hugging Face model directory (models never come from the hub): its config.json's settings; a
    ValueError naming the key otherwise."""
    directory = Path(path)
    if not directory.exists():
        raise ValueError(f"{key}={path!r}: no such directory (fastrft loads models from local Hugging Face model "
                         f"directories, never from the hub)")
    config = directory / "config.json"
    if not config.is_file():
        raise ValueError(f"{key}={path!r} is not a Hugging Face model directory: it has no config.json")
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{key}={path!r}: its config.json is not valid JSON ({e})") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{key}={path!r}: its config.json holds no settings (a JSON object)")
    return settings


def lora_settings(cfg: TrainConfig) -> dict | None:
    """What a LoRA checkpoint's adapter weights mean (checkpoints record it): their rank, their scale's alpha and
    the modules they sit on; None without adapters."""
    return {"lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha,
            "lora_target_modules": list(cfg.lora_target_modules)} if cfg.lora_r else None


def export_model(run_dir, out_dir) -> tuple[Path, int]:
    """The run's newest good checkpoint as an ordinary Hugging Face model directory (weights and tokenizer) at
    out_dir, LoRA adapters merged into the base weights (loaded unquantized, on the CPU): AutoModelForCausalLM loads
    it, and it can start a new run. Returns (out_dir, the checkpoint's step). An out_dir that exists and is not
    empty is refused: nothing is overwritten."""
    run = RunDir(run_dir)
    if not run.holds_run():
        raise ValueError(f"{run.path} is not a fastrft run directory (no {run.config.name})")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty directory: export never overwrites, give a new "
                         f"OUT_DIR")
    check_writable_dir(out, "OUT_DIR")
    cfg = load_saved_config(run.config, output_dir=str(run.path))
    # The adapters as the newest checkpoint trained them (config.yaml may hold a resume's settings that no
    # checkpoint has reached yet).
    cfg = cfg.replaced(**(latest_state(run.path).get("lora") or {}))
    check_model_dir(cfg.model, "model")
    tokenizer = load_tokenizers(cfg.model, cfg.model)
    model = _load_model(cfg.model, "model", getattr(torch, cfg.dtype), torch.device("cpu"), "none", "load_in_4bit")
    if cfg.lora_r:
        add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                 target_modules=cfg.lora_target_modules)
    for attempt in range(3):
        try:
            step, _ = load_checkpoint(run.path, model=model, narrowed_note=f"the export is written in the run's "
                                      f"dtype={cfg.dtype}, in which it computed")
            break
        except (ValueError, FileNotFoundError):
            # A live run may prune the checkpoint being read (keep_checkpoints): the newest one then is another.
            if attempt == 2:
                raise
    if cfg.lora_r:
        merge_lora(model)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)   # models/my_model in a fresh checkout
    stage_prefix = f".{out.name}.export-{socket.gethostname()}-"   # the host: a shared filesystem's other nodes
    _remove_dead_stagings(out.absolute().parent, stage_prefix)
    staging = Path(tempfile.mkdtemp(prefix=f"{stage_prefix}{os.getpid()}-", dir=out.absolute().parent))
    as_made(staging, directory=True)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for written in staging.rglob("*"):   # safetensors writes its files owner-only, whatever the umask
            as_made(written, directory=written.is_dir())
        try:
            if out.exists():
                out.rmdir()   # empty, checked above
            os.replace(staging, out)
        except OSError:   # something else filled it meanwhile
            raise ValueError(f"{out} already exists and is not an empty directory: export never overwrites, give "
                             f"a new OUT_DIR") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out, step


def _remove_dead_stagings(parent: Path, prefix: str) -> None:
    """The staging folders (prefix, with this host's name, then the pid of the export that made it) that an export
    killed midway (SIGKILL, SIGTERM) left beside its OUT_DIR: a whole model each. Those of a live process stay."""
    for entry in parent.iterdir():
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if not (entry.name.startswith(prefix) and entry.is_dir() and pid.isdigit()):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:   # alive, another user's
            pass


# ----------------------------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """Runs cfg.steps steps into cfg.output_dir; returns the summary (also written to summary.json). A folder that
    holds a run is continued with resume=True or replaced with overwrite=True, never silently reused. Under torchrun
    every rank calls it: a data-parallel run over the job's ranks (the process group stays for the next run;
    fastrft.distributed.end_world ends it)."""
    return train_run(make_run(cfg, resume=resume, overwrite=overwrite, world=run_world(cfg)))


def run_world(cfg: TrainConfig) -> World:
    """The job's World for a run of cfg: its ranks on NCCL where cfg.device is CUDA, else on gloo (a CPU run on a GPU
    machine too)."""
    return init_world(cfg.dist_timeout_s, cuda=resolve_device(cfg.device).type == "cuda")


def check_run_folder(run_dir: RunDir, resume: bool, overwrite: bool) -> None:
    """A ValueError unless run_dir may take this run: a run to resume, or what --overwrite replaces, or nothing; never
    files of a run's names that fastrft did not write, whatever the flags."""
    if resume and not run_dir.holds_run():
        raise ValueError(f"{run_dir.path} holds no run to resume (no {run_dir.config.name})")
    held = run_dir.run_files()
    if not resume and not overwrite and held:
        raise ValueError(f"{run_dir.path} already holds a run ({', '.join(p.name for p in held)}): "
                         f"continue it with `fastrft train --resume {run_dir.path}`, or start a new one in another "
                         f"output_dir (output_dir=PATH), or replace it with --overwrite")


def train_run(run: Run) -> dict:
    """The run's steps, evaluations and checkpoints, then its summary; the run folder is let go at the end (taken
    by make_run)."""
    try:
        return _train_steps(run)
    finally:
        if run.world.is_main:
            run.run_dir.unlock()


def _train_steps(run: Run) -> dict:
    cfg, world = run.cfg, run.world
    if run.start_step == 0 and run.eval_rows:
        eval_metrics = evaluate(run)
        if world.is_main:
            run.run_dir.append_metrics({"step": 0, **eval_metrics})
    progress = None
    if cfg.progress and world.is_main:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.steps, initial=run.start_step, desc="fastrft", unit="step", dynamic_ncols=True)
    step = run.start_step
    saved = run.start_step or None   # the newest checkpoint's step (a resume's)
    stop_requested = False
    with StopSignal() as stop:
        while step < cfg.steps and not stop_requested:
            step += 1
            record = run_step(run, step)
            if run.eval_rows and (step % cfg.eval_every == 0 or step == cfg.steps):
                record.eval = evaluate(run)
            record.resumable_from = saved
            if world.is_main:
                run.run_dir.append_metrics(record.to_dict())
            # A signal reaches the ranks at different moments: every rank stops after the same step.
            stop_requested = bool(world.max([stop.requested])[0])
            if step % cfg.save_every == 0 or step == cfg.steps or stop_requested:
                save_checkpoint(run.run_dir.path, step, model=run.policy, optimizer=run.optimizer,
                                state=run.checkpoint_state(), keep=cfg.keep_checkpoints,
                                trainable_only=cfg.lora_r > 0, world=world)
                saved = step
            if progress is not None:
                progress.update(1)
                progress.set_postfix(reward=_shown(_mean(record.rollout.rewards, None)),
                                     **({"eval": _shown(record.eval["eval_reward"])} if record.eval else {}))
        if progress is not None:
            progress.close()
        summary = None
        if world.is_main:
            # Still under the stop guard: a signal while the plots are drawn stops the run as one in its last step
            # would (its checkpoint is saved), with its summary written, not a traceback and a run left unfinished.
            if cfg.plots:   # before the summary, which marks the run finished (fastrft compare keeps such a run)
                try:
                    from fastrft.plots import plot_run

                    plot_run(run.run_dir.path)
                except ImportError as exc:
                    note_once(f"plots skipped: {exc}")
            summary = summarize(run.run_dir, run.skipped_steps, step,
                                (stop.signal_name or "SIGTERM") if stop_requested or stop.requested else None,
                                world.size)
            run.run_dir.write_summary(summary)
    return world.broadcast(summary)


def run_step(run: Run, step: int) -> StepRecord:
    """One step; under data parallelism every rank runs it on its share and gets the step's record over all ranks."""
    times_s: dict[str, float] = dict.fromkeys(PHASES, 0.0)
    t_step = time.perf_counter()
    world = run.world
    groups, rollout = sample_groups(run, times_s)                              # 1-3
    rows = sample_rows(run.cfg, groups)
    trained_tokens = sum(len(row.target_ids) for row in rows)
    refinement = None
    any_rows = bool(world.max([len(rows)])[0])   # a rank without rows still joins the others' collectives
    if any_rows:
        with _timed(times_s, "reference"):
            reference_logprobs(run, rows)                                      # 4
        if run.cfg.uses_refiner:
            with _timed(times_s, "refine"):
                refined, refinement = refined_rows(run, groups)
            trained_tokens += sum(len(row.target_ids) for row in refined if row is not None)
            rows = with_refinements(rows, refined, run.attention)
    lr = run.scheduler.get_last_lr()[0]   # this step's
    with _timed(times_s, "update"):
        update = update_policy(run, rows) if any_rows else UpdateStats()       # 5
        # The schedule follows the step count, skipped steps included; torch warns when no optimizer step came first.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            run.scheduler.step()
    run.skipped_steps += update.skipped
    ranks = world.gather((groups, rollout, refinement, trained_tokens, times_s,
                          time.perf_counter() - t_step, _peak_mem_gb(run.device)))
    return StepRecord(step=step, rollout=RolloutStats.merged([r[1] for r in ranks]),
                      groups=[g for r in ranks for g in r[0]],
                      refine=None if refinement is None else RefineResult.merged([r[2] for r in ranks]),
                      update=update, trained_tokens=sum(r[3] for r in ranks), skipped_steps=run.skipped_steps,
                      lr=lr,
                      times_s={phase: max(r[4][phase] for r in ranks) for phase in PHASES},
                      step_time_s=max(r[5] for r in ranks), peak_mem_gb=max(r[6] for r in ranks))


# ----------------------------------------------------------------------------------------------- phases 1-3

def sample_groups(run: Run, times_s: dict[str, float]) -> tuple[list[Group], RolloutStats]:
    """prompts_per_step groups of scored samples (this rank's share of them); with dynamic sampling, zero-variance
    groups are dropped and refilled from further prompts for up to max_resample_rounds more rounds."""
    cfg, world = run.cfg, run.world
    groups: list[Group] = []
    stats = RolloutStats()
    share = len(world.share(cfg.prompts_per_step))
    # Eval mode once for every round: transformers' train() and eval() are not free (see eval_mode).
    with policy_model(run) as policy, eval_mode(policy):
        for _ in range(1 + (cfg.max_resample_rounds if cfg.dynamic_sampling else 0)):
            # Every rank draws the prompts all ranks need, in rank order, and keeps its own: one stream, no overlap.
            needed = world.gather(share - len(groups))
            if sum(needed) == 0:
                break
            start = sum(needed[:world.rank])
            rows = run.stream.take(sum(needed))[start:start + needed[world.rank]]
            if rows:
                stats.prompts_drawn += len(rows)
                groups += scored_groups(run, policy, rows, stats, times_s)
    return groups, stats


def scored_groups(run: Run, policy, rows: list[dict], stats: RolloutStats, times_s: dict[str, float]) -> list[Group]:
    """The groups of rows' samples that teach something (see score_group); the others counted as dropped."""
    cfg = run.cfg
    with _timed(times_s, "rollout"):
        samples = run.generate(policy, run.tokenizer, encode_prompts(run.tokenizer, [r["prompt"] for r in rows]),
                               max_new_tokens=run.max_new_tokens, num_samples=cfg.group_size,
                               temperature=cfg.temperature, top_p=cfg.top_p, batch_size=cfg.generation_batch_size)
    with _timed(times_s, "reward"):
        expanded = [r for r in rows for _ in range(cfg.group_size)]
        rewards, per_func = run.task.score(expanded, samples.texts, samples.truncated, samples.completion_ids)
    for name, values in per_func.items():
        stats.per_func.setdefault(name, []).extend(v for v in values if v is not None)
    stats.lengths += [len(ids) for ids in samples.completion_ids]
    stats.degenerate += sum(run.task.degenerate(text, truncated) is not None
                            for text, truncated in zip(samples.texts, samples.truncated))
    groups = []
    for g, row in enumerate(rows):
        group = score_group(cfg, run.max_new_tokens, row, samples, range(g * cfg.group_size, (g + 1) * cfg.group_size),
                            rewards, stats)
        if group is None:
            stats.groups_dropped += 1
        else:
            groups.append(group)
    return groups


def score_group(cfg: TrainConfig, max_new_tokens: int, row: dict, samples, members, rewards,
                stats: RolloutStats) -> Group | None:
    """A prompt's samples with their advantages, or None when the group teaches nothing (fewer than two scored
    samples, or with dynamic sampling, one shaped reward for all)."""
    kept, shaped = [], []
    for i in members:
        if rewards[i] is None:
            stats.none_rewards += 1
            continue
        stats.rewards.append(rewards[i])
        kept.append(i)
        shaped.append(rewards[i] + overlong_penalty(len(samples.completion_ids[i]), max_new_tokens, cfg))
    if len(kept) < 2 or (cfg.dynamic_sampling and max(shaped) == min(shaped)):
        return None
    return Group(row=row, prompt_ids=samples.prompt_ids[kept[0]],
                 completion_ids=[samples.completion_ids[i] for i in kept], texts=[samples.texts[i] for i in kept],
                 truncated=[samples.truncated[i] for i in kept], advantages=group_advantages(shaped,
                                                                                             cfg.scale_rewards))


def group_advantages(rewards: list[float], scale: bool) -> list[float]:
    mean = sum(rewards) / len(rewards)
    std = (sum((r - mean) ** 2 for r in rewards) / max(1, len(rewards) - 1)) ** 0.5
    return [(r - mean) / (std + 1e-4) if scale else r - mean for r in rewards]


def overlong_penalty(length: int, max_new_tokens: int, cfg: TrainConfig) -> float:
    """DAPO's soft overlong punishment: 0 up to max_new_tokens - buffer, then a linear ramp to -overlong_penalty."""
    start = max_new_tokens - cfg.overlong_buffer
    if cfg.overlong != "penalty" or length <= start:
        return 0.0
    return -cfg.overlong_penalty * min(1.0, (length - start) / max(1, cfg.overlong_buffer))


def sample_rows(cfg: TrainConfig, groups: list[Group]) -> list[Row]:
    """The groups' samples as policy-gradient rows, in group order (overlong masking: a truncated sample carries
    no loss)."""
    return [Row(group.prompt_ids, ids, advantage=advantage, pg=not (cfg.overlong == "mask" and truncated))
            for group in groups
            for ids, truncated, advantage in zip(group.completion_ids, group.truncated, group.advantages)]


# ----------------------------------------------------------------------------------------------- phase 4

@contextmanager
def policy_model(run: Run):
    """The policy for the block's no-grad forwards (rollout, old log-probs, evaluation), its whole weights gathered
    where FSDP2 shards them. Every rank enters it together."""
    with gathered(run.policy_loss):
        yield run.policy


@contextmanager
def reference_model(run: Run):
    """The reference (and refiner) for the block, gathered where sharded: the separate model, or the policy itself
    with its LoRA adapters off and in eval mode (no weights copied). Every rank enters it together."""
    if run.ref is not run.policy:
        with gathered(run.ref):
            yield run.ref
        return
    with eval_mode(run.policy), policy_model(run), adapters_disabled(run.policy):
        yield run.policy


def reference_logprobs(run: Run, rows: list[Row]) -> None:
    with reference_model(run) as ref:
        logprobs = sequence_logprobs(ref, rows, run.device, path=run.attention, temperature=run.cfg.temperature)
    for row, lp in zip(rows, logprobs):
        row.ref_logprobs = lp


def refined_rows(run: Run, groups: list[Group]) -> tuple[list[Row | None], RefineResult]:
    """The refiner's correction of every sample (in sample_rows' order) as a weighted cross-entropy row after the
    sample's prompt; None where it changed nothing."""
    cfg = run.cfg
    prompts = [group.row["prompt"] for group in groups for _ in group.texts]
    with reference_model(run) as ref:
        result = refine(ref, run.tokenizer, template=run.refine_template, parse=run.task.parse_refinement,
                        prompts=prompts, completions=[text for group in groups for text in group.texts],
                        completion_ids=[ids for group in groups for ids in group.completion_ids],
                        max_new_tokens=cfg.refine_max_new_tokens or run.max_new_tokens,
                        batch_size=cfg.generation_batch_size, changed_weight=cfg.refine_coef,
                        kept_weight=cfg.refine_kept_weight, context=cfg.refine_context, draft=cfg.refine_draft,
                        generate=run.generate, stop_ids=stop_token_ids(run.policy, run.tokenizer))
    prompt_ids = [group.prompt_ids for group in groups for _ in group.texts]
    rows = [None if refinement is None else Row(ids, refinement.refined_ids, sft_weights=refinement.sft_weights)
            for ids, refinement in zip(prompt_ids, result.refinements)]
    return rows, result


# ----------------------------------------------------------------------------------------------- phase 5

def update_policy(run: Run, rows: list[Row]) -> UpdateStats:
    """ppo_epochs passes of `minibatches` optimizer steps over the rows, each accumulated over token-budgeted
    micro-batches. A non-finite loss or gradient skips that optimizer step and leaves the weights as they were."""
    cfg, world = run.cfg, run.world
    if run.stores_old_logprobs:
        pg_rows = [r for r in rows if r.pg]
        with policy_model(run) as policy:
            for row, lp in zip(pg_rows, sequence_logprobs(policy, pg_rows, run.device, path=run.attention,
                                                          temperature=cfg.temperature)):
                row.old_logprobs = lp
    if not run.policy.training:
        run.policy.train()
    stats = UpdateStats()
    sums: dict[str, tuple[float, int]] = {}   # each metric's sum and count over the optimizer steps
    kl_values = []
    for epoch in range(cfg.ppo_epochs):
        for minibatch in (rows[i::cfg.minibatches] for i in range(cfg.minibatches)):
            # No token of the loss on any rank (every sample masked as overlong, say): no optimizer step, which
            # would still move the weights by AdamW's momentum.
            if not world.sum([sum(row.loss_tokens for row in minibatch)])[0]:
                continue
            run.optimizer.zero_grad(set_to_none=True)
            result, n_batches = accumulate_gradients(run.policy_loss, minibatch, cfg, run.attention, run.device,
                                                     use_old=run.stores_old_logprobs,
                                                     kl_values=kl_values if epoch == 0 else None, world=world)
            if epoch == 0:
                stats.micro_batches += n_batches
            # Over every rank: FSDP2's gradients are DTensors, whose norm is one too.
            grad_norm = full_value(torch.nn.utils.clip_grad_norm_(
                run.policy.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
            if not (math.isfinite(result["loss"]) and torch.isfinite(grad_norm)):
                run.optimizer.zero_grad(set_to_none=True)
                stats.nonfinite_updates += 1
                continue
            run.optimizer.step()
            if not _finite_weights(run.policy, world):
                raise FloatingPointError(
                    "an optimizer step left NaN or inf in the policy's weights from a finite loss and gradient (the "
                    f"learning rate, lr={cfg.lr}, too large for them?); the run stops here so that they never reach "
                    "a checkpoint: the last checkpoint, if any, holds the last good weights")
            stats.optimizer_steps += 1
            result["grad_norm"] = float(grad_norm)
            for name, value in result.items():
                if math.isfinite(value):
                    total, count = sums.get(name, (0.0, 0))
                    sums[name] = (total + value, count + 1)
    for name, (total, count) in sums.items():
        setattr(stats, name, total / count)
    kl_sum, kl_count = world.sum([float(sum(v.sum() for v in kl_values)), sum(v.numel() for v in kl_values)])
    if kl_count:
        stats.kl_ref = kl_sum / kl_count
    return stats


def _finite_weights(model, world: World) -> bool:
    """Whether every trainable weight is finite, on every rank (one reduction, one device sync per rank)."""
    local = bool(torch.stack([local_tensor(p).isfinite().all() for p in model.parameters() if p.requires_grad]).all())
    return not world.max([not local])[0]


# ----------------------------------------------------------------------------------------------- evaluation, logs

def evaluate(run: Run) -> dict:
    """The task's held-out metrics (eval_*) of the policy; under data parallelism each rank evaluates its share of
    the prompts, and each metric is its values' sum over all ranks over their number (Task.evaluate_sums): the
    same as one process's. Every rank enters the policy's gathering, with prompts to evaluate or not."""
    task, rows = run.task, [run.eval_rows[i] for i in run.world.share(len(run.eval_rows))]
    options = dict(max_new_tokens=run.max_new_tokens, batch_size=run.cfg.generation_batch_size,
                   generate=run.generate)
    sums = {}
    with policy_model(run) as policy:
        if rows and _own_evaluate(type(task)):
            # A task whose evaluate is its own, not the means of its evaluate_sums: its means, weighted by the rows
            # each rank evaluated.
            sums = {name: (value * len(rows), len(rows)) if value is not None else (0.0, 0)
                    for name, value in task.evaluate(policy, run.tokenizer, rows, **options).items()}
        elif rows:
            sums = task.evaluate_sums(policy, run.tokenizer, rows, **options)
    ranks = [s for s in run.world.gather(sums) if s]
    names = ranks[0] if ranks else {}
    unprefixed = [name for name in names if not str(name).startswith("eval_")]
    if unprefixed:   # it would overwrite a metric of the step's line (step itself, say)
        raise ValueError(f"task {run.cfg.task!r}: its evaluation's metric {unprefixed[0]!r} is not named eval_*")
    counts = {name: sum(s[name][1] for s in ranks) for name in names}
    return {name: sum(s[name][0] for s in ranks) / counts[name] if counts[name] else None for name in names}


def _own_evaluate(task_class) -> bool:
    """Whether the class's evaluate is overridden below its evaluate_sums (the class nearest to it defining either
    defines evaluate)."""
    for cls in task_class.__mro__:
        if cls is Task or "evaluate_sums" in vars(cls):
            return False
        if "evaluate" in vars(cls):
            return True
    return False


@contextmanager
def _timed(times_s: dict[str, float], phase: str):
    """Adds the block's wall time to times_s[phase]."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times_s[phase] += time.perf_counter() - t0


def _peak_mem_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux


def _mean(values, empty: float | None = 0.0) -> float | None:
    return sum(values) / len(values) if values else empty


def _shown(value: float | None) -> str:
    """A metric for the progress bar: null (nothing scored) as -."""
    return "-" if value is None else f"{value:.3f}"


def _std(values) -> float:
    if len(values) < 2:
        return 0.0
    mean = _mean(values)
    return (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def summarize(run_dir: RunDir, skipped_steps: int, last_step: int, stopped_by: str | None,
              world_size: int = 1) -> dict:
    records = run_dir.read_metrics()
    evals = [r for r in records if "eval_reward" in r]
    scored = [r["eval_reward"] for r in evals if finite_number(r["eval_reward"])]   # (null: nothing was scored)
    steps = [r for r in records if "reward_mean" in r]
    tail = steps[-max(1, len(steps) // 5):] if steps else []
    return {
        "steps": last_step, "stopped_by": stopped_by, "world_size": world_size,
        "eval_reward_initial": evals[0]["eval_reward"] if evals else None,
        "eval_reward_final": evals[-1]["eval_reward"] if evals else None,
        "eval_reward_best": max(scored) if scored else None,
        "reward_mean_last": _mean([r["reward_mean"] for r in tail if finite_number(r["reward_mean"])], None),
        "refine_rate_mean": _mean([r["refine_rate"] for r in steps if finite_number(r.get("refine_rate"))], None),
        "refine_rate_last": _mean([r["refine_rate"] for r in tail if finite_number(r.get("refine_rate"))], None),
        "kl_ref_last": _mean([r["kl_ref"] for r in tail if finite_number(r.get("kl_ref"))], None),
        "skipped_steps": skipped_steps,
        "wall_time_s": sum(r.get("step_time_s", 0.0) for r in steps),
    }
