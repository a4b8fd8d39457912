"""Widening a trained spiking BERT's intermediate layers without changing what it computes (Net2Net).

Every encoder layer's intermediate (GELU-position) spiking layer of width I becomes ``k·I`` wide:
each neuron is copied ``k`` times (its incoming weights and bias repeated) and every copy's
outgoing weights are the original's divided by ``k``. Copies receive the same current and fire
the same spikes, so the layer's output current, and with it the whole network's spikes, ASRs and
logits, are unchanged (Chen, Goodfellow & Shlens 2016, "Net2Net"). The identity holds for the
quantized weight modes too: repeating rows keeps a matrix's mean |W| and the signs and
round-offs of every entry, and dividing every column by ``k`` divides mean |W| by ``k`` with them,
so the 1-bit and 1.58-bit values repeat and their scale divides by ``k``.

Copies that stay equal also stay equal under training (equal inputs, equal gradients): ``noise``
adds Gaussian noise of that many standard deviations of each widened matrix to its (latent)
weights, which breaks the tie at the cost of an approximate start. The wider network is trained
further from the returned model (e.g. ``spikesim train --init WIDE.pt``): more intermediate neurons
at the same hidden width, as the paper's students have (intermediate 3072).
"""

from __future__ import annotations

import torch

from .errors import ConfigError
from .model import SpikingBertForSequenceClassification


def widen_intermediate(model: SpikingBertForSequenceClassification, intermediate_size: int, *,
                       noise: float = 0.0, seed: int = 0) -> SpikingBertForSequenceClassification:
    """A copy of ``model`` whose intermediate layers are ``intermediate_size`` wide (a multiple of
    the current width), computing the same function when ``noise`` is 0 (see the module doc).

    Quantized layers of a packed (frozen) model are thawed first: the copy holds latent weights.
    Raises :class:`ConfigError` for a size that is not a multiple of the current one, or negative noise.
    """
    width = model.config.intermediate_size
    if isinstance(intermediate_size, bool) or not isinstance(intermediate_size, int) \
            or intermediate_size < width or intermediate_size % width:
        raise ConfigError(f"the new intermediate size must be a multiple of the current {width}, "
                          f"got {intermediate_size!r}")
    if not noise >= 0:
        raise ConfigError(f"noise must be >= 0, got {noise!r}")
    k = intermediate_size // width
    source = {name: value.detach().clone() for name, value in _latent_state(model).items()}
    wide = SpikingBertForSequenceClassification(model.config.replace(intermediate_size=intermediate_size))
    wide.to(model.embeddings.word_embeddings.weight.dtype)  # the source's precision
    g = torch.Generator().manual_seed(seed)

    def jitter(value: torch.Tensor) -> torch.Tensor:
        if not noise:
            return value
        std = float(value.double().std()) * noise
        return value + torch.randn(value.shape, generator=g, dtype=torch.float64).to(value.dtype) * std

    state = {}
    for name, value in source.items():
        layer_part = name.split(".")
        if len(layer_part) >= 4 and layer_part[0] == "layers" and layer_part[2] == "intermediate":
            value = value.repeat(k, 1) if layer_part[3] == "weight" else value.repeat(k)  # (k·I, D) / (k·I,)
            if layer_part[3] == "weight":
                value = jitter(value)
        elif len(layer_part) >= 4 and layer_part[0] == "layers" and layer_part[2] == "output" \
                and layer_part[3] == "weight":
            value = jitter(value.repeat(1, k) / k)  # (D, k·I)
        state[name] = value
    wide.load_state_dict(state)
    return wide.eval()


def _latent_state(model: SpikingBertForSequenceClassification) -> dict[str, torch.Tensor]:
    """The model's state with latent weights for every quantized layer (thawing a packed copy)."""
    from .quantization import QuantLinear

    if any(isinstance(m, QuantLinear) and m.frozen for m in model.modules()):
        import copy

        model = copy.deepcopy(model).thaw_quantized()
    return model.state_dict()
