"""Checkpoints of a training run, written atomically, and a clean stop on SIGINT/SIGTERM.

    save_checkpoint(run_dir, step, model=, optimizer=, scheduler=, state=)   -> run_dir/checkpoints/step_00000006/
    load_checkpoint(run_dir, model=, optimizer=, scheduler=)                 -> (step, state)
    latest_checkpoint(run_dir)                                              -> the directory load_checkpoint would read
    StopSignal()                                                            SIGINT/SIGTERM -> a flag, while active

Layout of one checkpoint (run_dir/checkpoints/step_{step:08d}/):
    weights/         a torch.distributed.checkpoint (DCP) of {"model": the model's weights, "optimizer": its state},
                     keyed by parameter name (torch.distributed.checkpoint.state_dict): every rank writes its own
                     shards, and DCP reshards on load, so a checkpoint written by N ranks loads at any world size
                     (one process included). With trainable_only=True only the parameters that train (a LoRA run's
                     adapters): the rest is the base model the run loads anyway. Tied weights are stored once.
    scheduler.pt     scheduler.state_dict(), when a scheduler was given
    rng.pt           python `random`, numpy's global generator, torch CPU and every CUDA device: rank 0's; rank r's
                     in rng_{r}.pt (a rank that had none when loading at a larger world size derives its own)
    state.json       the trainer's own JSON-able state (data position, counters, ...)
    checkpoint.json  manifest, written last (by rank 0, once every rank has written): step, every file above and
                     each one's sha256. A directory without it is not a checkpoint; a file whose sha256 differs is
                     corrupt, and loading falls back to the previous checkpoint.
and run_dir/checkpoints/latest holds the name of the newest one. Checkpoints of earlier versions (model.pt and
optimizer.pt, torch.save of the state dicts) still load in one process.

Atomicity: everything is written into a hidden sibling (.tmp-step_...), each file fsynced, then the directory is
renamed into place and `latest` replaced (write + fsync + os.replace). A crash at any point leaves the previous
checkpoint intact and `latest` naming it; leftovers of the crash are removed by the next save. Re-saving a step that
already exists moves the old directory aside first: a crash in that instant loses that step and `latest` falls back to
the previous one.

Data-parallel runs: every rank calls save_checkpoint and load_checkpoint with its World; rank 0 alone creates,
renames and prunes directories; the checksums are shared out over the ranks by file size (at save and at load, so a
large checkpoint's hashing takes 1/N of the time and no rank waits on another's long hash), and every rank reaches
the same choice of checkpoint. The run directory must be one filesystem that every rank sees (a shared filesystem
across nodes).

Simplified: one job per run directory (the trainer locks it); the .pt files are loaded with
torch.load(weights_only=True), so a scheduler whose state holds arbitrary Python objects cannot be restored.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import tempfile
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException

from fastrft.distributed import SINGLE, World, local_tensor
from fastrft.rundir import CHECKPOINTS_DIR, TMP_PREFIX, as_made, fsync_dir

LATEST_FILE = "latest"
MANIFEST_FILE = "checkpoint.json"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
WEIGHTS_DIR = "weights"
_FULL_DISK_BYTES = 64 << 20   # free space under which a failed save is said to be the disk's being full


def is_checkpoint_entry(entry: Path) -> bool:
    """Whether entry, in a run's checkpoints folder, is this module's: a checkpoint, the pointer to the newest one,
    or what a crashed save or prune left behind."""
    return ((entry.name == LATEST_FILE and entry.is_file())
            or (_STEP_DIR.match(entry.name) is not None and ((entry / MANIFEST_FILE).is_file()
                                                              or _is_pruned_remains(entry)))
            or entry.name.startswith(TMP_PREFIX))


def _is_pruned_remains(entry: Path) -> bool:
    """A step_* folder without its manifest, holding nothing but a checkpoint's files: what a prune that was killed
    mid-delete left before fastrft pruned by renaming first (a save names a folder step_* only once it is whole)."""
    names = {"state.json", "scheduler.pt", "model.pt", "optimizer.pt", WEIGHTS_DIR}
    return entry.is_dir() and not (entry / MANIFEST_FILE).exists() and all(
        child.name in names or re.fullmatch(r"rng(_\d+)?\.pt", child.name) for child in entry.iterdir())


def save_checkpoint(run_dir, step: int, *, model: torch.nn.Module, optimizer=None, scheduler=None,
                    state: dict | None = None, keep: int | None = 2, trainable_only: bool = False,
                    world: World = SINGLE) -> Path:
    """Write a checkpoint of `step` under run_dir/checkpoints/ and return its directory. Every rank of a
    data-parallel job calls it (collectively) with its World.

    Keeps the newest `keep` checkpoints (by step; None keeps all), never the one just written nor the one `latest`
    names. `state` must be JSON-serialisable: it comes back as-is from load_checkpoint."""
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None, got {keep}")
    # An optimizer before its first step has no state: DCP's state-dict API would create it (with a step of lr 0,
    # which shifts AdamW's bias correction), so it is recorded as fresh instead.
    optimizer_fresh = optimizer is not None and not optimizer.state
    weights = _weights_state(model, None if optimizer_fresh else optimizer, trainable_only)
    poisoned = [name for name, t in weights["model"].items()
                if t.is_floating_point() and not local_tensor(t).isfinite().all()]
    if world.max([len(poisoned)])[0]:   # a checkpoint is what a run falls back to: never NaN or inf weights
        raise ValueError(f"not saving step {step}: the model's weights hold NaN or inf ({', '.join(poisoned[:3])}"
                         f"{', ...' if len(poisoned) > 3 else ''}); the previous checkpoint stays the latest")
    try:  # before touching the disk, so a bad state costs nothing
        state_json = json.dumps({} if state is None else state, indent=2, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"state must be JSON-serialisable: {e}") from e

    ckpt_root = Path(run_dir) / CHECKPOINTS_DIR
    name = f"step_{step:08d}"
    final_dir = ckpt_root / name
    tmp_dir = None
    if world.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(ckpt_root)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{name}-", dir=ckpt_root))
        as_made(tmp_dir, directory=True)
    tmp_dir = Path(world.broadcast(str(tmp_dir)))
    try:
        _save_weights(weights, tmp_dir / WEIGHTS_DIR, world)
        _write_torch(tmp_dir / _rng_file(world.rank), _rng_state())
        if world.is_main:
            if scheduler is not None:
                _write_torch(tmp_dir / "scheduler.pt", scheduler.state_dict())
            _write_bytes(tmp_dir / "state.json", state_json.encode())
        world.barrier()   # every rank's files are on disk
        files = _files_of_every_rank(tmp_dir, world)
        sha256 = _shared_sha256(tmp_dir, files, world)
        if world.is_main:
            manifest = {"step": step, "files": files, "torch": torch.__version__, "world_size": world.size,
                        "weights": "trainable" if trainable_only else "all",
                        "optimizer": optimizer is not None, "optimizer_fresh": optimizer_fresh,
                        "scheduler": scheduler is not None, "sha256": sha256}
            _write_bytes(tmp_dir / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
            fsync_dir(tmp_dir / WEIGHTS_DIR)
            fsync_dir(tmp_dir)
            if final_dir.exists():  # the same step saved again (say a periodic save, then a stop at that step)
                old_dir = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}old-{name}-", dir=ckpt_root))
                os.replace(final_dir, old_dir / name)
                os.replace(tmp_dir, final_dir)
                shutil.rmtree(old_dir, ignore_errors=True)
            else:
                os.replace(tmp_dir, final_dir)
            fsync_dir(ckpt_root)
    except BaseException as error:
        full = isinstance(error, (OSError, RuntimeError)) and _free_bytes(ckpt_root) < _FULL_DISK_BYTES
        if world.is_main:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        if full:   # torch's own writers say it as "unexpected pos ..."
            raise OSError(errno.ENOSPC, f"no space left on the device to save step {step}'s checkpoint "
                                        f"({type(error).__name__}: {error}); the previous checkpoint stays the latest",
                          str(ckpt_root)) from error
        raise

    if world.is_main:
        latest_tmp = ckpt_root / f"{TMP_PREFIX}{LATEST_FILE}-{os.getpid()}"
        _write_bytes(latest_tmp, f"{name}\n".encode())
        os.replace(latest_tmp, ckpt_root / LATEST_FILE)
        fsync_dir(ckpt_root)
        if keep is not None:
            _prune(ckpt_root, keep, protect={name})
    world.barrier()   # no rank reads the run folder before the checkpoint is in place
    return final_dir


# What a resume can do about weights that load narrower than they were saved (load_checkpoint's narrowed_note).
RESUME_NARROWED_NOTE = "an FSDP2 mixed-precision run keeps float32 master weights; resume it with the same engine, " \
                       "or dtype=float32, to keep them"


def load_checkpoint(run_dir, *, model: torch.nn.Module, optimizer=None, scheduler=None,
                    map_location="cpu", world: World = SINGLE,
                    narrowed_note: str = RESUME_NARROWED_NOTE) -> tuple[int, dict]:
    """Restore model, optimizer, scheduler and RNG states from the newest good checkpoint; return (step, state).
    Every rank of a data-parallel job calls it (collectively) with its World; the checkpoint may come from any
    world size.

    `run_dir` is a run directory (the checkpoint `latest` names, else the highest complete step_* directory) or one
    checkpoint directory. Every file is checked against the manifest's sha256 before anything is restored. In a
    run directory a checkpoint with a missing, corrupt or truncated file is skipped with a warning naming it, and
    the previous one is tried; when none is good, an error of the newest one's type naming each one's problem is
    raised (FileNotFoundError for a missing file, ValueError for an unreadable one). ValueError too when a good
    checkpoint does not fit the model/optimizer. Nothing is modified unless every file reads back. Weights saved
    wider than the model holds them (fp32 master weights into a bfloat16 model) are said in a warning ending with
    narrowed_note."""
    ckpt_dir, manifest, error = _choose_checkpoint(Path(run_dir), optimizer is not None, scheduler is not None,
                                                   world)
    if error is not None:
        raise error
    ckpt_dir = Path(ckpt_dir)
    try:
        state = json.loads((ckpt_dir / "state.json").read_text())
        own_rng = _rng_file(world.rank) in manifest["files"]
        rng = _read_torch(ckpt_dir / _rng_file(world.rank if own_rng else 0), "cpu")
        scheduler_state = _read_torch(ckpt_dir / "scheduler.pt", map_location) if scheduler is not None else None
        if "model.pt" in manifest["files"]:
            _load_torch_save(ckpt_dir, manifest, model, optimizer, map_location, world)
        else:
            _load_weights(ckpt_dir / WEIGHTS_DIR, manifest, model, optimizer, world, narrowed_note)
        if scheduler is not None:
            scheduler.load_state_dict(scheduler_state)
    except (RuntimeError, KeyError, ValueError, CheckpointException) as e:   # (torch's CheckpointException is a
        # BaseException: a weight of another shape, say)
        raise ValueError(f"checkpoint {ckpt_dir} does not fit the model/optimizer/scheduler given: "
                         f"{_cause(e)}") from e
    _set_rng_state(rng)
    if not own_rng:
        # A rank the saving job did not have: its own stream, derived from rank 0's.
        seed = int(torch.randint(2**62, ())) + world.rank
        random.seed(seed)
        torch.manual_seed(seed)
    return manifest["step"], state


def _cause(error: BaseException) -> BaseException:
    """What went wrong: a CheckpointException's first failure (its message is every rank's traceback)."""
    if isinstance(error, CheckpointException) and error.failures:
        return next(iter(error.failures.values()))[0]
    return error


def _choose_checkpoint(run_dir: Path, with_optimizer: bool, with_scheduler: bool, world: World = SINGLE):
    """(directory, manifest, None) of the newest checkpoint whose every file checks out, or (None, None, an error of
    the newest one's type naming each one's problem); the same on every rank (collective: the ranks share the
    checksums' work)."""
    candidates = [Path(c) for c in world.broadcast([str(c) for c in _checkpoints_newest_first(run_dir)]
                                                   if world.is_main else None)]
    if not candidates:
        return None, None, FileNotFoundError(
            f"no checkpoint in {run_dir}: expected {run_dir / CHECKPOINTS_DIR}/step_*/{MANIFEST_FILE} (or "
            f"{MANIFEST_FILE} in {run_dir} itself)")
    errors = []
    for ckpt_dir in candidates:
        try:
            return str(ckpt_dir), _verified_manifest(ckpt_dir, with_optimizer, with_scheduler, world), None
        except (FileNotFoundError, ValueError) as e:
            errors.append(e)
            if ckpt_dir is not candidates[-1] and world.is_main:
                warnings.warn(f"checkpoint {ckpt_dir} is unusable ({e}); falling back to the previous one",
                              stacklevel=3)
    if len(errors) == 1:
        return None, None, errors[0]
    return None, None, type(errors[0])(f"none of the {len(errors)} checkpoints in {run_dir} loads: "
                                       + "; ".join(f"{d.name}: {e}" for d, e in zip(candidates, errors)))


def _verified_manifest(ckpt_dir: Path, with_optimizer: bool, with_scheduler: bool, world: World = SINGLE) -> dict:
    """The checkpoint's manifest, after checking that it holds what the caller restores and that every file's
    sha256 matches (every rank reads the manifest and checks the small files; the checksums are shared out)."""
    manifest = read_manifest(ckpt_dir)
    if with_optimizer and not manifest["optimizer"]:
        raise FileNotFoundError(f"{ckpt_dir} holds no optimizer state (it was saved without an optimizer)")
    if with_scheduler and "scheduler.pt" not in manifest["files"]:
        raise FileNotFoundError(f"{ckpt_dir} holds no scheduler state (it was saved without a scheduler)")
    expected = manifest["sha256"]   # checkpoints written before checksums have none
    # A file the manifest names and the folder lacks fails every rank alike (the same listing), before any collective.
    found = _shared_sha256(ckpt_dir, sorted(expected), world)
    for name in sorted(expected):
        if found[name] != expected[name]:
            raise ValueError(f"corrupt checkpoint file {ckpt_dir / name}: its sha256 differs from the one in "
                             f"{MANIFEST_FILE} (changed or truncated since it was written)")
    for name in ("state.json", _rng_file(0)):
        if name not in manifest["files"]:
            raise FileNotFoundError(f"checkpoint file missing: {ckpt_dir / name}")
    state_path = ckpt_dir / "state.json"
    try:
        json.loads(state_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"corrupt checkpoint file {state_path}: {e}") from e
    for name in manifest["files"]:   # the small files; unreadable ones surface here, before anything is restored
        if name.endswith(".pt") and name not in ("model.pt", "optimizer.pt"):
            _read_torch(ckpt_dir / name, "cpu")
    return manifest


def _weights_state(model, optimizer, trainable_only: bool) -> dict:
    """{"model": weights, "optimizer": state} keyed by parameter name, DTensor shards under FSDP2
    (torch.distributed.checkpoint.state_dict)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        out = {"model": get_model_state_dict(model)}
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        out = {"model": model_state, "optimizer": optimizer_state}
    if trainable_only:
        # By name: StateDictOptions(ignore_frozen_params=True) keeps a frozen head tied to the embeddings.
        trainable = set(trainable_weights(model))
        out["model"] = {name: t for name, t in out["model"].items() if name in trainable}
    return out


@contextmanager
def _single_process_quiet():
    # DCP warns that it assumes one process whenever torch.distributed is not initialised: that is the intent here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _save_weights(weights: dict, path: Path, world: World) -> None:
    import torch.distributed.checkpoint as dcp

    with _single_process_quiet():
        dcp.save(weights, checkpoint_id=str(path), no_dist=world.size == 1)


def _load_weights(path: Path, manifest: dict, model, optimizer, world: World, narrowed_note: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    trainable = manifest["weights"] == "trainable"
    if manifest["optimizer_fresh"]:
        optimizer = None   # saved before its first step: the fresh optimizer given is that state already
    template = _weights_state(model, optimizer, trainable)
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    saved = {key.split(".", 1)[1]: entry for key, entry in metadata.items() if key.startswith("model.")}
    expected = set(template["model"])
    if set(saved) != expected:
        what = "trainable weights" if trainable else "weights"
        raise ValueError(f"it holds the {what} {_names(set(saved) - expected)} the model does not have"
                         f"{' trainable' if trainable else ''}, and lacks {_names(expected - set(saved))}")
    saved_dtypes = {name: getattr(getattr(entry, "properties", None), "dtype", None) for name, entry in saved.items()}
    narrowed = sorted({(str(dtype), str(template["model"][name].dtype)) for name, dtype in saved_dtypes.items()
                       if dtype is not None and _bits(dtype) > _bits(template["model"][name].dtype)})
    if narrowed and world.is_main:   # say so: a resumed run otherwise trains on, silently less precise
        warnings.warn(f"{path.parent}: the checkpoint's {', '.join(f'{a} weights load into {b}' for a, b in narrowed)}"
                      f" ({narrowed_note})", stacklevel=3)
    with _single_process_quiet():
        dcp.load(template, checkpoint_id=str(path), no_dist=world.size == 1)
    options = StateDictOptions(strict=not trainable)
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, template["model"], options=options)
    else:
        set_state_dict(model, optimizer, model_state_dict=template["model"],
                       optim_state_dict=template["optimizer"], options=options)


def _bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits if dtype.is_floating_point else 0


def _load_torch_save(ckpt_dir: Path, manifest: dict, model, optimizer, map_location, world: World) -> None:
    """A checkpoint of an earlier version: model.pt and optimizer.pt, whole state dicts of one process."""
    if world.size > 1:
        raise ValueError("it is an earlier version's single-process checkpoint (model.pt): resume it in one "
                         "process; its next checkpoint loads at any world size")
    weights = _read_torch(ckpt_dir / "model.pt", map_location)
    if manifest["weights"] == "trainable":
        expected = set(trainable_weights(model))
        if set(weights) != expected:
            raise ValueError(f"it holds the trainable weights {_names(set(weights) - expected)} the "
                             f"model does not train, and lacks {_names(expected - set(weights))}")
        model.load_state_dict(weights, strict=False)
    else:
        model.load_state_dict(weights)
    if optimizer is not None:
        optimizer.load_state_dict(_read_torch(ckpt_dir / "optimizer.pt", map_location))


def _rng_file(rank: int) -> str:
    return "rng.pt" if rank == 0 else f"rng_{rank}.pt"


def trainable_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by their state_dict names."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def _names(names: set[str]) -> str:
    listed = sorted(names)
    return "[" + ", ".join(listed[:3]) + (", ..." if len(listed) > 3 else "") + "]" if listed else "nothing"


def _checkpoints_newest_first(run_dir: Path) -> list[Path]:
    """A checkpoint directory given itself; else the one latest_checkpoint picks, then the other complete ones from
    the highest step down."""
    first = latest_checkpoint(run_dir)
    if first is None or first == run_dir:
        return [] if first is None else [first]
    others = [d for _, d in reversed(_step_dirs(run_dir / CHECKPOINTS_DIR))
              if d != first and (d / MANIFEST_FILE).is_file()]
    return [first, *others]


def latest_state(run_dir) -> dict:
    """The trainer's state (state.json) of the newest checkpoint of run_dir that has one readable; {} where none
    has. Unverified: a small file read before the checkpoint is (load_checkpoint checks every file)."""
    for ckpt_dir in _checkpoints_newest_first(Path(run_dir)):
        try:
            return json.loads((ckpt_dir / "state.json").read_text())
        except (OSError, ValueError):
            continue
    return {}


def latest_checkpoint(run_dir) -> Path | None:
    """The checkpoint directory load_checkpoint(run_dir) would read, or None when there is none."""
    run_dir = Path(run_dir)
    if (run_dir / MANIFEST_FILE).is_file():
        return run_dir
    ckpt_root = run_dir / CHECKPOINTS_DIR
    if not ckpt_root.is_dir():
        return None
    latest_path = ckpt_root / LATEST_FILE
    if latest_path.is_file():
        name = latest_path.read_text().strip()
        if _STEP_DIR.match(name) and (ckpt_root / name / MANIFEST_FILE).is_file():
            return ckpt_root / name
        warnings.warn(f"{latest_path} names {name!r}, which is not a complete checkpoint; "
                      f"falling back to the highest complete step directory", stacklevel=2)
    complete = [d for _, d in _step_dirs(ckpt_root) if (d / MANIFEST_FILE).is_file()]
    return complete[-1] if complete else None


def save_traces(run_dir) -> list[Path]:
    """What completed saves left in run_dir's checkpoints folder, loadable or not: its step folders (newest first) and
    its latest pointer. A run that never completed a save has none (a save writes a hidden folder first)."""
    ckpt_root = Path(run_dir) / CHECKPOINTS_DIR
    if not ckpt_root.is_dir():
        return []
    return [d for _, d in reversed(_step_dirs(ckpt_root))] + [p for p in [ckpt_root / LATEST_FILE] if p.is_file()]


class StopSignal:
    """While active, SIGINT and SIGTERM set `.requested` (and `.signal_name`) instead of stopping the process.

        with StopSignal() as stop:
            for step in ...:
                train_step()
                if stop.requested:
                    save_checkpoint(...)
                    break

    A second SIGINT while a stop is pending raises KeyboardInterrupt, so Ctrl-C twice still quits at once. The previous
    handlers come back on exit. Signal handlers can only be installed from the main thread: elsewhere this is a no-op
    and `.requested` stays False."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict | None = None

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is not threading.main_thread():
            return self
        self._previous = {signum: signal.getsignal(signum) for signum in self.SIGNALS}
        for signum in self.SIGNALS:
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt(f"second SIGINT while a stop ({self.signal_name}) was pending")
        if not self.requested:
            self.requested = True
            self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc_info) -> None:
        if self._previous is None:
            return
        for signum, handler in self._previous.items():
            # None: a handler installed outside Python; the default action is the closest we can restore.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous = None


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_torch(path: Path, obj) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _files_of_every_rank(folder: Path, world: World) -> list[str]:
    """The files every rank wrote under folder (relative names, sorted; one listing on every rank). A rank that does
    not see a file another rank wrote is a ValueError on every rank: the run folder is not one folder for all of
    them (a node-local output_dir), and its checkpoints would never load."""
    files = sorted(set().union(*world.gather([str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file()])))
    unseen = world.gather([name for name in files if not (folder / name).is_file()])
    blind = [(rank, names) for rank, names in enumerate(unseen) if names]
    if blind:
        rank, names = blind[0]
        raise ValueError(f"rank {rank} does not see {names[0]} in {folder}, which another rank wrote "
                         f"({sum(len(n) for _, n in blind)} such files): output_dir must be one folder that every "
                         f"rank sees, on a filesystem every node mounts")
    return files


def _shared_sha256(folder: Path, files: list[str], world: World) -> dict[str, str]:
    """{file: sha256} of folder's files, the work shared out over the ranks by size (largest first, each to the
    least loaded rank: every rank makes the same assignment from the same listing) and gathered on every rank."""
    sizes = {name: (folder / name).stat().st_size for name in files}
    load, mine = [0] * world.size, []
    for name in sorted(files, key=lambda n: (-sizes[n], n)):
        rank = load.index(min(load))
        load[rank] += sizes[name]
        if rank == world.rank:
            mine.append(name)
    return {name: digest for part in world.gather({name: _sha256(folder / name) for name in mine})
            for name, digest in part.items()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_torch(path: Path, map_location):
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file missing: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, ...: torch raises several types
        raise ValueError(f"corrupt checkpoint file {path}: {e}") from e


def read_manifest(ckpt_dir: Path) -> dict:
    """The checkpoint directory's manifest, checked against the files it lists (FileNotFoundError for a missing
    one, ValueError for a manifest that does not parse or agree with itself)."""
    path = ckpt_dir / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
        step, files = int(manifest["step"]), list(manifest["files"])
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"corrupt checkpoint manifest {path}: {e}") from e
    for name in files:
        if not (ckpt_dir / name).is_file():
            raise FileNotFoundError(f"checkpoint file missing: {ckpt_dir / name} (listed in {path})")
    sha256 = manifest.get("sha256", {})
    if not isinstance(sha256, dict) or not set(sha256) <= set(files):
        raise ValueError(f"corrupt checkpoint manifest {path}: its sha256 entry does not match its files")
    weights = manifest.get("weights", "all")   # checkpoints written before LoRA hold every weight
    if weights not in ("all", "trainable"):
        raise ValueError(f"corrupt checkpoint manifest {path}: weights must be 'all' or 'trainable', got {weights!r}")
    # Earlier versions listed optimizer.pt among the files; DCP keeps the optimizer in weights/.
    optimizer = bool(manifest.get("optimizer", "optimizer.pt" in files))
    return {"step": step, "files": files, "sha256": sha256, "weights": weights, "optimizer": optimizer,
            "optimizer_fresh": bool(manifest.get("optimizer_fresh", False)),
            "world_size": manifest.get("world_size", 1)}   # written by every version with data parallelism


def _free_bytes(path: Path) -> float:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return math.inf


def _step_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every step_* directory, complete or not, by increasing step."""
    found = []
    for entry in ckpt_root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _remove_leftovers(ckpt_root: Path) -> None:
    """Temporary directories and pointer files left by a save or a prune that crashed."""
    for entry in ckpt_root.iterdir():
        if entry.name.startswith(TMP_PREFIX) or (_STEP_DIR.match(entry.name) and _is_pruned_remains(entry)):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _prune(ckpt_root: Path, keep: int, protect: set[str]) -> None:
    latest_path = ckpt_root / LATEST_FILE
    if latest_path.is_file():
        protect = protect | {latest_path.read_text().strip()}
    complete = [d for _, d in _step_dirs(ckpt_root) if (d / MANIFEST_FILE).is_file()]
    for ckpt_dir in complete[:-keep]:
        if ckpt_dir.name not in protect:
            # Renamed out of the layout first: a delete killed midway leaves a temporary folder, which the next save
            # removes, never a step_* folder without its manifest.
            doomed = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}pruned-{ckpt_dir.name}-", dir=ckpt_root))
            os.replace(ckpt_dir, doomed / ckpt_dir.name)
            shutil.rmtree(doomed, ignore_errors=True)


def _rng_state() -> dict:
    # Plain lists and tensors only, so that torch.load(weights_only=True) reads it back.
    version, internal, gauss_next = random.getstate()
    rng = {"python": [version, list(internal), gauss_next], "torch_cpu": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:
        np = None
    if np is not None:
        kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
        rng["numpy"] = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)]
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_rng_state(rng: dict) -> None:
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))
    torch.set_rng_state(rng["torch_cpu"])
    if "numpy" in rng:
        import numpy as np

        kind, keys, pos, has_gauss, cached_gaussian = rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    cuda_states = rng.get("torch_cuda", [])
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) != torch.cuda.device_count():
            warnings.warn(f"checkpoint has CUDA RNG states for {len(cuda_states)} devices, this process sees "
                          f"{torch.cuda.device_count()}; restoring the first ones", stacklevel=3)
        for device, cuda_state in enumerate(cuda_states[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
