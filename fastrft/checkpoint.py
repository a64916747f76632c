"""Checkpoints of a training run, written atomically, and a clean stop on SIGINT/SIGTERM.

    save_checkpoint(run_dir, step, model=, optimizer=, scheduler=, state=)   -> run_dir/checkpoints/step_00000006/
    load_checkpoint(run_dir, model=, optimizer=, scheduler=)                 -> (step, state)
    latest_checkpoint(run_dir)                                              -> the directory load_checkpoint would read
    StopSignal()                                                            SIGINT/SIGTERM -> a flag, while active

Layout of one checkpoint (run_dir/checkpoints/step_{step:08d}/):
    model.pt         model.state_dict() (torch.save: tied weights stay tied, which safetensors would refuse), or with
                     trainable_only=True the parameters that train (a LoRA run's adapters): the rest is the base
                     model the run loads anyway
    optimizer.pt     optimizer.state_dict(), when an optimizer was given
    scheduler.pt     scheduler.state_dict(), when a scheduler was given
    rng.pt           python `random`, numpy's global generator, torch CPU and every CUDA device
    state.json       the trainer's own JSON-able state (data position, counters, ...)
    checkpoint.json  manifest, written last: step, the files above and each one's sha256. A directory without it
                     is not a checkpoint; a file whose sha256 differs is corrupt, and loading falls back to the
                     previous checkpoint.
and run_dir/checkpoints/latest holds the name of the newest one.

Atomicity: everything is written into a hidden sibling (.tmp-step_...), each file fsynced, then the directory is
renamed into place and `latest` replaced (write + fsync + os.replace). A crash at any point leaves the previous
checkpoint intact and `latest` naming it; leftovers of the crash are removed by the next save. Re-saving a step that
already exists moves the old directory aside first: a crash in that instant loses that step and `latest` falls back to
the previous one.

Simplified: one writer per run directory (no locking); everything is saved from this process (no sharded or
distributed state); the files are loaded with torch.load(weights_only=True), so an optimizer or scheduler whose state
holds arbitrary Python objects cannot be restored.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from fastrft.rundir import CHECKPOINTS_DIR, fsync_dir

LATEST_FILE = "latest"
MANIFEST_FILE = "checkpoint.json"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp-"


def save_checkpoint(run_dir, step: int, *, model: torch.nn.Module, optimizer=None, scheduler=None,
                    state: dict | None = None, keep: int | None = 2, trainable_only: bool = False) -> Path:
    """Write a checkpoint of `step` under run_dir/checkpoints/ and return its directory.

    Keeps the newest `keep` checkpoints (by step; None keeps all), never the one just written nor the one `latest`
    names. `state` must be JSON-serialisable: it comes back as-is from load_checkpoint."""
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None, got {keep}")
    weights = trainable_weights(model) if trainable_only else model.state_dict()
    poisoned = [name for name, t in weights.items() if t.is_floating_point() and not t.isfinite().all()]
    if poisoned:   # a checkpoint is what a run falls back to: it must never hold NaN or inf weights
        raise ValueError(f"not saving step {step}: the model's weights hold NaN or inf ({', '.join(poisoned[:3])}"
                         f"{', ...' if len(poisoned) > 3 else ''}); the previous checkpoint stays the latest")
    try:  # before touching the disk, so a bad state costs nothing
        state_json = json.dumps({} if state is None else state, indent=2, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"state must be JSON-serialisable: {e}") from e

    ckpt_root = Path(run_dir) / CHECKPOINTS_DIR
    ckpt_root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(ckpt_root)
    name = f"step_{step:08d}"
    final_dir = ckpt_root / name

    tmp_dir = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}-", dir=ckpt_root))
    try:
        files = ["model.pt", "rng.pt", "state.json"]
        _write_torch(tmp_dir / "model.pt", weights)
        if optimizer is not None:
            _write_torch(tmp_dir / "optimizer.pt", optimizer.state_dict())
            files.append("optimizer.pt")
        if scheduler is not None:
            _write_torch(tmp_dir / "scheduler.pt", scheduler.state_dict())
            files.append("scheduler.pt")
        _write_torch(tmp_dir / "rng.pt", _rng_state())
        _write_bytes(tmp_dir / "state.json", state_json.encode())
        manifest = {"step": step, "files": sorted(files), "torch": torch.__version__,
                    "weights": "trainable" if trainable_only else "all",
                    "sha256": {name: _sha256(tmp_dir / name) for name in sorted(files)}}
        _write_bytes(tmp_dir / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
        fsync_dir(tmp_dir)

        if final_dir.exists():  # the same step saved again (say a periodic save, then a stop at that step)
            old_dir = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}old-{name}-", dir=ckpt_root))
            os.replace(final_dir, old_dir / name)
            os.replace(tmp_dir, final_dir)
            shutil.rmtree(old_dir, ignore_errors=True)
        else:
            os.replace(tmp_dir, final_dir)
        fsync_dir(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise

    latest_tmp = ckpt_root / f"{_TMP_PREFIX}{LATEST_FILE}-{os.getpid()}"
    _write_bytes(latest_tmp, f"{name}\n".encode())
    os.replace(latest_tmp, ckpt_root / LATEST_FILE)
    fsync_dir(ckpt_root)

    if keep is not None:
        _prune(ckpt_root, keep, protect={name})
    return final_dir


def load_checkpoint(run_dir, *, model: torch.nn.Module, optimizer=None, scheduler=None,
                    map_location="cpu") -> tuple[int, dict]:
    """Restore model, optimizer, scheduler and RNG states from the newest good checkpoint; return (step, state).

    `run_dir` is a run directory (the checkpoint `latest` names, else the highest complete step_* directory) or one
    checkpoint directory. Every file is checked against the manifest's sha256 before anything is restored. In a
    run directory a checkpoint with a missing, corrupt or truncated file is skipped with a warning naming it, and
    the previous one is tried; when none is good, the newest one's error is raised (FileNotFoundError for a missing
    file, ValueError for an unreadable one). ValueError too when a good checkpoint does not fit the
    model/optimizer. Nothing is modified unless every file reads back."""
    candidates = _checkpoints_newest_first(Path(run_dir))
    if not candidates:
        raise FileNotFoundError(f"no checkpoint in {run_dir}: expected {Path(run_dir) / CHECKPOINTS_DIR}/step_*/"
                                f"{MANIFEST_FILE} (or {MANIFEST_FILE} in {run_dir} itself)")
    errors = []
    for ckpt_dir in candidates:
        try:
            saved = _read_checkpoint(ckpt_dir, optimizer is not None, scheduler is not None, map_location)
            break
        except (FileNotFoundError, ValueError) as e:
            errors.append(e)
            if ckpt_dir is not candidates[-1]:
                warnings.warn(f"checkpoint {ckpt_dir} is unusable ({e}); falling back to the previous one",
                              stacklevel=2)
    else:
        raise errors[0]
    try:
        if saved["weights"] == "trainable":
            expected = set(trainable_weights(model))
            if set(saved["model"]) != expected:
                raise ValueError(f"it holds the trainable weights {_names(set(saved['model']) - expected)} the "
                                 f"model does not train, and lacks {_names(expected - set(saved['model']))}")
            model.load_state_dict(saved["model"], strict=False)
        else:
            model.load_state_dict(saved["model"])
        if optimizer is not None:
            optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise ValueError(f"checkpoint {ckpt_dir} does not fit the model/optimizer/scheduler given: {e}") from e
    _set_rng_state(saved["rng"])
    return saved["step"], saved["state"]


def _read_checkpoint(ckpt_dir: Path, with_optimizer: bool, with_scheduler: bool, map_location) -> dict:
    """Everything one checkpoint holds, each file checked against its manifest checksum; nothing restored yet."""
    manifest = _read_manifest(ckpt_dir)
    if with_optimizer and "optimizer.pt" not in manifest["files"]:
        raise FileNotFoundError(f"{ckpt_dir} holds no optimizer state (it was saved without an optimizer)")
    if with_scheduler and "scheduler.pt" not in manifest["files"]:
        raise FileNotFoundError(f"{ckpt_dir} holds no scheduler state (it was saved without a scheduler)")
    for name, digest in manifest["sha256"].items():   # checkpoints written before checksums have none
        if _sha256(ckpt_dir / name) != digest:
            raise ValueError(f"corrupt checkpoint file {ckpt_dir / name}: its sha256 differs from the one in "
                             f"{MANIFEST_FILE} (changed or truncated since it was written)")
    state_path = ckpt_dir / "state.json"
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"corrupt checkpoint file {state_path}: {e}") from e
    return {"step": manifest["step"], "state": state, "rng": _read_torch(ckpt_dir / "rng.pt", "cpu"),
            "weights": manifest["weights"],
            "model": _read_torch(ckpt_dir / "model.pt", map_location),
            "optimizer": _read_torch(ckpt_dir / "optimizer.pt", map_location) if with_optimizer else None,
            "scheduler": _read_torch(ckpt_dir / "scheduler.pt", map_location) if with_scheduler else None}


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


def _read_manifest(ckpt_dir: Path) -> dict:
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
    return {"step": step, "files": files, "sha256": sha256, "weights": weights}


def _step_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every step_* directory, complete or not, by increasing step."""
    found = []
    for entry in ckpt_root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _remove_leftovers(ckpt_root: Path) -> None:
    """Temporary directories and pointer files left by a save that crashed."""
    for entry in ckpt_root.iterdir():
        if entry.name.startswith(_TMP_PREFIX):
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
            shutil.rmtree(ckpt_dir, ignore_errors=True)


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
