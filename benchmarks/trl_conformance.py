"""Does FastRFTGRPOTrainer pass TRL's own GRPOTrainer tests?

Runs TRL's `tests/test_grpo_trainer.py` from a checkout of TRL's repository (the sdist on PyPI ships no tests, and
fastrft does not copy TRL's tests into its own), twice in one run: as it is, and with `trl.GRPOTrainer` replaced by
`fastrft.integrations.FastRFTGRPOTrainer` before the test module imports it. Nothing is downloaded: the hub models and
datasets the tests name are replaced by local stand-ins built here from configs (tiny causal LMs and reward models of
the same architectures sharing a character-level tokenizer with a chat template, and the `zen` prompt datasets),
found by transformers and datasets as local folders of the same names. Tests that need what this machine lacks (a
GPU, vLLM, vision models, hub-only models) fail or skip on both sides alike; the comparison is between the two runs:
every test that passes with TRL's own class must pass with ours.

    python benchmarks/trl_conformance.py --trl-repo ~/src/trl          # writes results/trl_conformance.{json,md}

Where the checkout's test utilities import helpers the installed TRL lacks (a checkout newer or older than the
installed release), those helpers count as unavailable (their tests skip on both sides).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import string
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import OUT_HELP, RESULTS, say_written  # noqa: E402

from fastrft.machine import describe_machine  # noqa: E402

TEST_FILES = ("__init__.py", "conftest.py", "testing_utils.py", "test_grpo_trainer.py")
SWAP = '''

# Added by fastrft's benchmarks/trl_conformance.py: FastRFTGRPOTrainer in place of GRPOTrainer when FASTRFT_SWAP=1.
import os as _os
if _os.environ.get("FASTRFT_SWAP") == "1":
    import trl as _trl
    from fastrft.integrations import FastRFTGRPOTrainer as _FastRFTGRPOTrainer
    _trl.GRPOTrainer = _FastRFTGRPOTrainer
'''
# (hub name, model type, head): the text models the tests name; the others (vision, hub-only) stay missing.
STAND_INS = [
    ("tiny-Qwen2ForCausalLM-2.5", "qwen2", "causal"), ("tiny-Qwen2ForSequenceClassification-2.5", "qwen2", "reward"),
    ("tiny-Qwen3ForCausalLM", "qwen3", "causal"), ("tiny-Qwen3ForSequenceClassification", "qwen3", "reward"),
    ("tiny-Qwen3MoeForCausalLM", "qwen3_moe", "causal"), ("tiny-LlamaForCausalLM-3.2", "llama", "causal"),
    ("tiny-LlamaForSequenceClassification-3.2", "llama", "reward"),
    ("tiny-MistralForCausalLM-0.2", "mistral", "causal"),
    ("tiny-Cohere2ForCausalLM", "cohere2", "causal"), ("tiny-Gemma2ForCausalLM", "gemma2", "causal"),
    ("tiny-GptOssForCausalLM", "gpt_oss", "causal"), ("tiny-Glm4MoeForCausalLM", "glm4_moe", "causal"),
]
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, moe_intermediate_size=16, num_experts=4, num_local_experts=4, num_experts_per_tok=2,
            n_routed_experts=4, n_shared_experts=1, max_position_embeddings=512, shared_expert_intermediate_size=16)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROMPTS = ["Solve 3*x + 4 = 3 for x.", "The sky is", "Python is", "What color is the sky?", "The capital of France is",
           "Once upon a time", "The best way to learn", "Water boils at", "In 1492,", "My favourite fruit is",
           "The quick brown fox", "To be or not to be", "A haiku about rain:", "The answer is", "Cats are",
           "The moon", "Tea or coffee?"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def character_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(string.printable))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                        unk_token="<unk>", additional_special_tokens=SPECIAL_TOKENS[1:3])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_stand_ins(root: Path) -> None:
    """root/trl-internal-testing/<name>: the models and the zen datasets, as the tests name them."""
    import torch
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    tokenizer = character_tokenizer()
    for name, model_type, head in STAND_INS:
        config = AutoConfig.for_model(model_type)
        for key, value in TINY.items():
            if isinstance(getattr(config, key, None), int) and not isinstance(getattr(config, key), bool):
                setattr(config, key, value)
        if isinstance(config.__dict__.get("layer_types"), list):   # one per layer, or the config does not reload
            config.layer_types = config.layer_types[:config.num_hidden_layers]
        config.vocab_size = len(tokenizer)
        config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        config.bos_token_id = None
        torch.manual_seed(0)
        if head == "reward":
            config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(root / "trl-internal-testing" / name)
        tokenizer.save_pretrained(root / "trl-internal-testing" / name)
    zen = root / "trl-internal-testing" / "zen"
    configs = ("standard_prompt_only", "conversational_prompt_only")
    for config_name in configs:
        (zen / config_name).mkdir(parents=True, exist_ok=True)
        for split, prompts in (("train", PROMPTS), ("test", PROMPTS[:2])):
            if config_name.startswith("conversational"):
                prompts = [[{"role": "user", "content": p}] for p in prompts]
            Dataset.from_dict({"prompt": prompts}).to_parquet(zen / config_name / f"{split}.parquet")
    (zen / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train.parquet\n"
        f"  - split: test\n    path: {c}/test.parquet\n" for c in configs) + "---\n")


def copy_tests(trl_repo: Path, root: Path) -> None:
    tests = root / "tests"
    tests.mkdir()
    for name in TEST_FILES:
        source = trl_repo / "tests" / name
        if not source.is_file():
            raise SystemExit(f"--trl-repo {trl_repo}: no tests/{name} there (a checkout of TRL's repository?)")
        shutil.copy(source, tests / name)
    utils = tests / "testing_utils.py"
    # Helpers of trl.import_utils this TRL may lack: looked up by name, absent ones read as unavailable.
    text = re.sub(r"from trl\.import_utils import \(([^)]*)\)\n", lambda m: "import trl.import_utils as _trl_utils\n"
                  + "".join(f"{n} = getattr(_trl_utils, {n!r}, lambda: False)\n"
                            for n in re.findall(r"\w+", m.group(1))), utils.read_text())
    utils.write_text(text)
    with open(tests / "conftest.py", "a") as f:
        f.write(SWAP)


def run_tests(root: Path, swap: bool) -> dict[str, str]:
    """{test id: passed | failed | skipped} of one run of the copied test file."""
    report = root / f"{'fastrft' if swap else 'trl'}.xml"
    env = {**os.environ, **OFFLINE, "FASTRFT_SWAP": "1" if swap else "0"}
    done = subprocess.run([sys.executable, "-m", "pytest", "tests/test_grpo_trainer.py", "-q", "-p",
                           "no:cacheprovider", f"--junitxml={report}"], cwd=root, env=env, capture_output=True, text=True)
    if done.returncode not in (0, 1) or not report.is_file():   # 1: some failed; else collection, usage, internal
        raise SystemExit(f"TRL's test file did not run with {'FastRFTGRPOTrainer' if swap else 'its own class'} "
                         f"(pytest exit {done.returncode}): nothing compared, nothing written\n"
                         f"{(done.stdout + done.stderr)[-3000:]}")
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        outcome = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = outcome
    return outcomes


def git_commit(repo: Path) -> str:
    result = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trl-repo", type=Path, required=True, help="a checkout of TRL's git repository")
    parser.add_argument("--out", default=None, help=OUT_HELP % "trl_conformance")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (printed) for inspection")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="trl_conformance_"))
    try:
        copy_tests(args.trl_repo.expanduser(), root)
        build_stand_ins(root)
        runs = {"trl": run_tests(root, swap=False), "fastrft": run_tests(root, swap=True)}
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    passed_with_trl = sorted(t for t, outcome in runs["trl"].items() if outcome == "passed")
    if not passed_with_trl:
        shutil.rmtree(root, ignore_errors=True)
        raise SystemExit(f"no test of {args.trl_repo}/tests/test_grpo_trainer.py passed with TRL's own class: "
                         f"nothing to compare (a checkout that does not match the installed trl "
                         f"{describe_machine().get('trl')}?), nothing written")
    regressions = [t for t in passed_with_trl if runs["fastrft"].get(t) != "passed"]
    counts = {side: {o: sum(v == o for v in outcomes.values()) for o in ("passed", "failed", "skipped")}
              for side, outcomes in runs.items()}
    payload = dict(env=describe_machine(), trl_tests_commit=git_commit(args.trl_repo.expanduser()), counts=counts,
                   passed_with_trl=len(passed_with_trl),
                   also_passed_with_fastrft=len(passed_with_trl) - len(regressions), regressions=regressions,
                   outcomes=runs)
    out = Path(args.out) if args.out else RESULTS / "trl_conformance"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    env = payload["env"]
    lines = ["# TRL's GRPOTrainer tests with FastRFTGRPOTrainer", "",
             f"trl {env.get('trl')}, transformers {env.get('transformers')}, torch {env.get('torch')}; TRL's tests at "
             f"commit {payload['trl_tests_commit']}; fastrft commit {env['commit']}"
             f"{' (dirty)' if env['dirty'] else ''}; {env['device']}", "", f"Command: `{env['command']}`", "",
             "| class under test | passed | failed | skipped |", "|---|---:|---:|---:|"]
    lines += [f"| {'trl.GRPOTrainer' if side == 'trl' else 'FastRFTGRPOTrainer'} | {c['passed']} | {c['failed']} | "
              f"{c['skipped']} |" for side, c in counts.items()]
    lines += ["", f"Of the {len(passed_with_trl)} tests that pass with TRL's own class, "
              f"{payload['also_passed_with_fastrft']} pass with FastRFTGRPOTrainer."]
    lines += [f"- does not pass with FastRFTGRPOTrainer: `{t}`" for t in regressions]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    say_written(out)
    print("\n".join(lines))
    if args.keep:
        print(f"work folder: {root}")
    else:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
