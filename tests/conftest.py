"""Shared fixtures: a real sentencepiece tokenizer and tiny Llama models, built offline."""

import io
import json
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PROMPTCBLUE = SHARED_DATA / "promptcblue"


def pytest_configure(config):
    if not (PROMPTCBLUE / "toy").is_dir():
        raise pytest.UsageError(
            f"{PROMPTCBLUE} not found: the tests read the PromptCBLUE files from "
            "shared/data/promptcblue in the folder that contains this repository"
        )


ENGLISH_LINES = [
    "Patient reports chest pain and shortness of breath for two days.",
    "Which department should a patient with a persistent cough visit?",
    "Metformin is a first-line drug for type 2 diabetes.",
    "Extract the symptoms and diseases from the sentence below.",
    "Answer: cardiology. Entities: fever; headache. Relation: aspirin treats fever.",
    "The quick brown fox jumps over the lazy dog, 0123456789.",
]


def _fixture_text() -> list[str]:
    """Chinese prompts from the real toy files plus English clinical sentences."""
    lines = list(ENGLISH_LINES) * 20
    with open(PROMPTCBLUE / "toy" / "train.json", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            lines.append(record["input"])
            lines.append(record["target"])
    return lines


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A folder holding a 2,000-piece sentencepiece `tokenizer.model` trained on fixture text."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("tokenizer")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_fixture_text()),
        model_writer=model,
        vocab_size=2000,
        model_type="bpe",
        character_coverage=0.9995,
        byte_fallback=True,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return folder


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    """A LlamaTokenizer loaded from the trained sentencepiece model (no chat template)."""
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(str(tokenizer_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token
    return tok


def make_tiny_model(vocab_size: int = 1000, seed: int = 0):
    """A seeded two-layer Llama with hidden size 64, in float32 and eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_model():
    """A fresh tiny Llama; every call with the same seed gives identical weights."""
    return make_tiny_model()
