"""The benchmark scripts run and report self-consistent numbers (timings themselves are not tested)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_simulate_profile_reports_product_share_and_bound(capsys):
    sim = _load("simulate")
    r = sim.main(["--device", "cpu", "--config", "tiny", "--batch", "2", "--timesteps", "6", "--seq-len", "8",
                  "--repeats", "1", "--threads", "1", "--profile", "--compare-native"])
    assert r["spike_mismatch"] == 0 and r["logits_max_abs_diff"] == 0.0
    from spikingbert_sim import native
    assert r["native_scan"] is native.available()
    if native.available():
        assert r["fast_native_scan_s"] > 0 and r["fast_without_native_seq_steps_per_s"] > 0
        assert r["fast_native_accumulate_s"] >= 0 and r["fast_native_affine_s"] >= 0
        assert r["native_speedup"] == pytest.approx(r["fast_seq_steps_per_s"] / r["fast_without_native_seq_steps_per_s"])
        # the timing wrappers are gone, the compiled kernels are back on
        assert (native.scan.__name__, native.accumulate.__name__, native.affine.__name__) == ("scan", "accumulate", "affine")
    assert 0 < r["fast_product_s"] < r["fast_profiled_s"]
    assert 0 < r["reference_product_share"] < 1
    assert r["fast_product_share"] == pytest.approx(r["fast_product_s"] / r["fast_profiled_s"])
    # if everything but the products were free, the speed-up could only grow
    assert r["speedup_bound_products_only"] > r["speedup"]
    assert set(r["cpu_matmul_peak_gflops"]) == {"fp32", "bf16"}
    assert '"fast_product_share"' in capsys.readouterr().out


def test_simulate_profile_refuses_cuda(capsys):
    sim = _load("simulate")
    with pytest.raises(SystemExit):
        sim.main(["--device", "cuda", "--profile"])
    assert "--profile is for --device cpu" in capsys.readouterr().err
