"""Test set-up: without a GPU, Triton kernels run in the interpreter on CPU tensors.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here, before the tests
import fastrft."""
import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if _HAS_CUDA else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The demo's untrained tiny model and its tokenizer, saved locally: a model directory for the trainer's tests."""
    from fastrft.tasks.demo import make_model, make_tokenizer

    path = tmp_path_factory.mktemp("tiny_model")
    tokenizer = make_tokenizer()
    make_model(tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def chat_model(tiny_model, tmp_path_factory):
    """tiny_model with a chat template (each message's content, then "="): a model that takes chat prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("chat_model")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}={% endfor %}"
    tokenizer.save_pretrained(path)
    AutoModelForCausalLM.from_pretrained(tiny_model).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def demo_reference(tmp_path_factory):
    """The demo's reference model, trained as fastrft demo trains it on a shorter budget (120 steps), saved with its
    tokenizer: the directory."""
    from fastrft.tasks.demo import train_reference

    path = tmp_path_factory.mktemp("demo_reference")
    train_reference(path, max_steps=120, n_eval=16, log_every=0)
    return str(path)
