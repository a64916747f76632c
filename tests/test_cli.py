"""The command line: train from YAML with overrides, resume, plot, demo (with a short reference budget), errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastrft.cli import main

FAST = ["steps=2", "prompts_per_step=2", "group_size=4", "eval_size=4", "eval_every=2", "progress=false",
        "dynamic_sampling=false", "device=cpu"]


def test_train_resume_and_plot(tiny_model, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    run_dir = tmp_path / "run"
    config.write_text(f"model: {tiny_model}\noutput_dir: {run_dir}\nconstraint: kl\nplots: false\n")
    assert main(["train", "--config", str(config), *FAST, "kl_coef=0.1"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2
    assert "kl_coef: 0.1" in (run_dir / "config.yaml").read_text()
    assert main(["train", "--resume", str(run_dir), "steps=3"]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3
    capsys.readouterr()
    assert main(["plot", str(run_dir)]) == 0
    assert "reward.png" in capsys.readouterr().out


def test_unknown_key_is_an_error_that_names_it(tiny_model, tmp_path, capsys):
    assert main(["train", f"model={tiny_model}", f"output_dir={tmp_path}", "learning_rate=1"]) == 2
    assert "unknown config key 'learning_rate'" in capsys.readouterr().err


def test_overrides_may_come_after_a_flag(tiny_model, tmp_path, capsys):
    """key=value pairs on both sides of a flag are all overrides, in order; anything else left over is an error."""
    run_dir = tmp_path / "run"
    assert main(["train", f"model={tiny_model}", *FAST, "--overwrite", f"output_dir={run_dir}", "kl_coef=0.1",
                 "constraint=kl"]) == 0
    assert "kl_coef: 0.1" in (run_dir / "config.yaml").read_text()
    with pytest.raises(SystemExit):
        main(["train", f"model={tiny_model}", "--overwrite", "stray"])
    assert "unrecognized arguments: stray" in capsys.readouterr().err


def test_resume_needs_a_run_directory(tmp_path, capsys):
    """Usage errors of --resume (and of compare's --config/--demo) read as every other error: status 2, named."""
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert f"fastrft train: error: --resume {tmp_path}: not a fastrft run directory" in capsys.readouterr().err
    (tmp_path / "run.yaml").write_text("steps: 1\n")
    assert main(["train", "--resume", str(tmp_path), "--config", str(tmp_path / "run.yaml")]) == 2
    assert "fastrft train: error: --resume reads the run's own config.yaml" in capsys.readouterr().err
    assert main(["compare", "--modes", "kl"]) == 2
    assert "fastrft compare: error: give --config RUN_YAML or --demo" in capsys.readouterr().err


def test_demo_end_to_end_with_a_short_budget(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--cache-dir", str(tmp_path / "reference"), "--reference-steps", "30",
                 f"output_dir={out}", "steps=2", "eval_every=1", "eval_size=8", "progress=false", "plots=false"])
    assert code == 0
    text = capsys.readouterr().out
    assert "held-out reward, reference model" in text and "held-out reward, after RL" in text
    assert (tmp_path / "reference" / "reference.json").is_file()
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_a_second_demo_keeps_the_first_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["demo", "--cache-dir", str(tmp_path / "reference"), "--reference-steps", "30", "steps=1",
            "eval_every=1", "eval_size=4", "progress=false", "plots=false", "prompts_per_step=2"]
    assert main(args) == 0
    first = (tmp_path / "runs" / "demo" / "metrics.jsonl").read_bytes()
    assert main(args) == 0
    assert "runs/demo holds an earlier run (kept); this one goes to runs/demo-2" in capsys.readouterr().out
    assert (tmp_path / "runs" / "demo" / "metrics.jsonl").read_bytes() == first
    assert json.loads((tmp_path / "runs" / "demo-2" / "summary.json").read_text())["steps"] == 1
    assert main([*args, "--overwrite"]) == 0 and not (tmp_path / "runs" / "demo-3").exists()
    # A demo started at the same moment as another, which has taken runs/demo-3 and is still loading: the next one.
    (tmp_path / "runs" / "demo-3").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "from fastrft.rundir import RunDir; RunDir('runs/demo-3').lock(); "
                               "print('held', flush=True); import time; time.sleep(60)"], stdout=subprocess.PIPE,
                              text=True, cwd=tmp_path)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main(args) == 0
        assert "this one goes to runs/demo-4" in capsys.readouterr().out
        assert (tmp_path / "runs" / "demo-4" / "summary.json").is_file()
    finally:
        holder.kill()
        holder.wait()


def test_train_into_a_run_folder_needs_resume_or_overwrite(tiny_model, tmp_path, capsys):
    args = ["train", f"model={tiny_model}", f"output_dir={tmp_path / 'run'}", *FAST, "steps=1", "plots=false"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_a_folder_with_files_fastrft_did_not_write_is_refused_not_overwritten(tiny_model, tmp_path, capsys):
    proj = tmp_path / "proj"
    (proj / "checkpoints").mkdir(parents=True)
    (proj / "checkpoints" / "my_model.bin").write_text("precious")
    (proj / "config.yaml").write_text("my: settings\n")
    (proj / "notes.txt").write_text("notes")
    args = ["train", f"model={tiny_model}", f"output_dir={proj}", *FAST, "steps=1", "plots=false"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{proj / 'config.yaml'} was not written by fastrft" in err and "already holds a run" not in err
    assert main([*args, "--overwrite"]) == 2
    assert f"{proj / 'config.yaml'} was not written by fastrft" in capsys.readouterr().err
    (proj / "config.yaml").unlink()   # the user moves it away: their checkpoints/ folder still blocks
    assert main([*args, "--overwrite"]) == 2
    assert f"{proj / 'checkpoints' / 'my_model.bin'} was not written by fastrft" in capsys.readouterr().err
    assert (proj / "checkpoints" / "my_model.bin").read_text() == "precious"
    assert sorted(p.name for p in proj.rglob("*")) == ["checkpoints", "my_model.bin", "notes.txt"]


@pytest.mark.parametrize("name, content", [
    ("config.yaml", "# my experiment, keep it\nmodel: MODEL\nsteps: 1\noutput_dir: PROJ\n"),   # TrainConfig keys
    ("metrics.jsonl", "my notes\n"),
    ("metrics.jsonl", '{"loss": 1}\n'),
    ("summary.json", '{"best": 1}'),
])
def test_a_users_own_file_under_a_runs_names_is_not_taken_for_a_run(name, content, tiny_model, tmp_path, capsys):
    proj = tmp_path / "proj"
    proj.mkdir()
    mine = proj / name
    mine.write_text(content.replace("MODEL", str(tiny_model)).replace("PROJ", str(proj)))
    before = mine.read_text()
    for args in (["train", f"model={tiny_model}", f"output_dir={proj}", *FAST, "steps=1", "--overwrite"],
                 ["train", "--resume", str(proj)]):
        if name != "config.yaml" and "--resume" in args:
            continue   # no config.yaml: not a run to resume, said before anything else
        assert main(args) == 2
        assert f"{mine} was not written by fastrft" in capsys.readouterr().err
        assert mine.read_text() == before and sorted(p.name for p in proj.iterdir()) == [name]
    if name == "config.yaml":   # the user's config, passed as --config, in the folder it names
        assert main(["train", "--config", str(mine), *FAST, "--overwrite"]) == 2
        assert f"{mine} was not written by fastrft" in capsys.readouterr().err
        assert mine.read_text() == before


@pytest.mark.parametrize("torn", ['{"st', '{', '{"step": 3, "rew'])
def test_a_metrics_log_torn_anywhere_in_its_last_line_is_still_the_runs(tmp_path, torn):
    from fastrft.rundir import RunDir

    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "eval_reward": 0.5}\n' + torn)
    assert RunDir(tmp_path).run_files() == [tmp_path / "metrics.jsonl"]   # a run to resume, not a user's file


def test_resume_continues_the_run_in_its_own_folder(tiny_model, tmp_path, capsys):
    run_dir, other = tmp_path / "run", tmp_path / "other"
    assert main(["train", f"model={tiny_model}", f"output_dir={run_dir}", *FAST, "steps=1", "plots=false"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), f"output_dir={other}", "steps=2"]) == 2
    assert f"override 'output_dir={other}': --resume continues {run_dir} in its own folder" in \
        capsys.readouterr().err
    assert not other.exists()


def test_overwrite_replaces_only_the_runs_own_files(tiny_model, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["train", f"model={tiny_model}", f"output_dir={run_dir}", *FAST, "steps=1"]
    assert main([*args, "plots=true", "save_every=1"]) == 0
    assert (run_dir / "plots" / "reward.png").is_file()
    (run_dir / "notes.txt").write_text("notes")
    capsys.readouterr()
    assert main([*args, "plots=false"]) == 2
    assert "already holds a run (config.yaml, metrics.jsonl, summary.json, plots, checkpoints)" in \
        capsys.readouterr().err
    assert main([*args, "plots=false", "--overwrite"]) == 0
    assert (run_dir / "notes.txt").read_text() == "notes"
    assert not (run_dir / "plots").exists()   # the first run's plots went with it
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_00000001"]
    assert "plots: false" in (run_dir / "config.yaml").read_text()


@pytest.mark.parametrize("steps", ["0", "-5"])
@pytest.mark.parametrize("command", [["demo"], ["compare", "--demo", "--modes", "none"]])
def test_reference_steps_below_one_is_refused_before_anything_is_cached(command, steps, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--cache-dir", str(tmp_path / "reference"), "--reference-steps", steps])
    assert exit_info.value.code == 2
    assert f"argument --reference-steps: must be >= 1, got {steps}" in capsys.readouterr().err
    assert not (tmp_path / "reference").exists()


def test_plot_of_a_file_or_of_a_run_without_steps_is_an_error_naming_it(tmp_path, capsys):
    config = tmp_path / "a.yaml"
    config.write_text("steps: 1\n")
    assert main(["plot", str(config)]) == 2
    assert f"{config} is not a run directory: it is a file" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    assert main(["plot", str(tmp_path / "run")]) == 2
    assert f"nothing to plot: {tmp_path / 'run' / 'metrics.jsonl'} logs no step's metrics" in capsys.readouterr().err


def test_an_os_error_is_one_line_naming_it_not_a_traceback(tiny_model, tmp_path, capsys, monkeypatch):
    import errno

    import fastrft.plots

    run_dir = tmp_path / "run"
    assert main(["train", f"model={tiny_model}", f"output_dir={run_dir}", *FAST, "steps=1", "plots=false"]) == 0

    def read_only(path):
        raise OSError(errno.EROFS, "Read-only file system", str(path / "plots"))

    monkeypatch.setattr(fastrft.plots, "plot_run", read_only)
    capsys.readouterr()
    assert main(["plot", str(run_dir)]) == 2
    assert f"fastrft plot: error: [Errno 30] Read-only file system: '{run_dir / 'plots'}'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "demo"])
def test_sigint_saves_a_checkpoint_then_exits_130(command, tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "fastrft", command, f"model={tiny_model}", f"output_dir={run_dir}", *FAST,
            "steps=1000", "save_every=1000", "plots=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # From tmp_path: the repository's top-level kernels/ would shadow the installed package of that name.
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 120
        # Step 1's record is written inside the training loop, where SIGINT asks for a stop.
        while not (metrics.exists() and '{"step": 1,' in metrics.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "stopped by SIGINT after step" in err and f"fastrft train --resume {run_dir}" in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGINT"
    assert (run_dir / "checkpoints" / f"step_{summary['steps']:08d}" / "checkpoint.json").is_file()


def test_demo_lists_only_the_files_it_wrote(tiny_model, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", f"model={tiny_model}", f"output_dir={out}", "steps=1", "prompts_per_step=2", "eval_size=4",
                 "progress=false", "plots=false"]) == 0
    assert f"run directory: {out} (metrics.jsonl, summary.json)\n" in capsys.readouterr().out


def test_lora_train_then_export(tiny_model, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", f"model={tiny_model}", f"output_dir={run_dir}", *FAST, "lora_r=4",
                 "lora_target_modules=q_proj,v_proj"]) == 0
    assert main(["export", str(run_dir), str(tmp_path / "model")]) == 0
    assert f"written to {tmp_path / 'model'}" in capsys.readouterr().out
    assert (tmp_path / "model" / "config.json").is_file() and (tmp_path / "model" / "tokenizer_config.json").is_file()
    assert main(["export", str(run_dir), str(tmp_path / "model")]) == 2
    assert "never overwrites" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "other")]) == 2
    assert "not a fastrft run directory" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the warning is DeepSpeed's guess on a machine without a GPU")
def test_export_on_the_cpu_prints_no_deepspeed_accelerator_warning(tiny_model, tmp_path):
    """save_pretrained imports DeepSpeed where it is installed; unnamed, its accelerator is guessed with a warning
    that a GPU went undetected."""
    pytest.importorskip("deepspeed")
    run_dir = tmp_path / "run"
    assert main(["train", f"model={tiny_model}", f"output_dir={run_dir}", *FAST]) == 0
    env = {key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"}
    done = subprocess.run([sys.executable, "-m", "fastrft", "export", str(run_dir), str(tmp_path / "model")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "accelerator" not in done.stdout + done.stderr, done.stdout + done.stderr


def test_export_under_torchrun_is_written_by_rank_0_alone(tiny_model, tmp_path, monkeypatch):
    """Prefixed with torchrun like train and compare, export would race: every rank into one folder."""
    assert main(["train", f"model={tiny_model}", f"output_dir={tmp_path / 'run'}", *FAST]) == 0
    monkeypatch.setenv("RANK", "1")
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("RANK", "0")
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "config.json").is_file()
