"""SPEC §4: 1-bit and 1.58-bit quantizers, straight-through gradients, QuantLinear, packing."""

import math

import pytest
import torch
import torch.nn.functional as F

from spikingbert_sim.errors import ConfigError
from spikingbert_sim.quantization import (QuantLinear, binarize, pack, quantize, row_stable_linear, ste_quantize,
                                          ternarize, unpack)

F64 = torch.float64
W = torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.0, -0.125]], dtype=F64)
# mean(W) = 1.625 / 6; mean|W| = 3.875 / 6


def test_binarize_hand_computed():
    values, scale = binarize(W)
    alpha = 1.625 / 6  # values are sign(W − α): 0.5, 2.0 above; the rest below
    assert values.tolist() == [[1, -1, -1], [1, -1, -1]]
    assert float(scale) == pytest.approx(3.875 / 6)
    assert float(W.mean()) == pytest.approx(alpha)


def test_binarize_sign_of_zero_is_plus_one():
    # W − mean(W) = [-1, 1, 0, 0]: the two weights equal to the mean become +1
    values, scale = binarize(torch.tensor([[1.0, 3.0], [2.0, 2.0]]))
    assert values.tolist() == [[-1, 1], [1, 1]]
    assert float(scale) == 2.0
    assert set(binarize(torch.zeros(3, 3))[0].unique().tolist()) == {1.0}


def test_ternarize_hand_computed():
    values, scale = ternarize(W, eps=1e-5)
    gamma = 3.875 / 6
    # W / γ = [0.774, -1.548, 0.387, 3.097, 0, -0.194] -> round -> [1, -2, 0, 3, 0, -0] -> clip
    assert values.tolist() == [[1, -1, 0], [1, 0, 0]]
    assert float(scale) == pytest.approx(gamma)
    # RoundClip divides by γ + ε, not γ: with a large ε the same weights round differently
    big_eps = ternarize(W, eps=1.0)[0]
    assert big_eps.tolist() == [[0, -1, 0], [1, 0, 0]]


def test_value_sets_on_random_weights():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    b, beta = binarize(w)
    t, gamma = ternarize(w)
    assert set(b.unique().tolist()) == {-1.0, 1.0}
    assert set(t.unique().tolist()) == {-1.0, 0.0, 1.0}
    assert float(beta) == pytest.approx(float(w.abs().mean()))
    assert float(gamma) == pytest.approx(float(w.abs().mean()))
    # about half of a centred Gaussian's weights fall inside |w| < γ/2 and become 0
    assert 0.2 < float((t == 0).float().mean()) < 0.5


def test_quantize_dispatch_and_unknown_mode():
    assert torch.equal(quantize(W, "binary")[0], binarize(W)[0])
    assert torch.equal(quantize(W, "ternary")[0], ternarize(W)[0])
    v, s = quantize(W, "fp")
    assert v is W and float(s) == 1.0
    with pytest.raises(ConfigError, match="int4"):
        quantize(W, "int4")


@pytest.mark.parametrize("mode", ["binary", "ternary"])
def test_ste_gradient_equals_gradient_wrt_quantized_weight(mode):
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(5, 7, generator=g, dtype=F64, requires_grad=True)
    x = torch.randn(3, 7, generator=g, dtype=F64)
    upstream = torch.randn(3, 5, generator=g, dtype=F64)
    w_eff = ste_quantize(latent, mode)
    values, scale = quantize(latent.detach(), mode)
    assert torch.allclose(w_eff.detach(), values * scale, rtol=0, atol=1e-15)  # forward: dequantized weight
    (F.linear(x, w_eff) * upstream).sum().backward()
    # explicit formula: y = x W_qᵀ, so dL/dW_q = upstreamᵀ x; the STE passes it to W unchanged
    assert torch.allclose(latent.grad, upstream.T @ x, rtol=0, atol=1e-12)
    # ... and the same as autograd with respect to the quantized weight used as a leaf
    wq = (values * scale).requires_grad_(True)
    (F.linear(x, wq) * upstream).sum().backward()
    assert torch.allclose(latent.grad, wq.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["binary", "ternary"])
def test_quantlinear_training_forward_gives_ste_gradients(mode):
    torch.manual_seed(0)
    layer = QuantLinear(7, 5, mode=mode).double()
    x = torch.randn(4, 7, dtype=F64)
    upstream = torch.randn(4, 5, dtype=F64)
    (layer(x) * upstream).sum().backward()
    assert torch.allclose(layer.weight.grad, upstream.T @ x, atol=1e-12)
    assert torch.allclose(layer.bias.grad, upstream.sum(0), atol=1e-12)


@pytest.mark.parametrize("mode", ["fp", "binary", "ternary"])
def test_quantlinear_forward_equals_dense_linear_with_dequantized_weight(mode):
    torch.manual_seed(0)
    layer = QuantLinear(9, 6, mode=mode).double()
    x = torch.randn(2, 3, 9, dtype=F64)
    values, scale = quantize(layer.weight.detach(), mode)
    want = F.linear(x, values * scale, layer.bias.detach())
    with torch.no_grad():
        got = layer(x)
    assert got.shape == (2, 3, 6)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    if mode != "fp":  # and differs from the full-precision layer
        assert not torch.allclose(got, F.linear(x, layer.weight.detach(), layer.bias.detach()), atol=1e-3)
    assert torch.allclose(layer.effective_weight().detach(), values * scale)


@pytest.mark.parametrize("mode", ["binary", "ternary"])
def test_freeze_keeps_int8_values_and_scale_with_identical_outputs(mode):
    torch.manual_seed(0)
    layer = QuantLinear(10, 4, mode=mode)
    spikes = (torch.rand(3, 10) > 0.5).float()
    with torch.no_grad():
        before = layer(spikes)
    values, scale = layer.quantized()
    layer.freeze()
    assert layer.frozen
    assert "weight" not in dict(layer.named_parameters())
    assert layer.qweight.dtype == torch.int8 and layer.qweight.shape == (4, 10)
    assert torch.equal(layer.qweight.float(), values)
    assert float(layer.scale) == float(scale)
    with torch.no_grad():
        after = layer(spikes)
    assert torch.equal(before, after)
    assert set(layer.state_dict()) == {"bias", "qweight", "scale"}


@pytest.mark.parametrize("mode", ["binary", "ternary"])
def test_thaw_gives_a_latent_weight_that_quantizes_back_to_the_frozen_layer(mode):
    torch.manual_seed(1)
    layer = QuantLinear(40, 12, mode=mode)
    with torch.no_grad():
        layer.weight.add_(0.05)  # a non-zero mean, so that binary's centring matters
    layer.freeze()
    values, scale = layer.qweight.float().clone(), layer.scale.clone()
    spikes = (torch.rand(5, 40) > 0.5).float()
    with torch.no_grad():
        before = layer(spikes)
    layer.thaw()
    assert not layer.frozen and layer.mode == mode and layer.weight.requires_grad
    assert set(layer.state_dict()) == {"bias", "weight"}
    got_values, got_scale = quantize(layer.weight.detach(), mode)
    assert torch.equal(got_values, values)
    assert torch.allclose(got_scale, scale, rtol=1e-6, atol=0)
    if mode == "ternary":  # mean|W| must stay γ: the plain dequantized matrix would shrink it to γ·p
        assert 0 < float(values.ne(0).float().mean()) < 1
        assert not torch.allclose(quantize(values * scale, mode)[1], scale, rtol=1e-3)
    with torch.no_grad():
        assert torch.allclose(layer(spikes), before, rtol=1e-6, atol=1e-6)
    layer.freeze()
    layer.thaw("fp")  # another mode: the dequantized matrix, the function the frozen layer computed
    assert layer.mode == "fp" and torch.allclose(layer.weight.detach(), values * scale)
    with pytest.raises(ConfigError, match="weight mode"):
        QuantLinear(3, 3, mode=mode).thaw("int2")


def test_freeze_is_a_no_op_in_fp_mode():
    layer = QuantLinear(4, 3, mode="fp")
    layer.freeze()
    assert not layer.frozen and isinstance(layer.weight, torch.nn.Parameter)


def test_quantlinear_rejects_unknown_mode():
    with pytest.raises(ConfigError, match="weight mode"):
        QuantLinear(3, 3, mode="int2")


def test_row_stable_linear_rows_do_not_depend_on_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 33, generator=g)
    w = torch.randn(29, 33, generator=g)
    b = torch.randn(29, generator=g)
    full = row_stable_linear(x, w, b)
    assert torch.allclose(full, F.linear(x, w, b), atol=1e-5)
    for rows in (1, 5, 13):
        assert torch.equal(row_stable_linear(x[:rows], w, b), full[:rows])


# --- packing --------------------------------------------------------------------------------------

def test_pack_binary_bit_layout():
    # bit i of the byte is element i (little-endian within a byte); +1 -> 1
    values = torch.tensor([1, -1, 1, 1, -1, -1, -1, 1])
    assert pack(values, "binary").tolist() == [1 + 4 + 8 + 128]


def test_pack_ternary_code_layout():
    # code = value + 1 in 2 bits, element i at bits 2i
    values = torch.tensor([-1, 0, 1, 1, 0])
    assert pack(values, "ternary").tolist() == [0 + (1 << 2) + (2 << 4) + (2 << 6), 1]


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 9), (2, 3, 5), (16, 8)])
@pytest.mark.parametrize("mode", ["binary", "ternary"])
def test_pack_unpack_round_trip_and_size(mode, shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    values, _ = quantize(w, mode)
    packed = pack(values, mode)
    bits = 1 if mode == "binary" else 2
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(math.prod(shape) * bits / 8)
    out = unpack(packed, mode, shape)
    assert out.dtype == torch.int8 and out.shape == shape
    assert torch.equal(out.to(values.dtype), values)


def test_pack_rejects_values_outside_the_set():
    with pytest.raises(ValueError, match="binary"):
        pack(torch.tensor([1, 0, -1]), "binary")
    with pytest.raises(ValueError, match="ternary"):
        pack(torch.tensor([1, 2, -1]), "ternary")


def test_unpack_rejects_wrong_size_and_invalid_code():
    packed = pack(torch.tensor([1, -1, 1]), "binary")
    with pytest.raises(ValueError, match="does not hold"):
        unpack(packed, "binary", (3, 3))  # 9 weights need 2 bytes
    with pytest.raises(ValueError, match="invalid 2-bit code"):
        unpack(torch.tensor([0b11], dtype=torch.uint8), "ternary", (1,))
