"""The run configuration: one dataclass, readable from YAML, overridable with key=value pairs.

    cfg = load_config("run.yaml", ["lr=3e-5", "constraint=kl", "kl_coef=0.1"])

Unknown keys are errors that name the key (with the closest known ones); values are converted to the field's type.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastrft.batch import PACKING
from fastrft.loss import KL_ESTIMATORS
from fastrft.refiner import check_refine_template
from fastrft.rundir import write_atomically

CONSTRAINTS = ("none", "kl", "refiner", "kl+refiner")
REFINER_CONSTRAINTS = ("refiner", "kl+refiner")   # the modes whose refiner writes corrections
OVERLONG = ("none", "mask", "penalty")
LR_SCHEDULES = ("constant", "linear", "cosine")
DTYPES = ("float32", "bfloat16", "float16")
OPTIMIZERS = ("adamw", "adamw8bit")
QUANTIZATIONS = ("none", "8bit", "4bit")
REF_SHARDING = ("shard", "replicate")
PATH_KEYS = ("model", "ref_model", "dataset", "eval_dataset")   # local paths, relative to the working directory


@dataclass
class TrainConfig:
    # What to train, on what.
    model: str = ""                        # local path of the policy's initial weights (a Hugging Face model dir)
    ref_model: str | None = None           # local path of the frozen reference / refiner; default: model
    task: str = "demo"                     # "demo", "package.module:function" or "file.py:function" -> a Task
    dataset: str | None = None             # local .jsonl / .parquet replacing the task's training prompts
    eval_dataset: str | None = None        # local .jsonl / .parquet replacing the task's held-out prompts
    output_dir: str = "runs/run"
    seed: int = 0
    device: str = "auto"                   # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...

    # 1. Rollout.
    steps: int = 100
    prompts_per_step: int = 16
    group_size: int = 8                    # G samples per prompt
    max_new_tokens: int | None = None      # default: the task's
    temperature: float = 1.0
    top_p: float = 1.0
    generation_batch_size: int = 256       # sequences per generate() call

    # 3. Advantages.
    scale_rewards: bool = True             # GRPO: divide by the group's reward std
    dynamic_sampling: bool = True          # DAPO: drop zero-variance groups, refill from further prompts
    max_resample_rounds: int = 2
    overlong: str = "none"                 # "mask": truncated samples carry no loss; "penalty": DAPO soft penalty
    overlong_buffer: int = 4               # tokens before max_new_tokens where the soft penalty ramps up
    overlong_penalty: float = 1.0

    # 4. Constraint.
    constraint: str = "refiner"            # "none" | "kl" | "refiner" | "kl+refiner"
    kl_coef: float = 0.05
    kl_estimator: str = "k3"
    refine_coef: float = 1.0               # sft weight of each token the refiner changed
    refine_kept_weight: float = 0.0        # sft weight of the refinement's unchanged tokens (1 = plain SFT on it)
    refine_context: int = 0                # also weight this many tokens before each change
    refine_max_new_tokens: int | None = None   # default: max_new_tokens
    refine_template: str | None = None     # default: the task's; str.format(prompt=..., response=...)
    refine_draft: bool = True              # verify the response as the draft of the greedy refinement (the same
                                           # tokens, one forward pass when nothing changes); false: plain decoding

    # 5. Update.
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.28
    entropy_coef: float = 0.0
    router_aux_loss_coef: float | None = None   # MoE models: weight of the router's load-balancing loss (the model's
                                           # own, from its forward); default: the model config's; 0 turns it off
    ppo_epochs: int = 1                    # passes over each rollout
    minibatches: int = 1                   # optimizer steps per pass; > 1 (or ppo_epochs > 1) stores old log-probs
    optimizer: str = "adamw"               # "adamw" (torch's fused one on CUDA) | "adamw8bit" (bitsandbytes, CUDA)
    disable_dropout: bool = True           # the model's own dropout off in training (lora_dropout stays): the
                                           # rollout, the old log-probs and the reference run without it; a run
                                           # saved before this key: false, as it ran (load_saved_config)

    # Memory.
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    packing: str = "auto"                  # "auto": packed through a varlen attention kernel where one runs (CUDA
                                           # with flash-attn or flex_attention), else padded length-bucketed
                                           # micro-batches; "true" asks for packing, "false" pads (fastrft.batch)
    max_tokens_per_batch: int = 8192       # tokens of one micro-batch (padded: rows x longest row); the update
                                           # accumulates gradients over the micro-batches of each optimizer step
    liger: bool = False                    # Liger-Kernel's layer kernels (CUDA)
    ref_quantization: str = "none"         # "8bit" | "4bit" through bitsandbytes (CUDA): a separate reference
    lora_r: int = 0                        # LoRA adapters of this rank (peft), the rest frozen; 0 = train every
                                           # weight. Without ref_model the reference (and refiner) is the policy
                                           # with its adapters off: one copy of the base weights
    lora_alpha: float = 32.0               # the adapters' scale is lora_alpha / lora_r
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=list)  # default: every attention and MLP projection;
                                           # naming the embeddings or the LM head trains them whole
    load_in_4bit: bool = False             # QLoRA: the policy's base weights in NF4 (bitsandbytes, CUDA; lora_r > 0)

    # Data parallelism (torchrun --nproc-per-node N -m fastrft train ...; fastrft.distributed).
    fsdp: bool | None = None               # shard the policy with FSDP2 per decoder layer; false: DDP (whole copies);
                                           # default: true when the job has more than one rank
    ref_sharding: str | None = None        # "shard" (FSDP2, gathered for its phases) | "replicate" (a whole copy per
                                           # rank); default: shard under fsdp, else replicate
    dist_timeout_s: float = 600.0          # a collective that waits longer (a rank died) ends the job with an error

    # Logging and checkpoints.
    eval_every: int = 10
    eval_size: int | None = None           # held-out prompts per evaluation; default: all
    save_every: int = 50
    keep_checkpoints: int | None = 2       # the newest checkpoints kept (each save prunes older ones); null: all
    progress: bool = True
    plots: bool = True                     # draw plots/ at the end of the run (fastrft plot RUN_DIR redraws them)
    extra: dict = field(default_factory=dict)  # task options, passed to the task loader

    def __post_init__(self):
        for key in (*PATH_KEYS, "output_dir"):   # ~ in a YAML file: no shell expands it there
            if isinstance(getattr(self, key), str):
                setattr(self, key, os.path.expanduser(getattr(self, key)))
        # packing was a boolean: true/false (YAML booleans included) still mean what they did.
        word = str(self.packing).lower()
        if word in _BOOLEAN_WORDS:
            self.packing = "true" if _BOOLEAN_WORDS[word] else "false"
        for name, allowed in (("constraint", CONSTRAINTS), ("overlong", OVERLONG), ("lr_schedule", LR_SCHEDULES),
                              ("dtype", DTYPES), ("optimizer", OPTIMIZERS), ("ref_quantization", QUANTIZATIONS),
                              ("kl_estimator", KL_ESTIMATORS),
                              ("packing", PACKING), ("ref_sharding", REF_SHARDING + (None,))):
            if getattr(self, name) not in allowed:
                raise ConfigError(name, f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        self._check_numbers()
        if self.device != "auto":
            try:
                kind = torch.device(self.device).type
            except (RuntimeError, ValueError):
                kind = None
            if kind not in ("cpu", "cuda"):   # fastrft's kernels and its memory paths are CUDA's or the CPU's
                raise ConfigError("device", f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.refine_template is not None:
            try:
                check_refine_template(self.refine_template)
            except ValueError as e:
                raise ConfigError("refine_template", str(e)) from None
        if self.load_in_4bit and self.lora_r == 0:
            raise ConfigError("load_in_4bit", "load_in_4bit=true needs lora_r > 0: 4-bit base weights are not "
                                              "trained, only adapters on them")
        if self.lora_r and not self.ref_model and self.ref_quantization != "none":
            raise ConfigError("ref_quantization", "with lora_r > 0 and no ref_model the reference is the policy's "
                                                  "own base weights: ref_quantization has no separate reference to "
                                                  "quantize (load_in_4bit quantizes the base)")
        if not self.output_dir:
            raise ConfigError("output_dir", "output_dir must name the run's folder, got ''")
        if self.warmup_steps >= self.steps:
            raise ConfigError("warmup_steps", f"warmup_steps={self.warmup_steps} is not below steps={self.steps}: the "
                                              f"learning rate would never reach lr")
        if self.overlong == "penalty" and self.overlong_buffer < 1:
            raise ConfigError("overlong_buffer", "overlong=penalty needs overlong_buffer >= 1: the penalty ramps up "
                                                 "over the last overlong_buffer tokens before max_new_tokens")
        if self.lora_target_modules and self.lora_r == 0:
            raise ConfigError("lora_target_modules", "lora_target_modules names LoRA's modules, but lora_r=0 trains "
                                                     "every weight whole: set lora_r > 0")
        if self.group_size < 2:
            raise ConfigError("group_size", "group_size must be >= 2: GRPO's advantages compare samples of the same "
                                            "prompt")
        if self.prompts_per_step * self.group_size < self.minibatches:
            raise ConfigError("minibatches", f"minibatches={self.minibatches} exceeds the {self.prompts_per_step * self.group_size} "
                             f"samples of a step")

    def _check_numbers(self) -> None:
        """Each numeric key's type (a bool is not a number) and range; NaN and inf are out of every range."""
        for name, annotation in _field_types().items():
            value = getattr(self, name)
            kind = _base_type(annotation)
            if value is None and annotation is not kind:
                continue
            if kind is bool and not isinstance(value, bool):
                raise ConfigError(name, f"{name} must be true or false, got {value!r}")
            if kind in (int, float):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                        (kind is int and not isinstance(value, int)):
                    raise ConfigError(name, f"{name} must be {kind.__name__}, got {value!r}")
                if not math.isfinite(value):
                    raise ConfigError(name, f"{name} must be a finite number, got {value!r}")
        for names, test, requirement in _RANGES:
            for name in names:
                value = getattr(self, name)
                if value is not None and not test(value):
                    raise ConfigError(name, f"{name} must be {requirement}, got {value!r}")

    def with_absolute_paths(self) -> TrainConfig:
        """A copy whose local paths are absolute, as config.yaml holds them, so that a run resumes and exports from
        any working directory: PATH_KEYS, each task option that names an existing file or folder
        (extra.reward_model, extra.dataset), and a task module of the working directory (as its file)."""
        from fastrft.tasks import portable_task_spec

        extra = {name: os.path.abspath(value) if isinstance(value, str) and value and os.path.exists(value) else value
                 for name, value in self.extra.items()}
        return self.replaced(extra=extra, task=portable_task_spec(self.task),
                             **{key: os.path.abspath(value) for key in PATH_KEYS if (value := getattr(self, key))})

    def replaced(self, **changes) -> TrainConfig:
        """dataclasses.replace(self, **changes) (checked alike), knowing where the keys it keeps were set."""
        out = dataclasses.replace(self, **changes)
        out.origins = {key: place for key, place in self.origins.items() if key.partition(".")[0] not in changes}
        return out

    @property
    def uses_kl(self) -> bool:
        return self.constraint in ("kl", "kl+refiner")

    @property
    def uses_refiner(self) -> bool:
        return self.constraint in REFINER_CONSTRAINTS

    # Where load_config read each key ("run.yaml:7", "override 'lr=1e-4'"; a task option as "extra.NAME"): not a
    # field, never saved; an error found later (a task's options, checked as the task loads) says where its value
    # was set (located).
    origins: typing.ClassVar[dict[str, str]] = {}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def located(self, error: ConfigError) -> ValueError:
        """error, prefixed with where its key was set where load_config knows it."""
        return _located(error, self.origins.get(error.key))


class ConfigError(ValueError):
    """A config value out of its type or range; `key` names the config key, so that load_config can say where it
    was set (the YAML file and line, or the command line)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


SEED_END = 2**32   # seeds are in [0, SEED_END): numpy's range; torch's ends at 2**64 - 1
SEED_RANGE = "[0, 2**32)"   # SEED_END's range, as messages say it

# (keys, test, what the test asks), checked after the types; None (unset) passes.
_RANGES = (
    (("steps", "prompts_per_step", "generation_batch_size", "ppo_epochs", "minibatches", "eval_every", "save_every",
      "max_tokens_per_batch", "max_new_tokens", "refine_max_new_tokens", "eval_size", "keep_checkpoints"),
     lambda v: v >= 1, ">= 1"),
    (("max_resample_rounds", "overlong_buffer", "refine_context", "warmup_steps", "lora_r"), lambda v: v >= 0,
     ">= 0"),
    (("lr", "temperature", "lora_alpha", "dist_timeout_s"), lambda v: v > 0, "> 0"),
    (("lora_dropout",), lambda v: 0 <= v < 1, "in [0, 1)"),
    (("kl_coef", "refine_coef", "refine_kept_weight", "weight_decay", "grad_clip", "clip_high", "entropy_coef",
      "overlong_penalty", "router_aux_loss_coef"), lambda v: v >= 0, ">= 0"),
    (("top_p",), lambda v: 0 < v <= 1, "in (0, 1]"),
    (("clip_low",), lambda v: 0 <= v < 1, "in [0, 1) (the ratio is clipped at 1 - clip_low)"),
    (("min_lr_ratio",), lambda v: 0 <= v <= 1, "in [0, 1]"),
    (("seed",), lambda v: 0 <= v < SEED_END, f"in {SEED_RANGE}"),
)


def _field_types() -> dict[str, object]:
    return typing.get_type_hints(TrainConfig)


def _base_type(annotation):
    """X for X and for X | None."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, _UnionType) else ()
    return next((t for t in options if t is not type(None)), annotation)


def _convert(key: str, value, annotation):
    """A YAML value or a command-line string as the field's type. Strings are parsed (lr=3e-5, steps=10); a typed
    value must be of the field's type: a YAML boolean is no number (steps: yes), and a number, list or null no string
    (output_dir: null)."""
    kind = _base_type(annotation)
    if kind is not annotation:  # X | None
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        annotation = kind
    if typing.get_origin(annotation) is list:
        # A YAML list, or on the command line a comma-separated string (q_proj,v_proj) or a YAML flow list
        # ([q_proj, v_proj]).
        if isinstance(value, str) and value.strip().startswith("["):
            import yaml

            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ValueError(f"config key {key!r}: {value!r} is not a list (write q_proj,v_proj or "
                                 f"[q_proj, v_proj])") from None
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) for x in items):
            raise ValueError(f"config key {key!r} must be a list of names (or a comma-separated string), got "
                             f"{value!r}")
        return [x.strip() for x in items if x.strip()]
    if annotation is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r} must be a mapping, got {value!r}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOLEAN_WORDS:
            return _BOOLEAN_WORDS[value.lower()]
        raise ValueError(f"config key {key!r} must be a boolean (true/false), got {value!r}")
    if annotation in (int, float):
        if isinstance(value, str):
            try:
                value = float(value) if annotation is float else int(value)
            except ValueError:
                raise ValueError(f"config key {key!r} must be {annotation.__name__}, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (annotation is int and not float(value).is_integer()):
            raise ValueError(f"config key {key!r} must be {annotation.__name__}, got {_shown(value)}")
        return annotation(value)
    if isinstance(value, bool) and key in _BOOLEAN_STRING_KEYS:
        return str(value).lower()
    if not isinstance(value, str):
        raise ValueError(f"config key {key!r} must be a string, got {_shown(value)}"
                         + (" (quote it in YAML)" if isinstance(value, (int, float)) else ""))
    return value


def _shown(value) -> str:
    """A value as YAML wrote it: true, null."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)


_UnionType = type(int | None)
# String keys that took YAML booleans when they were booleans (packing: true).
_BOOLEAN_STRING_KEYS = ("packing",)
_BOOLEAN_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False,
                  "off": False}


def _unknown_key(key: str, known) -> ValueError:
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ValueError(f"unknown config key {key!r}{hint}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), **values) -> TrainConfig:
    """TrainConfig from a YAML file (optional), then keyword values, then `key=value` overrides, in that order.
    `extra.NAME=value` sets a task option. Errors say where the bad value was set: the file and line, or the
    override."""
    import yaml

    types = _field_types()
    merged: dict = {}
    where: dict[str, str] = {}   # key -> where it was set
    if path is not None:
        data, lines = _read_yaml_mapping(Path(path))
        merged.update(data)
        where.update({key: f"{path}:{lines[str(key)]}" if str(key) in lines else str(path) for key in data})
        if isinstance(data.get("extra"), dict):   # each task option where it was set, else where extra was
            where.update({f"extra.{name}": f"{path}:{lines[f'extra.{name}']}" if f"extra.{name}" in lines
                          else where["extra"] for name in data["extra"]})
    merged.update(values)
    for item in overrides:   # a later one wins: scripts append to a list of common overrides
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value")
        if key.startswith("extra."):
            # Task options are typed the way YAML would type them: extra.n_eval=64 is an int.
            try:
                option = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise ValueError(f"override {item!r}: the value is not valid YAML ({getattr(e, 'problem', e)})") \
                    from None
            options = merged.get("extra", {})
            if not isinstance(options, dict):
                # As the file's own value would be refused: where it was set, not a TypeError here.
                raise _located(ValueError(f"config key 'extra' must be a mapping, got {options!r}"),
                               where.get("extra"))
            merged["extra"] = {**options, key[len("extra."):]: option}
            where[key] = f"override {item!r}"
            continue
        merged[key] = value
        where[key] = f"override {item!r}"
    kwargs = {}
    for key, value in merged.items():
        try:
            if key not in types:
                raise _unknown_key(key, list(types))
            kwargs[key] = _convert(key, value, types[key])
        except ValueError as e:
            raise _located(e, where.get(key)) from None
    try:
        cfg = TrainConfig(**kwargs)
    except ConfigError as e:
        raise _located(e, where.get(e.key)) from None
    cfg.origins = where
    return cfg


def _located(error: ValueError, place: str | None) -> ValueError:
    return ValueError(f"{place}: {error}") if place else error


def _read_yaml_mapping(path: Path) -> tuple[dict, dict[str, int]]:
    """The YAML file's mapping and the line of each top-level key; errors name the file (and line)."""
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {path} is not UTF-8 text (byte {e.start})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{path}{at}: malformed YAML: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values, not a {type(data).__name__}")
    lines: dict[str, int] = {}
    for key, value in node.value:
        line = key.start_mark.line + 1
        if str(key.value) in lines:
            raise ValueError(f"{path}:{line}: {key.value!r} is set twice (first on line {lines[str(key.value)]})")
        lines[str(key.value)] = line
        if key.value == "extra" and isinstance(value, yaml.MappingNode):   # the task options' own lines
            lines.update({f"extra.{option.value}": option.start_mark.line + 1 for option, _ in value.value})
    return data, lines


# The keys of fastrft's first release: every config save_config has written holds them (it writes every key; a run
# saved before a later key was added lacks only that one), a config a user wrote, of the keys it sets, hardly ever.
_FIRST_RELEASE_KEYS = frozenset((
    "model", "ref_model", "task", "dataset", "eval_dataset", "output_dir", "seed", "device", "steps",
    "prompts_per_step", "group_size", "max_new_tokens", "temperature", "top_p", "generation_batch_size",
    "scale_rewards", "dynamic_sampling", "max_resample_rounds", "overlong", "overlong_buffer", "overlong_penalty",
    "constraint", "kl_coef", "kl_estimator", "refine_coef", "refine_kept_weight", "refine_context",
    "refine_max_new_tokens", "refine_template", "lr", "weight_decay", "warmup_steps", "lr_schedule", "min_lr_ratio",
    "grad_clip", "clip_low", "clip_high", "entropy_coef", "ppo_epochs", "minibatches", "optimizer", "dtype",
    "gradient_checkpointing", "packing", "liger", "ref_quantization", "eval_every", "eval_size", "save_every",
    "progress", "plots", "extra"))


# Keys added since runs were first saved: the value a run saved without one trained under (load_saved_config).
_AS_RAN_WITHOUT = {"disable_dropout": False}


def load_saved_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), **values) -> TrainConfig:
    """A run's config.yaml as load_config reads it, a key added since it was saved taken as the run trained without
    it (its model's dropout on: a resume goes on as it ran, fastrft compare tells it from a run of today's
    defaults)."""
    import yaml

    saved = yaml.safe_load(Path(path).read_bytes())
    as_ran = {key: value for key, value in _AS_RAN_WITHOUT.items() if isinstance(saved, dict) and key not in saved}
    return load_config(path, overrides, **{**as_ran, **values})


def is_saved_config(path: Path) -> bool:
    """Whether path holds a config as save_config writes it: a YAML mapping of every TrainConfig key (a run saved
    before a key was added lacks that one). A config of the user's own, which sets some keys, is not: --overwrite
    never replaces it."""
    import yaml

    if not path.is_file():
        return False
    try:
        saved = yaml.safe_load(path.read_bytes())
    except yaml.YAMLError:
        return False
    return isinstance(saved, dict) and _FIRST_RELEASE_KEYS <= set(saved) <= set(_field_types())


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """cfg as YAML at path, written atomically (the old file, or the new one, whole)."""
    import yaml

    write_atomically(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
