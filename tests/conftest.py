"""Shared fixtures: a tiny seeded spiking model factory and a tiny Hugging Face BERT + tokenizer.

Everything is CPU-only and small (hidden 16-32, 2-3 layers) so that the suite runs in seconds.
Test modules add their own fixtures locally; keep this file minimal.
"""

from __future__ import annotations

import pytest
import torch

from spikingbert_sim.config import SpikingBertConfig
from spikingbert_sim.model import SpikingBertForSequenceClassification
from spikingbert_sim.quantization import QuantLinear

TINY_WORDS = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
              + "a an the film movie is was good bad great awful not very plot acting".split()
              + [f"w{i}" for i in range(20)])
"""A 40-word WordPiece vocabulary: special tokens first, as BERT's."""

TINY = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=32)


def build_model(weight_mode: str = "fp", seed: int = 0, scale: float = 2.0, **overrides
                ) -> SpikingBertForSequenceClassification:
    """A tiny spiking BERT with seeded weights large enough that every site spikes at ~10-35 %.

    BERT's std-0.02 initialisation leaves the key/value neurons of a tiny model silent, which would
    let most simulation tests pass vacuously; weights ~ N(0, scale² / fan_in) keep them active.
    Word embeddings are rounded to float16 (what checkpoints store), so save/load is exact.
    """
    torch.manual_seed(seed)
    config = SpikingBertConfig(**{**TINY, "weight_mode": weight_mode, **overrides})
    model = SpikingBertForSequenceClassification(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (QuantLinear, torch.nn.Linear)):
                fan_in = module.weight.shape[1]
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * scale / fan_in ** 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.1)
            elif isinstance(module, torch.nn.Embedding):
                module.weight.copy_(torch.randn(module.weight.shape, generator=g).half().float())
    return model.eval()


@pytest.fixture(scope="session")
def make_model():
    """Factory: ``make_model(weight_mode="fp", seed=0, scale=2.0, **config_overrides)``."""
    return build_model


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


needs_triton = pytest.mark.skipif(not _has_triton(), reason="needs triton (its CPU interpreter)")
"""Skip marker for the tests that run Triton kernels in its CPU interpreter."""


@pytest.fixture
def batch():
    """(3, 7) ids with the last sequence padded after 4 tokens, and its attention mask."""
    ids = torch.randint(5, 40, (3, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    ids[2, 4:] = 0
    return ids, mask


@pytest.fixture
def tiny_ids():
    """(2, 6) token ids, seeded, no special tokens needed by the model itself."""
    return torch.randint(5, TINY["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(1))


def build_tokenizer():
    import transformers

    vocab = {w: i for i, w in enumerate(TINY_WORDS)}
    return transformers.BertTokenizerFast(vocab=vocab, do_lower_case=True)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A lower-casing WordPiece tokenizer over :data:`TINY_WORDS`."""
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A saved ``BertForSequenceClassification`` (hidden 32, 3 layers, 4 heads, intermediate 64,
    3 labels) with its tokenizer: what ``--from-pretrained`` reads."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(TINY_WORDS), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=3)
    model = transformers.BertForSequenceClassification(config).eval()
    with torch.no_grad():  # distinct, non-trivial values so that a copy from the wrong place shows
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    path = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path
