"""fastrft inside other training stacks: TRL's GRPOTrainer, PEFT/LoRA, a plain PyTorch loop.

Models are tiny Llamas built from a config and saved under tmp_path; the tokenizer is a character-level WordLevel
vocabulary built offline. Nothing is downloaded. The reference for the TRL trainer is TRL's own compute_loss on the
same model and batch; the reference for the LoRA test is the contract's formula in float64 over full logits.
"""
import copy
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastrft

REPO = Path(__file__).resolve().parents[1]
# transformers 5 renames gradient checkpointing, which TRL's config still enables by that name.
pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers is not installed (pip install 'fastrft[integrations]')")
needs_trl = pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                               reason="trl is not installed (pip install 'fastrft[integrations]')")
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                reason="peft is not installed (pip install 'fastrft[integrations]')")

CHARS = "abcdefghijklmnopqrstuvwxyz "
LORA_TARGETS = ["q_proj", "v_proj"]


def tiny_llama(tie_word_embeddings=False, **config_overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=4 + len(CHARS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie_word_embeddings, **config_overrides)
    return LlamaForCausalLM(config)


def char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: 4 + i for i, c in enumerate(CHARS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture
def model_dir(tmp_path):
    """A tiny untied Llama and its tokenizer, saved locally."""
    path = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


def count_a(completions, **kwargs):
    return [float(c.count("a")) for c in completions]


def make_trainer(model, tmp_path, peft_config=None, refiner=None, trainer_class=None, **config):
    """A FastRFTGRPOTrainer (or trainer_class) on `model` (a path, or a model saved under tmp_path first: with
    beta > 0 TRL loads the reference model from the policy's path); refiner: the trainer's refine_* keyword
    arguments."""
    from datasets import Dataset
    from trl import GRPOConfig

    from fastrft.integrations import FastRFTGRPOTrainer

    defaults = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                    max_completion_length=6, learning_rate=1e-2, report_to="none", logging_steps=1,
                    save_strategy="no", use_cpu=True, disable_tqdm=True, gradient_accumulation_steps=2,
                    steps_per_generation=4)
    args = GRPOConfig(**{**defaults, **config})
    if not isinstance(model, str):
        path = tmp_path / "policy"
        model.save_pretrained(path)
        model = str(path)
    dataset = Dataset.from_dict({"prompt": ["abc", "hello", "xyz ab", "qq"] * 4})
    return (trainer_class or FastRFTGRPOTrainer)(model=model, reward_funcs=count_a, args=args, train_dataset=dataset,
                              processing_class=char_tokenizer(), peft_config=peft_config, **(refiner or {}))


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0)


class LMHeadCalls:
    """Records the number of positions each call of the LM head projects: the loss must never need more than one."""

    def __init__(self, head):
        self.positions = []
        self._handle = head.register_forward_hook(lambda module, args, out: self.positions.append(args[0].shape[-2]))

    def close(self):
        self._handle.remove()


# ----------------------------------------------------------------------------------------------------- TRL trainer

@needs_trl
@pytest.mark.parametrize("setup", ["grpo-kl-offpolicy", "dapo-lora-tied"])
def test_trainer_trains(setup, model_dir, tmp_path):
    if setup == "grpo-kl-offpolicy":  # num_iterations=2: TRL computes old log-probs, the ratio is not 1
        trainer = make_trainer(model_dir, tmp_path, max_steps=2, loss_type="grpo", beta=0.1,
                               use_bias_correction_kl=False, num_iterations=2)
    else:
        pytest.importorskip("peft", reason="peft is not installed (pip install 'fastrft[integrations]')")
        trainer = make_trainer(tiny_llama(tie_word_embeddings=True), tmp_path, peft_config=lora_config(),
                               max_steps=2, loss_type="dapo")
    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    head_calls = LMHeadCalls(trainer._causal_lm(trainer.model).get_output_embeddings())
    trainer.train()
    head_calls.close()

    logs = [entry for entry in trainer.state.log_history if "clip_ratio/region_mean" in entry]
    assert len(logs) == 2, "every optimiser step logs TRL's metrics"
    for entry in logs:
        assert all(torch.isfinite(torch.tensor(entry[k])) for k in ("loss", "entropy", "clip_ratio/region_mean"))
    if setup == "grpo-kl-offpolicy":
        assert all("kl" in entry for entry in logs)
    params = dict(trainer.model.named_parameters())
    assert any(not torch.equal(params[n], before) for n, before in trainable.items()), "no trainable weight moved"
    assert all(torch.equal(params[n], before) for n, before in frozen.items()), "a frozen weight moved"
    # Generation projects one position per call; the fused loss never calls the head on the completion.
    assert head_calls.positions and max(head_calls.positions) == 1


# Each case: GRPOConfig options beyond BASE_CONFIG, the model, and what else differs from the plain off-policy
# batch. Every loss type and option of TRL's compute_loss, each with TRL's default use_bias_correction_kl=True where
# beta > 0; the models with logit transforms (Cohere 2's scale, Gemma 2's soft-cap) and an MoE router loss.
BASE_CONFIG = dict(temperature=0.7, epsilon=0.2, epsilon_high=0.28, bf16=False)   # fp32: TRL's head runs in fp32 too
EQUIVALENCE_CASES = {
    **{f"{loss_type}-beta": (dict(loss_type=loss_type, beta=0.1), "llama", "off-policy")
       for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")},
    "grpo-on-policy": (dict(loss_type="grpo", beta=0.0), "llama", "on-policy"),
    "dapo-eval": (dict(loss_type="dapo", beta=0.1, use_bias_correction_kl=False), "llama", "eval"),
    "sequence-level": (dict(loss_type="grpo", importance_sampling_level="sequence"), "llama", "off-policy"),
    "delta": (dict(loss_type="dapo", delta=1.5), "llama", "off-policy"),
    "top-entropy": (dict(loss_type="dapo", top_entropy_quantile=0.5), "llama", "off-policy"),
    "off-policy-mask": (dict(loss_type="dapo", off_policy_mask_threshold=0.5), "llama", "off-policy"),
    "entropy-bonus": (dict(loss_type="dapo", entropy_coef=0.05), "llama", "off-policy"),
    "adaptive-entropy": (dict(loss_type="bnpo", use_adaptive_entropy=True), "llama", "off-policy"),
    "vllm-is-tool-mask": (dict(loss_type="dapo", beta=0.1), "llama", "vllm-is-tool-mask"),
    "lora-tied": (dict(loss_type="grpo", beta=0.1), "lora-tied", "off-policy"),
    "cohere2-scale": (dict(loss_type="dapo", beta=0.1), "cohere2", "off-policy"),
    "gemma2-softcap": (dict(loss_type="dapo"), "gemma2", "off-policy"),
    "moe-router-loss": (dict(loss_type="dapo", router_aux_loss_coef=0.05), "qwen3_moe", "off-policy"),
}


def equivalence_model(kind):
    """The policy of an equivalence case: a tiny Llama, or a tiny model of another architecture with the char
    tokenizer's vocabulary and logits of tens (where a soft-cap or a scale matters)."""
    if kind == "llama":
        return tiny_llama()
    if kind == "lora-tied":
        return tiny_llama(tie_word_embeddings=True)
    from test_batch import tiny_causal_lm

    overrides = dict(logit_scale=0.0625) if kind == "cohere2" else {}
    model = tiny_causal_lm(kind, **overrides)
    model.resize_token_embeddings(4 + len(CHARS))
    config = model.config
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 1, 2
    return model


def equivalence_batch(trainer, case, n_seq=4, prompt_len=3, n_tokens=5):
    """A TRL-shaped micro-batch with left-padded prompts, ragged completions (one empty) and off-policy ratios wide
    enough to clip on both sides."""
    generator = torch.Generator().manual_seed(1)
    vocab = trainer.model.config.vocab_size
    prompt_ids = torch.randint(4, vocab, (n_seq, prompt_len), generator=generator)
    prompt_mask = torch.ones(n_seq, prompt_len, dtype=torch.long)
    prompt_mask[1, 0] = prompt_mask[2, :2] = 0
    prompt_ids[prompt_mask == 0] = 0
    completion_ids = torch.randint(4, vocab, (n_seq, n_tokens), generator=generator)
    lengths = torch.tensor([5, 3, 3, 0])
    completion_mask = (torch.arange(n_tokens)[None] < lengths[:, None]).long()
    completion_ids[completion_mask == 0] = 0
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1),
            n_tokens)
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                  completion_mask=completion_mask, advantages=torch.tensor([1.2, -0.7, 0.4, -1.0]),
                  num_items_in_batch=completion_mask.sum() * 3)
    if case != "on-policy":
        inputs["old_per_token_logps"] = logps + 0.4 * torch.randn(logps.shape, generator=generator)
    if trainer.beta != 0.0:
        inputs["ref_per_token_logps"] = logps + 0.5 * torch.randn(logps.shape, generator=generator)
    if case == "vllm-is-tool-mask":
        inputs["importance_sampling_ratio"] = torch.rand(logps.shape, generator=generator) * 1.5
        inputs["tool_mask"] = torch.ones_like(completion_mask)
        inputs["tool_mask"][0, 1:3] = 0
    return inputs


def loss_and_grads(trainer, inputs):
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@needs_trl
@pytest.mark.parametrize("name", EQUIVALENCE_CASES)
def test_loss_and_gradients_match_trl(name, tmp_path):
    """FastRFTGRPOTrainer and TRL's own GRPOTrainer (its tiled fused LM head) on the same weights and batch: the
    same loss, gradients and metrics, for every loss type and option; the LM head runs on one position only."""
    from trl import GRPOTrainer

    options, kind, case = EQUIVALENCE_CASES[name]
    config = {**BASE_CONFIG, **options}
    peft_config = None
    if kind == "lora-tied":
        pytest.importorskip("peft", reason="peft is not installed (pip install 'fastrft[integrations]')")
        peft_config = lora_config()
    torch.manual_seed(0)
    model_dir = tmp_path / "policy"
    equivalence_model(kind).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    trainers = {}
    for label, trainer_class in (("trl", GRPOTrainer), ("fastrft", None)):
        torch.manual_seed(0)   # the same LoRA initialisation
        trainer = make_trainer(str(model_dir), tmp_path / label, peft_config=peft_config,
                               trainer_class=trainer_class, **config)
        trainer.current_gradient_accumulation_steps = 2  # set by Trainer.train(); the normalisers depend on it
        if case == "vllm-is-tool-mask":  # the vLLM path of compute_loss, without a vLLM server
            trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
        trainer.model.train(case != "eval")
        trainers[label] = trainer
    inputs = equivalence_batch(trainers["trl"], case)

    trl_loss, trl_grads = loss_and_grads(trainers["trl"], inputs)
    ours = trainers["fastrft"]
    head_calls = LMHeadCalls(ours._causal_lm(ours.model).get_output_embeddings())
    our_loss, our_grads = loss_and_grads(ours, inputs)
    head_calls.close()

    assert head_calls.positions == [1], "the loss must run the LM head on one position only (never full logits)"
    assert trl_loss.abs() > 1e-4, "a vanishing loss would make the comparison vacuous"
    torch.testing.assert_close(our_loss, trl_loss, rtol=2e-5, atol=1e-7)
    assert our_grads.keys() == trl_grads.keys()
    for param, trl_grad in trl_grads.items():
        scale = trl_grad.abs().max().clamp(min=1e-12)
        torch.testing.assert_close(our_grads[param] / scale, trl_grad / scale, rtol=1e-4, atol=1e-5, msg=param)
    if kind == "lora-tied":
        head = ours._causal_lm(ours.model).get_output_embeddings()
        assert head.weight is ours._causal_lm(ours.model).get_input_embeddings().weight
        assert head.weight.grad is None
    mode = "eval" if case == "eval" else "train"
    trl_metrics, our_metrics = trainers["trl"]._metrics[mode], ours._metrics[mode]
    assert trl_metrics.keys() == our_metrics.keys()
    for metric, values in trl_metrics.items():
        assert our_metrics[metric] == pytest.approx(values, rel=1e-4, abs=1e-6), metric
    assert "entropy" in our_metrics and ("kl" in our_metrics) == (ours.beta != 0.0)
    if kind == "qwen3_moe":
        assert our_metrics["aux_loss"] and our_metrics["aux_loss"][0] > 0
    if case != "on-policy" and "clip_ratio/region_mean" in our_metrics:   # cispo, sapo, vespo do not clip
        assert our_metrics["clip_ratio/region_mean"][-1] > 0, "the batch must clip on some tokens"


@needs_trl
def test_unsupported_models_fail_at_construction(tmp_path):
    pytest.importorskip("peft", reason="peft is not installed (pip install 'fastrft[integrations]')")
    from peft import LoraConfig

    head_adapter = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, modules_to_save=["lm_head"],
                              lora_dropout=0.0)
    with pytest.raises(ValueError, match="plain nn.Linear"):
        make_trainer(tiny_llama(), tmp_path, peft_config=head_adapter)


@needs_trl
def test_an_adapter_with_dropout_and_weights_passes_the_construction_probe(tmp_path):
    """Adapters that change the output (B not zero: a trained adapter, here initialised so) with lora_dropout: PEFT
    injects them training into the base model in eval mode, and the probe's two forwards drew different dropout
    masks, refusing the model as unsupported."""
    pytest.importorskip("peft", reason="peft is not installed (pip install 'fastrft[integrations]')")
    from peft import LoraConfig

    adapter = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.5, init_lora_weights=False)
    make_trainer(tiny_llama(), tmp_path, peft_config=adapter)


@needs_trl
def test_a_model_whose_logits_fastrft_cannot_reproduce_is_refused(tmp_path, monkeypatch):
    """A logit transform fastrft does not know (here: model_logit_transform made to miss Cohere 2's scale) is
    caught by the probe at construction, before any training."""
    import fastrft.integrations.trl as adapter

    monkeypatch.setattr(adapter, "model_logit_transform", lambda model: {"logit_scale": 1.0, "softcap": None})
    with pytest.raises(ValueError, match="model: fastrft's log-probs of Cohere2ForCausalLM differ from the model's"):
        make_trainer(equivalence_model("cohere2"), tmp_path)


def sort_digits(completions, answer, **kwargs):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


def readme_trainer(model_path, tmp_path, trainer_class=None, **config):
    """The README's GRPOConfig (loss_type="dapo", beta=0.04, epsilon_high=0.28; bf16 left at GRPOConfig's default,
    True) on the CPU, over the demo's sort prompts: a FastRFTGRPOTrainer, or trainer_class."""
    from datasets import Dataset
    from trl import GRPOConfig

    from fastrft.integrations import FastRFTGRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path / "out"), loss_type="dapo", beta=0.04, epsilon_high=0.28,
                      per_device_train_batch_size=4, num_generations=4, max_completion_length=8, report_to="none",
                      logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True, **config)
    dataset = Dataset.from_dict({"prompt": ["sort 7391=", "sort 4412=", "sort 981=", "sort 55120="],
                                 "answer": ["1379", "1244", "189", "01255"]})
    return (trainer_class or FastRFTGRPOTrainer)(model=model_path, reward_funcs=sort_digits, args=args,
                                                 train_dataset=dataset)


@needs_trl
def test_readme_config_trains_a_trained_model_under_bf16_autocast(demo_reference, tmp_path):
    """The README's GRPOConfig keeps bf16=True, under which TRL prepares its reference model with accelerate's
    autocast wrapper: the construction probe compares fastrft's head with the model's own forward without it (not
    with 16-bit logits handed back as fp32), so a trained model, whose logits are large enough for bf16 rounding to
    exceed the probe's tolerance, is accepted and trains."""
    trainer = readme_trainer(demo_reference, tmp_path, max_steps=1)
    assert trainer.args.bf16 and hasattr(trainer.ref_model, "_original_forward"), "not the autocast case"
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "kl" in entry]
    assert len(logs) == 1 and all(torch.isfinite(torch.tensor(logs[0][k])) for k in ("loss", "kl", "entropy"))


@needs_trl
def test_bf16_log_probs_match_trls_with_an_fp32_head(demo_reference, tmp_path):
    """Under bf16, the policy's and the reference model's log-probs (TRL calls both under autocast) are TRL's own
    with cast_lm_head_to_fp32=True: the model body under autocast, the LM head in fp32 (fastrft's always is)."""
    from transformers import AutoModelForCausalLM
    from trl import GRPOTrainer

    trainers = {"trl": readme_trainer(demo_reference, tmp_path / "trl", GRPOTrainer, cast_lm_head_to_fp32=True),
                "fastrft": readme_trainer(demo_reference, tmp_path / "fastrft")}
    tokenizer = trainers["trl"].processing_class
    input_ids = torch.tensor([tokenizer(text)["input_ids"] for text in ("sort 7391=1379", "sort 4412=1244")])
    mask, n_tokens = torch.ones_like(input_ids), 5
    with torch.no_grad():
        logps = {(label, key): trainer._get_per_token_logps_and_entropies(getattr(trainer, key), input_ids, mask,
                                                                          n_tokens)[0]
                 for label, trainer in trainers.items() for key in ("model", "ref_model")}
        logits = AutoModelForCausalLM.from_pretrained(demo_reference)(input_ids=input_ids).logits[:, -n_tokens - 1:-1]
    fp32 = logits.log_softmax(-1).gather(-1, input_ids[:, -n_tokens:, None]).squeeze(-1)
    for key in ("model", "ref_model"):
        torch.testing.assert_close(logps["fastrft", key], logps["trl", key], rtol=0, atol=1e-5, msg=key)
        assert (logps["fastrft", key] - fp32).abs().max() > 1e-3, "the body must run under bf16 autocast, as TRL's"


def test_missing_trl_gives_one_clear_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` now raises ImportError
    monkeypatch.delitem(sys.modules, "fastrft.integrations.trl", raising=False)
    import fastrft.integrations

    with pytest.raises(ImportError, match=r'pip install "fastrft\[integrations\]"'):
        fastrft.integrations.FastRFTGRPOTrainer


# --------------------------------------------------------------------------------------------- TRL trainer: refiner

REFINE_TEMPLATE = "fix {prompt} then {response} as"
CORRECTION = "aaa"


class EveryFourthFails:
    """parse_refinement that ignores the refiner's text (an untrained refiner writes noise) and returns CORRECTION,
    except on every fourth call: None, a failed refinement."""

    def __init__(self):
        self.calls = 0

    def __call__(self, text):
        self.calls += 1
        return None if self.calls % 4 == 0 else CORRECTION


@pytest.fixture
def finished_refiner(monkeypatch):
    """The refiner's real generation, with every output marked finished (an untrained model never writes EOS, and an
    unfinished refinement fails); records the model and whether PEFT adapters were disabled at each call."""
    import fastrft.rollout

    calls = []
    real_generate = fastrft.rollout.generate

    def generate(model, *args, **kwargs):
        adapters = [m.disable_adapters for m in model.modules() if hasattr(m, "lora_A")]
        calls.append((model, bool(adapters) and all(adapters)))
        samples = real_generate(model, *args, **kwargs)
        samples.truncated = [False] * len(samples.truncated)
        return samples

    monkeypatch.setattr(fastrft.rollout, "generate", generate)
    return calls


@needs_trl
def test_a_batch_whose_refinements_all_failed_logs_no_changed_token_share(finished_refiner, model_dir, tmp_path):
    refiner = dict(refine_coef=0.5, refine_template=REFINE_TEMPLATE, parse_refinement=lambda text: None)
    trainer = make_trainer(model_dir, tmp_path, refiner=refiner, max_steps=1, loss_type="dapo")
    trainer.train()
    refine_logs = [entry for entry in trainer.state.log_history if "refine/rate" in entry]
    assert refine_logs and all(entry["refine/failed"] == 1.0 for entry in refine_logs)
    # Nothing was measured: no value (0 would read as "every token kept").
    assert not any("refine/changed_token_frac" in entry for entry in refine_logs)


@needs_trl
@pytest.mark.parametrize("setup", ["dapo-copy", "grpo-kl-lora"])
def test_trainer_trains_with_refiner(setup, finished_refiner, model_dir, tmp_path):
    # The plain greedy path, whose generate() the fixture finishes; the draft path is checked below.
    refiner = dict(refine_coef=0.5, refine_template=REFINE_TEMPLATE, parse_refinement=EveryFourthFails(),
                   refine_draft=False)
    if setup == "dapo-copy":  # beta == 0: the refiner is a frozen copy of the initial policy, loaded from its path
        trainer = make_trainer(model_dir, tmp_path, refiner=refiner, max_steps=2, loss_type="dapo")
        assert trainer.refiner_model is not None and trainer.refiner_model is not trainer.model
        refiner_before = {n: p.detach().clone() for n, p in trainer.refiner_model.named_parameters()}
        policy_before = dict(trainer.model.named_parameters())
        assert all(torch.equal(p, policy_before[n]) for n, p in refiner_before.items()), "not the initial policy"
        assert not any(p.requires_grad for p in trainer.refiner_model.parameters())
    else:  # PEFT: the refiner is the policy with its adapters disabled
        pytest.importorskip("peft", reason="peft is not installed (pip install 'fastrft[integrations]')")
        trainer = make_trainer(tiny_llama(), tmp_path, peft_config=lora_config(), refiner=refiner, max_steps=2,
                               loss_type="grpo", beta=0.1, use_bias_correction_kl=False)
        assert trainer.refiner_model is None
    trainable = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()

    # 2 optimiser steps x 2 accumulation steps = 4 micro-batches = one generation batch (steps_per_generation=4):
    # the refiner runs once, on all 16 samples.
    assert len(finished_refiner) == 1
    refiner_used, adapters_disabled = finished_refiner[0]
    if setup == "dapo-copy":
        assert refiner_used is trainer.refiner_model
        assert all(torch.equal(p, refiner_before[n]) for n, p in trainer.refiner_model.named_parameters())
    else:
        assert adapters_disabled, "the PEFT refiner must generate with its adapters disabled"
        assert not any(m.disable_adapters for m in trainer.model.modules() if hasattr(m, "lora_A"))
    params = dict(trainer.model.named_parameters())
    assert any(not torch.equal(params[n], before) for n, before in trainable.items()), "no trainable weight moved"

    logs = [entry for entry in trainer.state.log_history if "fastrft/sft_loss" in entry]
    assert len(logs) == 2
    refine_logs = [entry for entry in logs if "refine/rate" in entry]
    assert len(refine_logs) == 1, "one generation batch, one set of refine metrics"
    # One parse in four fails; the others replace a sample without EOS by "aaa</s>", which always changes it.
    assert refine_logs[0]["refine/failed"] == pytest.approx(0.25)
    assert refine_logs[0]["refine/rate"] == pytest.approx(0.75)
    assert 0 < refine_logs[0]["refine/changed_token_frac"] <= 1
    assert sum(entry["fastrft/sft_loss"] for entry in logs) > 0
    assert all(entry["fastrft/sft_loss"] >= 0 and torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)

    # The refinements travel with their samples: the correction's tokens, cut after the last weighted one.
    correction_ids = trainer._tokenizer(CORRECTION, add_special_tokens=False)["input_ids"] + [2]
    n_refined = 0
    for batch in trainer._buffered_inputs:
        for ids, row_mask, weights in zip(batch["refined_ids"], batch["refined_mask"], batch["refined_weights"]):
            length = int(row_mask.sum())
            if length:
                n_refined += 1
                assert ids[:length].tolist() == correction_ids[:length]
                assert weights[length - 1] == 0.5 and set(weights[:length].tolist()) <= {0.0, 0.5}
                assert not weights[length:].any()
    assert n_refined == 12


def refined_batch(trainer, case):
    """equivalence_batch (4 samples of 5 tokens, lengths 5, 3, 3, 0) with refinements: sample 0's is longer than any
    sample and has unweighted tokens inside, sample 1 has none, sample 3's sample is empty."""
    inputs = equivalence_batch(trainer, case)
    vocab = trainer.model.config.vocab_size
    generator = torch.Generator().manual_seed(2)
    weights = torch.tensor([[0.0, 0.5, 0.5, 0.0, 0.1, 0.5],
                            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                            [0.5, 0.5, 0.0, 0.0, 0.0, 0.0],
                            [0.1, 0.5, 0.1, 0.5, 0.0, 0.0]])
    lengths = torch.tensor([6, 0, 2, 4])
    refined_mask = (torch.arange(6)[None] < lengths[:, None]).long()
    refined_ids = torch.randint(4, vocab, (4, 6), generator=generator).masked_fill(refined_mask == 0, 0)
    return dict(inputs, refined_ids=refined_ids, refined_mask=refined_mask, refined_weights=weights,
                refined_items_in_batch=(weights != 0).sum() * 3)


def reference_refined_loss64(model64, inputs, trainer, accumulation, entropy_coef=0.0):
    """TRL's loss for trainer.loss_type (use_bias_correction_kl=False) plus the refined rows' term as documented, in
    float64 from full logits. Returns (loss, the refined rows' term)."""
    prompt_len = inputs["prompt_ids"].size(1)

    def token_logps(ids, ids_mask):  # [B, L] log-probs of ids after the prompt and the entropies there
        logits = model64(input_ids=torch.cat([inputs["prompt_ids"], ids], 1),
                         attention_mask=torch.cat([inputs["prompt_mask"], ids_mask], 1)).logits
        logp = torch.log_softmax(logits[:, prompt_len - 1:-1] / trainer.temperature, dim=-1)
        return logp.gather(-1, ids[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)

    logp, entropy = token_logps(inputs["completion_ids"], inputs["completion_mask"])
    mask = inputs["completion_mask"].double()
    ratio = torch.exp(logp - inputs["old_per_token_logps"].double())
    adv = inputs["advantages"].double()[:, None]
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - trainer.epsilon_low, 1 + trainer.epsilon_high) * adv)
    if trainer.beta:
        log_ratio = inputs["ref_per_token_logps"].double() - logp
        per_token = per_token + trainer.beta * (torch.exp(log_ratio) - log_ratio - 1)
    refined_logp, _ = token_logps(inputs["refined_ids"], inputs["refined_mask"])
    weights = inputs["refined_weights"].double()
    pg = (per_token * mask).sum(-1)                                # [B]: each sample's summed loss
    tokens = mask.sum(-1)
    n_seq = mask.size(0)
    normalizer = {  # TRL's, per sequence [B] or one number; accumulation scaling below
        "grpo": n_seq * tokens.clamp(min=1),
        "bnpo": tokens.sum().clamp(min=1),
        "dr_grpo": n_seq * trainer.max_completion_length,
        "dapo": inputs["num_items_in_batch"].double() / trainer.args.steps_per_generation,
        "luspo": n_seq,
    }[trainer.loss_type]
    loss = (pg / normalizer).sum() / accumulation
    if entropy_coef:  # TRL's bonus: the mean entropy over the sample tokens
        loss = loss - entropy_coef * (entropy * mask).sum() / mask.sum() / accumulation
    # The refined rows: DAPO's token mean over the generation batch's sample and weighted refined tokens.
    items = (inputs["num_items_in_batch"] + inputs["refined_items_in_batch"]).double()
    sft = (weights * -refined_logp).sum() / (items / trainer.args.steps_per_generation) / accumulation
    return loss + sft, sft.detach()


@pytest.fixture(scope="module")
def refiner_trainer(tmp_path_factory):
    """One trainer (beta > 0, refiner on) shared by the loss checks; each sets the loss type it checks."""
    pytest.importorskip("trl", reason="trl is not installed (pip install 'fastrft[integrations]')")
    torch.manual_seed(0)
    refiner = dict(refine_coef=0.5, refine_template=REFINE_TEMPLATE)
    return make_trainer(tiny_llama(), tmp_path_factory.mktemp("refiner"), refiner=refiner, beta=0.1,
                        use_bias_correction_kl=False, temperature=0.7, epsilon=0.2, epsilon_high=0.28, bf16=False)


@needs_trl
@pytest.mark.parametrize("loss_type,entropy_coef", [("grpo", 0.0), ("bnpo", 0.05), ("dr_grpo", 0.0),
                                                    ("dapo", 0.0), ("luspo", 0.0)])
def test_refined_rows_loss_and_gradients_match_reference(loss_type, entropy_coef, refiner_trainer):
    from transformers import LlamaForCausalLM

    trainer = refiner_trainer
    assert trainer.refiner_model is trainer.ref_model, "with beta > 0 the refiner is TRL's reference model"
    trainer.loss_type = loss_type
    trainer.entropy_coef = entropy_coef
    trainer._entropy_bonus_enabled = entropy_coef != 0.0
    trainer.current_gradient_accumulation_steps = 2
    trainer.model.train()
    inputs = refined_batch(trainer, "off-policy")

    model64 = LlamaForCausalLM(trainer.model.config).double()
    model64.load_state_dict(trainer.model.state_dict())
    model64.train()  # dropout is 0; the same mode as the policy
    ref_loss, ref_sft = reference_refined_loss64(model64, inputs, trainer, accumulation=2, entropy_coef=entropy_coef)
    ref_loss.backward()
    head_calls = LMHeadCalls(trainer.model.get_output_embeddings())
    our_loss, our_grads = loss_and_grads(trainer, inputs)
    head_calls.close()

    assert head_calls.positions == [1, 1], "sample rows, then refined rows: the LM head on one position each"
    assert ref_sft > 0.05 * ref_loss.abs(), "the refined rows must weigh in the loss"
    torch.testing.assert_close(our_loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-7)
    assert trainer._metrics["train"]["fastrft/sft_loss"][-1] == pytest.approx(ref_sft.item(), rel=1e-5)
    reference_grads = dict(model64.named_parameters())
    assert our_grads.keys() == {n for n, p in reference_grads.items() if p.grad is not None}
    for name, grad in our_grads.items():
        expected = reference_grads[name].grad
        scale = expected.abs().max().clamp(min=1e-12)
        torch.testing.assert_close(grad.double() / scale, expected / scale, rtol=1e-4, atol=1e-5, msg=name)


@needs_trl
def test_loss_forward_is_one_row_per_sequence(refiner_trainer):
    """The adapter builds its batches itself (the samples and their refined rows, one row per sequence, TRL's
    masks): no tensor of the forward or backward has two dimensions as long as the batch's tokens, as a packed
    row's dense [T, T] mask would (fastrft.batch's rule, held by the TRL path too)."""
    from test_batch import LargestSquare

    trainer = refiner_trainer
    trainer.loss_type = "dapo"
    trainer.current_gradient_accumulation_steps = 1
    generator = torch.Generator().manual_seed(3)
    vocab = trainer.model.config.vocab_size
    n_seq, prompt_len, width = 40, 8, 8

    def ids(shape):
        return torch.randint(4, vocab, shape, generator=generator)

    completion_mask = (torch.arange(width)[None] < torch.randint(1, width + 1, (n_seq, 1), generator=generator)).long()
    refined_mask = (torch.arange(width)[None] < torch.randint(1, width + 1, (n_seq, 1), generator=generator)).long()
    logps = -torch.rand(n_seq, width, generator=generator)
    inputs = dict(prompt_ids=ids((n_seq, prompt_len)), prompt_mask=torch.ones(n_seq, prompt_len, dtype=torch.long),
                  completion_ids=ids((n_seq, width)) * completion_mask, completion_mask=completion_mask,
                  advantages=torch.randn(n_seq, generator=generator), num_items_in_batch=completion_mask.sum(),
                  old_per_token_logps=logps, ref_per_token_logps=logps - 0.1,
                  refined_ids=ids((n_seq, width)) * refined_mask, refined_mask=refined_mask,
                  refined_weights=refined_mask.float() * 0.5, refined_items_in_batch=refined_mask.sum())
    tokens = int(completion_mask.sum() + refined_mask.sum()) + 2 * n_seq * prompt_len
    config = trainer.model.config
    assert tokens > max(config.hidden_size, config.intermediate_size, config.vocab_size)
    with LargestSquare() as spy:
        loss_and_grads(trainer, inputs)
    assert spy.largest < tokens


@needs_trl
@pytest.mark.parametrize("setup", ["copy", "lora"])
def test_draft_refiner_writes_the_plain_refinements(setup, model_dir, tmp_path):
    """refine_draft (the default) against refine_draft=False on the same samples: the same refinements in the batch
    dict, no more passes that write tokens, and the refine/* metrics; under PEFT with the adapters disabled."""
    refiner = dict(refine_coef=0.5, refine_template=REFINE_TEMPLATE, refine_max_new_tokens=8)
    if setup == "copy":
        trainer = make_trainer(model_dir, tmp_path, refiner=refiner, loss_type="dapo")
    else:
        pytest.importorskip("peft", reason="peft is not installed (pip install 'fastrft[integrations]')")
        trainer = make_trainer(tiny_llama(), tmp_path, peft_config=lora_config(), refiner=refiner, loss_type="dapo")
    tokenizer = trainer._tokenizer
    prompts = ["abc", "hello", "xyz ab", "qq"] * 2
    generator = torch.Generator().manual_seed(0)
    completions = [torch.randint(4, tokenizer.vocab_size, (n,), generator=generator).tolist() + [2]
                   for n in (0, 1, 3, 5, 2, 4, 6, 1)]
    outputs = {}
    trainer.model.train()   # the train metrics
    for draft in (True, False):
        trainer.refine_draft = draft
        outputs[draft] = trainer._refine(prompts, completions)
    for name in ("refined_ids", "refined_mask", "refined_weights", "refined_items_in_batch"):
        assert torch.equal(outputs[True][name], outputs[False][name]), name
    passes = trainer._metrics["train"]["refine/passes"]
    assert passes[0] <= passes[1] + 1   # + the pass over the templates' common beginning ("Fix the answer.\nQ: ")
    assert len(trainer._metrics["train"]["refine/draft_accepted"]) == 1
    assert 0 <= trainer._metrics["train"]["refine/draft_accepted"][0] <= 1


REFINER_ERRORS = [
    (dict(refine_coef=0.5), "refine_coef > 0 needs refine_template"),
    (dict(refine_coef=-0.5, refine_template=REFINE_TEMPLATE), "refine_coef must be a finite number >= 0"),
    (dict(refine_coef=0.5, refine_template="fix {response} for {task}"), r"fields are \{prompt\}.*\['response', "
                                                                          r"'task'\]"),
    (dict(refine_coef=0.5, refine_template="fix {prompt}"), r"\{response\}"),
    (dict(refine_kept_weight=float("nan")), "refine_kept_weight"),
    (dict(refine_context=-1), "refine_context must be an int >= 0"),
    (dict(refine_max_new_tokens=0), "refine_max_new_tokens must be an int >= 1"),
    (dict(refine_coef=0.5, refine_template=REFINE_TEMPLATE, parse_refinement="json"), "parse_refinement"),
    (dict(refine_coef=0.5, refine_template=REFINE_TEMPLATE, refine_draft="yes"), "refine_draft must be True or False"),
    *[(dict(refine_coef=0.5, refine_template=REFINE_TEMPLATE, refiner_model=path),
       f"refiner_model '{re.escape(path)}' is a local path, but no such directory exists")
      for path in ("/nonexist", "./no/such/model", "~/no-such-model", "no/such/model")],
]


@needs_trl
@pytest.mark.parametrize("refiner,message", REFINER_ERRORS)
def test_refiner_options_fail_at_construction(refiner, message, model_dir, tmp_path):
    with pytest.raises(ValueError, match=message):
        make_trainer(model_dir, tmp_path, refiner=refiner)


@needs_trl
def test_a_refiner_without_rows_for_the_tokenizers_ids_fails_at_construction(model_dir, tmp_path):
    """Too few rows for the tokenizer's ids failed at the first step (an IndexError)."""
    refiner = tiny_llama()
    refiner.resize_token_embeddings(3)
    with pytest.raises(ValueError, match=r"the tokenizer has ids up to \d+ but the LM head of refiner_model "
                                         r"LlamaForCausalLM has only 3 rows"):
        make_trainer(model_dir, tmp_path, refiner=dict(refine_coef=0.5, refine_template=REFINE_TEMPLATE,
                                                       refiner_model=refiner))


@needs_trl
def test_a_refiner_with_a_padded_vocabulary_trains(model_dir, tmp_path):
    """A refiner of the policy's tokenizer whose head has more rows (a padded vocabulary, as Qwen2.5-7B's against
    0.5B's) is only decoded and read back through the tokenizer: it was refused as another vocabulary."""
    refiner = tiny_llama()
    refiner.resize_token_embeddings(refiner.config.vocab_size + 16)
    trainer = make_trainer(model_dir, tmp_path, max_steps=1, refiner=dict(refine_coef=0.5,
                                                                         refine_template=REFINE_TEMPLATE,
                                                                         refiner_model=refiner))
    trainer.train()


@needs_trl
@pytest.mark.parametrize("name,local", [("/models/qwen", True), ("./qwen", True), ("../qwen", True), ("~/qwen", True),
                                        ("models/qwen/v2", True), ("Qwen/Qwen2.5-0.5B", False), ("gpt2", False)])
def test_refiner_model_paths_are_told_from_hub_ids(name, local):
    """A name that can only be a local path is checked for its directory; Hub ids (name, namespace/name) are left to
    transformers."""
    from fastrft.integrations.trl import _is_local_path

    assert _is_local_path(name) == local


# ---------------------------------------------------------------------------------------------------- PEFT / LoRA

def reference_loss64(hidden, weight, targets, advantages, old_logprobs, clip_low, clip_high):
    """The contract's policy-gradient loss in float64 from full logits: token mean of -min(rA, clip(r)A)."""
    logp = torch.log_softmax(hidden.double() @ weight.double().T, dim=-1)
    valid = targets != -100
    logp_t = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    ratio = torch.exp(logp_t - old_logprobs.double())
    adv = advantages.double()
    rows = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_low, 1 + clip_high) * adv)
    return rows[valid].sum() / valid.sum()


@needs_peft
@needs_transformers
@pytest.mark.parametrize("tie_word_embeddings", [False, True])
def test_lora_frozen_head_gets_no_gradient(tie_word_embeddings):
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(tie_word_embeddings=tie_word_embeddings), lora_config())
    for name, param in model.named_parameters():  # LoRA's B starts at 0; move it so the adapters change the output
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    reference = copy.deepcopy(model).double()
    head = model.get_base_model().get_output_embeddings()
    assert not head.weight.requires_grad
    if tie_word_embeddings:
        assert head.weight is model.get_base_model().get_input_embeddings().weight

    ids = torch.randint(4, model.config.vocab_size, (3, 9))
    targets = ids[:, 1:].clone()
    targets[0, :3] = -100  # prompt tokens
    advantages = torch.randn(3)[:, None].expand_as(targets)
    old_logprobs = -3.5 + 0.5 * torch.randn(targets.shape)
    loss_fn = fastrft.FusedRFTLoss(head, clip_low=0.2, clip_high=0.28)

    hidden = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1][:, :-1]
    loss_fn(hidden, targets, advantages=advantages, old_logprobs=old_logprobs).loss.backward()
    hidden64 = reference(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1][:, :-1]
    head64 = reference.get_base_model().get_output_embeddings()
    reference_loss64(hidden64, head64.weight, targets, advantages, old_logprobs, 0.2, 0.28).backward()

    assert head.weight.grad is None
    lora_grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert lora_grads and all("lora_" in n for n in lora_grads)
    reference_grads = dict(reference.named_parameters())
    for name, grad in lora_grads.items():
        expected = reference_grads[name].grad
        assert expected.abs().max() > 0, name
        torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item(),
                                   msg=name)


# ---------------------------------------------------------------------------- errors a user of another trainer meets

@needs_transformers
def test_wiring_mistakes_raise_actionable_errors():
    model = tiny_llama()
    ids = torch.randint(4, model.config.vocab_size, (2, 7))
    hidden = model.model(input_ids=ids).last_hidden_state  # [2, 7, 32]
    loss_fn = fastrft.FusedRFTLoss(model.lm_head)
    targets = ids[:, 1:]  # [2, 6]
    advantages = torch.randn(2)

    # Hidden states not shifted to the positions that predict the targets.
    with pytest.raises(ValueError, match=r"targets shape \(2, 6\) does not match the leading shape of hidden \(2, 7\)"):
        loss_fn(hidden, targets, advantages=advantages[:, None].expand_as(targets))
    # The head's weight handed over transposed ([H, V] instead of [V, H]).
    with pytest.raises(ValueError, match=r"LM-head weight is 31 wide but the hidden size is 32.*must be \[V, H\]"):
        fastrft.fused_rft_loss(hidden[:, :-1], model.lm_head.weight.T, targets, advantages=torch.ones(targets.shape))
    # One advantage per sequence where one per token is expected.
    with pytest.raises(ValueError, match=r"advantages has shape \(2,\) but targets has shape \(2, 6\): one value per "
                                         r"token"):
        loss_fn(hidden[:, :-1], targets, advantages=advantages)
    with pytest.raises(ValueError, match=r"old_logprobs has shape \(2, 7\) but targets has shape \(2, 6\)"):
        loss_fn(hidden[:, :-1], targets, advantages=torch.ones(targets.shape), old_logprobs=torch.zeros(2, 7))


# ---------------------------------------------------------------------------------------------- plain PyTorch loop

@needs_transformers
def test_plain_pytorch_example_runs_and_learns():
    result = subprocess.run([sys.executable, str(REPO / "examples" / "plain_pytorch.py"), "--steps", "12"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    rewards = [float(r) for r in re.findall(r"reward ([0-9.]+)", result.stdout)]
    assert len(rewards) == 12
    assert sum(rewards[-3:]) > 2 * sum(rewards[:3]), f"the toy reward should rise: {rewards}"
