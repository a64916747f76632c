"""The command line: train from YAML with overrides, resume, plot, demo (with a short reference budget), errors."""
import json

import pytest

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


def test_resume_needs_a_run_directory(tmp_path):
    with pytest.raises(SystemExit, match="not a fastrft run directory"):
        main(["train", "--resume", str(tmp_path)])


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


def test_train_into_a_run_folder_needs_resume_or_overwrite(tiny_model, tmp_path, capsys):
    args = ["train", f"model={tiny_model}", f"output_dir={tmp_path / 'run'}", *FAST, "steps=1", "plots=false"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


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
