"""LoRA in `fastrft train`: the reference is the policy with its adapters off (the base model, bit for bit), only the
adapters train, checkpoints hold them alone and resume exactly, export merges them into an ordinary model directory,
and bad keys name themselves. The tiny demo model, built from a config and saved locally."""
import json
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

from fastrft.batch import AttentionPath, Row, sequence_logprobs
from fastrft.checkpoint import latest_checkpoint, load_checkpoint
from fastrft.config import load_config
from fastrft.lora import adapters_disabled, add_lora, default_target_modules, merge_lora
from fastrft.trainer import export_model, make_run, reference_logprobs, train, train_run

peft = pytest.importorskip("peft", reason="LoRA needs peft (the integrations extra)")

SMALL = ["prompts_per_step=3", "group_size=4", "eval_size=4", "eval_every=2", "save_every=2", "progress=false",
         "device=cpu", "plots=false", "dynamic_sampling=false", "lora_r=4", "lr=1e-2"]
PADDED = AttentionPath(False, "sdpa", 4096)


def config(model, tmp_path, *overrides):
    return load_config(None, [*SMALL, *overrides], model=model, output_dir=str(tmp_path / "run"))


def base_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def varied_rewards(run):
    """The untrained model scores 0 everywhere; a reward that varies with the completion gives advantages."""
    run.task.reward_funcs = [lambda prompts, completions, **kw: [len(c) % 3 / 2 for c in completions]]
    run.task.reward_weights = [1.0]


def sample_rows(vocab: int, n: int = 5) -> list[Row]:
    generator = torch.Generator().manual_seed(1)
    return [Row(torch.randint(3, vocab, (4 + i,), generator=generator).tolist(),
                torch.randint(3, vocab, (3 + 2 * i,), generator=generator).tolist()) for i in range(n)]


def logprobs(model, rows, path=PADDED):
    return sequence_logprobs(model, rows, torch.device("cpu"), path=path, temperature=1.0)


def randomized_adapters(model):
    """Adapters that change the model (peft starts lora_B at zero, which would make every test pass trivially)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)


def test_adapters_off_is_the_base_model_exactly(tiny_model):
    model, base = base_model(tiny_model), base_model(tiny_model)
    add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=[])
    randomized_adapters(model)
    rows = sample_rows(model.config.vocab_size)
    adapted = logprobs(model, rows)
    with adapters_disabled(model):
        off = logprobs(model, rows)
    for a, o, b in zip(adapted, off, logprobs(base, rows)):
        assert torch.equal(o, b)
        assert not torch.allclose(a, b)
    assert all(torch.equal(a, again) for a, again in zip(adapted, logprobs(model, rows)))  # switched back on


def test_default_targets_every_projection_and_the_rest_is_frozen(tiny_model):
    model = base_model(tiny_model)
    projections = default_target_modules(model)
    assert projections == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=[])
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    # model.layers.0.self_attn.q_proj.lora_A.default.weight: every projection of every layer
    assert {(name.split(".")[2], name.split(".")[-4]) for name in trainable} == \
        {(str(layer), projection) for layer in range(model.config.num_hidden_layers) for projection in projections}
    # Naming the head trains it whole (the fused loss reads its weight), never through an adapter.
    model = base_model(tiny_model)
    add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "lm_head"])
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    head = model.get_output_embeddings()
    assert head.weight.requires_grad and type(head) is torch.nn.Linear
    assert all("lora_" in name or name in ("lm_head.weight", "model.embed_tokens.weight") for name in trainable)


def test_lora_run_trains_only_the_adapters_and_checkpoints_them_alone(tiny_model, tmp_path):
    run = make_run(config(tiny_model, tmp_path, "steps=2", "constraint=kl+refiner"))
    assert run.ref is run.policy   # one copy of the base weights: the reference is the policy, adapters off
    varied_rewards(run)
    before = {name: p.detach().clone() for name, p in run.policy.named_parameters()}
    train_run(run)
    changed = {name for name, p in run.policy.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora_" in name for name in changed)     # base and head bit for bit untouched
    metadata = dcp.FileSystemReader(str(latest_checkpoint(tmp_path / "run") / "weights")).read_metadata()
    saved = {key.removeprefix("model.") for key in metadata.state_dict_metadata if key.startswith("model.")}
    assert saved == {name for name, p in run.policy.named_parameters() if p.requires_grad}
    steps = [r for r in run.run_dir.read_metrics() if r["step"] > 0]
    assert len(steps) == 2 and all(r["kl_ref"] >= 0 for r in steps)


def test_the_reference_is_the_base_model_during_a_lora_run(tiny_model, tmp_path):
    run = make_run(config(tiny_model, tmp_path, "steps=1", "constraint=kl"))
    randomized_adapters(run.policy)
    rows = sample_rows(run.policy.config.vocab_size)
    run.policy.train()
    reference_logprobs(run, rows)
    assert run.policy.training   # the mode it had
    for row, expected in zip(rows, logprobs(base_model(tiny_model), rows, run.attention)):   # batched alike
        assert torch.equal(row.ref_logprobs, expected)


def test_embeddings_trained_whole_leave_the_reference_the_base_model(tiny_model, tmp_path, capsys, monkeypatch):
    """With the embeddings (tied to the head) trained whole, the policy with its adapters off moves with them: the
    reference is then a frozen copy of the base model, and stays it through training."""
    monkeypatch.setattr("fastrft.batch._NOTED", set())   # said once a process: an earlier test may have said it
    run = make_run(config(tiny_model, tmp_path, "steps=2", "constraint=kl", "lora_target_modules=q_proj,embed_tokens"))
    assert run.ref is not run.policy and not any(p.requires_grad for p in run.ref.parameters())
    assert "lora_target_modules trains model.embed_tokens.weight whole: the reference and the refiner are a frozen " \
           "copy of" in capsys.readouterr().err
    varied_rewards(run)
    train_run(run)
    assert not torch.equal(run.policy.get_input_embeddings().weight, base_model(tiny_model).get_input_embeddings().weight)
    rows = sample_rows(run.policy.config.vocab_size)
    reference_logprobs(run, rows)
    for row, expected in zip(rows, logprobs(base_model(tiny_model), rows, run.attention)):
        assert torch.equal(row.ref_logprobs, expected)


def test_every_module_of_a_lora_policy_shares_its_mode(tiny_model, tmp_path):
    """New adapters' dropout starts in training mode inside a model loaded in eval mode: the run's policy has one
    mode throughout, so that rollout and evaluation (which switch it to eval mode only where it trains) run without
    dropout and the update with it."""
    from fastrft.rollout import eval_mode

    run = make_run(config(tiny_model, tmp_path, "steps=1", "lora_dropout=0.5"))
    assert all(module.training for module in run.policy.modules())
    with eval_mode(run.policy):
        assert not any(module.training for module in run.policy.modules())
    assert all(module.training for module in run.policy.modules())


def test_eval_mode_reaches_modules_training_inside_a_model_in_eval_mode(tiny_model):
    """PEFT injects new adapters training into a base model in eval mode (the TRL adapter's case): eval_mode turns
    them off too, and after the block each module is back in the mode it had."""
    from fastrft.rollout import eval_mode

    model = base_model(tiny_model).eval()
    add_lora(model, r=4, alpha=32.0, dropout=0.5, target_modules=[])
    training = {name for name, module in model.named_modules() if module.training}
    assert training and not model.training
    with eval_mode(model):
        assert not any(module.training for module in model.modules())
    assert {name for name, module in model.named_modules() if module.training} == training


def test_lora_resume_equals_the_uninterrupted_run(tiny_model, tmp_path):
    train(config(tiny_model, tmp_path / "a", "steps=4", "save_every=2"))
    train(config(tiny_model, tmp_path / "b", "steps=2", "save_every=2"))
    resumed = load_config(tmp_path / "b" / "run" / "config.yaml", ["steps=4"])
    train(resumed, resume=True)

    def adapters(run_dir):
        model = base_model(tiny_model)
        add_lora(model, r=4, alpha=32.0, dropout=0.0, target_modules=[])
        assert load_checkpoint(run_dir, model=model)[0] == 4
        return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    a, b = adapters(tmp_path / "a" / "run"), adapters(tmp_path / "b" / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    assert any(p.abs().sum() > 0 for name, p in a.items() if "lora_B" in name)   # it trained


def test_a_resume_that_changes_the_adapters_is_refused_and_export_merges_them_as_trained(tiny_model, tmp_path):
    """The checkpoint records the adapters' settings: another lora_alpha (their scale) or lora_r (their shape) is
    refused before anything is written, and export merges with the checkpoint's settings even where config.yaml was
    rewritten by a resume that died before its first checkpoint."""
    import yaml

    run = make_run(config(tiny_model, tmp_path, "steps=2", "lora_alpha=32"))
    varied_rewards(run)
    train_run(run)
    rows = sample_rows(run.policy.config.vocab_size)
    run.policy.eval()
    trained = logprobs(run.policy, rows)
    saved = (tmp_path / "run" / "config.yaml").read_text()
    for override, message in (("lora_alpha=64", r"trained with lora_r=4, lora_alpha=32\.0; resuming with "
                                                r"lora_alpha=64\.0 would change what they compute"),
                              ("lora_r=8", r"does not fit the model/optimizer/scheduler given: .*[Ss]ize mismatch")):
        with pytest.raises(ValueError, match=message):
            make_run(load_config(tmp_path / "run" / "config.yaml", ["steps=4", override]), resume=True)
        assert (tmp_path / "run" / "config.yaml").read_text() == saved
    settings = yaml.safe_load(saved)
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({**settings, "lora_alpha": 64.0}))
    out, _ = export_model(tmp_path / "run", tmp_path / "exported")
    for a, e in zip(trained, logprobs(base_model(out), rows)):
        torch.testing.assert_close(e, a, rtol=0, atol=1e-5)


def test_a_run_resumed_on_a_smaller_dataset_goes_on_from_a_new_epoch(tiny_model, tmp_path):
    rows = [{"prompt": f"sort {d}=", "answer": "".join(sorted(d))} for d in ("321", "4132", "97", "5501", "862")]
    (tmp_path / "big.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    (tmp_path / "small.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    train(config(tiny_model, tmp_path, "steps=2", f"dataset={tmp_path / 'big.jsonl'}"))   # 6 prompts in
    summary = train(load_config(tmp_path / "run" / "config.yaml", ["steps=3", f"dataset={tmp_path / 'small.jsonl'}"]),
                    resume=True)
    assert summary["steps"] == 3


def test_export_merges_the_adapters_into_a_model_that_starts_a_run(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = config(tiny_model, tmp_path, "steps=2", "constraint=kl")
    run = make_run(cfg)
    varied_rewards(run)
    train_run(run)
    rows = sample_rows(run.policy.config.vocab_size)
    run.policy.eval()
    adapted = logprobs(run.policy, rows)
    out, step = export_model(tmp_path / "run", tmp_path / "exported")
    assert step == 2 and (out / "config.json").is_file()
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name in exported.state_dict())
    for a, e in zip(adapted, logprobs(exported, rows)):
        torch.testing.assert_close(e, a, rtol=0, atol=1e-5)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(tiny_model).get_vocab()
    with pytest.raises(ValueError, match="never overwrites"):
        export_model(tmp_path / "run", out)
    train(load_config(None, [*SMALL, "steps=1", "lora_r=0"], model=str(out), output_dir=str(tmp_path / "again")))


def test_full_fine_tuning_runs_export_too(tiny_model, tmp_path):
    cfg = config(tiny_model, tmp_path, "steps=1", "lora_r=0", "constraint=none")
    run = make_run(cfg)
    varied_rewards(run)
    train_run(run)
    out, _ = export_model(tmp_path / "run", tmp_path / "models" / "exported")   # models/ made as needed
    exported = base_model(out)
    for name, tensor in run.policy.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask   # readable as any folder mkdir makes, not its owner's alone
    # and its files as open() makes them (safetensors writes its own owner-only)
    assert {path.name: path.stat().st_mode & 0o777 for path in out.iterdir()} == \
        {path.name: 0o666 & ~umask for path in out.iterdir()}
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(ValueError, match=f"OUT_DIR='{tmp_path / 'a_file' / 'sub'}': {tmp_path / 'a_file'} is a file"):
        export_model(tmp_path / "run", tmp_path / "a_file" / "sub")
    # An export killed midway (SIGKILL: no cleanup) left its staging folder, a whole model; the next export into that
    # folder removes it, not a live export's, nor anything else.
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    models = tmp_path / "models"
    host = socket.gethostname()
    left, live, mine = (models / f".again.export-{host}-{dead.stdout.strip()}-abc",
                        models / f".again.export-{host}-{os.getpid()}-x", models / ".again.export-notes")
    for folder in (left, live, mine):
        folder.mkdir()
    export_model(tmp_path / "run", models / "again")
    assert sorted(p.name for p in models.iterdir()) == sorted(["exported", "again", live.name, mine.name])


def test_an_moe_model_s_fused_experts_are_said_to_stay_frozen(capsys):
    from transformers import MixtralConfig, MixtralForCausalLM

    from fastrft.batch import _NOTED

    _NOTED.clear()
    model = MixtralForCausalLM(MixtralConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2, num_local_experts=4))
    add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=[])
    assert "its 2 fused expert weight tensors (layers.0.mlp.experts.gate_up_proj, ...) are no projections and stay " \
           "frozen" in capsys.readouterr().err
    assert not any(p.requires_grad for name, p in model.named_parameters() if "experts" in name)


def test_merge_is_what_the_adapters_compute(tiny_model):
    model = base_model(tiny_model)
    add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "down_proj"])
    randomized_adapters(model)
    rows = sample_rows(model.config.vocab_size)
    adapted = logprobs(model, rows)
    merge_lora(model)
    assert not any("lora" in name for name in model.state_dict())
    for a, m in zip(adapted, logprobs(model, rows)):
        torch.testing.assert_close(m, a, rtol=0, atol=1e-5)


@pytest.mark.parametrize("override, message", [
    ("lora_r=-1", "lora_r must be >= 0"),
    ("lora_alpha=0", "lora_alpha must be > 0"),
    ("lora_dropout=1.0", r"lora_dropout must be in \[0, 1\)"),
    ("load_in_4bit=true", "load_in_4bit=true needs lora_r > 0"),
])
def test_bad_lora_keys_name_themselves(override, message):
    with pytest.raises(ValueError, match=f"override '{override}': {message}"):
        load_config(None, [override] + (["lora_r=0"] if override.startswith("load_in_4bit") else []))


def test_unknown_target_module_is_named(tiny_model, tmp_path):
    with pytest.raises(ValueError, match=r"lora_target_modules: .* no module named 'qkv_proj'; its projections are "
                                         r"down_proj, gate_proj"):
        make_run(config(tiny_model, tmp_path, "lora_target_modules=q_proj,qkv_proj"))
    assert not (tmp_path / "run").exists()   # nothing written
    with pytest.raises(ValueError, match="lora_target_modules: Target module"):   # a module, but no projection
        add_lora(base_model(tiny_model), r=4, alpha=8, dropout=0.0, target_modules=["mlp"])


def test_load_in_4bit_off_cuda_says_so_and_runs_unquantized(tiny_model, tmp_path, capsys):
    run = make_run(config(tiny_model, tmp_path, "steps=1", "load_in_4bit=true"))
    assert "load_in_4bit asks for 4bit weights, which need bitsandbytes on CUDA" in capsys.readouterr().err
    assert run.policy.get_output_embeddings().weight.dtype == torch.float32


def test_lora_trains_the_demo_as_full_fine_tuning_does(demo_reference, tmp_path):
    """The demo's settings from its reference model, 40 steps each: the held-out reward rises with LoRA (r=16, a
    LoRA-sized learning rate) about as far as with every weight trained. Measured: full 0.544 -> 0.658, LoRA
    0.544 -> 0.643."""
    from fastrft.cli import DEMO_DEFAULTS

    gains = {}
    for name, overrides in (("full", []), ("lora", ["lora_r=16", "lr=1e-3"])):
        cfg = load_config(None, ["steps=40", "eval_every=40", "eval_size=64", "save_every=40", "progress=false",
                                 "plots=false", *overrides],
                          **{**DEMO_DEFAULTS, "model": demo_reference, "output_dir": str(tmp_path / name)})
        summary = train(cfg)
        gains[name] = summary["eval_reward_final"] - summary["eval_reward_initial"]
    assert gains["full"] > 0.05 and gains["lora"] > 0.05 and gains["lora"] > 0.6 * gains["full"], gains
