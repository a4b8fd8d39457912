"""Checkpoint files: config, weights (packed where quantized), format and package versions.

A checkpoint is one file written with ``torch.save`` and read with ``torch.load(weights_only=True)``
(no pickled code is ever executed). Its top level is a plain dict::

    {"format": "spikingbert_sim.checkpoint", "format_version": 1, "package_version": "0.1.0",
     "config": {...SpikingBertConfig fields...},
     "state": {name: tensor},                       # everything not packed
     "packed": {name: {"mode": "binary" | "ternary", "shape": [out, in], "data": uint8 tensor}},
     "meta": {...}}                                 # free-form: producing command, tokenizer, metrics

Quantized weights are stored as their int8 {±1} / {-1, 0, 1} values packed at 1 or 2 bits per
weight plus one scale per matrix; a checkpoint with packed weights loads as a frozen (inference)
model. Writes go to a temporary file in the same folder and are renamed into place, so an
interrupted save never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import SpikingBertConfig
from .errors import CheckpointError, ConfigError
from .fileio import atomic_path
from .model import SpikingBertForSequenceClassification
from .quantization import BITS, QuantLinear, pack, unpack

FORMAT_NAME = "spikingbert_sim.checkpoint"
FORMAT_VERSION = 1


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it into place."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def safe_torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into a one-line CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such file: {path}")
    if not path.is_file():
        raise CheckpointError(f"not a file: {path}")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise before the error
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses any pickle that would import or call code. Its message is a page of
        # advice; keep only the reason (after "WeightsUnpickler error:"), without ANSI escapes.
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
        reason = text.split("WeightsUnpickler error:", 1)[-1]
        lines = [line.strip() for line in reason.splitlines() if line.strip()]
        first = lines[0] if lines else type(exc).__name__
        raise CheckpointError(f"{path} was refused: it is not a plain-tensor checkpoint ({first[:160]})") from None
    except Exception as exc:  # noqa: BLE001 - any other failure of a weights-only load is a corrupt file
        # (seen: RuntimeError, EOFError, OSError, KeyError, IndexError from truncated or random bytes)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt: {first[:160]})") from None


@dataclass
class LoadedCheckpoint:
    model: SpikingBertForSequenceClassification
    meta: dict[str, Any] = field(default_factory=dict)
    package_version: str = ""
    path: str = ""


WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"


def checkpoint_dict(model: SpikingBertForSequenceClassification, meta: dict[str, Any] | None = None,
                    packed: bool = True, half_embeddings: bool = True, half_weights: bool = False) -> dict[str, Any]:
    """The checkpoint as a dict (what :func:`save_checkpoint` writes).

    ``half_embeddings`` stores the word-embedding table (vocab × hidden, most of a packed model's
    bytes) in float16; ``half_weights`` stores every floating-point matrix (full-precision linear
    weights, embedding tables) in float16. Both load back as float32: the stored model is the one
    that is evaluated.
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if half_embeddings:
        state[WORD_EMBEDDINGS] = state[WORD_EMBEDDINGS].to(torch.float16)
    if half_weights:
        state = {k: v.to(torch.float16) if v.is_floating_point() and v.dim() >= 2 else v for k, v in state.items()}
    packed_weights: dict[str, dict[str, Any]] = {}
    if packed and model.config.weight_mode != "fp":
        for name, module in model.named_modules():
            if isinstance(module, QuantLinear) and module.mode != "fp":
                values, scale = module.quantized()
                state.pop(f"{name}.weight", None)
                state.pop(f"{name}.qweight", None)
                state[f"{name}.scale"] = scale.detach().cpu().float().clone()
                packed_weights[f"{name}.qweight"] = {
                    "mode": module.mode, "shape": list(values.shape), "data": pack(values.cpu(), module.mode)}
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "config": model.config.to_dict(),
        "state": state,
        "packed": packed_weights,
        "meta": dict(meta or {}),
    }


def save_checkpoint(model: SpikingBertForSequenceClassification, path: str | os.PathLike,
                    meta: dict[str, Any] | None = None, packed: bool = True, half_embeddings: bool = True,
                    half_weights: bool = False) -> Path:
    """Write ``model`` to ``path`` atomically. Quantized weights are packed unless ``packed=False``
    (which keeps the latent full-precision weights, e.g. to continue training); the word
    embeddings are stored in float16 unless ``half_embeddings=False``, every floating-point
    matrix with ``half_weights``."""
    atomic_torch_save(checkpoint_dict(model, meta, packed, half_embeddings, half_weights), path)
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; every problem is a CheckpointError."""
    obj = safe_torch_load(path, map_location)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a spikingbert_sim checkpoint")
    version = obj.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise CheckpointError(
            f"{path} has checkpoint format version {version!r} (written by spikingbert_sim "
            f"{obj.get('package_version', '?')}); this spikingbert_sim {__version__} reads version {FORMAT_VERSION}")
    try:
        config = SpikingBertConfig.from_dict(obj.get("config"))
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{path} holds an invalid config: {exc}") from None
    for key in ("state", "packed", "meta"):
        if not isinstance(obj.get(key) or {}, dict):
            raise CheckpointError(f"{path} has a malformed {key!r} entry (expected a mapping)")
    state = dict(obj.get("state") or {})
    packed = obj.get("packed") or {}
    model = SpikingBertForSequenceClassification(config)
    try:
        for name, entry in packed.items():
            mode, shape, data = entry["mode"], tuple(entry["shape"]), entry["data"]
            if mode not in BITS:
                raise ValueError(f"unknown packing mode {mode!r}")
            module = model.get_submodule(name.rsplit(".", 1)[0])
            if not isinstance(module, QuantLinear):
                raise ValueError(f"{name} is not a quantized layer")
            module.freeze()
            state[name] = unpack(data, mode, shape)
        # float16-stored matrices (half_embeddings / half_weights) load as the model's float32
        state = {k: v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.float16 else v
                 for k, v in state.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(f"{path} has weights that do not fit its config: {str(exc).splitlines()[0][:200]}") from None
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{'...' if len(unexpected) > 3 else ''}")
        raise CheckpointError(f"{path} has weights that do not fit its config: {'; '.join(parts)}")
    model.eval()
    return LoadedCheckpoint(model=model, meta=dict(obj.get("meta") or {}),
                            package_version=str(obj.get("package_version", "")), path=str(path))


# Meta entries that describe one training run's point (its step, stage, scores, producing command): an
# average of several checkpoints, or a widened copy, is none of them, so they are not carried over to it.
_RUN_POINT_META = ("step", "stage", "dev_metrics", "command", "exported_from", "export_command",
                   "averaged_from", "average_weights", "quantized_disagreement", "widened_from")


def derived_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's meta for a model derived from it (an average, a widened copy): the task,
    tokenizer and lineage, without the entries that describe the source's run point."""
    return {k: v for k, v in meta.items() if k not in _RUN_POINT_META}


def _quantized_values(model: SpikingBertForSequenceClassification) -> dict[str, torch.Tensor]:
    """The int8 {±1} / {-1, 0, 1} values of every binary/ternary layer, by module name."""
    return {name: module.quantized()[0].to(torch.int8) for name, module in model.named_modules()
            if isinstance(module, QuantLinear) and module.mode != "fp"}


def average_checkpoints(paths: list[str | os.PathLike], weights: list[float] | None = None,
                        ) -> tuple[SpikingBertForSequenceClassification, dict[str, Any]]:
    """The weighted mean of the weights of several checkpoints of one model: a "model soup"
    (Wortsman et al. 2022), or the checkpoint averaging of machine translation.

    Every floating-point tensor is averaged, in float64, and stored in float32; binary and ternary
    layers are averaged in their latent full-precision weights, which are then quantized as usual
    (mean |W| of the average). A packed checkpoint (a ``best.pt`` or an export) contributes the latent
    weights :meth:`QuantLinear.thaw` gives it, which quantize back to its packed values. All the
    checkpoints must have the same config and tokenizer, and equal non-float tensors. Members that
    started from one parent (siblings of one schedule, or points along one run) average well; models
    trained apart do not. ``weights`` (default: all equal) need not sum to 1.

    Returns the averaged model (latent weights, trainable, in eval mode) and its meta: the first
    checkpoint's, without its run-point entries, with ``averaged_from``, ``average_weights`` and
    ``quantized_disagreement`` (per member, the fraction of the average's binary/ternary values
    that differ from the member's own; None for a full-precision model). Loads each checkpoint
    once, one at a time (keeping only its int8 quantized values); every problem is a
    CheckpointError or ConfigError.
    """
    paths = [str(p) for p in paths]
    if len(paths) < 2:
        raise ConfigError(f"averaging needs at least two checkpoints, got {len(paths)}")
    if len(set(os.path.realpath(p) for p in paths)) < len(paths):
        raise ConfigError("a checkpoint is given twice; weight it with --weight instead")
    weights = [1.0] * len(paths) if weights is None else [float(w) for w in weights]
    if len(weights) != len(paths):
        raise ConfigError(f"{len(weights)} weights for {len(paths)} checkpoints")
    if any(not (w >= 0 and w < float("inf")) for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"weights must be finite, non-negative and not all zero, got {weights}")
    first: LoadedCheckpoint | None = None
    sums: dict[str, torch.Tensor] = {}
    member_values: list[dict[str, torch.Tensor]] = []
    for path, weight in zip(paths, weights):
        ckpt = load_checkpoint(path)
        state = ckpt.model.thaw_quantized().state_dict()
        member_values.append(_quantized_values(ckpt.model))
        if first is None:
            first = ckpt
            sums = {k: v.double() * weight if v.is_floating_point() else v.clone() for k, v in state.items()}
            continue
        config, other = first.model.config.to_dict(), ckpt.model.config.to_dict()
        changed = [k for k in sorted(set(config) | set(other)) if config.get(k) != other.get(k)]
        if changed:
            key = changed[0]
            raise CheckpointError(f"{path} is another model than {paths[0]}: config {key} is "
                                  f"{other.get(key)!r}, not {config.get(key)!r}")
        if ckpt.meta.get("tokenizer") != first.meta.get("tokenizer"):
            raise CheckpointError(f"{path} uses another tokenizer than {paths[0]}")
        for key, value in state.items():
            if value.is_floating_point():
                sums[key] += value.double() * weight
            elif not torch.equal(value, sums[key]):
                raise CheckpointError(f"{path} differs from {paths[0]} in {key}, which is not a float tensor "
                                      f"and cannot be averaged")
    total = sum(weights)
    model = first.model
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    model.load_state_dict({k: (v / total).to(dtypes[k]) if v.is_floating_point() else v for k, v in sums.items()})
    average_values = _quantized_values(model)
    total_values = sum(v.numel() for v in average_values.values())
    disagreement = None if not total_values else [
        sum(int(v.ne(values[k]).sum()) for k, v in average_values.items()) / total_values for values in member_values]
    meta = derived_meta(first.meta)
    meta.update(averaged_from=paths, average_weights=[w / total for w in weights], quantized_disagreement=disagreement)
    return model.eval(), meta
