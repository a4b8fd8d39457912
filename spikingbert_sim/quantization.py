r"""Extremely quantized linear layers (SPEC §4, Eqns 5 and 6) and their packed storage.

* 1-bit (``binary``):   :math:`\tilde W = \mathrm{sign}(W - \alpha)`, :math:`\alpha = \mathrm{mean}(W)`,
  output scaled by :math:`\beta = \mathrm{mean}(|W|)`; sign(0) is taken as +1 so that every weight
  is ±1.
* 1.58-bit (``ternary``): :math:`\tilde W = \mathrm{RoundClip}(W / (\gamma_w + \epsilon), -1, 1)`,
  :math:`\gamma_w = \mathrm{mean}(|W|)`, output scaled by :math:`\gamma_w`.

Training keeps full-precision latent weights and passes gradients straight through the quantizer
(:math:`\partial \tilde W_{eff} / \partial W = 1`). For inference a layer is *frozen*: only the
int8 {±1} / {-1, 0, 1} matrix and one scale remain, and checkpoints store that matrix packed at
1 bit (binary) or 2 bits (ternary) per weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import WEIGHT_MODES
from .errors import ConfigError


def binarize(weight: Tensor) -> tuple[Tensor, Tensor]:
    """1-bit quantizer (Eqn 5). Returns ``(values in {-1, +1}, scale β = mean|W|)``."""
    centred = weight - weight.mean()
    values = torch.where(centred >= 0, torch.ones_like(weight), -torch.ones_like(weight))
    return values, weight.abs().mean()


def ternarize(weight: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """1.58-bit absmean quantizer (Eqn 6). Returns ``(values in {-1, 0, 1}, scale γ_w = mean|W|)``."""
    scale = weight.abs().mean()
    values = torch.clamp(torch.round(weight / (scale + eps)), -1.0, 1.0)
    return values, scale


def quantize(weight: Tensor, mode: str, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Quantize by mode name; ``fp`` returns the weight itself with scale 1."""
    if mode == "binary":
        return binarize(weight)
    if mode == "ternary":
        return ternarize(weight, eps)
    if mode == "fp":
        return weight, weight.new_ones(())
    raise ConfigError(f"weight mode must be one of {', '.join(WEIGHT_MODES)}, got {mode!r}")


def ste_quantize(weight: Tensor, mode: str, eps: float = 1e-5) -> Tensor:
    """Dequantized weight ``values * scale`` whose gradient passes straight through to ``weight``."""
    if mode == "fp":
        return weight
    values, scale = quantize(weight, mode, eps)
    return weight + (values * scale - weight).detach()


class QuantLinear(nn.Module):
    """``nn.Linear`` whose weight is used full precision, 1-bit or 1.58-bit.

    Two states:

    * training (default): a latent full-precision ``weight`` parameter, quantized on every forward
      with a straight-through gradient;
    * frozen (:meth:`freeze`, or loaded from a packed checkpoint): ``qweight`` (int8, (out, in))
      and ``scale`` buffers only; ``forward`` computes ``(x @ qweightᵀ) · scale + bias``, the form a
      spike × {±1, 0} accumulator implements.

    In ``fp`` mode the layer is an ordinary linear layer and never freezes.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, mode: str = "fp",
                 eps: float = 1e-5) -> None:
        super().__init__()
        if mode not in WEIGHT_MODES:
            raise ConfigError(f"weight mode must be one of {', '.join(WEIGHT_MODES)}, got {mode!r}")
        self.in_features, self.out_features, self.mode, self.eps = in_features, out_features, mode, eps
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.frozen = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's initialisation.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"mode={self.mode}, frozen={self.frozen}")

    def quantized(self) -> tuple[Tensor, Tensor]:
        """``(values, scale)`` as used at inference (values exact small integers)."""
        if self.frozen:
            return self.qweight, self.scale
        with torch.no_grad():
            return quantize(self.weight, self.mode, self.eps)

    def effective_weight(self) -> Tensor:
        """The dequantized weight matrix this layer applies (differentiable when not frozen)."""
        if self.frozen:
            return self.qweight.to(self.scale.dtype) * self.scale
        return ste_quantize(self.weight, self.mode, self.eps)

    def freeze(self) -> None:
        """Replace the latent weight by its int8 values and one scale (inference only)."""
        if self.mode == "fp" or self.frozen:
            return
        values, scale = self.quantized()
        del self.weight
        self.register_buffer("qweight", values.to(torch.int8))
        self.register_buffer("scale", scale.detach().clone())
        self.frozen = True

    def thaw(self, mode: str | None = None) -> None:
        """Give a frozen layer a latent weight again, to continue training a packed checkpoint.

        The packed values and scale are all that is left, so the latent weight is built to quantize
        back to them: ``values · β`` for ``binary`` (centred sign and mean|W| unchanged), and
        ``values · γ / p`` for ``ternary``, with ``p`` the fraction of non-zero values, so that
        mean|W| is γ again and every non-zero value rounds back to ±1. With another ``mode``
        (e.g. ``fp``) the latent weight is the dequantized matrix ``values · scale`` itself, the
        function the frozen layer computed. The layer switches to ``mode`` (default: its own).
        """
        mode = self.mode if mode is None else mode
        if mode not in WEIGHT_MODES:
            raise ConfigError(f"weight mode must be one of {', '.join(WEIGHT_MODES)}, got {mode!r}")
        if not self.frozen:
            self.mode = mode
            return
        values, scale = self.qweight.to(self.scale.dtype), self.scale
        latent = values * scale
        if mode == "ternary" and self.mode == "ternary":
            nonzero = values.ne(0).to(latent.dtype).mean()
            if nonzero > 0:
                latent = latent / nonzero
        del self.qweight, self.scale
        self.weight = nn.Parameter(latent.detach().clone())
        self.frozen, self.mode = False, mode

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "fp":
            return row_stable_linear(x, self.weight, self.bias)
        if not self.frozen and torch.is_grad_enabled() and self.weight.requires_grad:
            # Training: straight-through gradient to the latent weight.
            return F.linear(x, ste_quantize(self.weight, self.mode, self.eps), self.bias)
        values, scale = self.quantized()
        # Inference: accumulate with the integer weights, then scale once. With spike inputs the
        # accumulation is exact (small integers), so its result does not depend on summation order.
        out = F.linear(x, values.to(x.dtype)) * scale.to(x.dtype)
        return out + self.bias if self.bias is not None else out


_CPU_ROW_BLOCK = 24


def row_stable_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` whose result for each row does not depend on how many rows are computed.

    CPU BLAS kernels (MKL here) compute a matrix product's last ``rows mod 4`` rows with another
    micro-kernel, whose floating-point summation order differs in the last bit. Padding the rows to
    a multiple of 24 (a multiple of the usual 4-, 6- and 8-row micro-kernels) makes one time step
    computed alone (reference engine) and all T steps computed at once (fast engine) round
    identically, so the two engines' spikes agree bit for bit. The padding costs < 24 rows.
    """
    if x.device.type != "cpu" or x.dim() < 2:
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    pad = (-rows) % _CPU_ROW_BLOCK
    if pad == 0:
        return F.linear(x, weight, bias)
    flat = torch.cat([x.reshape(rows, x.shape[-1]), x.new_zeros(pad, x.shape[-1])])
    return F.linear(flat, weight, bias)[:rows].reshape(*x.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------------------------
# Packed storage: 8 binary or 4 ternary weights per byte.
# ---------------------------------------------------------------------------------------------

BITS = {"binary": 1, "ternary": 2}


def pack(values: Tensor, mode: str) -> Tensor:
    """Pack {±1} (binary) or {-1, 0, 1} (ternary) values into a flat uint8 tensor.

    Binary: bit = 1 for +1, 8 weights a byte. Ternary: code = value + 1 in {0, 1, 2}, 4 weights a
    byte. Element i goes to bits ``(i % k) * bits`` of byte ``i // k`` (little-endian within a byte).
    """
    bits = BITS[mode]
    per_byte = 8 // bits
    flat = values.detach().reshape(-1).to(torch.int16)
    if mode == "binary":
        if not bool(((flat == 1) | (flat == -1)).all()):
            raise ValueError("binary packing needs values in {-1, +1}")
        codes = (flat > 0).to(torch.int16)
    else:
        if not bool(((flat >= -1) & (flat <= 1)).all()):
            raise ValueError("ternary packing needs values in {-1, 0, 1}")
        codes = flat + 1
    pad = (-codes.numel()) % per_byte
    codes = torch.cat([codes, codes.new_zeros(pad)]).view(-1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int16) * bits
    return (codes << shifts).sum(1).to(torch.uint8)


def unpack(packed: Tensor, mode: str, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """Inverse of :func:`pack`: int8 values of the given shape."""
    bits = BITS[mode]
    per_byte = 8 // bits
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != -(-numel // per_byte):
        raise ValueError(f"packed tensor does not hold {numel} {mode} weights")
    shifts = torch.arange(per_byte, dtype=torch.int16) * bits
    codes = (packed.to(torch.int16).unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    codes = codes.reshape(-1)[:numel]
    if mode == "binary":
        values = codes * 2 - 1
    else:
        if bool((codes > 2).any()):
            raise ValueError("packed ternary data holds an invalid 2-bit code (3)")
        values = codes - 1
    return values.to(torch.int8).reshape(tuple(shape))
