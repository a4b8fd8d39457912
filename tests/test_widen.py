"""Net2Net widening of the intermediate layers: the same spikes and logits for every weight mode,
noise that breaks the copies' symmetry, refusals, and the command line."""

from __future__ import annotations

import copy

import pytest
import torch
from click.testing import CliRunner

from spikingbert_sim.checkpoint import load_checkpoint, save_checkpoint
from spikingbert_sim.cli import main
from spikingbert_sim.equilibrium import steady_state_forward
from spikingbert_sim.errors import ConfigError
from spikingbert_sim.simulation import simulate
from spikingbert_sim.widen import widen_intermediate


@pytest.mark.parametrize("mode", ["fp", "binary", "ternary"])
@pytest.mark.parametrize("packed", [False, True])
def test_widening_keeps_every_spike_and_logit(make_model, batch, mode, packed):
    model = make_model(mode).double()
    if packed and mode != "fp":
        model.freeze_quantized()
    ids, mask = batch
    wide = widen_intermediate(model, 2 * model.config.intermediate_size).double()  # halving is exact
    assert wide.config.intermediate_size == 64 and wide.layers[0].intermediate.weight.shape == (64, 16)
    assert wide.layers[0].output.weight.shape == (16, 64)
    b = simulate(wide, ids, mask, timesteps=16)
    if packed and mode != "fp":  # the copy holds latent weights: compare with the thawed model, whose
        # float sums x·(v·s) may differ from the packed (x·v)·s in the last bit
        assert torch.allclose(simulate(model, ids, mask, timesteps=16).logits, b.logits, atol=0.2)
        model = copy.deepcopy(model).thaw_quantized()
    a = simulate(model, ids, mask, timesteps=16)
    assert torch.equal(a.logits, b.logits)
    for site in model.site_names():
        factor = 2 if site.endswith(".intermediate") else 1  # two copies fire where one did
        assert b.spike_counts[site] == factor * a.spike_counts[site], site
        if not site.endswith(".intermediate"):
            assert torch.equal(a.asr[site], b.asr[site]), site
    a_int = a.asr["layer.1.intermediate"]
    assert torch.equal(b.asr["layer.1.intermediate"], a_int.repeat(1, 1, 2))
    assert torch.allclose(steady_state_forward(model, ids, mask).logits,
                          steady_state_forward(wide, ids, mask).logits, rtol=0, atol=1e-12)
    three = widen_intermediate(model, 3 * model.config.intermediate_size).double()  # w / 3 rounds: nearly
    assert torch.allclose(steady_state_forward(model, ids, mask).logits,
                          steady_state_forward(three, ids, mask).logits, rtol=0, atol=1e-9)
    if mode != "fp":  # the quantized values repeat and the output layers' scale halves
        v, s = model.layers[1].output.quantized()
        wv, ws = wide.layers[1].output.quantized()
        assert torch.equal(wv, v.repeat(1, 2)) and torch.equal(ws, s / 2)


def test_noise_breaks_the_copies_symmetry_and_training_separates_them(make_model, batch):
    model = make_model("fp").double()
    ids, mask = batch
    same = widen_intermediate(model, 64)
    noisy = widen_intermediate(model, 64, noise=0.05, seed=1)
    w_same, w_noisy = same.layers[0].intermediate.weight, noisy.layers[0].intermediate.weight
    assert torch.equal(w_same[:32], w_same[32:])
    assert not torch.equal(w_noisy[:32], w_noisy[32:])
    relative = (w_noisy - w_same).std() / w_same.std()
    assert 0.03 < float(relative.detach()) < 0.07  # noise in standard deviations of the matrix
    assert torch.equal(widen_intermediate(model, 64, noise=0.05, seed=1).layers[0].intermediate.weight, w_noisy)
    # without noise, the copies get the same gradient: training cannot tell them apart
    same.double().train()
    steady_state_forward(same, ids, mask).logits.sum().backward()
    grad = same.layers[0].intermediate.weight.grad
    assert float(grad.abs().max()) > 1e-3
    assert torch.allclose(grad[:32], grad[32:], rtol=0, atol=1e-12 * float(grad.abs().max()))


def test_widening_refuses_sizes_that_are_not_multiples(make_model):
    model = make_model("ternary")
    for size in (16, 48, 0, True):
        with pytest.raises(ConfigError, match="multiple of the current 32"):
            widen_intermediate(model, size)
    with pytest.raises(ConfigError, match="noise must be >= 0"):
        widen_intermediate(model, 64, noise=-1.0)


def test_widen_command(make_model, tmp_path, batch):
    model = make_model("ternary")
    save_checkpoint(model, tmp_path / "m.pt", meta={"task": "sst2", "step": 12, "command": "spikesim train ..."})
    runner = CliRunner()
    result = runner.invoke(main, ["widen", "-c", str(tmp_path / "m.pt"), "--intermediate-size", "64",
                                  "-o", str(tmp_path / "w.pt")])
    assert result.exit_code == 0, result.output
    assert "32 -> 64 wide" in result.output
    loaded = load_checkpoint(tmp_path / "w.pt")
    assert loaded.model.config.intermediate_size == 64 and loaded.model.config.weight_mode == "ternary"
    assert loaded.meta["widened_from"] == str(tmp_path / "m.pt") and "step" not in loaded.meta
    assert loaded.meta["command"].startswith("spikesim widen")
    ids, mask = batch
    assert torch.allclose(simulate(loaded.model, ids, mask, timesteps=8).logits,
                          simulate(model, ids, mask, timesteps=8).logits, atol=1e-5)
    again = runner.invoke(main, ["widen", "-c", str(tmp_path / "m.pt"), "--intermediate-size", "64",
                                 "-o", str(tmp_path / "w.pt")])
    assert again.exit_code != 0 and "exists; pass --force" in again.output
    bad = runner.invoke(main, ["widen", "-c", str(tmp_path / "m.pt"), "--intermediate-size", "40",
                               "-o", str(tmp_path / "x.pt")])
    assert bad.exit_code != 0 and "multiple of the current 32" in bad.output
    assert "Traceback" not in bad.output and not (tmp_path / "x.pt").exists()
