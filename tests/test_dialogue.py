"""The dialogue task: a tiny randomly initialised reward model saved under tmp_path, scored batched and unbatched."""
import json
import string

import pytest
import torch

from fastrft.rewards import combine_rewards
from fastrft.tasks import Task
from fastrft.tasks import dialogue

transformers = pytest.importorskip("transformers")

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


def _tokenizer(chat_template):
    """Character-level tokenizer over printable ASCII, with a <bos> prepended (left padding, as a policy's would be)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(string.printable)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="left", pad_token="<pad>",
                                                     bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    if chat_template:
        tokenizer.chat_template = "<bos>" + chat_template
    return tokenizer


def _save_reward_model(path, chat_template=CHAT_TEMPLATE):
    tokenizer = _tokenizer(chat_template)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=512, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # spread the scores so that differences show
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reward_model_path(tmp_path_factory):
    return str(_save_reward_model(tmp_path_factory.mktemp("rm")))


PROMPTS = ["Why is the sky blue?", "Say hi.", "Name a colour.", "What is 2+2?", "Tell me a joke about cats."]
REPLIES = ["Rayleigh scattering of sunlight.", "Hi!", "Teal, a blue-green.", "4", "Cats do not tell jokes; they are one."]


def _reference_scores(path, prompts, replies):
    """logits[:, 0] of the saved model for each conversation alone (no padding), in float64."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path).double().eval()
    scores = []
    with torch.no_grad():
        for prompt, reply in zip(prompts, replies):
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                                  {"role": "assistant", "content": reply}], tokenize=False)
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
            assert ids["input_ids"][0, 0] == tokenizer.bos_token_id and (ids["input_ids"] == 1).sum() == 1
            scores.append(model(**ids).logits[0, 0].item())
    return scores


def test_batched_scores_match_unpadded_reference(reward_model_path):
    scorer = dialogue.RewardModelScorer(reward_model_path, device="cpu", batch_size=3)
    scores = scorer(PROMPTS, REPLIES)
    expected = _reference_scores(reward_model_path, PROMPTS, REPLIES)
    assert scores == pytest.approx(expected, abs=1e-4)
    assert max(expected) - min(expected) > 1e-2  # the model tells the conversations apart
    assert scorer.model.dtype == torch.float32 and not scorer.model.training
    # Chat prompts and TRL's conversational completions score the same conversations.
    chat = scorer([[{"role": "user", "content": p}] for p in PROMPTS],
                  [[{"role": "assistant", "content": r}] for r in REPLIES])
    assert chat == pytest.approx(scores, abs=1e-6)


def test_reward_model_loaded_once_and_degenerate_replies_not_scored(reward_model_path, monkeypatch):
    expected = _reference_scores(reward_model_path, [PROMPTS[0], PROMPTS[3]], [REPLIES[0], REPLIES[3]])
    loads, scored = [], []
    real_from_pretrained = transformers.AutoModelForSequenceClassification.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained",
                        lambda *a, **k: loads.append(a) or real_from_pretrained(*a, **k))
    task = dialogue.dialogue_task(reward_model_path, device="cpu", batch_size=2, degenerate_reward=-7.0,
                                  max_new_tokens=8)
    assert isinstance(task, Task) and task.name == "dialogue" and not loads  # loaded lazily
    real_call = dialogue.RewardModelScorer.__call__
    monkeypatch.setattr(dialogue.RewardModelScorer, "__call__",
                        lambda self, p, r: scored.append(len(r)) or real_call(self, p, r))
    completions = [REPLIES[0], "", "spam " * 30, REPLIES[3], REPLIES[4]]
    ids = [[1] * 4, [], [1] * 5, [1], [1] * 8]  # the last one hit max_new_tokens: truncated
    rewards, per_func = combine_rewards(task.reward_funcs, task.reward_weights, PROMPTS, completions,
                                        completion_ids=ids)
    assert rewards == pytest.approx([expected[0], -7.0, -7.0, expected[1], -7.0], abs=1e-4)
    assert per_func["degenerate_empty"] == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert per_func["degenerate_looping"] == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert per_func["degenerate_truncated"] == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert scored == [2]
    task.reward_funcs[0](PROMPTS[:2], REPLIES[:2])
    assert len(loads) == 1 and scored == [2, 2]
    # all degenerate: the reward model is not called at all
    assert task.reward_funcs[0](PROMPTS[:1], [""]) == [-7.0] and scored == [2, 2]


def test_without_chat_template_uses_plain_layout(tmp_path):
    path = _save_reward_model(tmp_path, chat_template=None)
    scorer = dialogue.RewardModelScorer(str(path), device="cpu")
    assert scorer.format("Hi?", "Hello.") == "User: Hi?\n\nAssistant: Hello."
    # Chat prompts and TRL's conversational completions: the conversation as it is.
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    assert scorer.format(chat, [{"role": "assistant", "content": "Hello."}]) == \
        "System: Be brief.\n\nUser: Hi?\n\nAssistant: Hello."
    # A prompt's last assistant message is the answer's beginning: it and the reply are one answer.
    prefilled = [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Sure: it is"}]
    assert scorer.format(prefilled, " 7.") == "User: Name a prime.\n\nAssistant: Sure: it is 7."
    typed = [prefilled[0], {"role": "assistant", "content": [{"type": "text", "text": "Sure: it is"}]}]
    assert scorer.format(typed, " 7.") == "User: Name a prime.\n\nAssistant: Sure: it is 7."
    scores = scorer(PROMPTS[:2], REPLIES[:2])
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        ids = tokenizer(f"User: {PROMPTS[1]}\n\nAssistant: {REPLIES[1]}", return_tensors="pt")
        assert scores[1] == pytest.approx(model(**ids).logits[0, 0].item(), abs=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 reward model scoring runs on CUDA only")
def test_bf16_on_cuda(reward_model_path):
    scorer = dialogue.RewardModelScorer(reward_model_path)
    scores = scorer(PROMPTS, REPLIES)
    assert scorer.model.dtype == torch.bfloat16
    assert scores == pytest.approx(_reference_scores(reward_model_path, PROMPTS, REPLIES), abs=0.1)


def test_task_rows_refinement_and_dataset(tmp_path, reward_model_path):
    task = dialogue.dialogue_task(reward_model_path, n_eval=4)
    assert len(task.eval_rows) == 4 and len(task.train_rows) == len(dialogue.DEFAULT_PROMPTS) - 4
    text = task.refine_template.format(prompt="Say hi.", response="hi")
    assert text.startswith("Say hi.") and "improved reply" in text
    assert task.parse_refinement("  Hello there!\n") == "Hello there!"
    assert task.parse_refinement("   ") is None and task.parse_refinement("no no no " * 20) is None
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"question {i}"}) for i in range(6)) + "\n")
    task = dialogue.dialogue_task(reward_model_path, str(path), n_eval=2)
    assert [r["prompt"] for r in task.eval_rows] == ["question 0", "question 1"]
    with pytest.raises(ValueError, match="n_eval"):
        dialogue.dialogue_task(reward_model_path, str(path), n_eval=6)


def test_task_options_are_checked_before_any_scoring(tmp_path, reward_model_path, tiny_model):
    """A reward model that is not there or is no sequence classifier (a causal LM would score with a random head),
    and scoring options that cannot work, fail when the task is made, before a run starts."""
    for options, message in ((dict(reward_model=str(tmp_path / "nope")), "reward_model='.*nope': no such directory"),
                             (dict(reward_model=tiny_model), "is a LlamaForCausalLM, not a sequence-classification"),
                             (dict(batch_size=0), "batch_size must be an int >= 1, got 0"),
                             (dict(max_length=0), "max_length must be an int >= 1, got 0"),
                             (dict(device="gpu"), "device must be a torch device")):
        with pytest.raises(ValueError, match=f"dialogue_task: .*{message}"):
            dialogue.dialogue_task(**{"reward_model": reward_model_path, **options})
