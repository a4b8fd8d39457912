"""Operation counts and a 45 nm energy estimate of spiking inference (SPEC §8).

Counting rules, per sequence, over the valid (non-padding) tokens and all T steps:

* **Synaptic operations of spiking inputs are accumulates (AC).** A spike into a linear layer
  with ``out`` outputs costs ``out`` accumulates (only the non-zero weights for 1.58-bit); in
  attention a key spike adds one real query element per query token, a value spike one real
  probability per query token. Spike × {±1, 0} is an integer accumulate; spike × real weight a
  floating-point add.
* **Real inputs cost multiply-accumulates (MAC):** the classifier on the real-valued [CLS] ASR
  (a ``mean`` readout first sums the output spike counts over the tokens: integer adds),
  and the per-step rescaling of quantized layers' integer sums (one multiply per output neuron).
* **Normalized OPS** (the paper's measure): Σ over layers of (spikes per neuron of the layer's
  input over the T steps) × (the layer's operation count in the equivalent non-spiking network).
* The teacher is the non-spiking BERT of the same shape: one MAC per weight per token, and
  2·L²·D MACs for attention scores and context per layer.

Energies per operation at 45 nm (Horowitz 2014): fp32 MAC 4.6 pJ (3.7 mult + 0.9 add), fp32 add
0.9 pJ, int32 add 0.1 pJ. Element-wise work (LayerNorm, softmax, GELU, membrane updates) is left
out on both sides, as in the SNN literature.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .model import INPUT_SITE, SpikingBertForSequenceClassification
from .quantization import QuantLinear
from .simulation import SimulationResult


@dataclass(frozen=True)
class EnergyCosts:
    """Energy per operation in picojoules (45 nm CMOS, Horowitz 2014)."""

    mac_fp32: float = 4.6
    add_fp32: float = 0.9
    mult_fp32: float = 3.7
    add_int32: float = 0.1


@dataclass
class LayerEnergy:
    """Counts for one synaptic operation of the network (per sequence, averaged over the inputs)."""

    name: str  # e.g. layer.0.key (the projection) or layer.0.attention_scores
    input_site: str  # the spiking site feeding it
    input_spikes_per_neuron: float  # spikes per input neuron over the T steps
    accumulates: float  # AC count
    macs: float  # MAC count (real inputs, rescaling)
    integer_acs: bool  # whether the accumulates are integer (quantized weights)
    dense_ops: float  # MACs of the same operation in the non-spiking network
    normalized_ops: float  # input_spikes_per_neuron × dense_ops
    energy_pj: float  # energy of the spiking operation
    dense_energy_pj: float  # energy of the non-spiking operation


@dataclass
class EnergyReport:
    timesteps: int
    tokens_per_sequence: float  # mean valid tokens per sequence
    layers: list[LayerEnergy] = field(default_factory=list)
    spikes_per_neuron: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> dict[str, float]:
        acc = sum(l.accumulates for l in self.layers)
        macs = sum(l.macs for l in self.layers)
        dense = sum(l.dense_ops for l in self.layers)
        e = sum(l.energy_pj for l in self.layers)
        de = sum(l.dense_energy_pj for l in self.layers)
        return {"accumulates": acc, "macs": macs, "synaptic_ops": acc + macs,
                "normalized_ops": sum(l.normalized_ops for l in self.layers), "dense_ops": dense,
                "energy_pj": e, "dense_energy_pj": de, "energy_ratio_spiking_to_dense": e / de if de else float("nan")}

    def to_dict(self) -> dict:
        return {"timesteps": self.timesteps, "tokens_per_sequence": self.tokens_per_sequence,
                "total": self.total, "layers": [asdict(l) for l in self.layers],
                "spikes_per_neuron": self.spikes_per_neuron}


def _nonzero_fraction(layer: QuantLinear) -> float:
    values, _ = layer.quantized()
    return float((values != 0).float().mean()) if layer.mode != "fp" else 1.0


def energy_report(model: SpikingBertForSequenceClassification, result: SimulationResult, num_sequences: int,
                  costs: EnergyCosts = EnergyCosts()) -> EnergyReport:
    """Per-operation counts and energies for ``result`` (a simulation of ``num_sequences`` inputs)."""
    cfg = model.config
    D, T = cfg.hidden_size, result.timesteps
    n = max(num_sequences, 1)
    tokens = result.neuron_counts[INPUT_SITE] / D / n  # mean valid tokens per sequence
    spn = result.spikes_per_neuron()
    spikes = {s: c / n for s, c in result.spike_counts.items()}  # spikes per sequence
    quantized = cfg.weight_mode != "fp"
    report = EnergyReport(timesteps=T, tokens_per_sequence=tokens, spikes_per_neuron=spn)

    def add(name, input_site, accumulates, macs, dense_ops, integer):
        e = accumulates * (costs.add_int32 if integer else costs.add_fp32) + macs * costs.mac_fp32
        report.layers.append(LayerEnergy(
            name=name, input_site=input_site, input_spikes_per_neuron=spn[input_site], accumulates=accumulates,
            macs=macs, integer_acs=integer, dense_ops=dense_ops, normalized_ops=spn[input_site] * dense_ops,
            energy_pj=e, dense_energy_pj=dense_ops * costs.mac_fp32))

    prev = INPUT_SITE
    for layer in model.layers:
        site = layer.site
        projections = [("query", prev), ("key", prev), ("value", prev), ("attention_output", site("attention")),
                       ("intermediate", site("attention_output")), ("output", site("intermediate"))]
        for proj, src in projections:
            lin: QuantLinear = getattr(layer, proj)
            acs = spikes[src] * lin.out_features * _nonzero_fraction(lin)
            rescale = T * tokens * lin.out_features if quantized else 0.0  # integer sum × scale, per step
            add(site(proj), src, acs, rescale, tokens * lin.in_features * lin.out_features, quantized)
        # Attention: a key spike adds q to one score of every query; a value spike adds p to every query.
        add(site("attention_scores"), site("key"), spikes[site("key")] * tokens, 0.0, tokens * tokens * D, False)
        add(site("attention_context"), site("value"), spikes[site("value")] * tokens, 0.0, tokens * tokens * D, False)
        prev = site("output")
    head = model.classifier
    head_macs = float(head.in_features * head.out_features)
    # a mean readout first sums the output layer's spike counts over the valid tokens (integer adds)
    pooling = tokens * head.in_features if cfg.readout == "mean" else 0.0
    report.layers.append(LayerEnergy(
        name="classifier", input_site=model.output_site, input_spikes_per_neuron=spn[model.output_site],
        accumulates=pooling, macs=head_macs, integer_acs=pooling > 0, dense_ops=head_macs, normalized_ops=head_macs,
        energy_pj=pooling * costs.add_int32 + head_macs * costs.mac_fp32,
        dense_energy_pj=head_macs * costs.mac_fp32))
    return report
