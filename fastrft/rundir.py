"""A run's folder, and the one place that knows its layout (the trainer, the CLI, compare and plots ask it for paths):

    config.yaml      the resolved TrainConfig
    metrics.jsonl    one JSON object per logged step (step 0: the reference model's evaluation)
    summary.json     the run's summary, written when it stops
    plots/           PNGs drawn from metrics.jsonl (fastrft.plots): <stem>.png for each stem of PLOT_STEMS
    checkpoints/     fastrft.checkpoint's own layout

These names may hold only what fastrft writes there: anything else is the user's, and a run folder that holds it is
refused rather than replaced (RunDir.run_files).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
import warnings
from pathlib import Path

from fastrft.jsonl import json_safe, read_jsonl

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PLOTS_DIR = "plots"
CHECKPOINTS_DIR = "checkpoints"
PLOT_STEMS = ("reward", "constraint", "losses", "policy", "throughput", "other")
TMP_PREFIX = ".tmp-"   # temporary files and folders, renamed once whole (write_atomically, checkpoint saves)
LOCK_FILE = ".fastrft-lock"   # held (flock) by the process that writes the run; the kernel lets go when it ends
# folder -> the open lock file (None: a filesystem without locks, said once), for this process's life or until unlock
_HELD_LOCKS: dict[Path, object] = {}


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl file; ValueError naming file and line on a bad line."""
    return [record for _, record in read_jsonl(path)]


def as_made(path, directory: bool = False) -> None:
    """Gives path the mode open() or mkdir would have given it under the user's umask: tempfile's are its owner's
    alone, and a run's files are read by others (dashboards, evaluation jobs, colleagues)."""
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


def write_atomically(path, data: bytes) -> None:
    """path holds data, or (after a crash at any point) what it held before: a temporary sibling, fsynced, then
    renamed over it, and the directory fsynced."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}-", dir=path.parent)
    try:
        as_made(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path) -> None:
    """Makes the renames inside `path` durable; some filesystems cannot open a directory, and there is nothing to
    do."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class RunDir:
    def __init__(self, path):
        self.path = Path(path)
        self.config = self.path / CONFIG_FILE
        self.metrics = self.path / METRICS_FILE
        self.summary = self.path / SUMMARY_FILE
        self.plots = self.path / PLOTS_DIR
        self.checkpoints = self.path / CHECKPOINTS_DIR

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def holds_run(self) -> bool:
        return self.config.is_file()

    def plot_file(self, stem: str) -> Path:
        if stem not in PLOT_STEMS:
            raise ValueError(f"{stem!r} is not one of a run's plots ({', '.join(PLOT_STEMS)})")
        return self.plots / f"{stem}.png"

    def run_files(self) -> list[Path]:
        """What of a run's layout the folder holds (a run, or the remains of one). ValueError naming the first thing
        under the layout's names that fastrft did not write: that is the user's, neither a run nor ever replaced."""
        found = [p for p in (self.config, self.metrics, self.summary, self.plots, self.checkpoints) if p.exists()]
        for path in found:
            foreign = self._foreign_entry(path)
            if foreign is not None:
                where, why = foreign
                raise ValueError(f"{where} was not written by fastrft ({why}): fastrft keeps a run's {path.name} "
                                 f"there and never replaces what it did not write; move it away, or choose another "
                                 f"output_dir (nothing was changed)")
        return found

    def _foreign_entry(self, path: Path) -> tuple[Path, str] | None:
        """(the first thing at or under the layout name `path` that fastrft did not write, why), or None; a
        ValueError naming the line of fastrft's own metrics log that is damaged."""
        from fastrft.checkpoint import is_checkpoint_entry   # both import this module
        from fastrft.config import is_saved_config

        if path == self.config:
            return None if is_saved_config(path) else \
                (path, "not the config fastrft saves, a YAML mapping of every TrainConfig key")
        if path == self.metrics:
            if not path.is_file():
                return path, "not a file"
            line, logged = _unlogged_lines(path)
            if line is not None and logged:   # fastrft's log, a line of it damaged since
                raise ValueError(f"{path}:{line} is damaged: not the JSON object of a step that fastrft logs on each "
                                 f"line; repair or delete that line (nothing was changed)")
            return None if line is None else (path, "not the metrics fastrft logs, one JSON object of a step per line")
        if path == self.summary:
            return None if _is_summary(path) else \
                (path, "not the summary fastrft writes, a JSON object of the run's steps")
        if not path.is_dir():
            return path, "not a folder"
        is_own, what = ((_is_plot, "not a plot fastrft draws") if path == self.plots else
                        (is_checkpoint_entry, "not a checkpoint fastrft saves"))
        foreign = sorted(entry for entry in path.iterdir() if not is_own(entry))
        return (foreign[0], what) if foreign else None

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def check_writable(self) -> None:
        """A ValueError naming output_dir unless this folder exists or can be made, and takes files."""
        check_writable_dir(self.path, "output_dir")

    def check_shared(self, world, wait_s: float = 10.0) -> None:
        """A ValueError on every rank of world (fastrft.distributed.World) unless each sees this folder as the one
        rank 0 writes: rank 0 makes it and a marker file there, every rank looks for the marker (for up to wait_s, as
        a network filesystem may show a new file late). A node-local output_dir would otherwise train to the end and
        leave checkpoints that never load."""
        if world.size == 1:
            return
        marker = made = None
        if world.is_main:
            made = not self.path.exists()
            self.create()
            fd, marker = tempfile.mkstemp(prefix=f"{TMP_PREFIX}ranks-", dir=self.path)
            os.close(fd)
        marker = Path(world.broadcast(marker))
        deadline = time.monotonic() + wait_s
        while not marker.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        blind = [rank for rank, seen in enumerate(world.gather(marker.is_file())) if not seen]
        if world.is_main:
            marker.unlink()
            if blind and made:
                self.path.rmdir()
        if blind:
            raise ValueError(f"output_dir {self.path} is not the folder rank 0 writes on rank "
                             f"{', '.join(map(str, blind))}: every rank writes checkpoints there, so it must be one "
                             f"folder on a filesystem that every node mounts")

    def lock(self) -> None:
        """Takes the folder for this process until unlock (or the process's end, a kill included): a ValueError
        naming the process that holds it, so that two runs never write one folder at once (their records and
        checkpoints would mix). Taking it again in the process that holds it is a no-op (fastrft compare, a run
        made again). A filesystem without locks is said once and not locked."""
        key = self.path.resolve()
        if key in _HELD_LOCKS:
            return
        try:
            import fcntl
        except ImportError:   # not a POSIX system
            return
        f = open(self.path / LOCK_FILE, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ValueError(f"{self.path} is being written by another fastrft run ({holder}): two runs into one "
                             f"folder would mix their records and checkpoints; wait for it to end, or choose another "
                             f"output_dir (nothing was changed)") from None
        except OSError as e:
            f.close()
            warnings.warn(f"{self.path} cannot be locked ({e.strerror}): a second run started into it at the same "
                          f"time would not be refused", stacklevel=2)
            _HELD_LOCKS[key] = None
            return
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        _HELD_LOCKS[key] = f

    def unlock(self) -> None:
        f = _HELD_LOCKS.pop(self.path.resolve(), None)
        if f is not None:
            f.close()

    def locked(self) -> bool:
        """Whether this process holds the folder (lock; a filesystem without locks counts as held once said)."""
        return self.path.resolve() in _HELD_LOCKS

    def clear(self) -> None:
        """Remove the run's own files, nothing else the folder holds: ValueError (from run_files), with nothing
        removed, when the layout's names hold something fastrft did not write."""
        for path in self.run_files():
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    def read_metrics(self, torn_end_ok: bool = False) -> list[dict]:
        """The run's metrics records; torn_end_ok: a torn last line (a crash mid-write) is dropped with a warning,
        not an error (a bad line elsewhere still is); no file: none."""
        if not torn_end_ok:
            return read_metrics(self.metrics)
        if not self.metrics.is_file():
            return []
        return [record for _, record in read_jsonl(self.metrics, torn_end_ok=True)]

    def metrics_to_resume(self, step: int) -> list[dict]:
        """The records of steps up to `step` (a checkpoint's), to rewrite metrics.jsonl with when resuming from it.
        A torn last line (a crash mid-write) is dropped with a warning; a file that lacks steps the checkpoint has
        seen (emptied or cut short) is a ValueError: resuming would lose their records for good."""
        records = self.read_metrics(torn_end_ok=True)
        logged = max((r.get("step", 0) for r in records), default=None)
        if step > 0 and (logged is None or logged < step):
            held = "is missing" if not self.metrics.exists() else "holds no step" if logged is None else \
                f"holds steps up to {logged}"
            raise ValueError(f"{self.metrics} {held} but the checkpoint is at step {step}: the file was emptied, cut "
                             f"short or moved; restore it before resuming (nothing was changed)")
        return [r for r in records if r.get("step", 0) <= step]

    def write_metrics(self, records: list[dict]) -> None:
        write_atomically(self.metrics, "".join(json.dumps(json_safe(r)) + "\n" for r in records).encode())

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(json_safe(record)) + "\n")   # NaN and inf as null: JSON has neither

    def read_steps(self) -> list[dict]:
        """metrics.jsonl as one record per step, sorted by step; a step logged twice (a resumed run) keeps the later
        values."""
        by_step: dict[int, dict] = {}
        for record in self.read_metrics():
            by_step.setdefault(record["step"], {}).update(record)
        return [by_step[s] for s in sorted(by_step)]

    def read_summary(self) -> dict | None:
        return json.loads(self.summary.read_text()) if self.summary.is_file() else None

    def write_summary(self, summary: dict) -> None:
        write_atomically(self.summary, (json.dumps(json_safe(summary), indent=1) + "\n").encode())


def _unlogged_lines(path: Path) -> tuple[int | None, bool]:
    """(the first line (1-based) of a metrics.jsonl that is not as fastrft logs them, a JSON object of a step (the
    last line may be torn: a crash while it was written), or None; whether any line is one)."""
    lines = [(number, line) for number, line in enumerate(path.read_bytes().split(b"\n"), start=1) if line.strip()]
    first_bad, logged = None, False
    for i, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
            if i == len(lines) - 1 and (line.startswith(b'{"step": ') or b'{"step": '.startswith(line)):
                continue
        if isinstance(record, dict) and "step" in record:
            logged = True
        elif first_bad is None:
            first_bad = number
    return first_bad, logged


def _is_summary(path: Path) -> bool:
    """A summary.json as fastrft writes it: a JSON object of the run's steps, among others."""
    try:
        summary = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and "steps" in summary


def _is_plot(entry: Path) -> bool:
    """A PNG that fastrft.plots draws, or write_atomically's leftover of one."""
    names = [f"{stem}.png" for stem in PLOT_STEMS]
    return entry.is_file() and any(entry.name == name or entry.name.startswith(f"{TMP_PREFIX}{name}-")
                                   for name in names)


def check_writable_dir(path: Path, key: str) -> None:
    """A ValueError naming key unless the folder path exists or can be made, and takes files."""
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{key}={str(path)!r}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{key}={str(path)!r}: {existing} is not writable")
