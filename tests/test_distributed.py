"""Data parallelism on the CPU: `fastrft train`'s loop under torchrun, 2 ranks over the gloo backend
(tests/dist_worker.py is each rank), against the same run in one process.

The rollout sampler of these runs samples each prompt from a seed of its own (dist_worker.per_prompt_generate), so the
2-rank run sees the very samples of the 1-rank run: what differs is only how the step is split over the ranks, which
must not change the result (losses, metrics, weights within fp32 tolerance), with FSDP2 or DDP. Checkpoints move
between world sizes; a failing rank ends the job; FSDP2 over CausalLMWithFusedLoss gives one process's gradients."""
import json
import math
import re
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastrft.checkpoint import load_checkpoint
from fastrft.rundir import RunDir

WORKER = Path(__file__).with_name("dist_worker.py")
TRL_WORKER = Path(__file__).with_name("trl_worker.py")
RUN = ["task=demo", "device=cpu", "steps=3", "prompts_per_step=4", "group_size=4", "eval_size=8", "eval_every=3",
       "save_every=1", "progress=false", "plots=false", "lr=3e-4", "constraint=kl+refiner", "refine_coef=0.5",
       "dist_timeout_s=60"]
EXACT = ("step", "groups_used", "groups_dropped", "prompts_drawn", "reward_none", "micro_batches", "refine_failed")
CLOSE = ("reward_mean", "reward_std", "response_len", "refine_rate", "changed_token_frac", "pg_loss", "sft_loss",
         "kl_loss", "loss", "clip_frac", "entropy", "grad_norm", "kl_ref", "lr", "eval_reward")


def launch(nproc: int, *args: str, fault: str | None = None, timeout: float = 300,
           worker: Path = WORKER, rank_overrides: str | None = None) -> subprocess.CompletedProcess:
    """worker (tests/dist_worker.py) under torchrun with nproc ranks (one: plain python), its output captured."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if fault:
        env["FASTRFT_TEST_FAULT"] = fault
    if rank_overrides:
        env["FASTRFT_TEST_RANK_OVERRIDES"] = rank_overrides
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
        if nproc > 1 else [sys.executable]
    for _ in range(3):
        done = subprocess.run([*launcher, str(worker), *args], env=env, capture_output=True, text=True,
                              timeout=timeout)
        # --standalone picks a free port before its store binds it: another process may take it in between.
        if done.returncode == 0 or not PORT_TAKEN.search(done.stderr):
            return done
    return done


PORT_TAKEN = re.compile(r"EADDRINUSE|[Aa]ddress already in use|failed to listen on any local network address")


def failure(done: subprocess.CompletedProcess) -> str:
    """What a failed launch says: first the last lines of the rank that failed first (torchrun's root cause), which
    the other ranks' tracebacks, written after it, push out of the output's tail; then the tails."""
    root = re.search(r"Root Cause.*?\brank\s*:\s*(\d+)", done.stderr, re.S)
    first = [line for line in done.stderr.splitlines() if root and line.startswith(f"[rank{root.group(1)}]:")]
    return "\n".join(first[-60:]) + "\n...\n" + done.stdout[-2000:] + done.stderr[-4000:]


def train_ok(nproc: int, *args: str) -> None:
    done = launch(nproc, *args)
    assert done.returncode == 0, failure(done)
    assert "FutureWarning" not in done.stderr, done.stderr[-3000:]   # (DDP's broadcast_buffers was, once a rank)


@pytest.fixture(scope="module")
def runs(demo_reference, tmp_path_factory):
    """Run directories by name: one rank (one), two ranks with FSDP2 (fsdp) and with DDP (ddp), each 3 steps."""
    root = tmp_path_factory.mktemp("distributed")
    for name, nproc, extra in (("one", 1, []), ("fsdp", 2, []), ("ddp", 2, ["fsdp=false"])):
        train_ok(nproc, "train", str(root / name), f"model={demo_reference}", *RUN, *extra)
    return {name: root / name for name in ("one", "fsdp", "ddp")}


def steps(run_dir: Path) -> list[dict]:
    return RunDir(run_dir).read_metrics()


def final_weights(run_dir: Path, model_dir: str) -> dict[str, torch.Tensor]:
    """The run's last checkpoint loaded into the model in this (single) process."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    load_checkpoint(run_dir, model=model)
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_same_run(ours: Path, theirs: Path, model_dir: str) -> None:
    a, b = steps(ours), steps(theirs)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3]
    for mine, other in zip(a, b):
        for key in EXACT:
            assert mine.get(key) == other.get(key), (mine["step"], key)
        for key in CLOSE:
            if key in mine or key in other:
                assert mine[key] == pytest.approx(other[key], rel=1e-4, abs=1e-6), (mine["step"], key)
    ours_w, theirs_w = final_weights(ours, model_dir), final_weights(theirs, model_dir)
    assert ours_w.keys() == theirs_w.keys()
    for name in ours_w:
        torch.testing.assert_close(ours_w[name], theirs_w[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("engine", ["fsdp", "ddp"])
def test_two_ranks_train_as_one_rank_does(runs, demo_reference, engine):
    one = steps(runs["one"])
    # The run did something worth comparing: refinements, a KL, dynamic sampling's refills.
    assert any(r.get("refine_rate", 0) > 0 for r in one) and any(r.get("kl_ref", 0) > 0 for r in one[1:])
    assert sum(r.get("prompts_drawn", 0) for r in one) > 3 * 4
    assert_same_run(runs[engine], runs["one"], demo_reference)
    # Two ranks wrote one checkpoint: every rank's RNG, one set of DCP shards.
    ckpt = runs[engine] / "checkpoints" / "step_00000003"
    assert {"rng.pt", "rng_1.pt", "checkpoint.json"} <= {p.name for p in ckpt.iterdir()}
    assert json.loads((ckpt / "checkpoint.json").read_text())["world_size"] == 2


def resumed_from_step_2(source: Path, target: Path) -> Path:
    """A copy of source as it was after step 2's checkpoint (the later one gone)."""
    shutil.copytree(source, target)
    shutil.rmtree(target / "checkpoints" / "step_00000003")
    (target / "checkpoints" / "latest").write_text("step_00000002\n")
    return target


@pytest.mark.parametrize("saved_by, resumed_by", [("fsdp", 1), ("one", 2)])
def test_a_checkpoint_resumes_at_another_world_size(runs, demo_reference, tmp_path, saved_by, resumed_by):
    run_dir = resumed_from_step_2(runs[saved_by], tmp_path / "resumed")
    train_ok(resumed_by, "resume", str(run_dir))
    assert_same_run(run_dir, runs["one"], demo_reference)


def test_a_corrupt_file_found_by_another_rank_falls_back_on_every_rank(runs, demo_reference, tmp_path):
    """The ranks share out the checksums by file size (the largest to rank 0, the next to rank 1): the latest
    checkpoint's second-largest file changed after it was written is found by rank 1, and both ranks fall back to
    the previous checkpoint and resume from there to the uninterrupted run."""
    run_dir = tmp_path / "corrupt"
    shutil.copytree(runs["fsdp"], run_dir)
    latest = run_dir / "checkpoints" / "step_00000003"
    second = sorted((f for f in latest.rglob("*") if f.is_file()),
                    key=lambda f: (-f.stat().st_size, str(f.relative_to(latest))))[1]   # as the ranks order them
    data = bytearray(second.read_bytes())
    data[len(data) // 2] ^= 0xFF
    second.write_bytes(bytes(data))
    done = launch(2, "resume", str(run_dir))
    assert done.returncode == 0, failure(done)
    assert done.stderr.count(f"checkpoint {latest} is unusable (corrupt checkpoint file {second}") == 1
    assert_same_run(run_dir, runs["one"], demo_reference)

@pytest.mark.parametrize("how, said", [("kill", "SIGKILL"), ("raise", "RuntimeError: injected failure on rank 1"),
                                       ("hang", "Timed out")])
def test_a_failing_rank_ends_the_job_with_its_error(demo_reference, tmp_path, how, said):
    """Rank 1 dies (SIGKILL), raises, or hangs in step 2's reward phase: the job ends, non-zero, saying why; a hang
    within the collective timeout (10 s here) plus torchrun's grace period, never for good."""
    t0 = time.monotonic()
    done = launch(2, "train", str(tmp_path / "run"), f"model={demo_reference}", *RUN, "dist_timeout_s=10",
                  fault=f"1:2:{how}", timeout=240)
    assert done.returncode != 0
    assert said in done.stdout + done.stderr, done.stderr[-4000:]
    assert time.monotonic() - t0 < 120
    # What was saved before the failure is intact: step 1's checkpoint.
    assert (tmp_path / "run" / "checkpoints" / "step_00000001" / "checkpoint.json").is_file()


def test_ranks_given_other_settings_stop_before_anything_is_written(demo_reference, tmp_path):
    """A node launched with other overrides would train its share under them (or hang the others at a step they
    never take): every rank refuses, naming the rank and the keys."""
    done = launch(2, "train", str(tmp_path / "run"), f"model={demo_reference}", *RUN, rank_overrides="1:lr=0.01",
                  timeout=240)
    assert done.returncode != 0
    assert "rank 1 was given other settings than rank 0 (lr: 0.01 there, 0.0003 on rank 0)" in done.stderr, \
        failure(done)
    assert not (tmp_path / "run").exists()


def test_mixed_precision_keeps_fp32_master_weights(demo_reference, tmp_path):
    """dtype=bfloat16 under FSDP2: computed in bf16 through FSDP2's mixed-precision policy, the weights (and so the
    checkpoint) in fp32."""
    run_dir = tmp_path / "run"
    train_ok(2, "train", str(run_dir), f"model={demo_reference}", *RUN, "steps=2", "dtype=bfloat16")
    records = steps(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all(math.isfinite(r["loss"]) for r in records[1:])
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(run_dir / "checkpoints" / "step_00000002" / "weights")).read_metadata()
    dtypes = {meta.properties.dtype for key, meta in metadata.state_dict_metadata.items() if key.startswith("model.")}
    assert dtypes == {torch.float32}


def skip_unless_installed(engine: str) -> None:
    if engine.startswith("zero3"):
        pytest.importorskip("deepspeed")   # make setup installs it (CI runs these tests)


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
@pytest.mark.parametrize("tied", [True, False])
def test_fused_loss_under_sharding_gives_the_single_process_gradients(tmp_path, tied, engine):
    """CausalLMWithFusedLoss as FSDP2's root, or inside a DeepSpeed ZeRO-3 engine, each rank with half the rows: the
    head is gathered for the loss and its gradient (tied to the embeddings or not) reduce-scattered by FSDP2 or
    ZeRO-3, equal to one process's on all rows."""
    skip_unless_installed(engine)
    os.environ["FASTRFT_TEST_TIED"] = "1" if tied else "0"
    try:
        for nproc in (1, 2):
            done = launch(nproc, "loss", str(tmp_path / f"grads{nproc}.pt"), engine)
            assert done.returncode == 0, failure(done)
    finally:
        del os.environ["FASTRFT_TEST_TIED"]
    one, two = (torch.load(tmp_path / f"grads{n}.pt") for n in (1, 2))
    assert one.keys() == two.keys() and any("lm_head" in name for name in one) != tied
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def trl_model(tmp_path_factory):
    pytest.importorskip("trl")
    from test_integrations import char_tokenizer, tiny_llama

    path = tmp_path_factory.mktemp("trl_model")
    torch.manual_seed(0)
    tiny_llama().save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("engine", ["fsdp2", "zero3", "zero3 lora"])
def test_trl_trainer_under_sharding_gives_the_single_process_gradients(trl_model, tmp_path, engine):
    """FastRFTGRPOTrainer's generation batch (old and reference log-probs through fastrft's head, the refiner's
    corrections) and TRL's loss with the refiner term, the policy, TRL's reference model and the refiner sharded by
    FSDP2 or DeepSpeed ZeRO-3 over 2 processes, half the batch each: every weight's gradient equals one process's on
    the whole batch. Under ZeRO-3 the models are loaded partitioned, so the trainer's construction probe and the
    refiner run on gathered weights. lora: a PEFT policy, whose reference and refiner are the policy with its
    adapters disabled (the refiner's weights gathered from the policy's training engine)."""
    skip_unless_installed(engine)
    for nproc in (1, 2):
        done = launch(nproc, "grads", trl_model, str(tmp_path / f"p{nproc}"), *engine.split(), worker=TRL_WORKER)
        assert done.returncode == 0, failure(done)
    one, two = (torch.load(tmp_path / f"p{n}" / "grads.pt") for n in (1, 2))
    assert two["sharded"] == ({"model": True} if "lora" in engine else
                              {"model": True, "ref_model": True, "refiner_model": True})
    assert two["refiner_hooks_off"] == engine.startswith("zero3")   # whole weights, no per-module gathers
    assert one["refine_rate"] == two["refine_rate"] == 1.0   # every sample refined: the refiner term is in
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_trl_trainer_trains_on_two_processes_as_on_one(trl_model, tmp_path):
    """trainer.train() for 2 steps, data parallel over 2 CPU processes (accelerate's MULTI_CPU; FSDP needs an
    accelerator under accelerate) with the same global batch as one process: the same metrics and final weights, to
    the rounding that a different padded width brings (one process pads 8 rows together, each of two pads 4: ~1e-3
    relative in a near-zero gradient, as in TRL's own trainer; SGD keeps it that small in the weights)."""
    for nproc, per_device in ((1, 8), (2, 4)):
        done = launch(nproc, "train", trl_model, str(tmp_path / f"p{nproc}"), str(per_device), worker=TRL_WORKER)
        assert done.returncode == 0, failure(done)
    logs = [json.loads((tmp_path / f"p{n}" / "log.json").read_text()) for n in (1, 2)]
    steps = [[r for r in log if "loss" in r] for log in logs]
    assert len(steps[0]) == len(steps[1]) == 2
    for mine, other in zip(*steps):
        for key in ("loss", "grad_norm", "reward", "kl", "refine/rate", "fastrft/sft_loss"):
            assert mine[key] == pytest.approx(other[key], rel=1e-4, abs=1e-6), key
    one, two = (torch.load(tmp_path / f"p{n}" / "weights.pt") for n in (1, 2))
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)


def test_the_fsdp2_example_runs_and_learns():
    """examples/fsdp2_fused_loss.py, the README's FSDP2 loop, on 2 ranks."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(WORKER.parent.parent / "examples" / "fsdp2_fused_loss.py"), "--steps", "12"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, failure(done)
    rewards = [float(r) for r in re.findall(r"reward ([0-9.]+)", done.stdout)]
    assert len(rewards) == 12
    assert sum(rewards[-3:]) > 2 * sum(rewards[:3]), f"the toy reward should rise: {rewards}"


def test_a_rank_without_prompts_joins_the_others_step(demo_reference, tmp_path):
    """One prompt per step and one held-out prompt over 2 ranks: rank 1 draws nothing, runs no rollout and no
    evaluation, and still takes part in every collective of the step (gathered weights, idle micro-batches through
    FSDP2's forward and backward, the checkpoint, the evaluation's), so the job gives the 1-rank run's result."""
    extra = ["prompts_per_step=1", "steps=2", "eval_every=2", "eval_size=1"]
    train_ok(1, "train", str(tmp_path / "one"), f"model={demo_reference}", *RUN, *extra)
    train_ok(2, "train", str(tmp_path / "two"), f"model={demo_reference}", *RUN, *extra)
    a, b = steps(tmp_path / "one"), steps(tmp_path / "two")
    assert [r["step"] for r in b] == [0, 1, 2]
    for mine, other in zip(b, a):
        for key in ("reward_mean", "pg_loss", "sft_loss", "kl_ref", "grad_norm", "eval_reward"):
            if key in other:
                assert mine[key] == pytest.approx(other[key], rel=1e-4, abs=1e-6), (mine["step"], key)
    ours, theirs = final_weights(tmp_path / "two", demo_reference), final_weights(tmp_path / "one", demo_reference)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5, msg=name)


def test_lora_on_two_ranks_trains_as_on_one(demo_reference, tmp_path):
    """LoRA under FSDP2: adapters trained over sharded frozen weights, the reference the gathered policy with its
    adapters off, checkpoints of the adapters alone; the 1-rank run's result."""
    extra = ["steps=2", "eval_every=2", "lora_r=4", "lr=3e-3"]
    train_ok(1, "train", str(tmp_path / "one"), f"model={demo_reference}", *RUN, *extra)
    train_ok(2, "train", str(tmp_path / "two"), f"model={demo_reference}", *RUN, *extra)
    a, b = steps(tmp_path / "one"), steps(tmp_path / "two")
    for mine, other in zip(b, a):
        for key in ("reward_mean", "pg_loss", "sft_loss", "kl_ref", "grad_norm", "eval_reward"):
            if key in other:
                assert mine[key] == pytest.approx(other[key], rel=1e-4, abs=1e-6), (mine["step"], key)
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(tmp_path / "two" / "checkpoints" / "step_00000002" / "weights")).read_metadata()
    saved = {key for key in metadata.state_dict_metadata if key.startswith("model.")}
    assert saved and all("lora_" in key for key in saved)


def test_the_command_line_under_torchrun(demo_reference, tmp_path):
    """`torchrun -m fastrft train ...`, as the README has it: one run folder, one summary printed (rank 0's)."""
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "fastrft", "train", f"model={demo_reference}", f"output_dir={run_dir}", *RUN,
                           "steps=2", "eval_every=2"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, failure(done)
    assert done.stdout.count('"eval_reward_final"') == 1
    assert [r["step"] for r in steps(run_dir)] == [0, 1, 2]
    assert json.loads((run_dir / "checkpoints" / "step_00000002" / "checkpoint.json").read_text())["world_size"] == 2


def test_compare_passes_torchrun_through(tmp_path):
    """`torchrun -m fastrft compare --demo ...`: the demo's reference trained once (rank 0 first, the other rank
    finds it cached), every run on both ranks, one comparison written and printed."""
    out = tmp_path / "cmp"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "fastrft", "compare", "--demo", "--modes", "none,kl", "--seeds", "1",
                           "--reference-steps", "20", "--cache-dir", str(tmp_path / "reference"), "--out", str(out),
                           "steps=1", "prompts_per_step=2", "group_size=4", "eval_size=4", "eval_every=1",
                           "progress=false", "plots=false"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, failure(done)
    assert done.stdout.count("written to") == 1
    result = json.loads((out / "comparison.json").read_text())
    assert [v["name"] for v in result["variants"]] == ["none", "kl"]
    manifests = sorted((out / "runs").glob("*/checkpoints/step_00000001/checkpoint.json"))
    assert len(manifests) == 2 and all(json.loads(m.read_text())["world_size"] == 2 for m in manifests)


def test_more_ranks_than_gpus_is_a_clear_error(monkeypatch):
    """A second rank on a one-GPU node stops with the fix, before any process group waits for it."""
    from fastrft import distributed

    for name, value in dict(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="29500").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"LOCAL_RANK=1 but this node shows 1 CUDA device.*--nproc-per-node"):
        distributed.init_world(10, cuda=True)


def test_end_world_ends_the_process_after_its_exit_handlers(tmp_path):
    """end_world(exit_status=...) in a process with a group (here one gloo rank): the group ended, Python's exit
    handlers run and buffered output flushed, the process gone with the status given, before the interpreter's
    teardown (where gloo sometimes aborts a job that finished well); without a group it returns."""
    script = tmp_path / "ends.py"
    script.write_text(
        "import atexit, sys, torch.distributed as dist\n"
        "from fastrft.distributed import end_world\n"
        "end_world(exit_status=5)   # no group: returns\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'store'}', rank=0, world_size=1)\n"
        f"atexit.register(lambda: open({str(tmp_path / 'handled')!r}, 'w').close())\n"
        "sys.stdout.write('buffered, unflushed')\n"
        "end_world(exit_status=3)\n"
        "print('after end_world')\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr[-3000:]
    assert done.stdout == "buffered, unflushed" and (tmp_path / "handled").exists()
