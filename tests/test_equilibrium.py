"""Equilibrium training (SPEC §5): the measurement equals the spiking simulation, the forward value
is the spiking ASR, gradients are autograd through the steady-state graph (no feedback) or the
implicit-function gradient (feedback, every solver), memory does not grow with T, and the BPTT
baseline reproduces the spiking forward pass."""

import pytest
import torch

from spikingbert_sim.config import SpikingBertConfig
from spikingbert_sim.equilibrium import (SteadyStateSTE, bptt_forward, equilibrium_forward, measure_equilibrium,
                                         measure_stepwise, steady_state_equilibrium, steady_state_forward,
                                         student_forward)
from spikingbert_sim.errors import ConfigError
from spikingbert_sim.model import SpikingBertForSequenceClassification, attention_mask_bias
from spikingbert_sim.neurons import steady_state
from spikingbert_sim.simulation import simulate
from spikingbert_sim.solvers import SOLVERS


def tiny_model(dtype=torch.float32, feedback=False, mode="fp", seed=0, scale=8.0, threshold=1.0, leak=1.0,
               feedback_std=None, initial_membrane=0.0):
    torch.manual_seed(seed)
    cfg = SpikingBertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=16, weight_mode=mode, feedback=feedback,
                            threshold=threshold, leak=leak, initial_membrane=initial_membrane)
    model = SpikingBertForSequenceClassification(cfg).to(dtype)
    with torch.no_grad():  # larger weights than BERT's 0.02 so that neurons fire at varied rates
        for name, p in model.named_parameters():
            if p.dim() == 2 and not name.startswith(("embeddings", "feedback")):
                p.mul_(scale)
            if name.endswith("bias") and not name.startswith("embeddings"):
                p.normal_(0.0, 0.2)
        if feedback_std is not None:
            model.feedback.weight.normal_(0.0, feedback_std)
    return model


def tiny_batch(seed=1, B=3, L=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (B, L), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def embed(model, batch):
    emb = model.embeddings(batch["input_ids"], batch["token_type_ids"])
    return emb, attention_mask_bias(batch["attention_mask"], emb.dtype)


def loss_of(logits, asr, scores=None):
    """A loss touching the logits, every returned ASR and the attention scores, with fixed weights."""
    g = torch.Generator().manual_seed(7)
    total = (logits * torch.randn(logits.shape, generator=g, dtype=logits.dtype)).sum()
    for name in sorted(asr):
        total = total + (asr[name] * torch.randn(asr[name].shape, generator=g, dtype=logits.dtype)).sum()
    for name in sorted(scores or {}):
        total = total + 0.01 * (scores[name] ** 2).sum()
    return total


def grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


# --- measurement and forward value ---------------------------------------------------------------

@pytest.mark.parametrize("mode", ["fp", "ternary", "binary"])
@pytest.mark.parametrize("leak, init", [(1.0, 0.0), (0.9, 0.0), (1.0, 0.5)])
def test_measured_asr_equals_fast_simulation_bitwise(mode, leak, init):
    model = tiny_model(mode=mode, leak=leak, initial_membrane=init)
    batch = tiny_batch()
    ref = simulate(model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], timesteps=10)
    with torch.no_grad():
        emb, mb = embed(model, batch)
        for chunk in (None, 1, 3, 8, 10, 64):  # 3 does not divide T: the last chunk is short
            measured = measure_equilibrium(model, emb, mb, 10, time_chunk=chunk)
            assert set(measured) == set(model.site_names())
            for site in model.site_names():
                assert torch.equal(measured[site], ref.asr[site]), (chunk, site)
            if chunk is not None:  # the model.encode + if_scan form agrees too
                stepwise = measure_stepwise(model, emb, mb, 10, chunk=chunk)
                for site in model.site_names():
                    assert torch.equal(stepwise[site], ref.asr[site]), (chunk, site)
    mean = sum(float(v.mean()) for v in measured.values()) / len(measured)
    assert 0.05 < mean < 0.95  # the test model is neither silent nor saturated


def test_feedback_measurement_equals_reference_engine():
    model = tiny_model(feedback=True, feedback_std=0.3)
    batch = tiny_batch()
    ref = simulate(model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], timesteps=12,
                   engine="reference")
    with torch.no_grad():
        emb, mb = embed(model, batch)
        measured = measure_equilibrium(model, emb, mb, 12, time_chunk=8)
    for site in model.site_names():
        assert torch.equal(measured[site], ref.asr[site]), site


@pytest.mark.parametrize("feedback", [False, True])
def test_forward_value_is_the_measured_spiking_asr(feedback):
    model = tiny_model(mode="ternary", feedback=feedback, feedback_std=0.3 if feedback else None)
    batch = tiny_batch()
    ref = simulate(model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], timesteps=9)
    out = equilibrium_forward(model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                              timesteps=9, sites=model.site_names())
    assert torch.equal(out.logits.detach(), ref.logits)
    for site in model.site_names():
        assert torch.equal(out.asr[site].detach(), ref.asr[site]), site
        assert torch.equal(out.measured[site], ref.asr[site])
    assert out.logits.requires_grad


# --- gradients without feedback ------------------------------------------------------------------

@pytest.mark.parametrize("threshold", [1.0, 0.7])
def test_gradients_equal_autograd_through_the_steady_state_graph(threshold):
    """With measured ASRs equal to the analog steady state, the trainer's gradients are exactly
    autograd of the network with fire = clip(I / V_th, 0, 1) (SPEC §5, J_f = 0)."""
    model = tiny_model(torch.float64, threshold=threshold)
    batch = tiny_batch()
    # Reference: plain autograd through the analog network.
    emb, mb = embed(model, batch)
    sites, scores = {}, {}

    def fire(site, current):
        sites[site] = steady_state(current, threshold)
        return sites[site]

    final = model.encode(emb, fire, mb, lambda name, s: scores.__setitem__(name, s))
    keep = model.layer_output_sites()
    loss_of(model.readout(final), {s: sites[s] for s in keep}, scores).backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    # The trainer, fed the analog equilibrium as its "measurement".
    with torch.no_grad():
        measured = steady_state_equilibrium(model, *embed(model, batch))
    out = equilibrium_forward(model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                              timesteps=1, measured=measured, attention_scores=True)
    assert sorted(out.attention_scores) == ["layer.0.attention_scores", "layer.1.attention_scores"]
    loss_of(out.logits, out.asr, out.attention_scores).backward()
    got = grads(model)
    nonzero = 0
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-14, msg=name)
        nonzero += int(expected[name].abs().sum() > 0)
    assert nonzero >= len(expected) - 1  # every parameter (but padding rows) receives gradient


@pytest.mark.parametrize("feedback", [False, True])
def test_steady_state_method_is_equilibrium_training_at_the_analog_equilibrium(feedback):
    """--method steady_state: the values and gradients of equilibrium_forward fed the analog
    equilibrium, without simulating (and, without feedback, in one pass)."""
    model = tiny_model(torch.float64, feedback=feedback, feedback_std=0.02 if feedback else None)
    batch = tiny_batch()
    with torch.no_grad():
        measured = steady_state_equilibrium(model, *embed(model, batch))
    results = []
    for run in (lambda: equilibrium_forward(model, batch["input_ids"], batch["attention_mask"],
                                            batch["token_type_ids"], timesteps=1, measured=measured,
                                            attention_scores=True, solver_options={"tol": 1e-12, "max_iter": 200}),
                lambda: student_forward(model, batch, "steady_state", 5, attention_scores=True,
                                        solver_options={"tol": 1e-12, "max_iter": 200})):
        model.zero_grad(set_to_none=True)
        out = run()
        loss_of(out.logits, out.asr, out.attention_scores).backward()
        results.append((out, grads(model)))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-12, atol=1e-12)
    assert sorted(b.asr) == sorted(a.asr) == sorted(model.layer_output_sites())
    for site in a.asr:
        torch.testing.assert_close(b.asr[site], measured[site], rtol=1e-12, atol=1e-12)
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-9, atol=1e-12, msg=name)
    assert any(g.abs().sum() > 0 for g in gb.values())
    # and it is not the spiking value: a finite-T measurement differs
    spiking = equilibrium_forward(model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                                  timesteps=8)
    assert (spiking.logits - b.logits).abs().max() > 1e-3


def test_spiking_gradients_flow_through_clip_of_the_measured_operating_point():
    """With real spiking measurements: value = measured ASR, gradient = d clip(I/V_th)/dI at the
    currents computed from the measured ASRs — the formula steady_state(I) + (a − steady_state(I)).detach()."""
    model = tiny_model(torch.float64, mode="binary")
    batch = tiny_batch()
    out = equilibrium_forward(model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                              timesteps=6, time_chunk=4)
    loss_of(out.logits, out.asr).backward()
    got = grads(model)
    model.zero_grad(set_to_none=True)
    measured = out.measured
    emb, mb = embed(model, batch)
    sites = {}

    def fire(site, current):
        ss = steady_state(current, model.config.threshold)
        sites[site] = ss + (measured[site] - ss).detach()
        return sites[site]

    final = model.encode(emb, fire, mb)
    loss_of(model.readout(final), {s: sites[s] for s in model.layer_output_sites()}).backward()
    for name, g in grads(model).items():
        torch.testing.assert_close(got[name], g, rtol=1e-10, atol=1e-12, msg=name)
    assert any(g.abs().sum() > 0 for g in got.values())


def test_steady_state_ste_matches_clamp_gradient_including_boundaries():
    current = torch.tensor([-0.5, 0.0, 0.3, 0.7, 1.0, 1.4], dtype=torch.float64, requires_grad=True)
    measured = torch.tensor([0.0, 0.1, 0.25, 0.75, 1.0, 1.0], dtype=torch.float64)
    out = SteadyStateSTE.apply(current, measured, 0.7)
    assert torch.equal(out, measured)
    out.backward(torch.ones_like(out))
    ref = current.detach().clone().requires_grad_()
    steady_state(ref, 0.7).backward(torch.ones_like(out))
    assert torch.equal(current.grad, ref.grad)
    assert current.grad.tolist() == pytest.approx([0, 1 / 0.7, 1 / 0.7, 1 / 0.7, 0, 0])


def test_gradients_do_not_depend_on_the_time_chunk():
    model = tiny_model(mode="ternary")
    batch = tiny_batch()
    results = []
    for chunk in (None, 1, 5, 16):
        model.zero_grad(set_to_none=True)
        out = equilibrium_forward(model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                                  timesteps=16, time_chunk=chunk)
        loss_of(out.logits, out.asr).backward()
        results.append(grads(model))
    for other in results[1:]:
        for name in results[0]:
            assert torch.equal(results[0][name], other[name]), name


# --- gradients with feedback: implicit differentiation -----------------------------------------------

def _analog_loss(model, batch, measured_out=None):
    """Loss of the analog network at its exact fixed point (for finite differences)."""
    with torch.no_grad():
        emb, mb = embed(model, batch)
        sites = steady_state_equilibrium(model, emb, mb, tol=1e-13)
        logits = model.readout(sites[model.output_site])
        return float(loss_of(logits, {s: sites[s] for s in model.layer_output_sites()}))


def _contractive_feedback_model():
    model = tiny_model(torch.float64, feedback=True, feedback_std=0.02, scale=4.0, seed=3)
    return model


def test_feedback_test_model_is_contractive_but_not_trivial():
    model = _contractive_feedback_model()
    batch = tiny_batch()
    emb, mb = embed(model, batch)
    measured = steady_state_equilibrium(model, emb.detach(), mb)
    z = measured[model.output_site].clone().requires_grad_()
    fire = lambda s, i: steady_state(i, 1.0)  # noqa: E731
    f = model.encode(model.input_current(emb.detach(), z), fire, mb)
    # Power iteration on J_f (vector-Jacobian products) estimates its spectral radius.
    v = torch.randn_like(z)
    for _ in range(30):
        (v_new,) = torch.autograd.grad(f, z, v, retain_graph=True)
        rate = float(v_new.norm() / v.norm())
        v = v_new / v_new.norm()
    assert 0.1 < rate < 0.9


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_implicit_gradient_equals_unrolled_autograd_and_finite_differences(solver):
    model = _contractive_feedback_model()
    batch = tiny_batch()
    with torch.no_grad():
        measured = steady_state_equilibrium(model, *embed(model, batch), tol=1e-13)
    out = equilibrium_forward(model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                              timesteps=1, measured=measured, solver=solver,
                              solver_options={"tol": 1e-13, "max_iter": 300})
    loss_of(out.logits, out.asr).backward()
    implicit = grads(model)
    assert len(out.solver_stats) == 1
    stats = out.solver_stats[0]
    assert stats.solver == solver and stats.converged and stats.steps > 1

    # (a) autograd unrolled through many applications of the analog map, from the fixed point.
    model.zero_grad(set_to_none=True)
    emb, mb = embed(model, batch)
    fire = lambda s, i: steady_state(i, 1.0)  # noqa: E731
    z = measured[model.output_site].detach()
    for _ in range(120):
        z = model.encode(model.input_current(emb, z), fire, mb)
    sites = {}

    def recording(site, current):
        sites[site] = steady_state(current, 1.0)
        return sites[site]

    final = model.encode(model.input_current(emb, z), recording, mb)
    loss_of(model.readout(final), {s: sites[s] for s in model.layer_output_sites()}).backward()
    unrolled = grads(model)
    for name in implicit:
        torch.testing.assert_close(implicit[name], unrolled[name], rtol=1e-8, atol=1e-10, msg=name)

    # (b) central finite differences of the loss at the re-solved fixed point.
    checks = [("feedback.weight", (3, 5)), ("layers.0.intermediate.weight", (4, 2)),
              ("layers.1.output.bias", (6,)), ("embeddings.word_embeddings.weight", (int(batch["input_ids"][0, 1]), 0))]
    params = dict(model.named_parameters())
    eps = 1e-6
    for name, index in checks:
        p = params[name]
        with torch.no_grad():
            old = p[index].item()
            p[index] = old + eps
            up = _analog_loss(model, batch)
            p[index] = old - eps
            down = _analog_loss(model, batch)
            p[index] = old
        fd = (up - down) / (2 * eps)
        assert implicit[name][index].item() == pytest.approx(fd, rel=1e-5, abs=1e-7), name


def test_implicit_correction_matters():
    """Dropping the (I − J_f)⁻¹ factor (one pass, J_f treated as 0) gives different gradients:
    the solve is doing real work in the test above."""
    model = _contractive_feedback_model()
    batch = tiny_batch()
    with torch.no_grad():
        measured = steady_state_equilibrium(model, *embed(model, batch), tol=1e-13)
    out = equilibrium_forward(model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                              timesteps=1, measured=measured, solver_options={"tol": 1e-12, "max_iter": 200})
    loss_of(out.logits, out.asr).backward()
    implicit = model.feedback.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    emb, mb = embed(model, batch)
    sites = {}

    def fire(site, current):
        sites[site] = SteadyStateSTE.apply(current, measured[site], 1.0)
        return sites[site]

    final = model.encode(model.input_current(emb, measured[model.output_site]), fire, mb)
    loss_of(model.readout(final), {s: sites[s] for s in model.layer_output_sites()}).backward()
    naive = model.feedback.weight.grad
    assert float((implicit - naive).norm() / implicit.norm()) > 0.05


def test_solver_stats_report_non_convergence():
    model = _contractive_feedback_model()
    batch = tiny_batch()
    out = equilibrium_forward(model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                              timesteps=8, solver="fixed_point", solver_options={"tol": 1e-14, "max_iter": 2})
    out.logits.sum().backward()
    assert len(out.solver_stats) == 1
    assert out.solver_stats[0].steps == 2 and not out.solver_stats[0].converged


# --- memory --------------------------------------------------------------------------------------

def saved_bytes(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


def test_equilibrium_autograd_memory_is_flat_in_T_and_bptt_is_not():
    model = tiny_model(mode="ternary")
    batch = tiny_batch()
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    eq = {T: saved_bytes(lambda: equilibrium_forward(model, *args, timesteps=T))[0] for T in (4, 32)}
    bp = {T: saved_bytes(lambda: bptt_forward(model, *args, timesteps=T))[0] for T in (4, 32)}
    assert eq[4] == eq[32]
    assert bp[32] > 6 * bp[4]
    assert bp[32] > 10 * eq[32]


# --- BPTT baseline -------------------------------------------------------------------------------

@pytest.mark.parametrize("feedback", [False, True])
def test_bptt_forward_reproduces_the_spiking_simulation(feedback):
    model = tiny_model(feedback=feedback, feedback_std=0.3 if feedback else None)
    batch = tiny_batch()
    ref = simulate(model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], timesteps=7,
                   engine="reference")
    out = bptt_forward(model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], timesteps=7,
                       sites=model.site_names(), attention_scores=True)
    for site in model.site_names():
        assert torch.equal(out.asr[site].detach(), ref.asr[site]), site
    assert torch.equal(out.logits.detach(), ref.logits)
    assert out.attention_scores["layer.1.attention_scores"].shape == (3, 2, 7, 7)
    loss_of(out.logits, out.asr).backward()
    g = grads(model)
    assert all(torch.isfinite(v).all() for v in g.values())
    assert g["layers.0.key.weight"].abs().sum() > 0


def test_surrogates_and_method_dispatch():
    model = tiny_model()
    batch = tiny_batch()
    a = student_forward(model, batch, "bptt", 3, surrogate="fast_sigmoid", time_chunk=2)
    b = student_forward(model, batch, "equilibrium", 3, surrogate="atan", time_chunk=2)
    assert torch.equal(a.logits.detach(), b.logits.detach())  # same spikes, different gradients
    with pytest.raises(ConfigError, match="unknown training method"):
        student_forward(model, batch, "ode", 3)
    with pytest.raises(ConfigError, match="unknown surrogate"):
        student_forward(model, batch, "bptt", 3, surrogate="relu")
    with pytest.raises(ConfigError, match="timesteps"):
        student_forward(model, batch, "equilibrium", 0)
    with pytest.raises(ConfigError, match="unknown site"):
        student_forward(model, batch, "equilibrium", 2, sites=["layer.9.output"])
