"""fastrft compare: variants and seeds, the directory it writes, resuming an interrupted comparison, and the
aggregation (equal-time reward, stability and collapse, mean and std over seeds) on hand-written metrics."""
import functools
import json
import math

import pytest
import torch

from fastrft import compare as compare_module
from fastrft.cli import main
from fastrft.compare import Variant, compare, expand_variants, run_config, run_numbers, run_state, seed_list
from fastrft.config import load_config, save_config
from fastrft.rundir import RunDir
from fastrft.trainer import train

FAST = ["steps=2", "prompts_per_step=2", "group_size=4", "eval_size=4", "eval_every=1", "save_every=1",
        "progress=false", "plots=false", "dynamic_sampling=false", "device=cpu"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """A tiny model on a shared 2-core machine: a second intra-op thread only adds contention (15x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Spy:
    """Wraps a train function and records (run directory name, resume) of each call."""

    def __init__(self, fn=train):
        self.fn, self.calls = fn, []

    def __call__(self, cfg, resume=False, overwrite=False):
        self.calls.append((cfg.output_dir.rsplit("/", 1)[-1], resume))
        return self.fn(cfg, resume=resume, overwrite=overwrite)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


# ----------------------------------------------------------------------------------------------- variants

def test_kl_coefficients_expand_each_kl_mode():
    variants = expand_variants(["none", "kl", "refiner", "kl+refiner"], [0.01, 0.1])
    assert [v.name for v in variants] == ["none", "kl@0.01", "kl@0.1", "refiner", "kl+refiner@0.01",
                                          "kl+refiner@0.1"]
    assert [v.kl_coef for v in variants if v.constraint in ("kl", "kl+refiner")] == [0.01, 0.1, 0.01, 0.1]
    assert expand_variants(["kl"], None, default_kl_coef=0.2) == [Variant("kl", "kl", 0.2)]


@pytest.mark.parametrize("modes, kl_coefs, message", [
    (["none", "ppo"], None, "unknown mode 'ppo'"),
    ([], None, "no modes given"),
    (["kl", "kl"], None, "listed twice"),
    (["none", "refiner"], [0.1], "no mode uses KL"),
    (["kl"], [0.1, -1.0], "finite and >= 0"),
    (["kl"], [0.1, 0.1], "listed twice"),
    (["kl"], [0.1, 0.1000001], r"KL coefficients 0\.1 and 0\.1000001 both name their runs kl@0\.1"),
])
def test_bad_modes_are_errors(modes, kl_coefs, message):
    with pytest.raises(ValueError, match=message):
        expand_variants(modes, kl_coefs)


@pytest.mark.parametrize("base_seed, seeds, message", [
    (2**32 - 2, 3, r"seed=4294967294 with 3 seeds would run seeds up to 4294967296, past the last one there is "
                   r"\(4294967295\)"),
    (0, [5, -1], r"seeds must be in \[0, 2\*\*32\), got -1"),
    (0, [2**32], r"got 4294967296"),
    (0, 0, "seeds must be >= 1"),
])
def test_seeds_past_the_seed_range_are_errors(base_seed, seeds, message):
    with pytest.raises(ValueError, match=message):
        seed_list(base_seed, seeds)
    assert seed_list(2**32 - 2, 2) == [2**32 - 2, 2**32 - 1]   # the last seeds there are


def test_cli_errors(tiny_model, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model}\n")
    out = str(tmp_path / "cmp")
    assert main(["compare", "--config", str(config), "--modes", "none,ppo", "--out", out, *FAST]) == 2
    assert "unknown mode 'ppo'" in capsys.readouterr().err
    assert main(["compare", "--config", str(config), "--modes", "none", "--out", out, "constraint=kl"]) == 2
    assert "set by the comparison" in capsys.readouterr().err
    assert main(["compare", "--config", str(config), "--modes", "kl", "--kl-coefs", "0.1,x", "--out", out]) == 2
    assert "--kl-coefs must be comma-separated numbers" in capsys.readouterr().err
    # With --demo, a bad mode is reported before the reference model is trained.
    assert main(["compare", "--demo", "--modes", "kl+ppo", "--cache-dir", str(tmp_path / "ref"), "--out", out]) == 2
    assert "unknown mode 'kl+ppo'" in capsys.readouterr().err and not (tmp_path / "ref").exists()
    (tmp_path / "a_file").write_text("mine")   # and so is an --out it cannot write to
    assert main(["compare", "--demo", "--modes", "none", "--cache-dir", str(tmp_path / "ref"), "--out",
                 str(tmp_path / "a_file")]) == 2
    assert "--out=" in capsys.readouterr().err and not (tmp_path / "ref").exists()
    assert main(["compare", "--modes", "none", "--out", out]) == 2
    assert "fastrft compare: error: give --config RUN_YAML or --demo" in capsys.readouterr().err
    assert not (tmp_path / "cmp" / "runs").exists()


# ----------------------------------------------------------------------------------------------- real runs

def test_cli_end_to_end_layout_and_rerun_skips(tiny_model, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model}\n")
    out = tmp_path / "cmp"
    argv = ["compare", "--config", str(config), "--modes", "none,kl", "--kl-coefs", "0.01,0.1", "--seeds", "2",
            "--out", str(out), *FAST]
    assert main(argv) == 0
    names = [f"{v}_seed{s}" for v in ("none", "kl@0.01", "kl@0.1") for s in (0, 1)]
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(names)
    assert {p.name for p in out.iterdir()} >= {"comparison.json", "comparison.md", "reward.png", "kl_ref.png",
                                               "policy.png"}

    # Identical settings apart from constraint, kl_coef, seed (and the directory).
    configs = {n: load_config(out / "runs" / n / "config.yaml").to_dict() for n in names}
    for n, cfg in configs.items():
        assert cfg["steps"] == 2 and cfg["seed"] == int(n[-1])
        differing = {k for k in cfg if cfg[k] != configs["none_seed0"][k]}
        assert differing <= {"constraint", "kl_coef", "seed", "output_dir"}
    assert configs["kl@0.1_seed1"]["kl_coef"] == 0.1 and configs["kl@0.1_seed1"]["constraint"] == "kl"
    # Same seed, same initial weights: the same step-0 (reference) score in every variant.
    assert len({records(out / "runs" / n)[0]["eval_reward"] for n in names}) == 1

    result = json.loads((out / "comparison.json").read_text())
    assert [v["name"] for v in result["variants"]] == ["none", "kl@0.01", "kl@0.1"]
    assert result["seeds"] == [0, 1] and result["config"]["steps"] == 2
    for v in result["variants"]:
        assert [r["name"] for r in v["runs"]] == [f"{v['name']}_seed0", f"{v['name']}_seed1"]
        finals = [r["eval_reward_final"] for r in v["runs"]]
        assert v["summary"]["eval_reward_final"]["mean"] == pytest.approx(sum(finals) / 2)
        assert v["curves"]["eval_reward"]["step"] == [0, 1, 2]
    md = (out / "comparison.md").read_text()
    assert "| variant | final eval reward |" in md
    assert all(f"| {v} |" in md for v in ("none", "kl@0.01", "kl@0.1"))
    assert "![held-out reward](reward.png)" in md and "--kl-coefs 0.01,0.1" in md
    assert "fastrft compare" in capsys.readouterr().out

    # Running the same comparison again trains nothing and rewrites the report.
    mtimes = {n: (out / "runs" / n / "metrics.jsonl").stat().st_mtime_ns for n in names}
    spy = Spy()
    cfg = load_config(config, FAST)
    again = compare(cfg, modes=["none", "kl"], kl_coefs=[0.01, 0.1], seeds=2, out_dir=out, train_fn=spy)
    assert spy.calls == []
    assert [c["runs_trained"] for c in again["calls"]] == [names, []]
    assert (out / "comparison.md").read_text().splitlines()[-1].endswith("| (no run) |")   # not a mode's name
    assert mtimes == {n: (out / "runs" / n / "metrics.jsonl").stat().st_mtime_ns for n in names}


def test_the_recorded_command_names_the_demos_reference(tiny_model, tmp_path):
    out, reference = tmp_path / "cmp", tmp_path / "reference"
    # model= runs the demo's settings from the tiny model: no reference is trained, but the command records it.
    assert main(["compare", "--demo", "--cache-dir", str(reference), "--reference-steps", "7", "--modes", "none",
                 "--seeds", "1", "--out", str(out), f"model={tiny_model}", *FAST]) == 0
    command = (f"fastrft compare --demo --cache-dir {reference} --reference-steps 7 --modes none --seeds 1 --out {out} "
               f"model={tiny_model} {' '.join(FAST)}")
    assert json.loads((out / "comparison.json").read_text())["command"] == command
    assert command in (out / "comparison.md").read_text()
    # A reference cached there already is the one used, whatever --reference-steps says: its own steps recorded.
    reference.mkdir()
    (reference / "reference.json").write_text(json.dumps({"steps": 30}))
    assert main(["compare", "--demo", "--cache-dir", str(reference), "--reference-steps", "7", "--modes", "none",
                 "--seeds", "1", "--out", str(tmp_path / "again"), f"model={tiny_model}", *FAST]) == 0
    assert "--reference-steps 30 " in json.loads((tmp_path / "again" / "comparison.json").read_text())["command"]


def test_a_training_runs_folder_is_no_comparisons(tiny_model, tmp_path):
    train(load_config(None, FAST, model=tiny_model, output_dir=str(tmp_path / "run")))
    with pytest.raises(ValueError, match=f"--out {tmp_path / 'run'} holds a training run"):
        compare(load_config(None, FAST, model=tiny_model), modes=["none"], seeds=1, out_dir=tmp_path / "run",
                train_fn=Spy())


def test_interrupted_comparison_resumes_where_it_stopped(tiny_model, tmp_path):
    out = tmp_path / "cmp"
    base = load_config(None, FAST, model=tiny_model)
    cfgs = [run_config(base, Variant("refiner", "refiner", 0.05), seed, out) for seed in (0, 1, 2)]
    # seed 0: finished. seed 1: stopped after step 1 with a checkpoint, before writing its summary. seed 2: nothing.
    train(cfgs[0])
    train(load_config(None, ["steps=1"], **{**cfgs[1].to_dict(), "steps": 1}))
    (out / "runs" / "refiner_seed1" / "summary.json").unlink()
    step1 = records(out / "runs" / "refiner_seed1")[1]
    assert [run_state(c) for c in cfgs] == ["finished", "resume", "start"]
    finished_mtime = (out / "runs" / "refiner_seed0" / "metrics.jsonl").stat().st_mtime_ns

    spy = Spy()
    result = compare(base, modes=["refiner"], seeds=3, out_dir=out, train_fn=spy)
    assert spy.calls == [("refiner_seed1", True), ("refiner_seed2", False)]
    assert (out / "runs" / "refiner_seed0" / "metrics.jsonl").stat().st_mtime_ns == finished_mtime
    resumed = records(out / "runs" / "refiner_seed1")
    assert [r["step"] for r in resumed] == [0, 1, 2]
    assert resumed[1] == step1                      # the step before the checkpoint was kept, not re-run
    assert json.loads((out / "runs" / "refiner_seed1" / "summary.json").read_text())["steps"] == 2
    assert [r["steps"] for r in result["variants"][0]["runs"]] == [2, 2, 2]


def test_a_run_whose_checkpoints_are_lost_is_not_trained_again_over_its_records(tiny_model, tmp_path):
    """A comparison's run stopped after a checkpoint (no summary) whose checkpoints are gone since: "start" would
    replace its folder, records and all. Refused, naming what shows the save; nothing changed."""
    import shutil

    out = tmp_path / "cmp"
    base = load_config(None, FAST, model=tiny_model)   # a checkpoint every step
    cfg = run_config(base, Variant("refiner", "refiner", 0.05), 0, out)
    train(cfg)
    run = out / "runs" / "refiner_seed0"
    (run / "summary.json").unlink()
    shutil.rmtree(run / "checkpoints")
    logged = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(ValueError, match=f"{run} holds no checkpoint that loads, but the run saved one \\("
                                         f"{run / 'metrics.jsonl'} logs a checkpoint at step {cfg.steps - 1}\\)"):
        run_state(cfg)
    with pytest.raises(ValueError, match="holds no checkpoint that loads"):
        compare(base, modes=["refiner"], seeds=1, out_dir=out, train_fn=train)
    assert (run / "metrics.jsonl").read_bytes() == logged


def test_a_stop_signal_ends_the_comparison_after_the_current_run(tiny_model, tmp_path):
    calls = []

    def stopped(cfg, resume=False, overwrite=False):
        calls.append(cfg.seed)
        return {"steps": 1, "stopped_by": "SIGINT"}

    base = load_config(None, FAST, model=tiny_model)
    with pytest.raises(KeyboardInterrupt, match="run the same command again"):
        compare(base, modes=["none", "kl"], seeds=2, out_dir=tmp_path / "cmp", train_fn=stopped)
    assert calls == [0]
    assert not (tmp_path / "cmp" / "comparison.json").exists()
    # The stopped call stays on record, and the call that finishes the comparison reports it.
    ledger = [json.loads(line) for line in (tmp_path / "cmp" / "calls.jsonl").read_text().splitlines()]
    assert [(c["outcome"], c["runs_trained"]) for c in ledger] == [("stopped by SIGINT", ["none_seed0"])]
    result = compare(base, modes=["none"], seeds=1, out_dir=tmp_path / "cmp", train_fn=train)
    assert [(c["outcome"], c["runs_trained"]) for c in result["calls"]] == [("stopped by SIGINT", ["none_seed0"]),
                                                                          ("finished", ["none_seed0"])]
    assert "| stopped by SIGINT |" in (tmp_path / "cmp" / "comparison.md").read_text()
    # A call killed (or out of disk) while it wrote its line leaves it torn: dropped with a warning, not an error
    # that every later call on the folder would meet.
    with (tmp_path / "cmp" / "calls.jsonl").open("a") as f:
        f.write('{"command": "fastrft compa')
    with pytest.warns(UserWarning, match=r"calls\.jsonl:3: dropped a torn last line"):
        result = compare(base, modes=["none"], seeds=1, out_dir=tmp_path / "cmp", train_fn=train)
    assert [c["outcome"] for c in result["calls"]] == ["stopped by SIGINT", "finished", "finished"]
    assert len((tmp_path / "cmp" / "calls.jsonl").read_text().splitlines()) == 3


def test_sigterm_between_runs_steps_is_a_recorded_stop_with_its_status(tiny_model, tmp_path, capsys,
                                                                        monkeypatch):
    """SIGTERM while a run loads (outside the trainer's own handling of its steps): the call is recorded as stopped
    by SIGTERM, and the command exits 143, as fastrft train does."""
    import os
    import signal

    from fastrft.cli import main

    def terminated(cfg, resume=False, overwrite=False):
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("SIGTERM did not stop the comparison")

    base = load_config(None, FAST, model=tiny_model)
    with pytest.raises(KeyboardInterrupt, match="stopped by SIGTERM") as stop:
        compare(base, modes=["none"], seeds=1, out_dir=tmp_path / "cmp", train_fn=terminated)
    assert stop.value.signal_name == "SIGTERM" and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    ledger = [json.loads(line) for line in (tmp_path / "cmp" / "calls.jsonl").read_text().splitlines()]
    assert [c["outcome"] for c in ledger] == ["stopped by SIGTERM"]
    import fastrft.compare as compare_module

    monkeypatch.setattr(compare_module, "compare", functools.partial(compare_module.compare, train_fn=terminated))
    config = tmp_path / "run.yaml"
    config.write_text("".join(f"{item.replace('=', ': ', 1)}\n" for item in FAST) + f"model: {tiny_model}\n")
    assert main(["compare", "--config", str(config), "--modes", "none", "--seeds", "1", "--out",
                 str(tmp_path / "cmp2")]) == 143
    assert "fastrft compare: stopped by SIGTERM" in capsys.readouterr().err


def test_what_the_comparison_cannot_write_is_refused_before_any_training(tiny_model, tmp_path):
    """An --out that is a file or under one; a file of a later run's layout that fastrft did not write (found only
    when that run started, after the earlier ones had trained)."""
    base = load_config(None, FAST, model=tiny_model)
    (tmp_path / "a_file").write_text("mine")
    for out in (tmp_path / "a_file", tmp_path / "a_file" / "sub"):
        with pytest.raises(ValueError, match=f"--out='{out}': {tmp_path / 'a_file'} is a file, not a folder"):
            compare(base, modes=["none"], seeds=1, out_dir=out, train_fn=Spy(lambda *a, **k: pytest.fail()))
    plots = tmp_path / "cmp" / "runs" / "kl_seed0" / "plots"
    plots.mkdir(parents=True)
    (plots / "mine.png").write_text("mine")
    spy = Spy(lambda *a, **k: pytest.fail("a run trained before the folder was refused"))
    with pytest.raises(ValueError, match="mine.png"):
        compare(base, modes=["none", "kl"], seeds=1, out_dir=tmp_path / "cmp", train_fn=spy)
    assert spy.calls == [] and (plots / "mine.png").read_text() == "mine"


def test_a_run_directory_with_other_settings_is_refused(tiny_model, tmp_path):
    base = load_config(None, FAST, model=tiny_model)
    cfg = run_config(base, Variant("none", "none", 0.05), 0, tmp_path)
    (tmp_path / "runs" / "none_seed0").mkdir(parents=True)
    save_config(load_config(None, ["lr=0.5"], **cfg.to_dict()), tmp_path / "runs" / "none_seed0" / "config.yaml")
    with pytest.raises(ValueError, match="other settings.*lr: 0.5 there"):
        compare(base, modes=["none"], seeds=1, out_dir=tmp_path, train_fn=Spy(lambda *a, **k: pytest.fail()))


def test_a_run_saved_before_disable_dropout_is_taken_as_it_ran(tiny_model, tmp_path):
    """A config.yaml written before the key existed: its run trained with its model's dropout. Resumed, it goes on
    so (unless told otherwise); compared with runs of today's default, it is refused as a run of other settings."""
    from fastrft.config import load_saved_config

    base = load_config(None, FAST, model=tiny_model)
    cfg = run_config(base, Variant("none", "none", 0.05), 0, tmp_path)
    path = tmp_path / "runs" / "none_seed0" / "config.yaml"
    path.parent.mkdir(parents=True)
    save_config(cfg, path)
    path.write_text("".join(line for line in path.read_text().splitlines(keepends=True)
                            if not line.startswith("disable_dropout:")))
    assert load_saved_config(path).disable_dropout is False
    assert load_saved_config(path, ["disable_dropout=true"]).disable_dropout is True
    with pytest.raises(ValueError, match="other settings.*disable_dropout: False there"):
        compare(base, modes=["none"], seeds=1, out_dir=tmp_path, train_fn=Spy(lambda *a, **k: pytest.fail()))


# ----------------------------------------------------------------------------------------------- aggregation

def _write_run(out, base, variant, seed, step_time_s, evals, kl, refine, degenerate, gold=None):
    """A finished run from hand-written per-step numbers: 10 steps, evaluations at the steps in `evals` (and the
    gold reward at the steps in `gold`, a task trained on a proxy)."""
    cfg = run_config(base, variant, seed, out)
    run_dir = out / "runs" / f"{variant.name}_seed{seed}"
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    lines = [{"step": 0, "eval_reward": evals[0], **({"eval_gold": gold[0]} if gold else {})}]
    for step in range(1, 11):
        record = {"step": step, "reward_mean": 0.1 * step, "step_time_s": step_time_s, "kl_ref": kl * step,
                  "refine_rate": refine(step), "degenerate_frac": degenerate, "entropy": 1.0 / step}
        if step in evals:
            record["eval_reward"] = evals[step]
        if gold and step in gold:
            record["eval_gold"] = gold[step]
        lines.append(record)
    # A stale record of step 10 (a resumed run re-logs it): the later one wins.
    lines.insert(-1, {"step": 10, "eval_reward": -5.0, "kl_ref": 99.0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run_dir / "summary.json").write_text(json.dumps({"steps": 10, "stopped_by": None}))


def test_aggregation_on_hand_written_metrics(tmp_path):
    base = load_config(None, ["steps=10", "plots=false"], model="unused")
    none, kl = Variant("none", "none", 0.05), Variant("kl@0.1", "kl", 0.1)
    # none: 10 steps of 1.0 s (seed 0) and 1.2 s (seed 1): median total 11 s, the fastest variant.
    _write_run(tmp_path, base, none, 0, 1.0, {0: 0.5, 5: 0.8, 10: 0.7}, 0.01, lambda s: 0.0, 0.0)
    _write_run(tmp_path, base, none, 1, 1.2, {0: 0.5, 5: 0.9, 10: 0.3}, 0.02, lambda s: 0.0, 0.2)
    # kl@0.1: 2.0 s per step, 20 s in all.
    _write_run(tmp_path, base, kl, 0, 2.0, {0: 0.5, 5: 0.6, 10: 0.9}, 0.001, lambda s: 1.0 - s / 10, 0.0)
    _write_run(tmp_path, base, kl, 1, 2.0, {0: 0.5, 5: 0.7, 10: 0.8}, 0.003, lambda s: 0.5, 0.0)

    result = compare(base, modes=["none", "kl"], kl_coefs=[0.1], seeds=2, out_dir=tmp_path,
                     train_fn=Spy(lambda *a, **k: pytest.fail("a finished run was trained again")))
    assert result["equal_time"]["budget_s"] == pytest.approx(11.0)
    assert result["equal_time"]["variant"] == "none"
    by_name = {v["name"]: v for v in result["variants"]}
    n0, n1 = by_name["none"]["runs"]
    k0, k1 = by_name["kl@0.1"]["runs"]

    # Equal time (11 s): none seed 0 ended at 10 s (its final eval); none seed 1 reached step 5 at 6 s and step 10
    # only at 12 s; kl reached step 5 at 10 s and step 10 at 20 s.
    assert [r["eval_reward_at_equal_time"] for r in (n0, n1, k0, k1)] == [0.7, 0.9, 0.6, 0.7]
    assert [r["train_time_s"] for r in (n0, n1, k0, k1)] == pytest.approx([10.0, 12.0, 20.0, 20.0])

    # Stability: none seed 0 fell 0.1 below its best of 0.8, less than half its gain of 0.3: stable. None seed 1
    # fell 0.6 and ended below the initial 0.5: collapsed. kl never fell.
    assert (n0["max_drop"], n0["max_drop_step"], n0["collapsed"]) == (pytest.approx(0.1), 10, False)
    assert (n1["max_drop"], n1["collapsed"]) == (pytest.approx(0.6), True)
    assert (k0["max_drop"], k0["collapsed"], k1["collapsed"]) == (0.0, False, False)
    assert by_name["none"]["summary"]["collapsed"] == {"count": 1, "n": 2}

    # Mean and sample std over seeds, from the formula.
    def mean_std(a, b):
        m = (a + b) / 2
        return m, math.sqrt((a - m) ** 2 + (b - m) ** 2)

    summary = by_name["none"]["summary"]
    for key, (a, b) in {"eval_reward_final": (0.7, 0.3), "eval_reward_best": (0.8, 0.9),
                        "eval_reward_at_equal_time": (0.7, 0.9), "max_drop": (0.1, 0.6),
                        "kl_ref_end": (0.01 * 10, 0.02 * 10),          # last 10% of 10 steps = step 10
                        "degenerate_frac_end": (0.0, 0.2), "entropy_end": (0.1, 0.1)}.items():
        m, s = mean_std(a, b)
        assert summary[key]["mean"] == pytest.approx(m), key
        assert summary[key]["std"] == pytest.approx(s, abs=1e-12), key
        assert summary[key]["n"] == 2
    # The refine rate's windows, per run; a mode without the refiner (whose runs log 0) has none: n/a, no curve.
    k0_numbers = run_numbers(RunDir(tmp_path / "runs" / "kl@0.1_seed0").read_steps())
    assert (k0_numbers["refine_rate_first"], k0_numbers["refine_rate_last"]) == pytest.approx((0.9, 0.0))
    assert k0_numbers["refine_rate_mean"] == pytest.approx(0.45)
    ks = by_name["kl@0.1"]["summary"]
    assert all(ks[key]["mean"] is None for key in ("refine_rate_first", "refine_rate_last", "refine_rate_mean"))
    assert by_name["kl@0.1"]["curves"]["refine_rate"]["step"] == []
    assert by_name["kl@0.1"]["kl_coef"] == 0.1 and by_name["none"]["kl_coef"] is None

    # Curves: per step mean over seeds; training time accumulates step_time_s.
    curves = by_name["none"]["curves"]
    assert curves["eval_reward"]["step"] == [0, 5, 10]
    assert curves["eval_reward"]["mean"] == pytest.approx([0.5, 0.85, 0.5])
    assert curves["train_time_s"]["mean"][-1] == pytest.approx(11.0)
    assert curves["kl_ref"]["mean"][-1] == pytest.approx(0.15)

    # 95% interval of the mean over 2 seeds: t(0.975, 1) = 12.706 x std / sqrt(2).
    assert summary["eval_reward_final"]["ci95"] == pytest.approx(12.7062 * mean_std(0.7, 0.3)[1] / math.sqrt(2),
                                                                 rel=1e-4)
    # kl@0.1 - none, paired by seed: final eval rewards 0.9 - 0.7 and 0.8 - 0.3.
    tests = {t["metric"]: t for t in result["significance"] if (t["variant"], t["against"]) == ("kl@0.1", "none")}
    final = tests["eval_reward_final"]
    d = [0.9 - 0.7, 0.8 - 0.3]
    d_mean, d_std = sum(d) / 2, math.sqrt(sum((x - sum(d) / 2) ** 2 for x in d))
    assert final["mean_difference"] == pytest.approx(d_mean) and final["n"] == 2
    assert final["t"] == pytest.approx(d_mean / (d_std / math.sqrt(2)))
    assert final["p"] == pytest.approx(2 * (0.5 - math.atan(final["t"]) / math.pi))   # t with 1 df is Cauchy
    assert final["significant"] is False
    assert set(tests) == set(compare_module.TESTED_METRICS) - {"eval_gold_final"}   # no gold reward here
    assert "final gold reward" not in (tmp_path / "comparison.md").read_text()
    assert not (tmp_path / compare_module.GOLD_PLOT).exists()

    written = json.loads((tmp_path / "comparison.json").read_text())
    assert written["variants"][0]["summary"]["eval_reward_final"]["mean"] == pytest.approx(0.5)
    md = (tmp_path / "comparison.md").read_text()
    assert "| none | 0.500 ± 2.541 | 0.850 ± 0.635 | 0.800 ± 1.271 |" in md   # 95% intervals: 8.985 std
    assert "| 1/2 |" in md and "| kl@0.1 |" in md
    assert "| kl@0.1 - none | eval_reward_final | +0.350 |" in md
    # No refine rate in a comparison without the refiner: no empty plot of it, nor a link to one.
    assert not (tmp_path / "refine_rate.png").exists() and "refine_rate.png" not in md
    for name in set(compare_module.PLOT_FILES) - {"refine_rate.png"}:
        assert (tmp_path / name).stat().st_size > 0


def test_missing_values_are_shown_missing_never_filled_in():
    records = [{"step": 0, "eval_reward": 0.5}, {"step": 1, "step_time_s": 1.0, "eval_reward": 0.9},
               {"step": 2, "step_time_s": 1.0, "eval_reward": None}]   # the last evaluation scored nothing
    numbers = run_numbers(records)
    assert numbers["eval_reward_final"] is None and "collapsed" not in numbers   # not step 1's 0.9, nor "stable"
    gold = run_numbers([{**r, "eval_gold": r["eval_reward"]} for r in records])   # the gold reward likewise
    assert (gold["eval_gold_initial"], gold["eval_gold_final"], gold["eval_gold_best"]) == (0.5, None, 0.9)
    # A constant paired difference has no spread to test against: no t, p or verdict (p = 0 read "certain").
    assert compare_module.paired_test({0: 0.5, 1: 0.6}, {0: 0.4375, 1: 0.5375}) | {"mean_difference": 0} == \
        {"mean_difference": 0, "ci95": None, "t": None, "p": None, "significant": None, "n": 2}
    # Curves: only the steps every seed logged (seed 0's missing step-5 evaluation would draw a dip to seed 1's).
    runs = [{"curves": {key: {} for key in compare_module.CURVE_KEYS}} for _ in range(2)]
    runs[0]["curves"]["eval_reward"] = {0: 0.5, 10: 0.9}
    runs[1]["curves"]["eval_reward"] = {0: 0.5, 5: 0.2, 10: 0.3}
    assert compare_module._mean_curves(runs)["eval_reward"]["step"] == [0, 10]
    # A mean over fewer seeds than the comparison's says so.
    stat = compare_module.mean_std([0.1, None, 0.3])
    assert compare_module._cell({"kl_ref_end": stat}, "kl_ref_end", 3, seeds=3) == "0.200 ± 1.271 (n=2)"
    assert compare_module._cell({"collapsed": {"count": 0, "n": 0}}, "collapsed", 0, seeds=3) == "n/a"


def test_one_seed_has_no_std(tmp_path):
    base = load_config(None, ["steps=10", "plots=false"], model="unused")
    _write_run(tmp_path, base, Variant("none", "none", 0.05), 0, 1.0, {0: 0.5, 10: 0.6}, 0.01, lambda s: 0.0, 0.0)
    result = compare(base, modes=["none"], seeds=1, out_dir=tmp_path, train_fn=Spy(lambda *a, **k: pytest.fail()))
    assert result["variants"][0]["summary"]["eval_reward_final"] == {"mean": 0.6, "std": None, "ci95": None, "n": 1}
    assert result["significance"] == []   # nothing to pair
    assert "| none | 0.600 | 0.600 |" in (tmp_path / "comparison.md").read_text()


def test_t_distribution_and_paired_test_against_textbook_values():
    """Student's t quantiles from the tables; the paired t-test on Student's sleep data (Cushny and Peebles,
    the two drugs' extra hours of sleep of 10 patients): t = 4.0621, 9 df, p = 0.002833, 95% CI 0.700 to 2.460."""
    for df, quantile in ((1, 12.7062), (4, 2.7764), (9, 2.2622), (30, 2.0423)):
        assert compare_module.student_t_quantile(0.975, df) == pytest.approx(quantile, abs=1e-4)
    drug_a = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
    drug_b = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]
    test = compare_module.paired_test(dict(enumerate(drug_b)), dict(enumerate(drug_a)))
    assert test["t"] == pytest.approx(4.0621, abs=1e-4) and test["n"] == 10
    assert test["p"] == pytest.approx(0.002833, abs=1e-6) and test["significant"]
    assert (test["mean_difference"] - test["ci95"], test["mean_difference"] + test["ci95"]) == \
        (pytest.approx(0.7001, abs=1e-4), pytest.approx(2.4599, abs=1e-4))
    same = compare_module.paired_test({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})
    assert same["p"] == 1.0 and not same["significant"]
    assert compare_module.paired_test({0: 1.0}, {0: 2.0}) is None   # one pair: no test


def test_a_proxy_tasks_gold_reward_is_reported_and_tested(tmp_path):
    """Runs of a task trained on a proxy: the gold reward's initial, final and best per run, its column in the
    table, and its paired test; the proxy (eval_reward) rises in `none` while the gold falls."""
    base = load_config(None, ["steps=10", "plots=false"], model="unused")
    none, kl = Variant("none", "none", 0.05), Variant("kl@0.1", "kl", 0.1)
    for seed, (proxy_end, gold_end, kl_gold_end) in enumerate([(1.6, 0.4, 0.8), (1.8, 0.3, 0.85), (1.7, 0.2, 0.7)]):
        _write_run(tmp_path, base, none, seed, 1.0, {0: 1.0, 10: proxy_end}, 0.01, lambda s: 0.0, 0.5,
                   gold={0: 0.6, 10: gold_end})
        _write_run(tmp_path, base, kl, seed, 1.0, {0: 1.0, 10: 1.1}, 0.001, lambda s: 0.0, 0.0,
                   gold={0: 0.6, 10: kl_gold_end})
    result = compare(base, modes=["none", "kl"], kl_coefs=[0.1], seeds=3, out_dir=tmp_path,
                     train_fn=Spy(lambda *a, **k: pytest.fail()))
    by_name = {v["name"]: v for v in result["variants"]}
    gold = by_name["none"]["summary"]["eval_gold_final"]
    assert gold["mean"] == pytest.approx(0.3) and gold["n"] == 3
    assert by_name["none"]["summary"]["eval_gold_best"]["mean"] == pytest.approx(0.6)
    assert by_name["none"]["curves"]["eval_gold"]["mean"] == pytest.approx([0.6, 0.3])
    test = next(t for t in result["significance"] if t["metric"] == "eval_gold_final")
    assert (test["variant"], test["against"]) == ("kl@0.1", "none")
    # The best KL variant for the refiner's comparison is judged by the gold reward, not by the proxy it games.
    kl_weak = Variant("kl@0.01", "kl", 0.01)
    refiner = Variant("refiner", "refiner", 0.05)
    for seed in range(3):
        _write_run(tmp_path, base, kl_weak, seed, 1.0, {0: 1.0, 10: 1.9}, 0.01, lambda s: 0.0, 0.4,
                   gold={0: 0.6, 10: 0.3})
        _write_run(tmp_path, base, refiner, seed, 1.0, {0: 1.0, 10: 1.2}, 0.001, lambda s: 0.3, 0.0,
                   gold={0: 0.6, 10: 0.7 + 0.01 * seed})
    result = compare(base, modes=["none", "kl", "refiner"], kl_coefs=[0.01, 0.1], seeds=3, out_dir=tmp_path,
                     train_fn=Spy(lambda *a, **k: pytest.fail()))
    assert {t["against"] for t in result["significance"] if t["variant"] == "refiner"} == {"none", "kl@0.1"}
    assert test["mean_difference"] == pytest.approx(((0.8 - 0.4) + (0.85 - 0.3) + (0.7 - 0.2)) / 3)
    assert test["significant"]   # differences 0.4, 0.55, 0.5: t = 11.8 with 2 df
    md = (tmp_path / "comparison.md").read_text()
    assert "final gold reward" in md and f"]({compare_module.GOLD_PLOT})" in md
    assert (tmp_path / compare_module.GOLD_PLOT).stat().st_size > 0


def test_a_copy_without_git_reports_the_commit_it_was_sent_at(tmp_path):
    """A lent GPU machine receives the working tree without .git: its results carry FASTRFT_COMMIT, else 'unknown'."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import fastrft

    copy = tmp_path / "fastrft"
    shutil.copytree(Path(fastrft.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    script = "from fastrft.machine import describe_machine; env = describe_machine(); print(env['commit'], env['dirty'])"
    for sent, want in (("abc1234", "abc1234 None"), (None, "unknown None")):
        env = {k: v for k, v in os.environ.items() if k != "FASTRFT_COMMIT"}
        if sent:
            env["FASTRFT_COMMIT"] = sent
        env["PYTHONPATH"] = str(tmp_path)
        env["GIT_CEILING_DIRECTORIES"] = str(tmp_path.parent)   # no checkout above tmp_path lends its commit
        out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().splitlines()[-1] == want


def test_a_run_trained_on_another_number_of_ranks_is_refused(tiny_model, tmp_path, monkeypatch):
    """Each rank samples its share of the prompts: a run trained on 2 ranks does not belong in a 1-rank comparison
    (nor a resumed one), found from its summary or, before it finished, its checkpoint."""
    base = load_config(None, FAST, model=tiny_model)
    cfg = run_config(base, Variant("none", "none", 0.05), 0, tmp_path)
    train(cfg)
    summary = tmp_path / "runs" / "none_seed0" / "summary.json"
    assert json.loads(summary.read_text())["world_size"] == 1
    assert run_state(cfg, 1) == "finished"
    with pytest.raises(ValueError, match=r"none_seed0 holds a run trained on 1 rank, and this comparison runs on 2: "
                                         r"each rank samples its share"):
        run_state(cfg, 2)
    summary.unlink()   # stopped before its summary: the checkpoint's manifest says it
    assert run_state(cfg, 1) == "resume"
    with pytest.raises(ValueError, match="trained on 1 rank, and this comparison runs on 2"):
        run_state(cfg, 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="trained on 1 rank, and this comparison runs on 2"):
        compare(base, modes=["none"], seeds=1, out_dir=tmp_path, train_fn=Spy(lambda *a, **k: pytest.fail()))
