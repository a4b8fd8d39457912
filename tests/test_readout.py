"""What the head reads (``config.readout``): the [CLS] ASR, or the ASR averaged over valid tokens,
the same in every engine and training path, unchanged by padding, kept by checkpoints and training."""

from __future__ import annotations

import pytest
import torch

from spikingbert_sim.checkpoint import load_checkpoint, save_checkpoint
from spikingbert_sim.config import SpikingBertConfig
from spikingbert_sim.energy import energy_report
from spikingbert_sim.equilibrium import bptt_forward, equilibrium_forward, steady_state_forward
from spikingbert_sim.errors import ConfigError
from spikingbert_sim.simulation import simulate


def _padded(seed=4, L=7, valid=4):
    """Three sequences, the second padded after ``valid`` tokens, and that sequence alone unpadded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (3, L), generator=g)
    mask = torch.ones_like(ids)
    mask[1, valid:] = 0
    ids[1, valid:] = 0
    return ids, mask, ids[1:2, :valid], mask[1:2, :valid]


def test_pool_reads_cls_or_the_mean_of_valid_tokens(make_model):
    asr = torch.rand(2, 5, 16, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    cls = make_model("fp").double()
    assert torch.equal(cls.pool(asr, mask), asr[:, 0])
    mean = make_model("fp", readout="mean").double()
    pooled = mean.pool(asr, mask)
    assert torch.allclose(pooled[0], asr[0].mean(0), rtol=0, atol=1e-15)
    assert torch.allclose(pooled[1], asr[1, :2].mean(0), rtol=0, atol=1e-15)  # padding left out
    assert torch.allclose(mean.pool(asr), asr.mean(-2), rtol=0, atol=1e-15)  # no mask: every position
    # leading time axis (a trace): (t, B, L, D) -> (t, B, D)
    trace = torch.rand(3, 2, 5, 16, dtype=torch.float64)
    assert torch.allclose(mean.pool(trace, mask)[2], mean.pool(trace[2], mask), rtol=0, atol=1e-15)
    logits = mean.readout(asr, mask)
    assert torch.allclose(logits, mean.classifier(pooled), rtol=0, atol=1e-15)


@pytest.mark.parametrize("mode", ["fp", "binary", "ternary"])
def test_a_mean_readout_ignores_padding_in_every_engine_and_training_path(make_model, mode):
    model = make_model(mode, readout="mean").double()
    ids, mask, alone, alone_mask = _padded()

    def agree(padded_logits, alone_logits):
        assert torch.allclose(padded_logits[1], alone_logits[0], rtol=0, atol=1e-10)

    for engine in ("fast", "reference"):
        agree(simulate(model, ids, mask, timesteps=12, engine=engine).logits,
              simulate(model, alone, alone_mask, timesteps=12, engine=engine).logits)
    agree(steady_state_forward(model, ids, mask).logits.detach(),
          steady_state_forward(model, alone, alone_mask).logits.detach())
    agree(equilibrium_forward(model, ids, mask, timesteps=12).logits.detach(),
          equilibrium_forward(model, alone, alone_mask, timesteps=12).logits.detach())
    agree(bptt_forward(model, ids, mask, timesteps=6).logits.detach(),
          bptt_forward(model, alone, alone_mask, timesteps=6).logits.detach())
    # the reading differs from [CLS]'s (the test would pass vacuously if the head ignored readout)
    cls = make_model(mode).double()
    assert not torch.allclose(simulate(cls, ids, mask, timesteps=12).logits,
                              simulate(model, ids, mask, timesteps=12).logits)
    # an unmasked mean would move with the padding
    unmasked = model.classifier(simulate(model, ids, mask, timesteps=12).asr[model.output_site][1].mean(0))
    assert not torch.allclose(unmasked, simulate(model, alone, alone_mask, timesteps=12).logits[0], atol=1e-6)


def test_readout_is_validated_kept_by_checkpoints_and_omitted_at_its_default(make_model, tmp_path):
    with pytest.raises(ConfigError, match="readout must be one of cls, mean"):
        SpikingBertConfig(readout="max")
    assert "readout" not in SpikingBertConfig().to_dict()  # files stay readable by older versions
    config = SpikingBertConfig(readout="mean")
    assert config.to_dict()["readout"] == "mean"
    assert SpikingBertConfig.from_json(config.to_json()).readout == "mean"
    model = make_model("ternary", readout="mean")
    save_checkpoint(model, tmp_path / "m.pt")
    loaded = load_checkpoint(tmp_path / "m.pt").model
    assert loaded.config.readout == "mean"
    ids, mask, _, _ = _padded()
    assert torch.equal(simulate(loaded, ids, mask, timesteps=8).logits, simulate(model, ids, mask, timesteps=8).logits)


def test_energy_counts_the_mean_readouts_pooling_adds(make_model):
    ids, mask, _, _ = _padded()
    reports = {}
    for readout in ("cls", "mean"):
        model = make_model("ternary", readout=readout)
        reports[readout] = energy_report(model, simulate(model, ids, mask, timesteps=8), num_sequences=3)
    cls_head, mean_head = reports["cls"].layers[-1], reports["mean"].layers[-1]
    assert cls_head.name == mean_head.name == "classifier"
    assert cls_head.accumulates == 0 and not cls_head.integer_acs
    tokens = int(mask.sum()) / 3
    assert mean_head.accumulates == pytest.approx(tokens * 16) and mean_head.integer_acs
    assert mean_head.energy_pj - cls_head.energy_pj == pytest.approx(tokens * 16 * 0.1)
