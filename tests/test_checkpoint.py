"""Checkpoints: resume gives bit-identical weights, saves are atomic, old ones are pruned, SIGINT/SIGTERM become a flag.

The reference is an uninterrupted run: 6 steps in one go against 3 steps, save, load into fresh objects in a
scrambled process state, 3 more steps. The step draws from torch (dropout), numpy (input noise) and python `random`
(loss scale), so every RNG state must come back for the weights to match."""
import json
import os
import random
import re
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fastrft import checkpoint
from fastrft.checkpoint import MANIFEST_FILE, StopSignal, latest_checkpoint, load_checkpoint, save_checkpoint

SHARD = "weights/__0_0.distcp"   # the weights' DCP shard written by a single process
DATA = torch.linspace(-1.0, 1.0, 40 * 6, dtype=torch.float64).reshape(40, 6).float()  # fixed dataset, 40 rows


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Dropout(0.3),
                                       torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x)


def _make():
    model = Tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    # Warm-up then decay: the learning rate depends on the scheduler's step count.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4) * 0.9 ** s)
    return model, optimizer, scheduler


def _train_step(model, optimizer, scheduler, state):
    pos = state["data_pos"]
    x = DATA[torch.arange(pos, pos + 4) % len(DATA)]
    x = x + torch.from_numpy(np.random.normal(0.0, 0.1, size=x.shape)).float()  # numpy RNG
    loss_scale = random.uniform(0.5, 1.5)                                       # python RNG
    loss = loss_scale * (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()  # dropout: torch RNG
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    state["data_pos"] = pos + 4
    state["samples_seen"] = state["samples_seen"] + len(x)


def _seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train_from_scratch(steps):
    """steps training steps from the same initial weights and RNG state every time."""
    _seed_all(1)
    model, optimizer, scheduler = _make()
    _seed_all(0)
    state = {"data_pos": 0, "samples_seen": 0}
    for _ in range(steps):
        _train_step(model, optimizer, scheduler, state)
    return model, optimizer, scheduler, state


def _run_straight(steps=6):
    model, _, _, state = _train_from_scratch(steps)
    return _weights(model), state


def _run_resumed(run_dir, first=3, then=3):
    model, optimizer, scheduler, state = _train_from_scratch(first)
    save_checkpoint(run_dir, first, model=model, optimizer=optimizer, scheduler=scheduler, state=state)

    # A new process: other initial weights, other RNG states, fresh optimizer and scheduler.
    _seed_all(12345)
    model, optimizer, scheduler = _make()
    step, state = load_checkpoint(run_dir, model=model, optimizer=optimizer, scheduler=scheduler)
    assert step == first
    for _ in range(then):
        _train_step(model, optimizer, scheduler, state)
    return _weights(model), state


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _differs(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_resume_is_bit_identical(tmp_path):
    straight, straight_state = _run_straight()
    resumed, resumed_state = _run_resumed(tmp_path)
    _assert_same(straight, resumed)
    assert resumed_state == straight_state == {"data_pos": 24, "samples_seen": 24}


@pytest.mark.parametrize("source", ["python", "numpy", "torch"])
def test_resume_needs_every_rng(tmp_path, monkeypatch, source):
    # The test above is only meaningful if each RNG changes the weights: clobber one after the restore.
    restore = checkpoint._set_rng_state
    reseed = {"python": random.seed, "numpy": np.random.seed, "torch": torch.manual_seed}[source]

    def restore_then_clobber(rng):
        restore(rng)
        reseed(777)

    monkeypatch.setattr(checkpoint, "_set_rng_state", restore_then_clobber)
    straight, _ = _run_straight()
    resumed, _ = _run_resumed(tmp_path)
    assert _differs(straight, resumed)


def test_resume_needs_optimizer_and_scheduler(tmp_path):
    straight, _ = _run_straight()
    _run_resumed(tmp_path / "a", first=3, then=0)
    for drop in ("optimizer", "scheduler"):
        _seed_all(0)
        model, optimizer, scheduler = _make()
        kwargs = {"optimizer": optimizer, "scheduler": scheduler}
        kwargs.pop(drop)
        _, state = load_checkpoint(tmp_path / "a", model=model, **kwargs)
        for _ in range(3):
            _train_step(model, optimizer, scheduler, state)
        assert _differs(straight, _weights(model)), drop


def test_layout_and_latest(tmp_path):
    model, optimizer, scheduler = _make()
    ckpt_dir = save_checkpoint(tmp_path, 7, model=model, optimizer=optimizer, scheduler=scheduler,
                               state={"data_pos": 3})
    assert ckpt_dir == tmp_path / "checkpoints" / "step_00000007"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [
        "checkpoint.json", "rng.pt", "scheduler.pt", "state.json", "weights"]
    assert sorted(p.name for p in (ckpt_dir / "weights").iterdir()) == [".metadata", "__0_0.distcp"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000007"
    assert json.loads((ckpt_dir / "state.json").read_text()) == {"data_pos": 3}
    assert latest_checkpoint(tmp_path) == ckpt_dir
    # A checkpoint directory itself is accepted too.
    assert load_checkpoint(ckpt_dir, model=Tiny())[0] == 7


def test_model_only_checkpoint(tmp_path):
    model = Tiny()
    save_checkpoint(tmp_path, 1, model=model, state=None)
    fresh = Tiny()
    assert load_checkpoint(tmp_path, model=fresh) == (1, {})
    _assert_same(_weights(model), _weights(fresh))
    _, optimizer, _ = _make()
    with pytest.raises(FileNotFoundError, match="no optimizer state"):
        load_checkpoint(tmp_path, model=fresh, optimizer=optimizer)



def test_weights_loaded_into_a_narrower_dtype_are_said_once(tmp_path):
    """float32 weights (an FSDP2 mixed-precision run's master weights) resumed into a bfloat16 model load, rounded,
    with a warning that says so; the same dtype loads without one."""
    model = Tiny()
    save_checkpoint(tmp_path, 1, model=model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(tmp_path, model=Tiny())
    narrow = Tiny().to(torch.bfloat16)
    with pytest.warns(UserWarning, match="the checkpoint's torch.float32 weights load into torch.bfloat16 .*resume "
                                         "it with the same engine") as caught:
        load_checkpoint(tmp_path, model=narrow)
    assert len(caught) == 1
    _assert_same(_weights(model.to(torch.bfloat16)), _weights(narrow))
    # The caller's own word on it (an export, where resuming is beside the point):
    with pytest.warns(UserWarning, match=r"load into torch.bfloat16 \(the export is written in bfloat16\)$"):
        load_checkpoint(tmp_path, model=Tiny().to(torch.bfloat16), narrowed_note="the export is written in bfloat16")

def _shift(model):
    """Weights other than the saved ones."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)


def test_crash_mid_save_keeps_previous(tmp_path, monkeypatch):
    model, optimizer, scheduler = _make()
    save_checkpoint(tmp_path, 3, model=model, optimizer=optimizer, scheduler=scheduler, state={"data_pos": 12})
    good = _weights(model)
    _shift(model)

    # A hard crash while writing step 6: the weights are on disk, nothing cleans up.
    write = checkpoint._write_torch

    def write_then_crash(path, obj):
        if path.name == "scheduler.pt":
            raise SystemExit("killed")
        write(path, obj)

    monkeypatch.setattr(checkpoint, "_write_torch", write_then_crash)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda *args, **kwargs: None)
    with pytest.raises(SystemExit):
        save_checkpoint(tmp_path, 6, model=model, optimizer=optimizer, scheduler=scheduler, state={"data_pos": 24})
    monkeypatch.undo()

    leftovers = [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / "weights" / ".metadata").is_file()
    assert not (tmp_path / "checkpoints" / "step_00000006").exists()

    fresh, fresh_optimizer, fresh_scheduler = _make()
    assert load_checkpoint(tmp_path, model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler) == (
        3, {"data_pos": 12})
    _assert_same(good, _weights(fresh))

    save_checkpoint(tmp_path, 6, model=model, optimizer=optimizer, scheduler=scheduler, state={"data_pos": 24})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_00000003", "step_00000006"]
    assert load_checkpoint(tmp_path, model=fresh)[0] == 6


def test_exception_mid_save_cleans_up(tmp_path, monkeypatch):
    model, optimizer, _ = _make()
    save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer)
    monkeypatch.setattr(checkpoint, "_rng_state", lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000001"]


def test_keep_prunes_oldest(tmp_path):
    model, optimizer, scheduler = _make()
    for step in (2, 4, 6, 8):
        save_checkpoint(tmp_path, step, model=model, optimizer=optimizer, scheduler=scheduler, keep=2)
    steps = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert steps == ["step_00000006", "step_00000008"]
    # Saving an older step (a rewound run) keeps the newest `keep` by step and never what was just written.
    save_checkpoint(tmp_path, 5, model=model, keep=1)
    steps = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert steps == ["step_00000005", "step_00000008"]
    assert latest_checkpoint(tmp_path).name == "step_00000005"
    # keep=None keeps everything.
    for step in (10, 11, 12):
        save_checkpoint(tmp_path, step, model=model, keep=None)
    assert len(list((tmp_path / "checkpoints").glob("step_*"))) == 5
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(tmp_path, 13, model=model, keep=0)


def test_a_prune_killed_midway_leaves_a_run_that_resumes_and_saves(tmp_path, monkeypatch):
    from fastrft.rundir import RunDir

    model, optimizer, scheduler = _make()
    for step in (2, 4):
        save_checkpoint(tmp_path, step, model=model, optimizer=optimizer, scheduler=scheduler, keep=2)
    root = tmp_path / "checkpoints"
    # Killed while deleting step 2 (the prune of step 6's save), its manifest gone first.

    def killed_midway(path, *args, **kwargs):
        next(Path(path).rglob(MANIFEST_FILE)).unlink()
        raise SystemExit("killed")

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    with pytest.raises(SystemExit):
        save_checkpoint(tmp_path, 6, model=model, optimizer=optimizer, scheduler=scheduler, keep=2)
    monkeypatch.undo()
    # Pruned by renaming first: no step_* folder without its manifest, a temporary one instead.
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000004", "step_00000006"]
    assert RunDir(tmp_path).run_files()   # fastrft's own leftovers: neither foreign nor in the way
    # A run left so by an earlier fastrft (the step_* folder itself half deleted) is fastrft's too.
    remains = root / "step_00000001"
    shutil.copytree(root / "step_00000004", remains)
    (remains / MANIFEST_FILE).unlink()
    assert RunDir(tmp_path).run_files()
    assert load_checkpoint(tmp_path, model=model)[0] == 6
    save_checkpoint(tmp_path, 8, model=model, optimizer=optimizer, scheduler=scheduler, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000006", "step_00000008"]


def test_a_save_that_fails_on_a_full_disk_says_so(tmp_path, monkeypatch):
    import errno
    from collections import namedtuple

    model = Tiny()
    save_checkpoint(tmp_path, 1, model=model)

    def full(path, obj):   # how torch.save fails at ENOSPC
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(checkpoint, "_write_torch", full)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: namedtuple("usage", "total used free")(1, 1, 0))
    with pytest.raises(OSError, match="no space left on the device to save step 2's checkpoint") as failure:
        save_checkpoint(tmp_path, 2, model=model)
    assert failure.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000001"]


def test_resave_same_step_overwrites(tmp_path):
    model = Tiny()
    save_checkpoint(tmp_path, 4, model=model, state={"v": 1})
    save_checkpoint(tmp_path, 4, model=model, state={"v": 2})
    assert load_checkpoint(tmp_path, model=model) == (4, {"v": 2})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000004"]


def test_missing_and_corrupt(tmp_path):
    model = Tiny()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        load_checkpoint(tmp_path, model=model)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path, model=model)

    first = save_checkpoint(tmp_path, 1, model=model, keep=None)
    second = save_checkpoint(tmp_path, 2, model=model, keep=None)

    before = _weights(model)
    (second / SHARD).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=re.escape(str(second / SHARD))):
        load_checkpoint(second, model=model)       # one checkpoint asked for by name: no fallback
    _assert_same(before, _weights(model))
    (second / "rng.pt").unlink()
    with pytest.raises(FileNotFoundError, match="rng.pt"):
        load_checkpoint(second, model=model)
    (second / "checkpoint.json").write_text("{trunc")
    with pytest.raises(ValueError, match="manifest"):
        load_checkpoint(second, model=model)
    (first / SHARD).write_bytes(b"")
    with pytest.warns(UserWarning, match="step_00000002 is unusable"):   # and none is good: each one's error
        with pytest.raises(ValueError, match=f"none of the 2 checkpoints in {tmp_path} loads: step_00000002: "
                                             f"corrupt checkpoint manifest.*; step_00000001: .*{SHARD}"):
            load_checkpoint(tmp_path, model=model)
    _assert_same(before, _weights(model))
    first = save_checkpoint(tmp_path, 1, model=model, keep=None)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000002\n")

    # `latest` naming a directory that is gone: fall back to the highest complete one, and say so.
    checkpoint.shutil.rmtree(second)
    with pytest.warns(UserWarning, match="falling back"):
        assert load_checkpoint(tmp_path, model=model)[0] == 1
    (tmp_path / "checkpoints" / "latest").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert latest_checkpoint(tmp_path) == first

    with pytest.raises(ValueError, match="does not fit"):
        load_checkpoint(tmp_path, model=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(tmp_path, 3, model=model, state={"x": object()})
    assert not (tmp_path / "checkpoints" / "step_00000003").exists()


def _wait_for(predicate, timeout_s=2.0):
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.001)
    return predicate()


def test_stop_signal_sigterm_sets_flag():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with StopSignal() as stop:
        assert not stop.requested and stop.signal_name is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert _wait_for(lambda: stop.requested)
        assert stop.signal_name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM is absorbed as well
        time.sleep(0.01)
    assert {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} == before


def test_stop_signal_double_sigint_raises():
    before = signal.getsignal(signal.SIGINT)
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with StopSignal() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert _wait_for(lambda: stop.requested)
            reached.append(stop.signal_name)  # the first SIGINT did not interrupt
            os.kill(os.getpid(), signal.SIGINT)
            _wait_for(lambda: False, timeout_s=1.0)
            reached.append("not interrupted")
    assert reached == ["SIGINT"]
    assert signal.getsignal(signal.SIGINT) is before


def test_stop_signal_off_main_thread_is_noop():
    before = signal.getsignal(signal.SIGTERM)
    seen = {}

    def worker():
        with StopSignal() as stop:
            seen["handler"] = signal.getsignal(signal.SIGTERM)
            seen["requested"] = stop.requested

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == {"handler": before, "requested": False}


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
@pytest.mark.parametrize("victim", [SHARD, "weights/.metadata", "state.json"])
def test_a_damaged_file_is_found_and_the_previous_checkpoint_loads(tmp_path, damage, victim):
    """Bytes flipped or cut off in any file of the newest checkpoint: its checksum catches it at load, a warning
    names the file, and the previous checkpoint is restored instead (not silently wrong weights)."""
    model, optimizer, scheduler = _make()
    save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, scheduler=scheduler, state={"at": 1})
    good = _weights(model)
    _shift(model)
    newest = save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer, scheduler=scheduler, state={"at": 2})
    path = newest / victim
    data = bytearray(path.read_bytes())
    if damage == "flipped byte":
        data[len(data) // 2] ^= 0x10
    else:
        del data[len(data) // 2:]
    path.write_bytes(bytes(data))

    fresh, fresh_optimizer, fresh_scheduler = _make()
    with pytest.warns(UserWarning, match=re.escape(str(path))):
        step, state = load_checkpoint(tmp_path, model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler)
    assert (step, state) == (1, {"at": 1})
    _assert_same(good, _weights(fresh))


def test_nan_weights_never_reach_a_checkpoint(tmp_path):
    model = Tiny()
    save_checkpoint(tmp_path, 1, model=model)
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(ValueError, match="not saving step 2: the model's weights hold NaN or inf"):
        save_checkpoint(tmp_path, 2, model=model)
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert not (tmp_path / "checkpoints" / "step_00000002").exists()


def test_a_checkpoint_of_an_earlier_version_still_loads(tmp_path):
    """Before DCP a checkpoint held model.pt and optimizer.pt (torch.save of whole state dicts): runs saved then
    resume."""
    model, optimizer, scheduler = _train_from_scratch(3)[:3]
    old = tmp_path / "checkpoints" / "step_00000003"
    old.mkdir(parents=True)
    files = {"model.pt": model.state_dict(), "optimizer.pt": optimizer.state_dict(),
             "scheduler.pt": scheduler.state_dict(), "rng.pt": checkpoint._rng_state()}
    for name, obj in files.items():
        torch.save(obj, old / name)
    (old / "state.json").write_text('{"data_pos": 12}')
    names = sorted([*files, "state.json"])
    (old / "checkpoint.json").write_text(json.dumps({"step": 3, "files": names, "weights": "all", "sha256": {
        name: checkpoint._sha256(old / name) for name in names}}))
    fresh, fresh_optimizer, fresh_scheduler = _make()
    assert load_checkpoint(tmp_path, model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler) == \
        (3, {"data_pos": 12})
    _assert_same(_weights(model), _weights(fresh))
    assert fresh_optimizer.state_dict()["state"][0]["exp_avg"].equal(optimizer.state_dict()["state"][0]["exp_avg"])


def test_a_checkpoint_before_the_first_step_leaves_the_optimizer_fresh(tmp_path):
    """An optimizer without state yet (no step taken) is recorded as fresh: saving does not create its state (DCP's
    state-dict API would, with a step of lr 0 that shifts AdamW's bias correction), and loading leaves it fresh."""
    model, optimizer, scheduler = _make()
    save_checkpoint(tmp_path, 0, model=model, optimizer=optimizer, scheduler=scheduler)
    assert not optimizer.state
    fresh, fresh_optimizer, fresh_scheduler = _make()
    load_checkpoint(tmp_path, model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler)
    assert not fresh_optimizer.state
    _assert_same(_weights(model), _weights(fresh))


class OneOfTwoRanks:
    """A World of two ranks seen from one of them, the other simulated: gather returns this rank's value and the
    other's (`others`), broadcast rank 0's (`from_rank_0` on rank 1)."""

    def __init__(self, rank: int, others: list, from_rank_0=None):
        self.rank, self.size, self.others, self.from_rank_0 = rank, 2, list(others), from_rank_0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj) -> list:
        other = self.others.pop(0)
        return [obj, other] if self.rank == 0 else [other, obj]

    def broadcast(self, obj):
        return obj if self.rank == 0 else self.from_rank_0


def test_a_run_folder_that_a_rank_does_not_see_is_refused_at_the_start(tmp_path):
    """A node-local output_dir (not the folder rank 0 writes) would train to the end and leave checkpoints that
    never load: every rank refuses before anything is written."""
    from fastrft.rundir import RunDir

    run_dir = RunDir(tmp_path / "run")
    with pytest.raises(ValueError, match=r"output_dir .*run is not the folder rank 0 writes on rank 1: every rank "
                                         r"writes checkpoints there"):
        run_dir.check_shared(OneOfTwoRanks(0, others=[False]), wait_s=0)
    assert not run_dir.path.exists()                     # the folder rank 0 made for the check is gone again
    with pytest.raises(ValueError, match="is not the folder rank 0 writes on rank 1"):   # rank 1's side of it
        run_dir.check_shared(OneOfTwoRanks(1, others=[True], from_rank_0=str(tmp_path / "elsewhere" / ".tmp-x")),
                             wait_s=0)
    run_dir.check_shared(OneOfTwoRanks(0, others=[True]), wait_s=0)   # both see it
    assert run_dir.path.is_dir() and not any(run_dir.path.iterdir())


def test_a_checkpoint_file_a_rank_does_not_see_fails_the_save_on_every_rank(tmp_path):
    folder = tmp_path / "ckpt"
    (folder / "weights").mkdir(parents=True)
    (folder / "rng.pt").write_bytes(b"0")
    (folder / "weights" / "__0_0.distcp").write_bytes(b"0")
    # Rank 1 wrote rng_1.pt and its shard where rank 0 does not see them; rank 1 sees nothing of rank 0's.
    world = OneOfTwoRanks(0, others=[["rng_1.pt", "weights/__1_0.distcp"], ["rng.pt", "weights/__0_0.distcp"]])
    with pytest.raises(ValueError, match=r"rank 0 does not see rng_1\.pt in .*ckpt, which another rank wrote \(4 such "
                                         r"files\): output_dir must be one folder that every rank sees"):
        checkpoint._files_of_every_rank(folder, world)
    assert checkpoint._files_of_every_rank(folder, OneOfTwoRanks(0, others=[["rng.pt"], []])) == \
        ["rng.pt", "weights/__0_0.distcp"]
