"""The RFT loop: one GPU (or the CPU), one policy, one frozen reference that doubles as the online refiner.

Each step, top to bottom:
  1. rollout      G samples per prompt from the policy (KV cache; static cache on CUDA)
  2. reward       the task's reward functions (TRL's calling convention), weighted; None drops a sample
  3. advantages   GRPO group normalisation; DAPO dynamic sampling (zero-variance groups dropped and refilled) and
                  overlong shaping (mask or soft penalty)
  4. constraint   reference log-probs of the samples (the KL term, and kl_ref in every mode); the refiner's
                  corrections turned into weighted cross-entropy rows (fastrft.refiner)
  5. update       one packed batch of sample rows (policy gradient) and refined rows (cross-entropy); the policy
                  runs to its final hidden states only and fastrft.fused_rft_loss does the rest; gradient clipping;
                  AdamW; warm-up and decay; optionally several minibatch updates with stored old log-probs.

Simplified on purpose: one process, one device (users who outgrow it reuse the loss through the TRL integration);
the reference model is the refiner (no separate refiner checkpoint); prompts are drawn in a seeded order, without
curriculum or replay.
"""
from __future__ import annotations

import json
import math
import random
import resource
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastrft.checkpoint import StopSignal, load_checkpoint, save_checkpoint
from fastrft.config import TrainConfig, save_config
from fastrft.loss import fused_rft_loss, token_logprobs
from fastrft.refiner import refine
from fastrft.rewards import combine_rewards, is_degenerate
from fastrft.rollout import encode_prompts, generate
from fastrft.tasks import load_rows, load_task

IGNORE_INDEX = -100
_NOTED: set[str] = set()


def _note_once(message: str) -> None:
    """Optional features that cannot run here say so once, then the run goes on without them."""
    if message not in _NOTED:
        _NOTED.add(message)
        print(f"fastrft: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- set-up helpers

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available")
    return device


def _attn_implementation(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            _note_once("flash-attn is not installed: packed sequences use SDPA")
    return "sdpa"


def load_tokenizers(policy_path: str, ref_path: str):
    from transformers import AutoTokenizer

    policy_tok = AutoTokenizer.from_pretrained(policy_path)
    ref_tok = policy_tok if ref_path == policy_path else AutoTokenizer.from_pretrained(ref_path)
    if policy_tok.get_vocab() != ref_tok.get_vocab() or policy_tok.eos_token_id != ref_tok.eos_token_id:
        raise ValueError(f"the policy ({policy_path}) and the reference ({ref_path}) have different tokenizers: the "
                         f"KL term and the refiner's diff compare token ids, so both must share one vocabulary")
    if policy_tok.pad_token_id is None:
        policy_tok.pad_token = policy_tok.eos_token
    return policy_tok


def load_models(cfg: TrainConfig, device: torch.device):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()   # one progress bar: the run's

    dtype = getattr(torch, cfg.dtype)
    attn = _attn_implementation(device)
    policy = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype, attn_implementation=attn).to(device)
    ref_kwargs = dict(dtype=dtype, attn_implementation=attn)
    if cfg.ref_quantization != "none":
        if device.type == "cuda":
            from transformers import BitsAndBytesConfig

            ref_kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_8bit=cfg.ref_quantization == "8bit", load_in_4bit=cfg.ref_quantization == "4bit")
            ref_kwargs["device_map"] = {"": device.index or 0}
        else:
            _note_once(f"ref_quantization={cfg.ref_quantization} needs bitsandbytes on CUDA: the reference stays in "
                       f"{cfg.dtype}")
    ref = AutoModelForCausalLM.from_pretrained(cfg.ref_model or cfg.model, **ref_kwargs)
    if "device_map" not in ref_kwargs:
        ref = ref.to(device)
    ref.eval().requires_grad_(False)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(policy)
    if cfg.liger:
        if device.type == "cuda":
            from liger_kernel.transformers import _apply_liger_kernel_to_instance

            _apply_liger_kernel_to_instance(model=policy, cross_entropy=False, fused_linear_cross_entropy=False)
        else:
            _note_once("liger=true needs CUDA: Liger-Kernel's layer kernels are not applied")
    return policy, ref


def enable_activation_checkpointing(model) -> None:
    # transformers 5 renamed gradient_checkpointing_enable; older releases only have the old name.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def make_optimizer(cfg: TrainConfig, model, device: torch.device):
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw8bit":
        if device.type == "cuda":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        _note_once("optimizer=adamw8bit needs bitsandbytes on CUDA: using torch's AdamW")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")


def make_scheduler(cfg: TrainConfig, optimizer):
    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        if cfg.lr_schedule == "linear":
            return 1 - (1 - cfg.min_lr_ratio) * progress
        if cfg.lr_schedule == "cosine":
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


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
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.rows[self._order[self.index]])
            self.index += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}


# ----------------------------------------------------------------------------------------------- batches

@dataclass
class Row:
    """One sequence of the update: a prompt and the target tokens the loss reads (a sample or a refinement)."""
    prompt_ids: list[int]
    target_ids: list[int]
    advantage: float = 0.0
    pg: bool = False                                   # policy-gradient row (sample) or not (refined row)
    sft_weights: torch.Tensor | None = None            # [len(target_ids)] for refined rows
    old_logprobs: torch.Tensor | None = None           # [len(target_ids)], stored for minibatch updates
    ref_logprobs: torch.Tensor | None = None           # [len(target_ids)], for the KL term


@dataclass
class Batch:
    input_ids: torch.Tensor       # [1, T] packed (or [B, L] padded)
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    targets: torch.Tensor         # same shape as input_ids, IGNORE_INDEX off the target positions
    advantages: torch.Tensor
    pg_mask: torch.Tensor
    sft_weights: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    target_slices: list[tuple[int, int, int]] = field(default_factory=list)   # (row of the tensor, start, end)


def build_batch(rows: list[Row], device: torch.device, *, packed: bool, pad_id: int = 0) -> Batch:
    """Sequence i reads prompt + target[:-1]; the hidden state at position len(prompt) - 1 + j predicts target[j].
    packed: all sequences in one row, position_ids restarting at 0 (no padding, no attention across sequences);
    else: one right-padded row per sequence with an attention mask."""
    lengths = [len(r.prompt_ids) + len(r.target_ids) - 1 for r in rows]
    shape = (1, sum(lengths)) if packed else (len(rows), max(lengths))
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    attention_mask = None if packed else torch.zeros(shape, dtype=torch.long)
    targets = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    per_token = {name: torch.zeros(shape) for name in ("advantages", "sft_weights", "old_logprobs", "ref_logprobs")}
    pg_mask = torch.zeros(shape, dtype=torch.bool)
    slices, offset = [], 0
    for i, (row, length) in enumerate(zip(rows, lengths)):
        b, start = (0, offset) if packed else (i, 0)
        sequence = row.prompt_ids + row.target_ids[:-1]
        input_ids[b, start:start + length] = torch.tensor(sequence)
        position_ids[b, start:start + length] = torch.arange(length)
        if attention_mask is not None:
            attention_mask[b, :length] = 1
        t0 = start + len(row.prompt_ids) - 1
        t1 = t0 + len(row.target_ids)
        targets[b, t0:t1] = torch.tensor(row.target_ids)
        per_token["advantages"][b, t0:t1] = row.advantage
        pg_mask[b, t0:t1] = row.pg
        for name in ("sft_weights", "old_logprobs", "ref_logprobs"):
            value = getattr(row, name)
            if value is not None:
                per_token[name][b, t0:t1] = value
        slices.append((b, t0, t1))
        offset += length
    return Batch(input_ids.to(device), position_ids.to(device),
                 attention_mask.to(device) if attention_mask is not None else None, targets.to(device),
                 per_token["advantages"].to(device), pg_mask.to(device), per_token["sft_weights"].to(device),
                 per_token["old_logprobs"].to(device), per_token["ref_logprobs"].to(device), slices)


def final_hidden(model, batch: Batch) -> torch.Tensor:
    """The policy's final hidden states (after the final norm), never its logits."""
    out = model.base_model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                           attention_mask=batch.attention_mask, use_cache=False)
    return out.last_hidden_state


def lm_head(model):
    return model.get_output_embeddings()


@torch.no_grad()
def sequence_logprobs(model, rows: list[Row], device, *, packed: bool, temperature: float) -> list[torch.Tensor]:
    """Per-row log-probs of the target tokens under model (no gradient): reference and old log-probs."""
    batch = build_batch(rows, device, packed=packed)
    head = lm_head(model)
    hidden = final_hidden(model, batch)
    lp = token_logprobs(hidden, head.weight.to(hidden.dtype), batch.targets,
                        bias=None if head.bias is None else head.bias.to(hidden.dtype), temperature=temperature)
    return [lp[b, t0:t1].float().cpu() for b, t0, t1 in batch.target_slices]


def rft_loss(model, batch: Batch, cfg: TrainConfig, *, use_old: bool):
    head = lm_head(model)
    hidden = final_hidden(model, batch)
    return fused_rft_loss(
        hidden, head.weight, batch.targets, bias=head.bias, advantages=batch.advantages, pg_mask=batch.pg_mask,
        old_logprobs=batch.old_logprobs if use_old else None,
        ref_logprobs=batch.ref_logprobs if cfg.uses_kl else None, sft_weights=batch.sft_weights,
        clip_low=cfg.clip_low, clip_high=cfg.clip_high, kl_coef=cfg.kl_coef if cfg.uses_kl else 0.0,
        kl_estimator=cfg.kl_estimator, entropy_coef=cfg.entropy_coef, temperature=cfg.temperature,
    )


# ----------------------------------------------------------------------------------------------- phases 2-3

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


def evaluate(model, tokenizer, task, rows: list[dict], cfg: TrainConfig, max_new_tokens: int) -> dict:
    """Greedy completions of the held-out prompts, scored by the task's rewards."""
    samples = generate(model, tokenizer, encode_prompts(tokenizer, [r["prompt"] for r in rows]),
                       max_new_tokens=max_new_tokens, greedy=True, batch_size=cfg.generation_batch_size)
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"} if rows else {}
    columns["truncated"] = samples.truncated
    rewards, per_func = combine_rewards(task.reward_funcs, task.reward_weights, [r["prompt"] for r in rows],
                                        samples.texts, **columns)
    scored = [r for r in rewards if r is not None]
    out = {"eval_reward": sum(scored) / max(1, len(scored))}
    for name, values in per_func.items():
        values = [v for v in values if v is not None]
        out[f"eval_{name}"] = sum(values) / max(1, len(values))
    return out


def _peak_mem_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux


# ----------------------------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig, *, resume: bool = False) -> dict:
    """Runs cfg.steps steps into cfg.output_dir; returns the summary (also written to summary.json)."""
    if not cfg.model:
        raise ValueError("model is not set: give the local path of the policy's initial weights (model=PATH)")
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    device = resolve_device(cfg.device)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    tokenizer = load_tokenizers(cfg.model, cfg.ref_model or cfg.model)
    policy, ref = load_models(cfg, device)
    task = load_task(cfg.task, **cfg.extra)
    train_rows = load_rows(cfg.dataset) if cfg.dataset else task.train_rows
    eval_rows = load_rows(cfg.eval_dataset) if cfg.eval_dataset else task.eval_rows
    eval_rows = eval_rows[:cfg.eval_size] if cfg.eval_size else eval_rows
    max_new = cfg.max_new_tokens or task.max_new_tokens
    refine_template = cfg.refine_template or task.refine_template
    optimizer = make_optimizer(cfg, policy, device)
    scheduler = make_scheduler(cfg, optimizer)

    start_step, state = 0, {"stream": {"epoch": 0, "index": 0}, "skipped_steps": 0}
    if resume:
        start_step, state = load_checkpoint(run_dir, model=policy, optimizer=optimizer, scheduler=scheduler,
                                            map_location=device)
    stream = PromptStream(train_rows, cfg.seed, **state["stream"])
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        # Steps logged after the checkpoint are run again: their old records go.
        from fastrft.plots import read_metrics

        kept = [r for r in read_metrics(metrics_path) if r.get("step", 0) <= start_step]
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    else:
        metrics_path.write_text("")
    use_old = cfg.ppo_epochs > 1 or cfg.minibatches > 1

    def log(record: dict) -> None:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    if start_step == 0 and eval_rows:
        log({"step": 0, **evaluate(policy, tokenizer, task, eval_rows, cfg, max_new)})

    progress = None
    if cfg.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.steps, initial=start_step, desc="fastrft", unit="step", dynamic_ncols=True)
    step = start_step
    with StopSignal() as stop:
        while step < cfg.steps and not stop.requested:
            step += 1
            record = run_step(cfg, step, policy, ref, tokenizer, task, stream, optimizer, scheduler, device,
                              max_new, refine_template, use_old, state)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                record.update(evaluate(policy, tokenizer, task, eval_rows, cfg, max_new) if eval_rows else {})
            log(record)
            state["stream"] = stream.state()
            if step % cfg.save_every == 0 or step == cfg.steps or stop.requested:
                save_checkpoint(run_dir, step, model=policy, optimizer=optimizer, scheduler=scheduler, state=state)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(reward=f"{record['reward_mean']:.3f}",
                                     **({"eval": f"{record['eval_reward']:.3f}"} if "eval_reward" in record else {}))
    if progress is not None:
        progress.close()

    summary = summarize(run_dir, state, step, stop.signal_name if stop.requested else None)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if cfg.plots:
        try:
            from fastrft.plots import plot_run

            plot_run(run_dir)
        except ImportError as exc:
            _note_once(f"plots skipped: {exc}")
    return summary


def run_step(cfg, step, policy, ref, tokenizer, task, stream, optimizer, scheduler, device, max_new,
             refine_template, use_old, state) -> dict:
    timers: dict[str, float] = {}
    t_step = time.perf_counter()

    # 1-3. Rollout, reward, advantages; dynamic sampling refills zero-variance groups from further prompts.
    groups, all_rewards, degenerate, none_rewards, dropped_groups = [], [], 0, 0, 0
    per_func_rewards: dict[str, list[float]] = {}
    needed, rounds = cfg.prompts_per_step, 0
    while needed > 0:
        rows = stream.take(needed)
        t0 = time.perf_counter()
        prompt_ids = encode_prompts(tokenizer, [r["prompt"] for r in rows])
        samples = generate(policy, tokenizer, prompt_ids, max_new_tokens=max_new, num_samples=cfg.group_size,
                           temperature=cfg.temperature, top_p=cfg.top_p, batch_size=cfg.generation_batch_size)
        timers["rollout"] = timers.get("rollout", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        expanded = [r for r in rows for _ in range(cfg.group_size)]
        columns = {k: [r.get(k) for r in expanded] for k in rows[0] if k != "prompt"}
        columns["truncated"] = samples.truncated   # stopped by max_new_tokens: tasks may treat it as degenerate
        rewards, per_func = combine_rewards(task.reward_funcs, task.reward_weights, [r["prompt"] for r in expanded],
                                            samples.texts, **columns)
        for name, values in per_func.items():
            per_func_rewards.setdefault(name, []).extend(v for v in values if v is not None)
        timers["reward"] = timers.get("reward", 0.0) + time.perf_counter() - t0
        for g, row in enumerate(rows):
            members = []
            for i in range(g * cfg.group_size, (g + 1) * cfg.group_size):
                degenerate += is_degenerate(samples.texts[i], truncated=samples.truncated[i]) is not None
                if rewards[i] is None:
                    none_rewards += 1
                    continue
                all_rewards.append(rewards[i])
                shaped = rewards[i] + overlong_penalty(len(samples.completion_ids[i]), max_new, cfg)
                members.append((i, shaped))
            shaped_rewards = [r for _, r in members]
            if len(members) < 2 or (cfg.dynamic_sampling and max(shaped_rewards) == min(shaped_rewards)):
                dropped_groups += 1
                continue
            groups.append((row, samples, members, group_advantages(shaped_rewards, cfg.scale_rewards)))
        needed = cfg.prompts_per_step - len(groups)
        rounds += 1
        if not cfg.dynamic_sampling or rounds > cfg.max_resample_rounds:
            break
    groups = groups[:cfg.prompts_per_step]

    sample_rows, sample_texts, sample_prompts, sample_ids = [], [], [], []
    for row, samples, members, advantages in groups:
        for (i, _), advantage in zip(members, advantages):
            masked = cfg.overlong == "mask" and samples.truncated[i]
            sample_rows.append(Row(samples.prompt_ids[i], samples.completion_ids[i], advantage=advantage,
                                   pg=not masked))
            sample_texts.append(samples.texts[i])
            sample_prompts.append(row["prompt"])
            sample_ids.append(samples.completion_ids[i])

    record = {"step": step, "reward_mean": _mean(all_rewards), "reward_std": _std(all_rewards),
              "reward_none": none_rewards, "groups_used": len(groups), "groups_dropped": dropped_groups,
              "degenerate_frac": degenerate / max(1, len(all_rewards) + none_rewards),
              "response_len": _mean([len(r.target_ids) for r in sample_rows]) if sample_rows else 0.0,
              # each reward function's mean, weighted or not: a task's degenerate-output rates are logged this way
              **{f"reward_{name}": _mean(values) for name, values in per_func_rewards.items()}}

    # 4. Constraint: reference log-probs (KL term and kl_ref in every mode), then the refiner's rows.
    refined_rows = []
    if sample_rows:
        t0 = time.perf_counter()
        ref_lp = sequence_logprobs(ref, sample_rows, device, packed=cfg.packing, temperature=cfg.temperature)
        for row, lp in zip(sample_rows, ref_lp):
            row.ref_logprobs = lp
        timers["reference"] = time.perf_counter() - t0
        if cfg.uses_refiner:
            t0 = time.perf_counter()
            result = refine(ref, tokenizer, template=refine_template, parse=task.parse_refinement,
                            prompts=sample_prompts, completions=sample_texts, completion_ids=sample_ids,
                            max_new_tokens=cfg.refine_max_new_tokens or max_new,
                            batch_size=cfg.generation_batch_size, changed_weight=cfg.refine_coef,
                            kept_weight=cfg.refine_kept_weight, context=cfg.refine_context)
            for row, refinement in zip(sample_rows, result.refinements):
                if refinement is not None:
                    refined_rows.append(Row(row.prompt_ids, refinement.refined_ids,
                                            sft_weights=refinement.sft_weights))
            timers["refine"] = time.perf_counter() - t0
            record.update(refine_rate=len(refined_rows) / len(sample_rows), refine_failed=result.failed,
                          changed_token_frac=result.changed_tokens / max(1, result.refined_tokens))
        else:
            record.update(refine_rate=0.0, refine_failed=0, changed_token_frac=0.0)

    # 5. Update.
    t0 = time.perf_counter()
    update = update_policy(cfg, policy, sample_rows + refined_rows, optimizer, device, use_old) if sample_rows \
        else {"skipped": 1}
    if update.get("skipped"):
        # The schedule follows the step count, skipped steps included; torch warns when no optimizer step came first.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()
    else:
        scheduler.step()
    timers["update"] = time.perf_counter() - t0
    state["skipped_steps"] = state.get("skipped_steps", 0) + update.pop("skipped", 0)
    record.update(update)
    record["skipped_steps"] = state["skipped_steps"]
    record["lr"] = scheduler.get_last_lr()[0]
    step_time = time.perf_counter() - t_step
    trained_tokens = sum(len(r.target_ids) for r in sample_rows + refined_rows)
    record.update({f"time_{k}_s": v for k, v in timers.items()})
    record.update(tokens_per_s=trained_tokens / max(timers["update"], 1e-9), step_time_s=step_time,
                  peak_mem_gb=_peak_mem_gb(device))
    return record


def update_policy(cfg: TrainConfig, policy, rows: list[Row], optimizer, device, use_old: bool) -> dict:
    """ppo_epochs passes of `minibatches` optimizer steps over the rows. A non-finite loss or gradient skips the
    optimizer step and leaves the weights as they were."""
    if use_old:
        pg_rows = [r for r in rows if r.pg]
        for row, lp in zip(pg_rows, sequence_logprobs(policy, pg_rows, device, packed=cfg.packing,
                                                      temperature=cfg.temperature)):
            row.old_logprobs = lp
    policy.train()
    sums: dict[str, float] = {}
    n_updates, skipped = 0, 0
    kl_values = []
    order = list(range(len(rows)))
    for epoch in range(cfg.ppo_epochs):
        for chunk in (order[i::cfg.minibatches] for i in range(cfg.minibatches)):
            batch = build_batch([rows[i] for i in chunk], device, packed=cfg.packing)
            out = rft_loss(policy, batch, cfg, use_old=use_old)
            pg_tokens = batch.pg_mask & (batch.targets != IGNORE_INDEX)
            if epoch == 0:
                # kl_ref, in every constraint mode: k3 estimate of KL(policy || reference) on the sampled tokens.
                log_ratio = batch.ref_logprobs[pg_tokens] - out.logprobs[pg_tokens]
                kl_values.append(torch.exp(log_ratio) - log_ratio - 1)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(),
                                                       cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            if not (torch.isfinite(out.loss) and torch.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                continue
            optimizer.step()
            n_updates += 1
            values = dict(out.metrics, grad_norm=float(grad_norm), loss=float(out.loss.detach()),
                          entropy=float(out.entropy[pg_tokens].mean()) if pg_tokens.any() else 0.0)
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
    averaged = {k: v / max(1, n_updates) for k, v in sums.items()}
    kl = float(torch.cat(kl_values).mean()) if kl_values and sum(v.numel() for v in kl_values) else float("nan")
    return {"pg_loss": averaged.get("pg_loss", 0.0), "sft_loss": averaged.get("sft_loss", 0.0),
            "clip_frac": averaged.get("clip_frac", 0.0), "entropy": averaged.get("entropy", 0.0),
            "grad_norm": averaged.get("grad_norm", 0.0), "loss": averaged.get("loss", 0.0), "kl_ref": kl,
            "skipped": int(skipped == cfg.ppo_epochs * cfg.minibatches), "nonfinite_updates": skipped}


def _mean(values) -> float:
    return sum(values) / len(values) if values else 0.0


def _std(values) -> float:
    if len(values) < 2:
        return 0.0
    mean = _mean(values)
    return (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def summarize(run_dir: Path, state: dict, last_step: int, stopped_by: str | None) -> dict:
    from fastrft.plots import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if "eval_reward" in r]
    steps = [r for r in records if "reward_mean" in r]
    tail = steps[-max(1, len(steps) // 5):] if steps else []
    return {
        "steps": last_step, "stopped_by": stopped_by,
        "eval_reward_initial": evals[0]["eval_reward"] if evals else None,
        "eval_reward_final": evals[-1]["eval_reward"] if evals else None,
        "eval_reward_best": max(r["eval_reward"] for r in evals) if evals else None,
        "reward_mean_last": _mean([r["reward_mean"] for r in tail]),
        "refine_rate_mean": _mean([r.get("refine_rate", 0.0) for r in steps]),
        "refine_rate_last": _mean([r.get("refine_rate", 0.0) for r in tail]),
        "kl_ref_last": _mean([r["kl_ref"] for r in tail if isinstance(r.get("kl_ref"), float)
                              and math.isfinite(r["kl_ref"])]),
        "skipped_steps": state.get("skipped_steps", 0),
        "wall_time_s": sum(r.get("step_time_s", 0.0) for r in steps),
    }
