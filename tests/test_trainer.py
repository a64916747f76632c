"""The RFT loop on the CPU with a tiny model built from a config and saved locally: real steps in every constraint
mode, resume, non-finite skip, refiner failure, dynamic sampling, packing equivalence, configuration errors."""
import json
import math

import pytest
import torch

from fastrft import trainer as trainer_module
from fastrft.config import TrainConfig, load_config
from fastrft.tasks import load_task
from fastrft.tasks.demo import make_model, make_tokenizer
from fastrft.trainer import Row, build_batch, final_hidden, group_advantages, overlong_penalty, rft_loss, train

SMALL = ["prompts_per_step=3", "group_size=4", "eval_size=4", "eval_every=2", "save_every=2", "progress=false",
         "device=cpu", "plots=false", "dynamic_sampling=false"]


def config(tiny_model, tmp_path, *overrides, **values):
    return load_config(None, [*SMALL, *overrides], model=tiny_model, output_dir=str(tmp_path / "run"), **values)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def weights(model_or_path):
    return {k: v.clone() for k, v in model_or_path.state_dict().items()}


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
                "peak_mem_gb"}
    for record in steps:
        assert required <= set(record), required - set(record)
        assert {"reward_sort_reward", "reward_exact_match"} <= set(record)   # each reward function's mean
        assert math.isfinite(record["kl_ref"]) and record["kl_ref"] >= 0
    assert "eval_reward" in steps[-1]
    if constraint in ("none", "kl"):
        assert all(r["refine_rate"] == 0 and r["sft_loss"] == 0 for r in steps)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "summary.json").is_file()
    assert summary["steps"] == 2 and summary["eval_reward_initial"] is not None
    if cfg.plots:
        assert {p.name for p in (run_dir / "plots").glob("*.png")} >= {"reward.png", "constraint.png"}


def test_refiner_rows_enter_the_loss(tiny_model, tmp_path, monkeypatch):
    """A refiner that always finishes with a fixed correction (the untrained tiny model never writes EOS) yields
    weighted cross-entropy rows."""
    from fastrft import refiner as refiner_module
    from fastrft.rollout import Samples

    def finished(model, tokenizer, prompt_ids, **kwargs):
        n = len(prompt_ids)
        return Samples(prompt_ids, [[1]] * n, ["anything"] * n, [False] * n)

    task = load_task("demo")
    task.parse_refinement = lambda text: "0123"
    monkeypatch.setattr(refiner_module, "generate", finished)
    monkeypatch.setattr(trainer_module, "load_task", lambda spec, **kw: task)
    cfg = config(tiny_model, tmp_path, "steps=1", "constraint=refiner")
    train(cfg)
    record = read_metrics(tmp_path / "run")[-1]
    assert record["refine_rate"] > 0 and record["sft_loss"] > 0 and record["refine_failed"] == 0
    assert 0 < record["changed_token_frac"] <= 1


def test_refiner_failures_are_counted_and_cost_nothing(tiny_model, tmp_path, monkeypatch):
    task = load_task("demo")
    task.parse_refinement = lambda text: None
    monkeypatch.setattr(trainer_module, "load_task", lambda spec, **kw: task)
    cfg = config(tiny_model, tmp_path, "steps=1", "constraint=refiner")
    train(cfg)
    record = read_metrics(tmp_path / "run")[-1]
    assert record["refine_failed"] == cfg.prompts_per_step * cfg.group_size
    assert record["refine_rate"] == 0 and record["sft_loss"] == 0


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


def test_nonfinite_loss_skips_the_step(tiny_model, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from fastrft.checkpoint import load_checkpoint

    real_loss = trainer_module.rft_loss

    def poisoned(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer_module, "rft_loss", poisoned)
    cfg = config(tiny_model, tmp_path, "steps=2", "save_every=1")
    train(cfg)
    records = [r for r in read_metrics(tmp_path / "run") if r["step"] > 0]
    assert [r["skipped_steps"] for r in records] == [1, 2]
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    initial = weights(model)
    load_checkpoint(tmp_path / "run", model=model)
    for name, value in weights(model).items():
        assert torch.equal(value, initial[name]), f"{name} changed by a skipped step"


def test_dynamic_sampling_drops_and_refills(tiny_model, tmp_path, monkeypatch):
    """Prompts whose group has zero reward variance are dropped and replaced by further prompts."""
    task = load_task("demo")
    real = task.reward_funcs[0]

    def flat_for_odd_lengths(prompts, completions, answer, **columns):
        scores = real(prompts, completions, answer=answer, **columns)
        return [0.5 if len(a) % 2 else s for s, a in zip(scores, answer)]

    task.reward_funcs = [flat_for_odd_lengths, *task.reward_funcs[1:]]
    monkeypatch.setattr(trainer_module, "load_task", lambda spec, **kw: task)
    cfg = config(tiny_model, tmp_path, "steps=1", "constraint=none", "temperature=1.5", "max_resample_rounds=4",
                 "dynamic_sampling=true")
    train(cfg)
    record = read_metrics(tmp_path / "run")[-1]
    assert record["groups_dropped"] > 0
    assert record["groups_used"] <= cfg.prompts_per_step


def test_packed_and_padded_batches_give_the_same_loss_and_grads(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i, (p, t) in enumerate([(5, 4), (9, 2), (3, 7), (6, 6)]):
        prompt = torch.randint(4, 20, (p,), generator=gen).tolist()
        target = torch.randint(4, 20, (t,), generator=gen).tolist()
        if i == 3:   # a refined row
            rows.append(Row(prompt, target, sft_weights=torch.rand(t, generator=gen)))
        else:
            rows.append(Row(prompt, target, advantage=float(torch.randn(1, generator=gen)), pg=True,
                            ref_logprobs=-torch.rand(t, generator=gen) * 3))
    cfg = TrainConfig(model="unused", constraint="kl+refiner", kl_coef=0.1, entropy_coef=0.01)
    results = []
    for packed in (True, False):
        model.zero_grad()
        out = rft_loss(model, build_batch(rows, torch.device("cpu"), packed=packed), cfg, use_old=False)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (packed_loss, packed_grads), (padded_loss, padded_grads) = results
    assert torch.allclose(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    for name in packed_grads:
        assert torch.allclose(packed_grads[name], padded_grads[name], rtol=1e-4, atol=1e-6), name


def test_packed_hidden_states_do_not_attend_across_sequences(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    a, b = Row([5, 6, 7], [8, 9]), Row([10, 11], [12, 13, 14])
    with torch.no_grad():
        together = final_hidden(model, build_batch([a, b], torch.device("cpu"), packed=True))[0]
        alone = final_hidden(model, build_batch([b], torch.device("cpu"), packed=True))[0]
    assert torch.allclose(together[4:], alone, atol=1e-5)


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


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'learning_rate'"):
        load_config(None, ["learning_rate=1e-4"])
    with pytest.raises(ValueError, match="'steps' must be int"):
        load_config(None, ["steps=ten"])
    with pytest.raises(ValueError, match="constraint must be one of"):
        load_config(None, ["constraint=both"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["steps"])
    path = tmp_path / "run.yaml"
    path.write_text("steps: 7\nconstraint: kl\nbogus_key: 1\n")
    with pytest.raises(ValueError, match="unknown config key 'bogus_key'"):
        load_config(path)
    path.write_text("steps: 7\nconstraint: kl\nmax_new_tokens: null\n")
    cfg = load_config(path, ["kl_coef=0.2", "packing=false", "extra.n_eval=5"])
    assert (cfg.steps, cfg.constraint, cfg.kl_coef, cfg.packing, cfg.extra) == (7, "kl", 0.2, False, {"n_eval": 5})


def test_minibatch_updates_store_old_logprobs(tiny_model, tmp_path, monkeypatch):
    task = load_task("demo")
    # The untrained model scores 0 everywhere; a reward that varies with the completion gives advantages.
    task.reward_funcs = [lambda prompts, completions, **kw: [len(c) % 3 / 2 for c in completions]]
    task.reward_weights = [1.0]
    monkeypatch.setattr(trainer_module, "load_task", lambda spec, **kw: task)
    cfg = config(tiny_model, tmp_path, "steps=1", "ppo_epochs=2", "minibatches=2", "lr=1e-2", "constraint=kl")
    train(cfg)
    record = read_metrics(tmp_path / "run")[-1]
    assert record["nonfinite_updates"] == 0 and math.isfinite(record["pg_loss"])
    # After the first of four optimizer steps the ratio moves away from 1: some rows are clipped.
    assert record["clip_frac"] > 0


def test_bfloat16_run(tiny_model, tmp_path):
    train(config(tiny_model, tmp_path, "steps=1", "dtype=bfloat16", "constraint=kl+refiner"))
    record = read_metrics(tmp_path / "run")[-1]
    assert math.isfinite(record["pg_loss"]) and record["skipped_steps"] == 0


def test_sigterm_saves_a_checkpoint_and_stops(tiny_model, tmp_path, monkeypatch):
    import os
    import signal

    from fastrft.checkpoint import latest_checkpoint

    real_step = trainer_module.run_step

    def step_then_sigterm(cfg, step, *args, **kwargs):
        record = real_step(cfg, step, *args, **kwargs)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return record

    monkeypatch.setattr(trainer_module, "run_step", step_then_sigterm)
    summary = train(config(tiny_model, tmp_path, "steps=10", "save_every=100"))
    assert summary["steps"] == 2 and summary["stopped_by"] == "SIGTERM"
    assert latest_checkpoint(tmp_path / "run").name == "step_00000002"


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
