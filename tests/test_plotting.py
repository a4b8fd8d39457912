"""Figures: each plot function draws on the given ax and returns it; save_figure is atomic."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from spikingbert_sim.plotting import (plot_accuracy_vs_timesteps, plot_layer_convergence,  # noqa: E402
                                      plot_output_comparison, plot_raster, save_figure, short_site)

TRACES = {"embeddings": np.array([1.0, 0.5, 0.5, 0.25]),
          "layer.0.key": torch.tensor([0.0, 0.5, 1 / 3, 0.25]),
          "layer.0.output": [0.0, 0.0, 1 / 3, 0.5]}


@pytest.fixture
def ax():
    fig, ax = plt.subplots()
    yield ax
    plt.close(fig)


def test_short_site():
    assert short_site("layer.2.output") == "L2 output"
    assert short_site("layer.0.attention_output") == "L0 attention_output"
    assert short_site("embeddings") == "embeddings"


def test_layer_convergence_draws_one_line_per_site(ax):
    assert plot_layer_convergence(ax, TRACES) is ax
    assert len(ax.lines) == 3
    assert [line.get_label() for line in ax.lines] == ["embeddings", "L0 key", "L0 output"]
    x, y = ax.lines[1].get_data()
    assert list(x) == [1, 2, 3, 4]
    assert np.allclose(y, [0.0, 0.5, 1 / 3, 0.25])
    assert ax.get_yscale() == "linear"
    assert ax.get_legend() is not None


def test_layer_convergence_selected_sites_and_deviation(ax):
    plot_layer_convergence(ax, TRACES, sites=["embeddings", "layer.0.output"], deviation=True)
    assert len(ax.lines) == 2
    assert np.allclose(ax.lines[0].get_ydata(), [0.75, 0.25, 0.25, 0.0])
    assert np.allclose(ax.lines[1].get_ydata(), [0.5, 0.5, 1 / 6, 0.0])
    assert ax.get_yscale() == "log"


def test_output_comparison(ax):
    curves = {"fp": [0.1, 0.2, 0.3], "ternary": np.array([0.1, 0.25, 0.3])}
    assert plot_output_comparison(ax, curves, title="x") is ax
    assert [line.get_label() for line in ax.lines] == ["fp", "ternary"]
    assert np.allclose(ax.lines[1].get_ydata(), [0.1, 0.25, 0.3])
    assert ax.lines[0].get_linestyle() != ax.lines[1].get_linestyle()
    assert ax.get_title() == "x"


def test_raster_places_a_mark_per_spike(ax):
    raster = np.zeros((5, 3), dtype=np.uint8)
    raster[0, 2] = raster[3, 0] = raster[4, 2] = 1
    assert plot_raster(ax, raster, title="r", neuron_labels=[7, 8, 9]) is ax
    assert len(ax.collections) == 1
    offsets = sorted(map(tuple, ax.collections[0].get_offsets().tolist()))
    assert offsets == [(1.0, 2.0), (4.0, 0.0), (5.0, 2.0)]  # (time step 1-based, neuron)
    assert ax.get_xlim() == (0.5, 5.5)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["7", "8", "9"]


def test_raster_rejects_non_2d(ax):
    with pytest.raises(ValueError, match="T, neurons"):
        plot_raster(ax, np.zeros((2, 2, 2)))


def test_accuracy_vs_timesteps(ax):
    curves = {"fp": ([4, 8, 16], [0.5, 0.7, 0.8]), "binary": ([4, 8, 16], [0.5, 0.6, 0.75])}
    assert plot_accuracy_vs_timesteps(ax, curves, metric="f1") is ax
    assert len(ax.lines) == 2 and ax.get_xscale() == "log" and ax.get_ylabel() == "f1"
    assert list(ax.lines[1].get_xdata()) == [4, 8, 16]


def test_accuracy_vs_timesteps_marks_adaptive_stopping_in_the_curve_colour(ax):
    curves = {"fp": ([4, 8, 16], [0.5, 0.7, 0.8]), "binary": ([4, 8, 16], [0.5, 0.6, 0.75])}
    plot_accuracy_vs_timesteps(ax, curves, adaptive={"binary": (11.5, 0.74), "other": (3.0, 0.1)})
    assert len(ax.lines) == 3  # two curves and one star (no curve is labelled "other")
    star = ax.lines[2]
    assert star.get_marker() == "*" and list(star.get_xdata()) == [11.5] and list(star.get_ydata()) == [0.74]
    assert star.get_color() == ax.lines[1].get_color() and star.get_label() == "binary, adaptive"


def test_save_figure_writes_png_and_closes(tmp_path):
    fig, ax = plt.subplots()
    plot_output_comparison(ax, {"a": [0.0, 1.0]})
    path = save_figure(fig, tmp_path / "sub" / "fig.png")
    assert path == tmp_path / "sub" / "fig.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["fig.png"]
    assert fig.number not in plt.get_fignums()


def test_save_figure_failure_keeps_existing_file(tmp_path, monkeypatch):
    target = tmp_path / "fig.png"
    target.write_bytes(b"old figure")
    fig, _ = plt.subplots()

    def broken(fname, *args, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half")
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(RuntimeError, match="renderer crashed"):
        save_figure(fig, target)
    assert target.read_bytes() == b"old figure"
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"]
    assert fig.number not in plt.get_fignums()


def test_adaptive_points_from_reports_take_the_sweep_labels():
    from spikingbert_sim.evaluation import adaptive_points_from_reports, curves_from_reports

    sweep = [{"timesteps": 8, "metrics": {"accuracy": 0.6, "f1": 0.5}}]
    reports = [{"label": "fp", "sweep": sweep, "adaptive": {"mean_timesteps": 5.25, "metrics": {"accuracy": 0.55}}},
               {"weight_mode": "ternary", "checkpoint": "t.pt", "sweep": sweep}]
    curves, metric = curves_from_reports(reports, "accuracy")
    points = adaptive_points_from_reports(reports, metric)
    assert points == {"fp": (5.25, 0.55)} and set(points) <= set(curves)
    assert adaptive_points_from_reports(reports, "f1") == {}  # adaptive scored no f1
