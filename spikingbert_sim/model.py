"""The spiking BERT (SpikingBERT architecture, SPEC §3), read top-down from parts to the whole.

Every spiking layer ("site") is written once, as the operation that turns its inputs' activity
into an input current, followed by a call ``fire(site_name, current) -> activity``. What
``fire`` does decides what the network computes:

* the reference engine passes one time step of spikes (B, L, D) and fires snnTorch neurons;
* the fast engine passes all T steps at once (T, B, L, D) and scans the neuron over T — exact,
  because the network is feed-forward inside a time step;
* the equilibrium trainer passes average spiking rates and fires ``clip(I / V_th, 0, 1)``, the
  steady-state function of SPEC §5.

So the three cannot drift apart: there is one definition of the network.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SpikingBertConfig
from .quantization import QuantLinear

Fire = Callable[[str, Tensor], Tensor]
"""``fire(site, current) -> activity``: the neuron model applied at one spiking site."""
Observe = Callable[[str, Tensor], None]
"""``observe(name, tensor)``: sees intermediate real values (attention scores) without changing them."""

LAYER_SITES = ("key", "value", "attention", "attention_output", "intermediate", "output")
"""Spiking sites of one encoder layer, in the order they fire within a time step."""
INPUT_SITE = "embeddings"


def attention_mask_bias(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, L) 1/0 mask -> (B, 1, 1, L) additive bias: 0 for tokens, a large negative for padding."""
    bias = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
    return bias


def token_mean(x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Mean over the valid tokens: (..., B, L, D) -> (..., B, D); ``attention_mask`` (B, L), 1 for a
    token and 0 for padding (None: every position is a token)."""
    if attention_mask is None:
        return x.mean(-2)
    weights = attention_mask.to(x.dtype)
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1.0)  # (B, L)
    return (x * weights[..., None]).sum(-2)


class SpikingBertEmbeddings(nn.Module):
    """Word + position + token-type embeddings and LayerNorm (BERT's, same parameter names).

    Computed once per input; the result is the constant current of the input spiking layer.
    """

    def __init__(self, config: SpikingBertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        B, L = input_ids.shape
        positions = torch.arange(L, device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(positions)[None]  # (B, L, D)
        return self.LayerNorm(x)


class SpikingEncoderLayer(nn.Module):
    """One spiking encoder layer (SPEC §3). ``in`` is the previous layer's activity.

    K = spikes(W_k·in + b), V = spikes(W_v·in + b), Q = W_q·in + b (real valued);
    attention = spikes(softmax(Q·Kᵀ/√d_head + mask)·V), per head;
    attention_output = spikes(LayerNorm(W_o·attention + b + in));
    intermediate = spikes(GELU(W_i·attention_output + b));
    output = spikes(LayerNorm(W_2·intermediate + b + attention_output)).

    Works on any leading dimensions: (B, L, D) for one step, (T, B, L, D) for all steps.
    """

    def __init__(self, config: SpikingBertConfig, index: int) -> None:
        super().__init__()
        D, I, mode, eps = config.hidden_size, config.intermediate_size, config.weight_mode, config.quant_eps
        self.prefix = f"layer.{index}"
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.query = QuantLinear(D, D, mode=mode, eps=eps)
        self.key = QuantLinear(D, D, mode=mode, eps=eps)
        self.value = QuantLinear(D, D, mode=mode, eps=eps)
        self.attention_output = QuantLinear(D, D, mode=mode, eps=eps)
        self.attention_norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.intermediate = QuantLinear(D, I, mode=mode, eps=eps)
        self.output = QuantLinear(I, D, mode=mode, eps=eps)
        self.output_norm = nn.LayerNorm(D, eps=config.layer_norm_eps)

    def site(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def _heads(self, x: Tensor) -> Tensor:
        *lead, L, _ = x.shape
        return x.reshape(*lead, L, self.num_heads, self.head_dim).transpose(-3, -2)  # (*, H, L, dh)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask_bias: Tensor | None, observe: Observe | None = None) -> Tensor:
        """Scaled dot-product attention of real Q over spiking K and V, per head: (*, L, D) -> (*, L, D)."""
        k_t = self._heads(k).transpose(-1, -2)  # (*, H, dh, L)
        ctx = self.attend_heads(self._heads(q), k_t, self._heads(v), mask_bias, observe)  # (*, H, L, dh)
        return ctx.transpose(-3, -2).flatten(-2)  # (*, L, D)

    def attend_heads(self, q: Tensor, k_t: Tensor, v: Tensor, mask_bias: Tensor | None,
                     observe: Observe | None = None) -> Tensor:
        """:meth:`attend` on operands already split into heads: Q (*, H, L, dh), Kᵀ (*, H, dh, L),
        V (*, H, L, dh) -> the context (*, H, L, dh). (The multi-step engine hands it contiguous
        per-head tensors, so the products need no re-layout copies; same results.)"""
        scores = q @ k_t  # (*, H, L, L)
        # in place where no gradient is taken (inference): the same rounding, no second tensor
        inplace = not scores.requires_grad
        scale = math.sqrt(self.head_dim)
        scores = scores.div_(scale) if inplace else scores / scale
        if observe is not None:
            observe(self.site("attention_scores"), scores)
        if mask_bias is not None:  # None: no padding (adding zeros would change nothing)
            # (B, 1, 1, L) broadcasts; not in place once an observer holds the scores
            scores = scores.add_(mask_bias) if inplace and observe is None else scores + mask_bias
        probs = torch.softmax(scores, dim=-1)
        return probs @ v  # (*, H, L, dh)

    def forward(self, x: Tensor, fire: Fire, mask_bias: Tensor, observe: Observe | None = None) -> Tensor:
        k = fire(self.site("key"), self.key(x))
        v = fire(self.site("value"), self.value(x))
        q = self.query(x)  # real valued: no neurons on Q
        a = fire(self.site("attention"), self.attend(q, k, v, mask_bias, observe))
        so = fire(self.site("attention_output"), self.attention_norm(self.attention_output(a) + x))
        h = fire(self.site("intermediate"), F.gelu(self.intermediate(so)))
        return fire(self.site("output"), self.output_norm(self.output(h) + so))


@dataclass
class SequenceClassifierOutput:
    """What :meth:`SpikingBertForSequenceClassification.forward` returns."""

    logits: Tensor  # (B, num_labels)
    loss: Tensor | None = None
    result: object | None = None  # the full simulation.SimulationResult


class SpikingBertForSequenceClassification(nn.Module):
    """Input spiking layer, N spiking encoder layers, and a linear head on the final [CLS] ASR
    (or, with ``config.readout = "mean"``, on the final ASR averaged over the valid tokens).

    With ``config.feedback`` the input layer also receives ``W_fb · (last layer's output)`` from
    the previous time step, which makes the equilibrium a true fixed point (SPEC §5).
    """

    def __init__(self, config: SpikingBertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = SpikingBertEmbeddings(config)
        self.layers = nn.ModuleList(SpikingEncoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.feedback = nn.Linear(config.hidden_size, config.hidden_size) if config.feedback else None
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # BERT's initialisation (normal, std 0.02); the feedback starts small so that the
        # feedback map is contractive.
        if isinstance(module, (nn.Linear, QuantLinear)):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        if module is self.feedback:
            nn.init.normal_(module.weight, std=0.002)

    # --- structure -------------------------------------------------------------------------

    def site_names(self) -> list[str]:
        """Every spiking site in firing order: ``embeddings``, ``layer.0.key``, ..., ``layer.{N-1}.output``."""
        return [INPUT_SITE] + [layer.site(s) for layer in self.layers for s in LAYER_SITES]

    def layer_output_sites(self) -> list[str]:
        """The sites whose ASR is a layer's hidden state: ``embeddings`` and each ``layer.i.output``."""
        return [INPUT_SITE] + [layer.site("output") for layer in self.layers]

    def site_width(self, site: str) -> int:
        return self.config.intermediate_size if site.endswith(".intermediate") else self.config.hidden_size

    @property
    def output_site(self) -> str:
        return self.layers[-1].site("output")

    # --- the three building blocks every engine composes ----------------------------------------

    def input_current(self, embedded: Tensor, last_output: Tensor | None = None) -> Tensor:
        """Current into the input spiking layer: the embeddings, plus feedback if configured."""
        if self.feedback is None or last_output is None:
            return embedded
        return embedded + self.feedback(last_output)

    def encode(self, current: Tensor, fire: Fire, mask_bias: Tensor, observe: Observe | None = None) -> Tensor:
        """Fire the input layer on ``current`` and run every encoder layer; returns the last activity."""
        x = fire(INPUT_SITE, current)
        for layer in self.layers:
            x = layer(x, fire, mask_bias, observe)
        return x

    def pool(self, final: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """What the head reads of the final layer's activity (ASRs or spikes, it is linear):
        (..., B, L, D) -> (..., B, D). ``config.readout`` ``cls``: the [CLS] position; ``mean``: the
        mean over valid tokens (``attention_mask`` (B, L), 1 for a token and 0 for padding; None:
        every position is a token)."""
        if self.config.readout == "cls":
            return final[..., 0, :]
        return token_mean(final, attention_mask)

    def readout(self, final_asr: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The head on the final layer's activity (:meth:`pool`): (..., B, L, D) -> (..., B, num_labels)."""
        return self.classifier(self.pool(final_asr, attention_mask))

    # --- conveniences ---------------------------------------------------------------------

    def freeze_quantized(self) -> "SpikingBertForSequenceClassification":
        """Drop latent weights of quantized layers, keeping int8 values and scales (inference)."""
        for module in self.modules():
            if isinstance(module, QuantLinear):
                module.freeze()
        return self

    def thaw_quantized(self, mode: str | None = None) -> "SpikingBertForSequenceClassification":
        """Give every frozen (packed) quantized layer a latent weight again (:meth:`QuantLinear.thaw`,
        switching it to ``mode`` if given), to train or average a packed checkpoint."""
        for module in self.modules():
            if isinstance(module, QuantLinear) and module.frozen:
                module.thaw(mode)
        return self

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, labels: Tensor | None = None,
                timesteps: int = 80, engine: str = "fast") -> SequenceClassifierOutput:
        """Simulate ``timesteps`` steps (no gradients) and classify; see :func:`simulation.simulate`."""
        from .simulation import simulate

        result = simulate(self, input_ids, attention_mask, token_type_ids, timesteps=timesteps, engine=engine)
        loss = None
        if labels is not None:
            if self.config.is_regression:
                loss = F.mse_loss(result.logits.squeeze(-1), labels.to(result.logits.dtype))
            else:
                loss = F.cross_entropy(result.logits, labels)
        return SequenceClassifierOutput(logits=result.logits, loss=loss, result=result)

    def save_pretrained(self, path, **meta) -> None:
        """Write a checkpoint file (see :mod:`spikingbert_sim.checkpoint`)."""
        from .checkpoint import save_checkpoint

        save_checkpoint(self, path, meta=meta)

    @classmethod
    def from_pretrained(cls, path, map_location="cpu") -> "SpikingBertForSequenceClassification":
        from .checkpoint import load_checkpoint

        return load_checkpoint(path, map_location=map_location).model
