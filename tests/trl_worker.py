"""FastRFTGRPOTrainer on 1 or 2 CPU processes, launched by tests/test_distributed.py (2 under torchrun, gloo):

    python tests/trl_worker.py train MODEL_DIR OUT_DIR PER_DEVICE_BATCH
    python tests/trl_worker.py grads MODEL_DIR OUT_DIR [fsdp2|zero3] [lora]

train: TRL's own trainer end to end (rewards, advantages, old and reference log-probs through fastrft's head, its
loss, the refiner constraint, the optimizer; data parallel over the processes); rank 0 writes the final weights and
the logged metrics to OUT_DIR.

grads: one generation batch through the trainer's _generate_and_score_completions and compute_loss with the policy,
TRL's reference model and the refiner sharded by FSDP2 as accelerate shards them (fully_shard per decoder layer, then
the model; the reference and the refiner whole, as TRL's prepare_fsdp and accelerate's prepare_model do), each
process with half the batch; rank 0 writes every weight's whole gradient. Accelerate turns FSDP on only on
accelerators (its CPU processes are plain data parallel), so on the CPU the sharding is applied here, the way
accelerate's fsdp2_prepare_model applies it. zero3: the same under DeepSpeed ZeRO-3 (which accelerate also turns on
only on accelerators): the models loaded partitioned (transformers' HfDeepSpeedConfig, as the Trainer sets it up),
then made ZeRO-3 engines as accelerate makes the policy's (with its optimizer; the Trainer keeps the model as
trainer.model, the engine as trainer.model_wrapped) and TRL's prepare_deepspeed the reference's and the refiner's.
lora: the policy a PEFT LoRA model (its adapters' weights fixed), the reference and the refiner the policy with its
adapters disabled (zero3 only).

Both sample through a rollout_func (TRL's seam for custom generation) that writes each prompt's completions from a
seed of its own, so that 1 process and 2 see the same samples.
"""
import json
import os
import sys
import types
import zlib
from pathlib import Path

import torch

from fastrft.distributed import end_world

sys.path.insert(0, str(Path(__file__).parent))
from dist_worker import ZERO3, backward, full_gradients, start_deepspeed  # noqa: E402
from test_integrations import char_tokenizer, tiny_llama  # noqa: E402

NUM_GENERATIONS, COMPLETION_TOKENS = 4, 5


def seeded_rollout(prompts, trainer):
    """For each prompt (its num_generations copies are adjacent) num_generations completions drawn from the prompt's
    own seed: letters and spaces, sometimes an early EOS."""
    tokenizer = trainer.processing_class
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    completion_ids = []
    for i, (prompt, ids) in enumerate(zip(prompts, prompt_ids)):
        draw = torch.Generator().manual_seed(zlib.crc32(f"{prompt}/{i % NUM_GENERATIONS}".encode()))
        tokens = torch.randint(4, tokenizer.vocab_size, (COMPLETION_TOKENS,), generator=draw).tolist()
        stop = int(torch.randint(2, COMPLETION_TOKENS + 1, (), generator=draw))
        completion_ids.append(tokens[:stop - 1] + [tokenizer.eos_token_id] if stop < COMPLETION_TOKENS else tokens)
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}


def letters(completions, **kwargs):
    """A reward that varies between a prompt's samples: the completion's letters."""
    return [float(len(c.replace(" ", ""))) for c in completions]


def save_stopping_refiner(path: Path, noise: float = 0.0) -> None:
    """A refiner that ends every refinement at once (EOS first): its residual stream is one attention bias, which
    only the EOS row of its head reads. Its refinements then parse to the same short text, deterministic on any
    number of processes. noise > 0: every weight also that much Gaussian noise (fixed), which its EOS outweighs (a
    model that still stops at once, through whose weights LoRA adapters get gradients)."""
    model = tiny_llama(attention_bias=True)
    draw = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(noise * torch.randn(p.shape, generator=draw))
        model.model.layers[0].self_attn.o_proj.bias.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        # EOS's logit: about the hidden size (32) without noise; with it, a few of the other logits' deviations, so
        # that EOS comes first while the softmax keeps room for gradients.
        model.lm_head.weight[model.config.eos_token_id] = 0.2 if noise else 1.0
    model.save_pretrained(path)


# Of one length: left padding would shift positions (TRL passes no position ids).
PROMPTS = ["abc", "hey", "xyz", "qqa"]


def make_trainer(model_dir: str, out_dir: str, per_device_batch: int, lora: bool = False):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig

    from fastrft.integrations import FastRFTGRPOTrainer

    args = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=per_device_batch,
                      num_generations=NUM_GENERATIONS, max_completion_length=COMPLETION_TOKENS, learning_rate=1e-2,
                      beta=0.1, loss_type="dapo", report_to="none", logging_steps=1, save_strategy="no",
                      disable_tqdm=True, max_steps=2, seed=0, use_cpu=True,
                      optim="sgd")   # Adam would amplify the rounding of near-zero gradients into whole steps
    if lora:   # the refiner: the policy with its adapters disabled (model_dir: save_stopping_refiner's, with noise)
        options = dict(peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    else:
        refiner_dir = Path(out_dir) / "refiner"
        if not refiner_dir.is_dir():
            save_stopping_refiner(refiner_dir)
        options = dict(refiner_model=str(refiner_dir))
    trainer = FastRFTGRPOTrainer(model=model_dir, reward_funcs=letters, args=args,
                                 train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
                                 processing_class=char_tokenizer(), rollout_func=seeded_rollout, refine_coef=0.5,
                                 refine_template="fix: {response}\n", parse_refinement=lambda text: "ab", **options)
    if lora:   # the same adapters on any number of processes (PEFT draws them from the global generator)
        with torch.no_grad():
            for name, p in trainer.model.named_parameters():
                if "lora_" in name:
                    draw = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                    p.copy_(0.1 * torch.randn(p.shape, generator=draw))
    return trainer


def shard_as_accelerate_does(trainer) -> None:
    """FSDP2 over the trainer's models as accelerate (policy) and TRL's prepare_fsdp (reference) apply it, and the
    refiner made the root of its own (as FastRFTGRPOTrainer._load_refiner does after accelerate's prepare_model)."""
    from torch.distributed.fsdp import fully_shard

    from fastrft.distributed import ROOT_WARMUP_TOKENS, fix_root

    for layer in trainer.model.model.layers:
        fully_shard(layer)
    fully_shard(trainer.model)
    fully_shard(trainer.ref_model)
    fully_shard(trainer.refiner_model)
    fix_root(trainer.refiner_model, input_ids=torch.zeros(1, ROOT_WARMUP_TOKENS, dtype=torch.long))


def record_calls(module, name: str) -> list:
    """module.name (a function of one argument) made to record its arguments in the list returned."""
    calls, function = [], getattr(module, name)

    def recording(argument):
        calls.append(argument)
        return function(argument)

    setattr(module, name, recording)
    return calls


def zero3_engines(trainer) -> None:
    """The policy, TRL's reference model and the refiner as ZeRO-3 engines, as accelerate and TRL make them."""
    import deepspeed
    from trl.models.utils import prepare_deepspeed

    optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.0)
    trainer.model_wrapped = trainer.deepspeed = deepspeed.initialize(model=trainer.model, optimizer=optimizer,
                                                                     config=ZERO3)[0]
    # prepare_deepspeed reads the configuration from accelerate's DeepSpeed plugin, which accelerate makes on GPUs only.
    plugin = types.SimpleNamespace(deepspeed_config=ZERO3)
    accelerator = types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=plugin))
    for name in ("ref_model", "refiner_model"):
        if getattr(trainer, name) is not None:   # None under PEFT: the policy with its adapters disabled
            setattr(trainer, name, prepare_deepspeed(getattr(trainer, name), accelerator))


def gradients(model_dir: str, out_dir: str, engine: str = "fsdp2", peft: str = "") -> None:
    import fastrft.integrations.trl as adapter

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    zero3, lora = engine == "zero3" and world_size > 1, peft == "lora"
    if lora:
        model_dir = str(Path(out_dir) / "policy")
    # The models made here are saved whole, before loading (under ZeRO-3 it partitions every model).
    saved = Path(model_dir) if lora else Path(out_dir) / "refiner"
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        start_deepspeed()
        if int(os.environ["RANK"]) == 0:
            save_stopping_refiner(saved, noise=0.1 if lora else 0.0)
        torch.distributed.barrier()
        zero3_loading = HfDeepSpeedConfig(ZERO3)   # noqa: F841 (transformers reads it while it lives)
    elif lora:
        save_stopping_refiner(saved, noise=0.1)
    trainer = make_trainer(model_dir, out_dir, per_device_batch=8 // world_size, lora=lora)
    rank = trainer.accelerator.process_index

    def models():
        named = (("model", trainer.model), ("ref_model", trainer.ref_model), ("refiner_model", trainer.refiner_model))
        return [(name, model) for name, model in named if model is not None]

    if zero3:
        # (PEFT adds its adapters to the loaded model: the engine partitions them.)
        loaded_partitioned = {name: all(hasattr(p, "ds_id") for n, p in model.named_parameters() if "lora_" not in n)
                              for name, model in models()}
        zero3_engines(trainer)
        # (prepare_deepspeed keeps weights of under 10 x hidden size elements whole.)
        sharded = {name: loaded_partitioned[name] and all(p.ds_tensor.numel() < p.ds_numel for p in model.parameters()
                                                          if p.ds_numel >= 1000) for name, model in models()}
        refiner_engine = trainer.model_wrapped if lora else trainer.refiner_model
        hooks_removed = record_calls(adapter, "remove_hooks")   # the refiner decodes with its engine's hooks off
    else:
        if world_size > 1:
            shard_as_accelerate_does(trainer)
            trainer._check_model()   # its probe once more, on sharded models (TRL's prepare_fsdp shards the reference)
        sharded = {name: all(hasattr(p, "to_local") for p in model.parameters()) for name, model in models()}
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps   # set by train()'s loop
    # Two prompts' groups: two processes take one each; one process takes both and runs the loss on each group's
    # half of the batch in turn, so that every forward pads as the two processes' do (the padded width changes a
    # forward's rounding: a whole batch's gradient and its halves' summed differ by ~1e-3 relative, TRL's own
    # trainer alike).
    rows = [{"prompt": p} for p in PROMPTS[:2] for _ in range(NUM_GENERATIONS)]
    share = len(rows) // world_size
    batch = trainer._generate_and_score_completions(rows[rank * share:(rank + 1) * share])
    for half in range(share // NUM_GENERATIONS):
        part = {key: value[half * NUM_GENERATIONS:(half + 1) * NUM_GENERATIONS]
                if isinstance(value, torch.Tensor) and value.dim() > 0 else value for key, value in batch.items()}
        loss = trainer.compute_loss(trainer.model_wrapped, part, num_items_in_batch=batch["num_items_in_batch"])
        backward(loss, trainer.model_wrapped, zero3)
    grads = full_gradients(trainer.model, zero3)
    if rank == 0:
        refiner_hooks_off = zero3 and any(e is refiner_engine for e in hooks_removed)
        torch.save({"grads": grads, "refine_rate": trainer._metrics["train"]["refine/rate"][-1], "sharded": sharded,
                    "refiner_hooks_off": refiner_hooks_off}, Path(out_dir) / "grads.pt")


def main(model_dir: str, out_dir: str, per_device_batch: int) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    trainer = make_trainer(model_dir, out_dir, per_device_batch)
    trainer.train()
    weights = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.accelerator.is_main_process:
        torch.save({name: t.clone() for name, t in weights.items()}, Path(out_dir) / "weights.pt")
        (Path(out_dir) / "log.json").write_text(json.dumps(trainer.state.log_history))


if __name__ == "__main__":
    if sys.argv[1] == "grads":
        gradients(*sys.argv[2:])
    else:
        main(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    end_world(exit_status=0)
