"""The RFT loop on the CPU with a tiny model built from a config and saved locally: real steps in every constraint
mode, constraints that act, resume, non-finite skip, refiner failure, dynamic sampling, configuration errors.
Fakes plug in at the Run's seams (its task, its models, its generate), never at module globals."""
import contextlib
import dataclasses
import json
import math
import os
import signal

import pytest
import torch

from fastrft.config import TrainConfig, load_config
from fastrft.distributed import World
from fastrft.rollout import Samples
from fastrft.rundir import RunDir
from fastrft.tasks import Task
from fastrft.tasks.demo import make_model, make_tokenizer
from fastrft.trainer import (evaluate, group_advantages, lr_factor, make_optimizer, make_run, overlong_penalty, train,
                             train_run)

SMALL = ["prompts_per_step=3", "group_size=4", "eval_size=4", "eval_every=2", "save_every=2", "progress=false",
         "device=cpu", "plots=false", "dynamic_sampling=false"]


def config(tiny_model, tmp_path, *overrides, **values):
    return load_config(None, [*SMALL, *overrides], model=tiny_model, output_dir=str(tmp_path / "run"), **values)


def read_metrics(run_dir):
    return RunDir(run_dir).read_metrics()


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def varied_rewards(run):
    """The untrained model scores 0 everywhere; a reward that varies with the completion gives advantages."""
    run.task.reward_funcs = [lambda prompts, completions, **kw: [len(c) % 3 / 2 for c in completions]]
    run.task.reward_weights = [1.0]


def finished_refiner(run, correction="0123"):
    """The refiner's plain greedy pass (refine_draft=false; the untrained tiny model never writes EOS) replaced by
    one that finishes; rollouts and evaluation keep the real sampler."""
    assert not run.cfg.refine_draft
    real_generate = run.generate

    def generate(model, tokenizer, prompt_ids, **kwargs):
        if model is not run.ref or not kwargs.get("greedy"):
            return real_generate(model, tokenizer, prompt_ids, **kwargs)
        n = len(prompt_ids)
        return Samples(prompt_ids, [[1]] * n, ["anything"] * n, [False] * n)

    run.generate = generate
    run.task.parse_refinement = lambda text: correction


@pytest.mark.parametrize("constraint", ["none", "kl", "refiner", "kl+refiner"])
def test_real_steps_in_every_mode(tiny_model, tmp_path, constraint):
    cfg = config(tiny_model, tmp_path, "steps=2", f"constraint={constraint}", "refine_coef=1.0",
                 f"plots={constraint == 'kl+refiner'}")
    summary = train(cfg)
    run_dir = tmp_path / "run"
    records = read_metrics(run_dir)
    assert records[0]["step"] == 0 and "eval_reward" in records[0]      # the reference model's own score
    steps = [r for r in records if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2]
    required = {"step", "reward_mean", "reward_std", "refine_rate", "changed_token_frac", "refine_failed", "kl_ref",
                "entropy", "clip_frac", "pg_loss", "sft_loss", "response_len", "tokens_per_s", "step_time_s",
                "peak_mem_gb", "micro_batches", "prompts_drawn"} | {f"time_{p}_s" for p in
                                                                    ("rollout", "reward", "reference", "update")}
    for record in steps:
        assert required <= set(record), required - set(record)
        assert {"reward_sort_reward", "reward_exact_match"} <= set(record)   # each reward function's mean
        assert math.isfinite(record["kl_ref"]) and record["kl_ref"] >= 0
        assert record["micro_batches"] >= 1
    assert "eval_reward" in steps[-1]
    if constraint in ("none", "kl"):
        assert all(r["refine_rate"] == 0 and r["sft_loss"] == 0 and r["time_refine_s"] == 0 for r in steps)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "summary.json").is_file()
    assert summary["steps"] == 2 and summary["eval_reward_initial"] is not None
    if cfg.plots:
        assert {p.name for p in (run_dir / "plots").glob("*.png")} >= {"reward.png", "constraint.png"}


def test_kl_constraint_keeps_the_policy_closer_to_the_reference(tiny_model, tmp_path):
    """Same seed, same prompts, a learning rate that moves the policy fast: the KL penalty must end with a lower
    KL to the reference than no constraint (it would not if the KL term did nothing)."""
    kl_end = {}
    for constraint in ("none", "kl"):
        run = make_run(config(tiny_model, tmp_path / constraint, "steps=8", "lr=1e-2", f"constraint={constraint}",
                              "kl_coef=3.0", "eval_every=100", "save_every=100", "eval_size=1"))
        varied_rewards(run)
        train_run(run)
        kl_end[constraint] = [r["kl_ref"] for r in read_metrics(tmp_path / constraint / "run") if r["step"] > 5]
    # Measured: none 0.38, 0.47, 0.73; kl 0.09, 0.09, 0.05.
    assert sum(kl_end["kl"]) < 0.4 * sum(kl_end["none"]), kl_end


def test_refined_rows_change_the_update(tiny_model, tmp_path):
    """A refiner that finishes with a fixed correction yields weighted cross-entropy rows, and they move the
    weights: the same step with and without the refiner (same seed, same samples) ends in different weights."""
    final = {}
    for constraint in ("none", "refiner"):
        run = make_run(config(tiny_model, tmp_path / constraint, "steps=1", f"constraint={constraint}",
                              "refine_draft=false"))
        finished_refiner(run)
        train_run(run)
        final[constraint] = weights(run.policy)
        record = read_metrics(tmp_path / constraint / "run")[-1]
        if constraint == "refiner":
            assert record["refine_rate"] > 0 and record["sft_loss"] > 0 and record["refine_failed"] == 0
            assert 0 < record["changed_token_frac"] <= 1
        else:
            assert record["sft_loss"] == 0
    assert any(not torch.equal(final["none"][k], final["refiner"][k]) for k in final["none"])


def test_tree_rows_train_as_rows_apart(tiny_model, tmp_path):
    """Refiner steps with a prompt's samples and their refinements in tree rows (the default here: padded rows
    through SDPA) and every sequence in a row of its own: the same losses, metrics and weights. The refiner keeps
    the first half of each response and changes the rest, so refinements fork from their samples all along them."""
    final, metrics = {}, {}
    for branches in (True, False):
        run = make_run(config(tiny_model, tmp_path / str(branches), "steps=2", "constraint=kl+refiner",
                              "refine_draft=false", "eval_every=100", "save_every=100"))
        varied_rewards(run)
        assert run.attention.branches and run.attention.pair_cost is not None
        if not branches:
            run.attention = dataclasses.replace(run.attention, branches=False, pair_cost=None)
        real_generate = run.generate

        def generate(model, tokenizer, prompt_ids, real_generate=real_generate, run=run, **kwargs):
            if model is not run.ref or not kwargs.get("greedy"):
                return real_generate(model, tokenizer, prompt_ids, **kwargs)
            responses = [tokenizer.decode(ids, skip_special_tokens=True).split("=", 1)[1][:-1] for ids in prompt_ids]
            texts = [r[:len(r) // 2] + "7" * (i % 3 + 1) for i, r in enumerate(responses)]
            return Samples(prompt_ids, [[1]] * len(texts), texts, [False] * len(texts))

        run.generate = generate
        run.task.parse_refinement = lambda text: text
        train_run(run)
        final[branches] = weights(run.policy)
        metrics[branches] = [r for r in read_metrics(tmp_path / str(branches) / "run") if r["step"] > 0]
    for ours, theirs in zip(metrics[True], metrics[False]):
        assert ours["refine_rate"] > 0.5 and ours["sft_loss"] > 0
        for name in ("pg_loss", "sft_loss", "kl_ref", "entropy", "refine_rate", "changed_token_frac"):
            assert ours[name] == pytest.approx(theirs[name], rel=1e-4, abs=1e-6), name
        assert ours["tokens_per_s"] * ours["time_update_s"] == pytest.approx(
            theirs["tokens_per_s"] * theirs["time_update_s"], rel=1e-6)   # the same trained tokens
    # AdamW's first steps are about lr (3e-4) per weight, whatever the gradient's size: tiny gradients, equal but
    # for rounding, can move a few weights differently by a fraction of that.
    for name, weight in final[True].items():
        torch.testing.assert_close(weight, final[False][name], rtol=1e-4, atol=1e-5, msg=name)


def test_refiner_failures_are_counted_and_cost_nothing(tiny_model, tmp_path):
    run = make_run(config(tiny_model, tmp_path, "steps=1", "constraint=refiner"))
    run.task.parse_refinement = lambda text: None
    train_run(run)
    record = read_metrics(tmp_path / "run")[-1]
    assert record["refine_failed"] == run.cfg.prompts_per_step * run.cfg.group_size
    assert record["refine_rate"] == 0 and record["sft_loss"] == 0
    assert record["changed_token_frac"] is None   # no refinement, no token measured: not "every token kept"


@pytest.mark.parametrize("constraint", ["none", "kl"])
def test_a_step_whose_samples_carry_no_loss_token_makes_no_optimizer_step(tiny_model, tmp_path, constraint):
    # Every sample cut at max_new_tokens: overlong=mask drops each from the loss.
    run = make_run(config(tiny_model, tmp_path, "steps=2", "overlong=mask", f"constraint={constraint}"))
    varied_rewards(run)
    real_generate = run.generate

    def generate(*args, **kwargs):
        samples = real_generate(*args, **kwargs)
        samples.truncated = [True] * len(samples.truncated)
        return samples

    run.generate = generate
    before = weights(run.policy)
    train_run(run)
    assert all(torch.equal(before[k], v) for k, v in run.policy.state_dict().items()), "AdamW's momentum moved them"
    for record in read_metrics(tmp_path / "run")[1:]:
        assert record["skipped_steps"] == record["step"]
        assert record["loss"] is None and record["grad_norm"] is None and record["pg_loss"] is None


def test_resume_gives_the_same_weights(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from fastrft.checkpoint import load_checkpoint

    straight = config(tiny_model, tmp_path / "a", "steps=6", "save_every=3", "lr=1e-3")
    train(straight)
    first = config(tiny_model, tmp_path / "b", "steps=3", "save_every=3", "lr=1e-3")
    train(first)
    resumed = load_config(tmp_path / "b" / "run" / "config.yaml", ["steps=6"])
    train(resumed, resume=True)

    def final_weights(run_dir):
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        step, _ = load_checkpoint(run_dir, model=model)
        assert step == 6
        return weights(model)

    a, b = final_weights(tmp_path / "a" / "run"), final_weights(tmp_path / "b" / "run")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "run")] == [0, 1, 2, 3, 4, 5, 6]


def test_a_run_that_stopped_before_its_first_checkpoint_resumes_from_step_0(tiny_model, tmp_path, monkeypatch,
                                                                             capsys):
    """A crash in the first steps (a reward function's bug, say) leaves a run folder with no checkpoint: --resume
    starts it again from step 0, its records of those steps dropped, and trains as a fresh run would."""
    import fastrft.trainer as trainer

    train(config(tiny_model, tmp_path / "a", "steps=2", "save_every=2", "lr=1e-3"))
    cfg = config(tiny_model, tmp_path / "b", "steps=2", "save_every=2", "lr=1e-3")
    real_step = trainer.run_step
    calls = []

    def crashing_step(run, step):
        calls.append(step)
        if step == 2:
            raise RuntimeError("a reward function's bug")
        return real_step(run, step)

    monkeypatch.setattr(trainer, "run_step", crashing_step)
    with pytest.raises(RuntimeError, match="a reward function's bug"):
        train(cfg)
    run_dir = tmp_path / "b" / "run"
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1] and not (run_dir / "checkpoints").exists()
    monkeypatch.setattr(trainer, "run_step", real_step)
    capsys.readouterr()
    train(load_config(run_dir / "config.yaml"), resume=True)
    assert "holds no checkpoint (the run stopped before its first one was saved): it starts again from step 0" \
        in capsys.readouterr().err
    straight, resumed = read_metrics(tmp_path / "a" / "run"), read_metrics(run_dir)
    assert [r["step"] for r in resumed] == [0, 1, 2]
    for a, b in zip(straight[1:], resumed[1:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["reward_mean"] == b["reward_mean"]


def test_nonfinite_loss_skips_the_step(tiny_model, tmp_path):
    """A policy whose final hidden states overflow (as a bf16 model can) gives a NaN loss: the step is skipped,
    counted, and the weights stay as they were."""
    from transformers import AutoModelForCausalLM

    from fastrft.checkpoint import load_checkpoint

    run = make_run(config(tiny_model, tmp_path, "steps=2", "save_every=1", "eval_size=1"))
    varied_rewards(run)
    run.policy.model.norm.register_forward_hook(
        lambda module, args, output: output * float("nan") if module.training else output)
    train_run(run)
    records = [r for r in read_metrics(tmp_path / "run") if r["step"] > 0]
    assert [r["skipped_steps"] for r in records] == [1, 2]
    assert [r["nonfinite_updates"] for r in records] == [1, 1]
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    initial = weights(model)
    load_checkpoint(tmp_path / "run", model=model)
    for name, value in weights(model).items():
        assert torch.equal(value, initial[name]), f"{name} changed by a skipped step"


def test_dynamic_sampling_drops_and_refills(tiny_model, tmp_path):
    """Prompts whose group has zero reward variance are dropped and replaced by further prompts, until the step
    has prompts_per_step groups."""
    run = make_run(config(tiny_model, tmp_path, "steps=1", "constraint=none", "temperature=1.5",
                          "max_resample_rounds=6", "dynamic_sampling=true", "prompts_per_step=4"))
    def flat_for_odd_lengths(prompts, completions, answer, **columns):
        return [0.5 if len(a) % 2 else len(c) % 3 / 2 for c, a in zip(completions, answer)]

    run.task.reward_funcs = [flat_for_odd_lengths, *run.task.reward_funcs[1:]]
    train_run(run)
    record = read_metrics(tmp_path / "run")[-1]
    assert record["groups_dropped"] > 0
    assert record["groups_used"] == run.cfg.prompts_per_step
    assert record["prompts_drawn"] == record["groups_used"] + record["groups_dropped"]
    assert run.stream.state()["index"] == record["prompts_drawn"]


def test_group_advantages_and_overlong_penalty():
    adv = group_advantages([1.0, 0.0, 0.5, 0.5], scale=True)
    assert sum(adv) == pytest.approx(0.0, abs=1e-9) and adv[0] > adv[2] > adv[1]
    assert group_advantages([1.0, 0.0], scale=False) == [0.5, -0.5]
    cfg = TrainConfig(model="m", overlong="penalty", overlong_buffer=4, overlong_penalty=1.0)
    assert overlong_penalty(6, 10, cfg) == 0.0
    assert overlong_penalty(8, 10, cfg) == pytest.approx(-0.5)
    assert overlong_penalty(12, 10, cfg) == -1.0
    assert overlong_penalty(12, 10, TrainConfig(model="m")) == 0.0


def test_different_tokenizers_are_refused(tiny_model, tmp_path):
    other = make_tokenizer()
    other.add_tokens(["<extra>"])
    other_dir = tmp_path / "other"
    make_model(other, seed=1).save_pretrained(other_dir)
    other.save_pretrained(other_dir)
    cfg = config(tiny_model, tmp_path, "steps=1", ref_model=str(other_dir))
    with pytest.raises(ValueError, match="different tokenizers"):
        train(cfg)


@pytest.mark.parametrize("override,message", [
    ("learning_rate=1e-4", "unknown config key 'learning_rate'"), ("steps=ten", "'steps' must be int"),
    ("constraint=both", "constraint must be one of"), ("steps", "key=value"),
    ("packing=sometimes", "packing must be one of"), ("max_tokens_per_batch=0", "max_tokens_per_batch must be >= 1"),
    ("output_dir=", "output_dir must name the run's folder, got ''"),
    ("warmup_steps=100", "warmup_steps=100 is not below steps=100: the learning rate would never reach lr"),
    ("overlong=penalty overlong_buffer=0", "overlong=penalty needs overlong_buffer >= 1"),
    ("lora_target_modules=q_proj", "lora_target_modules names LoRA's modules, but lora_r=0 trains every weight"),
    ("keep_checkpoints=0", "keep_checkpoints must be >= 1")])
def test_config_override_errors_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, override.split(" "))


def test_a_list_key_takes_a_yaml_list_on_the_command_line_too():
    """q_proj,v_proj and [q_proj, v_proj] alike ('[q_proj' was taken for a module name); a broken one is named."""
    for written in ("q_proj,v_proj", "[q_proj, v_proj]", "[q_proj,v_proj]", " [ q_proj , v_proj ] "):
        assert load_config(None, ["lora_r=2", f"lora_target_modules={written}"]).lora_target_modules == \
            ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match=r"lora_target_modules.*'\[q_proj, v_proj' is not a list"):
        load_config(None, ["lora_r=2", "lora_target_modules=[q_proj, v_proj"])
    with pytest.raises(ValueError, match="must be a list of names"):
        load_config(None, ["lora_r=2", "lora_target_modules=[1, 2]"])


@pytest.mark.parametrize("override,message", [
    ("lr=nan", "lr must be a finite number"), ("lr=inf", "lr must be a finite number"), ("lr=0", "lr must be > 0"),
    ("lr=-1e-4", "lr must be > 0"), ("clip_low=1.0", "clip_low must be in \\[0, 1\\)"),
    ("clip_high=-0.1", "clip_high must be >= 0"), ("kl_coef=inf", "kl_coef must be a finite number"),
    ("temperature=0", "temperature must be > 0"), ("top_p=1.5", "top_p must be in"),
    ("min_lr_ratio=2", "min_lr_ratio must be in \\[0, 1\\]"), ("warmup_steps=-1", "warmup_steps must be >= 0"),
    ("grad_clip=nan", "grad_clip must be a finite number"), ("refine_context=-2", "refine_context must be >= 0"),
    ("group_size=1", "group_size must be >= 2"), ("eval_size=0", "eval_size must be >= 1"),
    ("seed=18446744073709551616", "override 'seed=18446744073709551616': seed must be in \\[0, 2\\*\\*32\\)"),
    ("seed=-1", "seed must be in"),
    ("extra.n_eval=[1,", "override 'extra.n_eval=\\[1,': the value is not valid YAML")])
def test_every_numeric_key_is_checked_for_its_range(override, message):
    with pytest.raises(ValueError, match=message) as info:
        load_config(None, [override])
    assert "override" in str(info.value)     # where the value came from


def test_config_values_are_typed_in_python_too():
    for kwargs, message in ((dict(lr=float("nan")), "lr must be a finite number"),
                            (dict(steps=True), "steps must be int"), (dict(kl_coef="0.1"), "kl_coef must be float"),
                            (dict(refine_draft="yes"), "refine_draft must be true or false")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(model="m", **kwargs)


@pytest.mark.parametrize("content,message", [
    (b"steps: 7\nlr: .nan\n", ":2: lr must be a finite number"),
    (b"steps: 7\nconstraint: kl\nclip_low: 3\n", ":3: clip_low must be in"),
    (b"steps: 7\n  lr: [1e-4\n", ":2:\\d+: malformed YAML"),
    (b"steps: ten\n", ":1: config key 'steps' must be int"),
    (b"steps: 7\nmodel: \xff\xfe\n", " is not UTF-8 text")])
def test_config_file_errors_name_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"{path}{message}"):
        load_config(path)


@pytest.mark.parametrize("content,message", [
    ("steps: true\n", ":1: config key 'steps' must be int, got true"),
    ("lr: yes\n", ":1: config key 'lr' must be float, got true"),
    ("clip_low: false\n", ":1: config key 'clip_low' must be float, got false"),
    ("steps: 2.5\n", ":1: config key 'steps' must be int, got 2.5"),
    ("output_dir: null\n", ":1: config key 'output_dir' must be a string, got null"),
    ("model: 5\n", ":1: config key 'model' must be a string, got 5 \\(quote it in YAML\\)"),
    ("model: [a]\n", ":1: config key 'model' must be a string, got \\['a'\\]"),
    ("steps: 1\nlr: 1e-4\nsteps: 2\n", ":3: 'steps' is set twice \\(first on line 1\\)"),
    ("device: gpu\n", ":1: device must be auto, cpu, cuda or cuda:N"),
    ("device: mps\n", ":1: device must be auto, cpu, cuda or cuda:N, got 'mps'"),   # torch's, not fastrft's
    ("device: meta\n", ":1: device must be auto, cpu, cuda or cuda:N, got 'meta'"),
    ("refine_template: 'fix {prompt}{resp}>'\n", ":1: refine_template must be a str.format template whose fields "
                                                  "are {prompt} \\(optional\\) and {response}, got the fields "
                                                  "\\['prompt', 'resp'\\]"),
    ("refine_template: 'fix {0}'\n", ":1: refine_template must be a str.format template"),
    ("refine_template: 'no fields'\n", ":1: refine_template must be a str.format template"),
    ("refine_template: 'fix {response}{'\n", ":1: refine_template 'fix {response}{' is not a str.format template"),
])
def test_config_values_of_the_wrong_type_are_refused_where_they_were_set(tmp_path, content, message):
    path = tmp_path / "run.yaml"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"{path}{message}"):
        load_config(path)


@pytest.mark.parametrize("content,override,message", [
    ("steps: 1\n\nextra:\n  n_eval: 4\n  foo: 1\n", None, ":5: task 'demo' takes no option extra.foo"),
    ("steps: 1\nextra: {n_train: x}\n", None, ":2: task 'demo': extra.n_train must be int, got 'x'"),
    ("steps: 1\nextra: {n_train: 8}\n", "extra.n_train=y", "override 'extra.n_train=y': task 'demo': extra.n_train "
                                                           "must be int, got 'y'"),
    ("steps: 1\n", "extra.bar=2", "override 'extra.bar=2': task 'demo' takes no option extra.bar")])
def test_task_options_are_refused_where_they_were_set(tiny_model, tmp_path, content, override, message):
    """The task checks its options as it loads, after the config: its refusal still names the file and line, or the
    override, and leaves no run folder."""
    path = tmp_path / "run.yaml"
    path.write_text(content)
    overrides = [f"model={tiny_model}", f"output_dir={tmp_path / 'run'}", *([override] if override else [])]
    cfg = load_config(path, overrides)
    with pytest.raises(ValueError) as refused:
        make_run(cfg)
    assert str(refused.value).startswith(message if override else f"{path}{message}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["null", "[1]"])
def test_a_task_option_on_the_command_line_over_a_file_whose_extra_is_no_mapping(tmp_path, value):
    path = tmp_path / "run.yaml"
    path.write_text(f"steps: 1\nextra: {value}\n")
    with pytest.raises(ValueError, match=f"{path}:2: config key 'extra' must be a mapping"):
        load_config(path, ["extra.n_eval=3"])


def test_config_values_yaml_types_that_mean_the_same_are_taken(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 10.0\nlr: 1e-4\npacking: false\neval_size: null\nrefine_template: 'fix {prompt}{response}>'\n")
    cfg = load_config(path)
    assert (cfg.steps, cfg.lr, cfg.packing, cfg.eval_size) == (10, 1e-4, "false", None)


def test_config_paths_may_begin_with_the_home_folder(tmp_path, monkeypatch):
    """No shell expands ~ in a YAML file: the config does, for the model, reference, dataset and output paths."""
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "run.yaml"
    path.write_text("model: ~/m\nref_model: ~/r\ndataset: ~/d.jsonl\neval_dataset: ~/e.jsonl\noutput_dir: ~/runs/x\n")
    cfg = load_config(path)
    assert (cfg.model, cfg.ref_model, cfg.dataset, cfg.eval_dataset, cfg.output_dir) == tuple(
        str(tmp_path / name) for name in ("m", "r", "d.jsonl", "e.jsonl", "runs/x"))


def test_config_errors_name_the_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 7\nconstraint: kl\nbogus_key: 1\n")
    with pytest.raises(ValueError, match="unknown config key 'bogus_key'"):
        load_config(path)
    path.write_text("steps: 7\nconstraint: kl\nmax_new_tokens: null\n")
    cfg = load_config(path, ["kl_coef=0.2", "packing=false", "extra.n_eval=5"])
    assert (cfg.steps, cfg.constraint, cfg.kl_coef, cfg.packing, cfg.extra) == (7, "kl", 0.2, "false", {"n_eval": 5})


@pytest.mark.parametrize("yaml_value, expected", [("true", "true"), ("false", "false"), ("auto", "auto"),
                                                  ("on", "true"), ("'False'", "false")])
def test_packing_reads_the_old_booleans(tmp_path, yaml_value, expected):
    path = tmp_path / "run.yaml"
    path.write_text(f"packing: {yaml_value}\n")
    assert load_config(path).packing == expected
    assert TrainConfig(packing=expected == "true").packing == ("true" if expected == "true" else "false")


def test_minibatch_updates_store_old_logprobs(tiny_model, tmp_path):
    run = make_run(config(tiny_model, tmp_path, "steps=1", "ppo_epochs=2", "minibatches=2", "lr=1e-2",
                          "constraint=kl"))
    varied_rewards(run)
    train_run(run)
    record = read_metrics(tmp_path / "run")[-1]
    assert record["nonfinite_updates"] == 0 and math.isfinite(record["pg_loss"])
    # After the first of four optimizer steps the ratio moves away from 1: some rows are clipped.
    assert record["clip_frac"] > 0


def test_bfloat16_run(tiny_model, tmp_path):
    train(config(tiny_model, tmp_path, "steps=1", "dtype=bfloat16", "constraint=kl+refiner"))
    record = read_metrics(tmp_path / "run")[-1]
    assert math.isfinite(record["pg_loss"]) and record["skipped_steps"] == 0


@pytest.mark.parametrize("key", ["dataset", "eval_dataset"])
def test_a_dataset_file_that_is_missing_or_empty_is_named_by_its_key(tiny_model, tmp_path, key):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for path, problem in ((tmp_path / "missing.jsonl", "does not exist"), (empty, "holds no rows")):
        with pytest.raises(ValueError, match=f"^{key} {path} {problem}"):
            train(config(tiny_model, tmp_path, f"{key}={path}", "steps=1"))
        assert not (tmp_path / "run").exists()


def test_the_cpu_optimizer_is_the_fused_adamw_with_the_loops_numbers():
    torch.manual_seed(0)
    fused_model, loop_model = (torch.nn.Linear(8, 4) for _ in range(2))
    loop_model.load_state_dict(fused_model.state_dict())
    cfg = TrainConfig(model="unused", lr=1e-2, weight_decay=0.1)
    fused = make_optimizer(cfg, fused_model, torch.device("cpu"))
    loop = torch.optim.AdamW(loop_model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    assert fused.defaults["fused"]
    for _ in range(3):
        x = torch.randn(5, 8)
        for model, optimizer in ((fused_model, fused), (loop_model, loop)):
            optimizer.zero_grad()
            model(x).square().sum().backward()
            optimizer.step()
    for a, b in zip(fused_model.parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_sigterm_saves_a_checkpoint_and_stops(tiny_model, tmp_path):
    from fastrft.checkpoint import latest_checkpoint

    run = make_run(config(tiny_model, tmp_path, "steps=10", "save_every=100", "eval_size=1"))
    real = run.task.reward_funcs[0]
    calls = []

    def reward_then_sigterm(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:   # step 2's rollout (no evaluation in this run, one rollout round a step)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    run.task.reward_funcs = [reward_then_sigterm, *run.task.reward_funcs[1:]]
    run.eval_rows = []
    summary = train_run(run)
    assert summary["steps"] == 2 and summary["stopped_by"] == "SIGTERM"
    assert latest_checkpoint(tmp_path / "run").name == "step_00000002"


def test_sigterm_while_the_plots_are_drawn_still_writes_the_summary(tiny_model, tmp_path, monkeypatch):
    import fastrft.plots

    run = make_run(config(tiny_model, tmp_path, "steps=1", "plots=true"))
    real_plot = fastrft.plots.plot_run

    def plot_then_sigterm(path):
        os.kill(os.getpid(), signal.SIGTERM)   # the default action would end the process here
        return real_plot(path)

    monkeypatch.setattr(fastrft.plots, "plot_run", plot_then_sigterm)
    summary = train_run(run)
    assert summary["steps"] == 1 and summary["stopped_by"] == "SIGTERM"
    assert RunDir(tmp_path / "run").read_summary() == summary
    assert (tmp_path / "run" / "plots" / "reward.png").is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # the guard ends with the run


def test_static_cache_generates_what_the_dynamic_cache_does(tiny_model, monkeypatch):
    """The static KV cache (what rollouts use on CUDA) gives the same greedy completions as the dynamic one, with
    left-padded prompts of different lengths in one batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastrft import rollout

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompts = rollout.encode_prompts(tokenizer, ["12+7=", "3+4=", "105+96="])

    def complete():
        return rollout.generate(model, tokenizer, prompts, max_new_tokens=12, greedy=True).completion_ids

    from transformers import cache_utils

    dynamic = complete()
    static_caches = []
    monkeypatch.setattr(rollout, "cache_implementation", lambda device: "static")
    original_init = cache_utils.StaticCache.__init__
    monkeypatch.setattr(cache_utils.StaticCache, "__init__",
                        lambda self, *a, **k: static_caches.append(self) or original_init(self, *a, **k))
    assert complete() == dynamic
    assert static_caches, "generate() did not build a static cache"
    assert any(len(ids) > 1 for ids in dynamic)


# ----------------------------------------------------------------------------------------------- the run folder

def snapshot(folder):
    """Every file below folder and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(tiny_model, tmp_path):
    cfg = config(tiny_model, tmp_path, "steps=2")
    train(cfg)
    before = snapshot(tmp_path / "run")
    with pytest.raises(ValueError, match=r"already holds a run .*--resume .*output_dir.*--overwrite"):
        train(cfg)
    assert snapshot(tmp_path / "run") == before          # nothing truncated, no checkpoints mixed
    (tmp_path / "run" / "notes.txt").write_text("mine")
    train(config(tiny_model, tmp_path, "steps=1", "save_every=1"), overwrite=True)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [0, 1]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == ["step_00000001"]
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"   # only the run's own files were replaced


@contextlib.contextmanager
def folder_held_by_another_process(run_dir):
    """A process holding run_dir's lock (as a run writing it does) for the block; yields its pid; killed after."""
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", f"from fastrft.rundir import RunDir; RunDir({str(run_dir)!r}).lock(); print('held', "
                               f"flush=True); import time; time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=run_dir)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_folder_another_run_is_writing_is_refused_until_that_run_ends(tiny_model, tmp_path):
    """Two runs started into one folder at once: the one that reaches the folder second (here, after another process
    took it) is refused before it writes anything; once the other process is gone, even killed, the folder is free."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with folder_held_by_another_process(run_dir) as pid:
        with pytest.raises(ValueError, match=f"being written by another fastrft run \\(pid {pid} on "):
            make_run(config(tiny_model, tmp_path, "steps=1"))
        assert sorted(p.name for p in run_dir.iterdir()) == [".fastrft-lock"]
    train_run(make_run(config(tiny_model, tmp_path, "steps=1")))
    assert (run_dir / "summary.json").is_file()


def test_a_resume_takes_the_folder_before_it_reads_the_checkpoint(tiny_model, tmp_path, monkeypatch):
    """A resume started while the run is still being written is refused at once, before it loads anything: had it
    read the checkpoint and the records first, a run that went on writing them (and ended) would have left it a
    stale copy to continue over the newer steps. A resume that fails lets the folder go."""
    import fastrft.trainer
    from fastrft import rundir

    def no_loading(*args, **kwargs):
        raise AssertionError("a resume of a folder another run holds loaded its models")

    train(config(tiny_model, tmp_path, "steps=1"))
    run_dir = tmp_path / "run"
    with folder_held_by_another_process(run_dir) as pid:
        monkeypatch.setattr(fastrft.trainer, "load_models", no_loading)
        with pytest.raises(ValueError, match=f"being written by another fastrft run \\(pid {pid} on "):
            make_run(config(tiny_model, tmp_path, "steps=2"), resume=True)
        monkeypatch.undo()
    with pytest.raises(ValueError, match="ref_model='/nonexistent/model': no such directory"):
        make_run(config(tiny_model, tmp_path, "steps=2", "ref_model=/nonexistent/model"), resume=True)
    assert run_dir.resolve() not in rundir._HELD_LOCKS
    train_run(make_run(config(tiny_model, tmp_path, "steps=2"), resume=True))
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1, 2]


def test_a_start_that_fails_once_it_holds_the_folder_lets_it_go(tiny_model, tmp_path, monkeypatch):
    import fastrft.trainer
    from fastrft import rundir

    def full_disk(cfg, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(fastrft.trainer, "save_config", full_disk)
    with pytest.raises(OSError, match="No space left"):
        make_run(config(tiny_model, tmp_path, "steps=1"))
    assert (tmp_path / "run").resolve() not in rundir._HELD_LOCKS   # another process may take it now


def test_a_start_that_fails_keeps_the_lock_a_run_of_the_same_process_holds(tiny_model, tmp_path):
    """A second make_run into the folder of a Run this process made (and has not trained yet) fails, and the first
    Run keeps its hold: another process is still refused the folder."""
    first = make_run(config(tiny_model, tmp_path, "steps=1"))
    with pytest.raises(ValueError, match="already holds a run"):
        make_run(config(tiny_model, tmp_path, "steps=1"))
    assert RunDir(tmp_path / "run").locked()
    train_run(first)
    assert not RunDir(tmp_path / "run").locked()   # train_run lets it go


def test_a_folder_that_cannot_be_locked_is_said_once_per_run(tiny_model, tmp_path, monkeypatch):
    import errno
    import fcntl
    import warnings

    train(config(tiny_model, tmp_path, "steps=1"))

    def no_locks(f, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_run(make_run(config(tiny_model, tmp_path, "steps=2"), resume=True))
    said = [w for w in caught if "cannot be locked" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in said]


@pytest.mark.parametrize("model_type", ["gemma2", "bloom"])
def test_a_model_without_sdpa_attention_trains_and_exports(tiny_model, tmp_path, model_type):
    """Architectures that transformers gives no SDPA attention load with eager attention (the loader asked every
    model for SDPA, and transformers refused them)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from fastrft.trainer import export_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, n_layer=1, num_attention_heads=2,
                 n_head=2, num_key_value_heads=1, head_dim=16)
    model_config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        **sizes)
    path = tmp_path / model_type
    AutoModelForCausalLM.from_config(model_config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    run = make_run(config(str(path), tmp_path, "steps=1", "constraint=kl"))
    assert run.policy.config._attn_implementation == "eager"
    train_run(run)
    out, step = export_model(tmp_path / "run", tmp_path / "exported")
    assert step == 1 and (out / "config.json").is_file()


def test_the_policy_trains_without_its_dropout_unless_asked(tiny_model, tmp_path):
    """A model with dropout (GPT-2's 0.1): at the first step the policy is the reference, and its KL to it reads 0
    only where the update's forward runs without dropout, as the reference's does (disable_dropout, the default);
    disable_dropout=false keeps the model's own, and the KL then measures its noise."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from fastrft.trainer import export_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model_config = AutoConfig.for_model("gpt2", vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2,
                                        n_positions=128, pad_token_id=tokenizer.pad_token_id,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3)
    path = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(model_config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    kl_ref = {}
    for disable in (True, False):
        train(config(str(path), tmp_path, "steps=1", "constraint=kl", f"disable_dropout={str(disable).lower()}",
                     f"output_dir={tmp_path / f'run_{disable}'}"))
        kl_ref[disable] = read_metrics(tmp_path / f"run_{disable}")[1]["kl_ref"]
    assert abs(kl_ref[True]) < 1e-5 < abs(kl_ref[False]), kl_ref
    out, _ = export_model(tmp_path / "run_True", tmp_path / "exported")
    assert AutoConfig.from_pretrained(out).resid_pdrop == 0.3   # the model's own rates, as its directory has them


@pytest.mark.parametrize("model_type, rates", [
    ("llama", dict(attention_dropout=0.5)),   # a float its attention hands the kernel
    ("falcon", dict(attention_dropout=0.5, hidden_dropout=0.5)),   # read from the config in the forward
    ("gpt2", dict(resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)),   # dropout modules
])
def test_disable_dropout_leaves_training_forwards_deterministic(model_type, rates):
    from transformers import AutoConfig, AutoModelForCausalLM

    from fastrft.trainer import disable_dropout

    model_config = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, n_embd=32, intermediate_size=64,
                                        num_hidden_layers=1, n_layer=1, num_attention_heads=2, n_head=2,
                                        num_key_value_heads=2, **rates)
    model = AutoModelForCausalLM.from_config(model_config, attn_implementation="eager").train()
    ids = torch.randint(0, 64, (2, 12))
    assert not torch.equal(model(ids).logits, model(ids).logits)   # the rates are in effect
    assert disable_dropout(model) > 0
    torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_a_checkpoint_of_the_per_tensor_adamw_resumes_with_the_fused_one(tiny_model, tmp_path, monkeypatch):
    import fastrft.trainer

    real = fastrft.trainer.make_optimizer

    def per_tensor(cfg, model, device):   # what fastrft built on the CPU before
        optimizer = real(cfg, model, device)
        return torch.optim.AdamW(optimizer.param_groups[0]["params"], lr=cfg.lr, weight_decay=cfg.weight_decay)

    monkeypatch.setattr(fastrft.trainer, "make_optimizer", per_tensor)
    train_run(make_run(config(tiny_model, tmp_path, "steps=1")))
    monkeypatch.undo()
    run = make_run(config(tiny_model, tmp_path, "steps=2"), resume=True)
    assert all(group["fused"] for group in run.optimizer.param_groups)   # the checkpoint's groups said False
    train_run(run)


def test_a_failed_resume_changes_nothing_on_disk(tiny_model, tmp_path):
    train(config(tiny_model, tmp_path, "steps=2"))
    run_dir = tmp_path / "run"
    before = snapshot(run_dir)
    resumed = load_config(run_dir / "config.yaml", ["steps=4", "lr=5e-4", "ref_model=/nonexistent/model"])
    with pytest.raises(ValueError, match="ref_model='/nonexistent/model': no such directory"):
        train(resumed, resume=True)
    for name in ("metrics.jsonl", "checkpoints/step_00000002/weights/__0_0.distcp"):
        (run_dir / name).write_bytes(before[name][:-10])      # cut short: nothing usable to resume from
    before = snapshot(run_dir)
    with pytest.raises(ValueError, match="corrupt checkpoint file"):
        train(load_config(run_dir / "config.yaml", ["steps=4", "lr=5e-4"]), resume=True)
    assert snapshot(run_dir) == before                   # config.yaml still the old one


def test_a_start_that_fails_on_its_task_or_data_writes_nothing(tiny_model, tmp_path, monkeypatch):
    """An empty training set, a dataset value of the wrong type or a task's own refinement template that cannot
    work fail the start before the run folder is written, so the corrected command runs without --overwrite."""
    (tmp_path / "odd_tasks.py").write_text(
        "from fastrft.tasks import load_task\n"
        "def no_prompts():\n    task = load_task('demo', n_eval=4)\n    task.train_rows = []\n    return task\n"
        "def bad_template():\n    task = load_task('demo', n_eval=4)\n    task.refine_template = 'fix {resp}'\n"
        "    return task\n"
        "def bad_parser():\n    task = load_task('demo', n_eval=4)\n    task.parse_refinement = None\n"
        "    return task\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "sort 21=", "answer": "12"}\n{"prompt": "sort 321=", "answer": 123}\n')
    for overrides, message in ((["task=odd_tasks:no_prompts"], "the task has no training prompts"),
                               (["task=odd_tasks:bad_template"], "refine_template must be a str.format template"),
                               (["task=odd_tasks:bad_parser"], "Task.parse_refinement must be a callable"),
                               ([f"dataset={data}"], r"rows\.jsonl:2: 'answer' must be str")):
        with pytest.raises(ValueError, match=message):
            train(config(tiny_model, tmp_path, "steps=1", *overrides))
        assert not (tmp_path / "run").exists()


def test_a_prompt_of_no_tokens_is_refused_before_the_run_folder_is_written(tiny_model, tmp_path):
    """An empty prompt, with a tokenizer that adds no BOS token (as Qwen's and Llama 3's), would give the first
    written token nothing to follow."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    no_bos = tmp_path / "no_bos"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer._tokenizer.post_processor = None   # the demo tokenizer's BOS template gone
    tokenizer.save_pretrained(no_bos)
    AutoModelForCausalLM.from_pretrained(tiny_model).save_pretrained(no_bos)
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "sort 21=", "answer": "12"}\n{"prompt": "", "answer": ""}\n')
    with pytest.raises(ValueError, match=rf"{data}: the prompt '' encodes to no tokens \(1 prompts do; the tokenizer "
                                         r"adds no BOS token\)"):
        train(config(str(no_bos), tmp_path, "steps=1", f"dataset={data}"))
    assert not (tmp_path / "run").exists()
    train(config(tiny_model, tmp_path, "steps=1", f"dataset={data}"))   # with its BOS, an empty prompt is fine


def test_chat_prompts_are_encoded_through_the_chat_template(tiny_model):
    from transformers import AutoTokenizer

    from fastrft.rollout import encode_prompts

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}={% endfor %}"
    chat, text = encode_prompts(tokenizer, [[{"role": "user", "content": "sort 21"}], "sort 21="])
    assert chat == text[1:]   # the template's text, without the BOS that the string's encoding adds
    # A last assistant message is continued, not followed by a new turn (TRL's continue_final_message).
    prefilled, text = encode_prompts(tokenizer, [[{"role": "user", "content": "sort 321"},
                                                  {"role": "assistant", "content": "1"}], "sort 321=1"])
    assert prefilled == text[1:]
    with pytest.raises(ValueError, match="a prompt must be a string or a list of chat messages, got int"):
        encode_prompts(tokenizer, [3])


def test_a_step_with_no_group_to_learn_from(tiny_model, tmp_path):
    """Every group dropped (one reward for all): no optimizer step, counted in skipped_steps; response_len still
    over the step's samples; kl_ref, which no token gave, is null (valid JSON), and so is the summary's."""
    run = make_run(config(tiny_model, tmp_path, "steps=1", "dynamic_sampling=true", "max_resample_rounds=0"))
    run.task.reward_funcs = [lambda prompts, completions, **kw: [1.0] * len(completions)]
    run.task.reward_weights = [1.0]
    summary = train_run(run)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[-1])   # strict: NaN would not parse
    assert record["groups_used"] == 0 and record["skipped_steps"] == 1 and record["response_len"] > 0
    assert record["kl_ref"] is None and summary["kl_ref_last"] is None
    # What no update measured is null too, not 0: the loss, the entropy, the clip fraction, the gradient norm.
    assert all(record[key] is None for key in ("loss", "pg_loss", "entropy", "clip_frac", "grad_norm"))
    assert "NaN" not in "".join(lines)


def test_a_mean_of_no_scored_sample_is_null_not_zero(tiny_model, tmp_path):
    """A reward function that scores nothing (every value None): the step's and the evaluation's means are null, and
    the summary's too; nothing crashes at the end."""
    run = make_run(config(tiny_model, tmp_path, "steps=2", "eval_every=1", "progress=true"))   # (a bar shows -)
    run.task.reward_funcs = [lambda prompts, completions, **kw: [None] * len(completions)]
    run.task.reward_weights = [1.0]
    summary = train_run(run)
    records = read_metrics(tmp_path / "run")
    assert [r["eval_reward"] for r in records if "eval_reward" in r] == [None] * 3
    steps = [r for r in records if "reward_mean" in r]
    assert steps and all(r["reward_mean"] is None and r["reward_std"] is None and r["reward_none"] > 0 for r in steps)
    assert summary["eval_reward_best"] is None and summary["reward_mean_last"] is None
    assert summary["refine_rate_mean"] is None and summary["refine_rate_last"] is None   # no step logged one

    class OwnEvaluation(Task):   # a task's own evaluate, whose metric scored nothing
        def evaluate(self, *args, **kwargs):
            return {"eval_reward": None}

    run.task = OwnEvaluation(**{f.name: getattr(run.task, f.name) for f in dataclasses.fields(Task)})
    assert evaluate(run) == {"eval_reward": None}


def test_a_task_s_rows_and_evaluation_are_checked(tiny_model, tmp_path, monkeypatch):
    """A task's own rows lacking what its reward functions read are refused before the run folder is written, as a
    dataset file's are; an evaluation metric not named eval_* (it would overwrite the step's own) is refused."""
    (tmp_path / "rowless_task.py").write_text(
        "from fastrft.tasks.demo import demo_task\n"
        "def make():\n"
        "    task = demo_task()\n"
        "    task.train_rows = [{'prompt': r['prompt']} for r in task.train_rows]\n"
        "    return task\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"task 'rowless_task:make''s training rows, row 1: row lacks 'answer', which "
                                         r"the task's reward functions need"):
        make_run(config(tiny_model, tmp_path, "steps=1", "task=rowless_task:make"))
    assert not (tmp_path / "run").exists()
    run = make_run(config(tiny_model, tmp_path, "steps=1"))
    run.task.evaluate_sums = lambda *args, **kwargs: {"step": (99.0, 1)}
    with pytest.raises(ValueError, match="task 'demo': its evaluation's metric 'step' is not named eval_"):
        train_run(run)


def test_a_dataset_of_chat_prompts_trains_through_the_chat_template(tiny_model, chat_model, tmp_path):
    """Chat-message prompts: formatted by the model's chat template (refused before the run folder is written when it
    has none); the reward functions get the messages, and the completions as TRL's conversational ones; the
    refiner's template the last user message's content."""
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"sort {d}"}], "answer": "".join(
        sorted(d))}) + "\n" for d in ("321", "4132", "97", "5501")))
    with pytest.raises(ValueError, match=rf"{data}: Cannot use chat template functions because "
                                         r"tokenizer.chat_template is not set"):
        train(config(tiny_model, tmp_path, "steps=1", f"dataset={data}"))
    assert not (tmp_path / "run").exists()
    run = make_run(config(chat_model, tmp_path, "steps=1", f"dataset={data}", "constraint=kl+refiner"))
    seen = []
    reward = run.task.reward_funcs[0]

    def spy(prompts, completions, **columns):
        seen.extend(zip(prompts, completions))
        return reward(prompts, completions, **columns)

    run.task.reward_funcs = [spy, *run.task.reward_funcs[1:]]
    train_run(run)
    chat = [(p, c) for p, c in seen if not isinstance(p, str)]   # the training prompts (evaluation: the task's own)
    assert chat and all(p[0]["role"] == "user" and p[0]["content"].startswith("sort ") for p, _ in chat)
    assert all(len(c) == 1 and c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) for _, c in chat)
    assert all(isinstance(c, str) for p, c in seen if isinstance(p, str))
    assert [r["step"] for r in read_metrics(tmp_path / "run")][-1] == 1


def test_settings_that_only_the_task_or_the_folder_can_refuse(tiny_model, tmp_path, capsys):
    """Refused (or said) before the run folder is written: an overlong buffer as long as the task's answers, an
    output_dir under a file; eval_size beyond the evaluation set is said once."""
    with pytest.raises(ValueError, match=r"overlong_buffer=10 is not below max_new_tokens=10: the overlong penalty "
                                         r"would fall on every sample"):
        train(config(tiny_model, tmp_path, "steps=1", "overlong=penalty", "overlong_buffer=10"))
    (tmp_path / "a_file").write_text("mine")
    for output_dir in (tmp_path / "a_file", tmp_path / "a_file" / "run"):
        with pytest.raises(ValueError, match=rf"output_dir='{output_dir}': {tmp_path / 'a_file'} is a file, not a "
                                             r"folder"):
            train(config(tiny_model, tmp_path, "steps=1", f"output_dir={output_dir}"))
    assert not (tmp_path / "run").exists() and (tmp_path / "a_file").read_text() == "mine"
    run = make_run(config(tiny_model, tmp_path, "steps=1", "eval_size=1000"))
    assert len(run.eval_rows) < 1000
    assert f"eval_size=1000, but the evaluation set holds {len(run.eval_rows)} prompts" in capsys.readouterr().err


def test_a_run_keeps_its_newest_checkpoints_and_its_files_are_readable_as_any(tiny_model, tmp_path):
    """keep_checkpoints (null: all); the run's files and folders take the user's umask, as open() and mkdir make
    them (tempfile's, renamed into place, had been their owner's alone)."""
    train(config(tiny_model, tmp_path, "steps=3", "save_every=1", "keep_checkpoints=1", "plots=true"))
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000003"]
    umask = os.umask(0o022)
    os.umask(umask)
    for path in (run_dir / "config.yaml", run_dir / "metrics.jsonl", run_dir / "summary.json",
                 *(run_dir / "plots").glob("*.png")):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    assert (run_dir / "checkpoints" / "step_00000003").stat().st_mode & 0o777 == 0o777 & ~umask
    train(config(tiny_model, tmp_path / "all", "steps=3", "save_every=1", "keep_checkpoints=null"))
    assert len(list((tmp_path / "all" / "run" / "checkpoints").glob("step_*"))) == 3


def test_the_refine_rate_counts_changed_samples_whatever_their_weight(tiny_model, tmp_path):
    """refine_coef=0 watches the refiner without training on it: its rate is the share of samples it changed."""
    rates = {}
    for coef in ("0", "1"):
        run = make_run(config(tiny_model, tmp_path / coef, "steps=1", "constraint=refiner", "refine_draft=false",
                              f"refine_coef={coef}"))
        varied_rewards(run)
        finished_refiner(run)
        train_run(run)
        record = read_metrics(tmp_path / coef / "run")[-1]
        rates[coef] = record["refine_rate"]
        assert record["sft_loss"] == 0 if coef == "0" else record["sft_loss"] > 0
    assert rates["0"] == rates["1"] > 0


def test_a_resume_with_no_step_left_to_run(tiny_model, tmp_path, capsys):
    """steps below the checkpoint's would go back: refused. steps equal to it: nothing runs, and config.yaml keeps
    the settings the run ran with."""
    train(config(tiny_model, tmp_path, "steps=2", "lr=3e-5"))
    run_dir = tmp_path / "run"
    before = (run_dir / "config.yaml").read_text()
    with pytest.raises(ValueError, match="is at step 2 already: steps=1 would go back; give steps above 2"):
        train(load_config(run_dir / "config.yaml", ["steps=1"]), resume=True)
    capsys.readouterr()
    summary = train(load_config(run_dir / "config.yaml", ["lr=0.5"]), resume=True)
    assert summary["steps"] == 2 and "is at its last step (2) already: nothing to train" in capsys.readouterr().err
    assert (run_dir / "config.yaml").read_text() == before


def test_float16_trains_adapters_in_fp32_and_refuses_fp16_weights(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="dtype=float16 would train weights in fp16 itself"):
        train(config(tiny_model, tmp_path, "steps=1", "dtype=float16"))
    with pytest.raises(ValueError, match=r"dtype=float16 would train model.embed_tokens.weight whole in fp16 "
                                         r"\(lora_target_modules names it\)"):
        train(config(tiny_model, tmp_path, "steps=1", "dtype=float16", "lora_r=4",
                     "lora_target_modules=q_proj,embed_tokens"))
    assert not (tmp_path / "run").exists()
    run = make_run(config(tiny_model, tmp_path, "steps=2", "dtype=float16", "lora_r=4", "constraint=kl"))
    trained = [p for p in run.policy.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    assert {p.dtype for p in run.policy.parameters() if not p.requires_grad} == {torch.float16}
    varied_rewards(run)
    before = weights(run.policy)
    train_run(run)
    assert read_metrics(tmp_path / "run")[-1]["skipped_steps"] == 0
    assert any(not torch.equal(before[k], v) for k, v in run.policy.state_dict().items() if "lora_" in k)
    assert all(torch.isfinite(p).all() for p in run.policy.parameters())


def test_the_logged_learning_rate_is_the_steps_own_and_decays_to_its_floor(tiny_model, tmp_path, capsys):
    train(config(tiny_model, tmp_path, "steps=3", "lr=1e-3", "lr_schedule=linear", "min_lr_ratio=0.1",
                 "save_every=3"))
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run") if "lr" in r]
    assert lrs == pytest.approx([1e-3, 5.5e-4, 1e-4])     # the first step at lr, the last at lr * min_lr_ratio
    resumed = load_config(tmp_path / "run" / "config.yaml", ["steps=5"])
    train(resumed, resume=True)
    assert "resuming at step 4 with the learning-rate schedule of these settings (lr_schedule=linear over " \
           "steps=5): it runs at lr 0.000325" in capsys.readouterr().err
    assert [r["lr"] for r in read_metrics(tmp_path / "run") if "lr" in r][3:] == pytest.approx([3.25e-4, 1e-4])
    # One step past the warmup is the last: it too runs at the floor.
    short = load_config(None, ["steps=3", "warmup_steps=2", "lr_schedule=cosine", "min_lr_ratio=0.1"])
    assert [lr_factor(short, step) for step in range(3)] == pytest.approx([0.5, 1.0, 0.1])


def test_a_run_given_relative_paths_resumes_from_any_folder(tiny_model, tmp_path, monkeypatch):
    """config.yaml holds the model's path, and a task option's that names a file, made absolute: --resume and export
    read them from another folder too."""
    import shutil

    shutil.copytree(tiny_model, tmp_path / "models" / "tiny")
    (tmp_path / "work").mkdir()
    (tmp_path / "odd_paths.py").write_text(   # a task with a path among its options, as the dialogue task has
        "from fastrft.tasks import load_rows, load_task\n"
        "def task(dataset: str, seed: int = 0):\n"
        "    task = load_task('demo', n_eval=4, seed=seed)\n    task.train_rows = load_rows(dataset)\n"
        "    return task\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path / "models")
    (tmp_path / "models" / "rows.jsonl").write_text('{"prompt": "sort 21=", "answer": "12"}\n')
    train(load_config(None, [*SMALL, "steps=1", "extra.dataset=rows.jsonl", "extra.seed=3"], model="tiny",
                      output_dir=str(tmp_path / "run"), task="odd_paths:task"))
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.model == str(tmp_path / "models" / "tiny")
    assert saved.extra == {"dataset": str(tmp_path / "models" / "rows.jsonl"), "seed": 3}   # task options too
    monkeypatch.chdir(tmp_path / "work")
    train(load_config(tmp_path / "run" / "config.yaml", ["steps=2"]), resume=True)
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "lr" in r] == [1, 2]


def test_resume_drops_a_torn_last_line_and_refuses_a_shortened_log(tiny_model, tmp_path):
    train(config(tiny_model, tmp_path, "steps=2", "save_every=2"))
    run_dir = tmp_path / "run"
    metrics = run_dir / "metrics.jsonl"
    whole = metrics.read_bytes()
    metrics.write_bytes(whole + b'{"step": 3, "reward_me')      # a crash mid-write after the checkpoint
    with pytest.warns(UserWarning, match="torn last line"):
        train(load_config(run_dir / "config.yaml", ["steps=3"]), resume=True)
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1, 2, 3]

    for shortened in (b"", whole.split(b"\n", 2)[0] + b"\n"):    # emptied; only step 0 left
        metrics.write_bytes(shortened)
        with pytest.raises(ValueError, match="holds (no step|steps up to 0) but the checkpoint is at step 3: the file "
                                             "was emptied, cut short or moved"):
            train(load_config(run_dir / "config.yaml", ["steps=4"]), resume=True)
        assert metrics.read_bytes() == shortened
    damaged = whole.replace(b'{"step": 1,', b'{"step": 1, BROKEN', 1)   # a line damaged before the last
    metrics.write_bytes(damaged)
    with pytest.raises(ValueError, match=f"{metrics}:2 is damaged: not the JSON object of a step that fastrft logs "
                                         "on each line; repair or delete that line \\(nothing was changed\\)"):
        train(load_config(run_dir / "config.yaml", ["steps=4"]), resume=True)
    assert metrics.read_bytes() == damaged
    metrics.unlink()
    with pytest.raises(ValueError, match="metrics.jsonl is missing but the checkpoint is at step 3"):
        train(load_config(run_dir / "config.yaml", ["steps=4"]), resume=True)


def test_a_run_whose_checkpoints_are_lost_is_not_started_again(tiny_model, tmp_path):
    """A run that saved checkpoints, none of which loads now (deleted, or their manifests gone): a resume would start
    it again from step 0 over its records. Refused, nothing changed, on what shows the saves: the step folders left,
    the summary of a run that ended, records past the first save."""
    import shutil

    train(config(tiny_model, tmp_path, "steps=3", "save_every=2"))
    run_dir = tmp_path / "run"
    # Each step's record names the checkpoint a resume would start from as it is logged.
    assert [(r["step"], r.get("resumable_from")) for r in read_metrics(run_dir)] == [(0, None), (1, None), (2, None),
                                                                                      (3, 2)]
    files = {p: p.read_bytes() for p in (run_dir / "metrics.jsonl", run_dir / "summary.json", run_dir / "config.yaml")}

    def refused(shown: str):
        with pytest.raises(ValueError, match=f"holds no checkpoint that loads, but the run saved one \\({shown}\\): "
                                             "starting it again from step 0 would rewrite"):
            train(load_config(run_dir / "config.yaml", ["steps=5"]), resume=True)
        assert {p: p.read_bytes() for p in files if p.exists()} == {p: b for p, b in files.items() if p.exists()}

    for manifest in (run_dir / "checkpoints").glob("step_*/checkpoint.json"):
        manifest.unlink()
    with pytest.warns(UserWarning, match="latest names 'step_00000003', which is not a complete checkpoint"):
        refused(f"{run_dir / 'checkpoints' / 'step_00000003'} is left of it")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_00000002", "step_00000003"]
    shutil.rmtree(run_dir / "checkpoints")
    refused(f"it ended: {run_dir / 'summary.json'}")
    (run_dir / "summary.json").unlink()
    refused(f"{run_dir / 'metrics.jsonl'} logs a checkpoint at step 2")   # step 3's record: resumable from step 2
    # A log from before records named their checkpoint: steps past the first save of the settings it ran under.
    records = [{k: v for k, v in r.items() if k != "resumable_from"} for r in read_metrics(run_dir)]
    files[run_dir / "metrics.jsonl"] = "".join(json.dumps(r) + "\n" for r in records).encode()
    (run_dir / "metrics.jsonl").write_bytes(files[run_dir / "metrics.jsonl"])
    refused(f"{run_dir / 'metrics.jsonl'} logs step 3, after its first save at step 2")


def test_non_finite_weights_stop_the_run_before_a_checkpoint(tiny_model, tmp_path):
    """An optimizer step that leaves inf in the weights from a finite loss and gradient (here on its second call,
    as an overflowing update would): the run stops with an error at that step, and the checkpoints keep only the
    good weights."""
    run = make_run(config(tiny_model, tmp_path, "steps=3", "save_every=1", "constraint=none"))
    varied_rewards(run)
    calls = []

    def overflow(optimizer, args, kwargs):
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                next(run.policy.parameters()).view(-1)[0] = float("inf")

    run.optimizer.register_step_post_hook(overflow)
    with pytest.raises(FloatingPointError, match="NaN or inf in the policy's weights"):
        train_run(run)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == ["step_00000001"]


def test_model_directories_are_checked_before_anything_loads(tiny_model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((__import__("pathlib").Path(tiny_model) / "config.json").read_text())
    for override, message in (("model=/nonexistent/model", "model='/nonexistent/model': no such directory"),
                              (f"ref_model={empty}", "ref_model=.*is not a Hugging Face model directory"),
                              (f"model={broken}", "model=.*could not be loaded")):
        cfg = config(tiny_model, tmp_path, "steps=1", override)
        with pytest.raises(ValueError, match=message):
            train(cfg)
        assert not (tmp_path / "run").exists()            # a failed start leaves no run behind


def test_vocabularies_of_policy_and_reference_must_match(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    bigger = AutoModelForCausalLM.from_pretrained(tiny_model)
    bigger.resize_token_embeddings(bigger.config.vocab_size + 8)
    bigger.save_pretrained(tmp_path / "bigger")
    make_tokenizer().save_pretrained(tmp_path / "bigger")
    for overrides in ([f"ref_model={tmp_path / 'bigger'}"], [f"model={tmp_path / 'bigger'}", f"ref_model={tiny_model}"]):
        cfg = config(tiny_model, tmp_path, "steps=1", *overrides)
        with pytest.raises(ValueError, match="vocabulary rows but the reference .* has"):
            train(cfg)


@dataclasses.dataclass(frozen=True)
class OneOfTwoRanks(World):
    """A rank of two in one process: gather returns what it is given and `others` (the other rank's object) in rank
    order, and keeps what it was given (sent)."""
    others: object = None
    sent: list = dataclasses.field(default_factory=list)

    def gather(self, obj):
        self.sent.append(obj)
        return [obj, self.others] if self.rank == 0 else [self.others, obj]


@pytest.mark.parametrize("override", ["evaluate_sums", "evaluate"])
def test_evaluation_over_ranks_is_that_of_one_process(tiny_model, tmp_path, override):
    """Held-out metrics of prompts shared over two ranks, where one rank's rewards are mostly unscored (None): each
    metric over all the scored values, as one process computes it; a task overriding only evaluate keeps its
    per-row weighting of the ranks' means."""
    from fastrft.tasks import Task
    from fastrft.trainer import evaluate

    run = make_run(config(tiny_model, tmp_path, "eval_size=6"))
    answers = {row["prompt"]: text for row, text in zip(run.eval_rows, ["a", "-", "-", "b", "b", "a"])}

    def scripted_generate(model, tokenizer, prompt_ids, **kwargs):
        texts = [answers[tokenizer.decode(ids, skip_special_tokens=True)] for ids in prompt_ids]
        return Samples(prompt_ids, [[1] for _ in texts], texts, [False] * len(texts))

    # 1.0 for "a", 0.0 for "b", unscored (None) for "-": rank 0 scores 1 of its 3 (1.0), rank 1 all 3 (1/3).
    run.task.reward_funcs = [lambda prompts, completions, **kw: [{"a": 1.0, "b": 0.0}.get(c) for c in completions]]
    run.task.reward_weights = [1.0]
    if override == "evaluate":
        class OwnEvaluation(Task):
            def evaluate(self, *args, **kwargs):
                return {"eval_reward": Task.evaluate(self, *args, **kwargs)["eval_reward"]}

        run.task = OwnEvaluation(**{f.name: getattr(run.task, f.name) for f in dataclasses.fields(Task)})
    run.generate = scripted_generate
    alone = evaluate(run)
    run.world = OneOfTwoRanks(rank=1, size=2)
    evaluate(run)
    run.world = OneOfTwoRanks(rank=0, size=2, others=run.world.sent[-1])
    shared = evaluate(run)
    assert alone["eval_reward"] == pytest.approx(2 / 4)
    if override == "evaluate_sums":
        assert shared == pytest.approx(alone)
    else:   # the ranks' means weighted by their rows
        assert shared["eval_reward"] == pytest.approx((1.0 * 3 + 1 / 3 * 3) / 6)



def test_the_evaluation_a_task_gives_is_its_nearest_override():
    """The trainer reads evaluate_sums unless a class below the one defining it overrides evaluate alone (then that
    evaluate's means)."""
    from fastrft.tasks import Task
    from fastrft.tasks.code import CodeTask
    from fastrft.trainer import _own_evaluate

    class OwnMeans(CodeTask):
        def evaluate(self, *args, **kwargs):
            return {}

    class OwnSumsAgain(OwnMeans):
        def evaluate_sums(self, *args, **kwargs):
            return {}

    class Both(Task):
        evaluate, evaluate_sums = OwnMeans.evaluate, OwnSumsAgain.evaluate_sums

    assert [_own_evaluate(c) for c in (Task, CodeTask, OwnMeans, OwnSumsAgain, Both)] == \
        [False, False, True, False, False]


def test_minibatches_beyond_a_ranks_share_of_the_step_are_refused():
    """Each rank splits its own share of the step's samples into minibatches: past that share some would be empty
    on every rank, and the step would take fewer optimizer steps than asked."""
    from fastrft.distributed import World
    from fastrft.trainer import check_distributable

    cfg = load_config(None, ["prompts_per_step=3", "group_size=2", "minibatches=4"])
    check_distributable(cfg, True, "shard", World(rank=0, size=1))
    check_distributable(cfg, True, "shard", World(rank=0, size=2))   # 4 samples on rank 0, 2 on rank 1
    with pytest.raises(ValueError, match=r"minibatches=4 exceeds the 2 samples a rank holds of a step on 3 ranks"):
        check_distributable(cfg, True, "shard", World(rank=0, size=3))
