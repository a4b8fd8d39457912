"""``spikesim teacher | train | eval | significance | summary | augment``: fine-tune the teacher, distil a
spiking student, score it, compare two scorings, summarize runs, augment data."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from .cli import echo_json, initial_membrane_option, load_simulated, log, positive_int
from .config import READOUTS
from .evaluation import PREDICTION_KINDS

COMMANDS: list[click.Command] = []


def _command(fn):
    COMMANDS.append(fn)
    return fn


def _command_line() -> str:
    return "spikesim " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def training_options(fn):
    """Options the teacher and the student trainers share."""
    options = [
        click.option("--task", required=True, help="GLUE task: sst2, mrpc, qqp, mnli, qnli, rte, stsb, cola, wnli."),
        click.option("--data", "data_dir", type=click.Path(file_okay=False),
                     help="GLUE data folder (classic TSV layout); omit to use the datasets hub."),
        click.option("--epochs", type=int, default=3, show_default=True, callback=positive_int,
                     help="Passes over the training set (per stage); ignored with --max-steps."),
        click.option("--max-steps", type=int, default=None, callback=positive_int,
                     help="Optimizer steps (per stage); overrides --epochs."),
        click.option("--batch-size", type=int, default=32, show_default=True, callback=positive_int,
                     help="Examples per step (per process under torchrun)."),
        click.option("--seed", type=int, default=42, show_default=True, help="Seed of initialisation and data order."),
        click.option("--max-length", type=int, default=128, show_default=True, callback=positive_int,
                     help="Tokens per example (longer inputs are truncated)."),
        click.option("--limit", type=int, default=None, callback=positive_int,
                     help="Use the first N training examples (and dev examples, unless --eval-limit)."),
        click.option("--eval-limit", type=int, default=None, callback=positive_int,
                     help="Use the first N dev examples."),
        click.option("--warmup-ratio", type=float, default=0.1, show_default=True,
                     help="Fraction of steps of linear learning-rate warm-up."),
        click.option("--weight-decay", type=float, default=0.01, show_default=True, help="AdamW weight decay."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                     help="Where to train (auto: CUDA when available)."),
        click.option("--progress/--no-progress", default=None,
                     help="Show progress bars [default: when stderr is a terminal]."),
        click.option("--log-every", type=click.IntRange(min=0), default=None,
                     help="Log a progress line (loss, s/step, time left) every N steps; 0: never "
                          "[default: 50 when no progress bar is shown]."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@_command
@click.command()
@training_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to save the fine-tuned teacher in.")
@click.option("--model", default=None,
              help="BERT folder or hub name to fine-tune [default: the offline MiniLM-L6-H384].")
@click.option("--lr", type=float, default=2e-5, show_default=True, help="Peak learning rate (AdamW).")
@click.option("--force", is_flag=True, help="Replace --out if it exists and is not empty.")
@click.option("--save-every", type=click.IntRange(min=0), default=500, show_default=True,
              help="Save the training state to OUT/resume.pt every N steps (0: never).")
@click.option("--resume", is_flag=True, help="Continue the unfinished run in --out from its resume.pt.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def teacher(task, data_dir, epochs, max_steps, batch_size, seed, max_length, limit, eval_limit, warmup_ratio,
            weight_decay, device, progress, log_every, out, model, lr, force, save_every, resume, as_json):
    """Fine-tune a BERT classifier on a GLUE task: the distillation teacher."""
    from .teacher import TeacherConfig, finetune_teacher

    config = TeacherConfig(task=task, out=out, data_dir=data_dir, model=model, epochs=epochs, max_steps=max_steps,
                           batch_size=batch_size, lr=lr, seed=seed, max_length=max_length, limit=limit,
                           eval_limit=eval_limit, warmup_ratio=warmup_ratio, weight_decay=weight_decay,
                           device=device, force=force, log_every=log_every, save_every=save_every or None)
    summary = finetune_teacher(config, progress=progress, log=log, resume=resume)
    if as_json:
        echo_json(summary)
    else:
        click.echo(f"{summary['out']}: {summary['steps']} steps; dev " +
                   ", ".join(f"{k}={v:.4f}" for k, v in summary["dev_metrics"].items()))


def _layer_map(ctx, param, value):
    if value is None:
        return None
    try:
        values = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated teacher layers, e.g. 2,4,6; got {value!r}") from None
    if not values:
        raise click.BadParameter("empty layer map")
    return values


@_command
@click.command()
@training_options
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for metrics.jsonl, last.pt and best.pt.")
@click.option("--teacher", "teacher_dir", type=click.Path(),
              help="Fine-tuned BERT teacher folder (from `spikesim teacher`), or a spiking checkpoint (e.g. "
                   "a full-precision student teaching quantized ones: targets at its analog equilibrium).")
@click.option("--weights", type=click.Choice(["fp", "binary", "ternary"]), default="fp", show_default=True,
              help="Student weight precision: fp, binary (1-bit) or ternary (1.58-bit).")
@click.option("--timesteps", "-T", type=int, default=16, show_default=True, callback=positive_int,
              help="Time steps T simulated per training step.")
@click.option("--stage", type=click.Choice(["kd", "predict", "finetune", "all"]), default="all", show_default=True,
              help="kd: intermediate-layer distillation; predict: soft-label distillation; finetune: true "
                   "labels; all: the three in turn, each with the --epochs/--max-steps budget.")
@click.option("--lr", type=float, default=5e-5, show_default=True, help="Peak learning rate of every stage (AdamW).")
@click.option("--init", default="teacher", show_default=True,
              help="Student initialisation: teacher (copy the teacher layers each student layer is matched "
                   "to; a spiking teacher: the whole of it), random, or a spiking checkpoint (packed quantized "
                   "weights continue from latent weights that quantize back to them).")
@click.option("--layers", type=int, default=4, show_default=True, callback=positive_int,
              help="Student encoder layers.")
@click.option("--method", type=click.Choice(["equilibrium", "steady_state", "bptt"]), default="equilibrium",
              show_default=True,
              help="Gradient: implicit differentiation at the measured spiking equilibrium; the same at the "
                   "analog (T -> infinity) equilibrium, no simulation (a cheap warm start); or backprop "
                   "through time.")
@click.option("--resume", is_flag=True, help="Continue the run saved in --out (bit-exact); refuses another configuration.")
@click.option("--eval-every", type=int, default=None, callback=positive_int,
              help="Evaluate on dev and save every N steps [default: each epoch and stage end].")
@click.option("--save-every", type=int, default=None, callback=positive_int, help="Also save last.pt every N steps.")
@click.option("--eval-timesteps", type=int, default=None, callback=positive_int,
              help="T of dev evaluation [default: --timesteps].")
@click.option("--layer-map", callback=_layer_map,
              help="Teacher hidden state matched by each student layer, e.g. 2,4,6 (0 = embeddings) "
                   "[default: evenly spaced, last on last].")
@click.option("--attention-kd/--no-attention-kd", default=True, show_default=True,
              help="Also distil pre-softmax attention scores in the kd stage.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Soft-label distillation temperature.")
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True, help="Gradient clipping (0: off).")
@click.option("--feedback", is_flag=True, help="Student with a last-layer -> input feedback connection.")
@click.option("--threshold", type=float, default=1.0, show_default=True, help="Firing threshold V_th.")
@click.option("--readout", type=click.Choice(READOUTS), default=None,
              help="What the student's head reads of the last layer: the [CLS] ASR (cls, the paper's) or the ASR "
                   "averaged over the valid tokens (mean) [default: the --init checkpoint's, else cls].")
@click.option("--solver", type=click.Choice(["fixed_point", "anderson", "broyden"]), default="anderson",
              show_default=True, help="Implicit backward solver (feedback students).")
@click.option("--solver-tol", type=float, default=1e-4, show_default=True, help="Relative residual to stop at.")
@click.option("--solver-max-iter", type=int, default=30, show_default=True, callback=positive_int,
              help="Solver iterations at most.")
@click.option("--time-chunk", type=int, default=None, callback=positive_int,
              help="Time steps simulated at once while measuring the equilibrium (memory vs speed) "
                   "[default: planned by the engine on CPU, 8 on CUDA].")
@click.option("--surrogate", type=click.Choice(["atan", "fast_sigmoid"]), default="atan", show_default=True,
              help="BPTT surrogate gradient.")
@click.option("--transfer", multiple=True, metavar="TASK",
              help="Add this GLUE task's training inputs (its labels unused) to the kd and predict stages, "
                   "whose targets come from the teacher; repeatable. Same input layout as --task.")
@click.option("--transfer-file", "transfer_files", multiple=True, metavar="TSV", type=click.Path(dir_okay=False),
              help="Add the inputs of this TSV file (`spikesim augment` output: a sentence column, or sentence1 "
                   "and sentence2) to the kd and predict stages, like --transfer; repeatable.")
def train(task, data_dir, epochs, max_steps, batch_size, seed, max_length, limit, eval_limit, warmup_ratio,
          weight_decay, device, progress, log_every, out, teacher_dir, weights, timesteps, stage, lr, init, layers,
          method, resume, eval_every, save_every, eval_timesteps, layer_map, attention_kd, temperature, max_grad_norm,
          feedback, threshold, readout, solver, solver_tol, solver_max_iter, time_chunk, surrogate, transfer,
          transfer_files):
    """Distil a spiking student from a BERT teacher on a GLUE task (equilibrium gradients or BPTT)."""
    from .teacher import quiet_transformers
    from .trainer import TrainConfig
    from .trainer import train as run_training

    quiet_transformers()
    config = TrainConfig(
        task=task, out=out, data_dir=data_dir, teacher=teacher_dir, weights=weights, timesteps=timesteps,
        stage=stage, epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr, seed=seed, init=init,
        layers=layers, method=method, layer_map=layer_map, attention_kd=attention_kd, temperature=temperature,
        max_length=max_length, limit=limit, warmup_ratio=warmup_ratio, weight_decay=weight_decay,
        max_grad_norm=max_grad_norm, feedback=feedback, threshold=threshold, readout=readout, solver=solver,
        solver_tol=solver_tol, solver_max_iter=solver_max_iter, time_chunk=time_chunk, surrogate=surrogate,
        transfer=transfer, transfer_files=transfer_files, eval_every=eval_every, save_every=save_every,
        eval_limit=eval_limit, eval_timesteps=eval_timesteps, log_every=log_every, device=device)
    result = run_training(config, resume=resume, progress=progress, command=_command_line())
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        best = f"{result.best_metric:.4f} at step {result.best_step}" if result.best_metric is not None else "none"
        click.echo(f"{result.out}: {result.global_step} steps; best dev {best}; "
                   f"checkpoints {result.out}/last.pt, {result.out}/best.pt")


def _adaptive_options(window, asr_tol, value_tol, min_steps, check_every):
    from .simulation import AdaptiveOptions

    return AdaptiveOptions(window=window, asr_tol=asr_tol, value_tol=value_tol, min_steps=min_steps,
                           check_every=check_every)


def _sweep(ctx, param, value):
    if value is None:
        return None
    from .errors import ConfigError
    from .evaluation import parse_timesteps_list

    try:
        return parse_timesteps_list(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


def _predictions(info, logits) -> list:
    """Class ids (argmax of the logits), or for a regression task the scores (5 decimals)."""
    if info.is_regression:
        return [round(float(v), 5) for v in logits.reshape(-1)]
    return logits.argmax(dim=-1).tolist()


@_command
@click.command(name="eval")
@click.option("--checkpoint", "-c", required=True, type=click.Path(dir_okay=False), help="Spiking checkpoint (.pt).")
@click.option("--task", required=True, help="GLUE task to score on.")
@click.option("--data", "data_dir", type=click.Path(file_okay=False),
              help="GLUE data folder (classic TSV layout); omit to use the datasets hub.")
@click.option("--split", default="validation", show_default=True, help="Split: validation (dev), train, ...")
@click.option("--timesteps", "-T", type=int, default=80, show_default=True, callback=positive_int,
              help="Simulation time steps T (the most an adaptive run may use).")
@click.option("--sweep", callback=_sweep, default=None,
              help="Also score at each of these T (comma-separated, e.g. 1,2,4,8,16,32,64,80,128), from one "
                   "simulation of the largest.")
@click.option("--adaptive", is_flag=True,
              help="Also score with adaptive stopping: a batch stops once its output layer has settled.")
@click.option("--adaptive-window", type=int, default=8, show_default=True, callback=positive_int,
              help="Adaptive: steps over which every prediction and the output ASR the head reads must hold still.")
@click.option("--adaptive-asr-tol", type=float, default=0.02, show_default=True,
              help="Adaptive: largest mean |change| of the output ASR the head reads over the window.")
@click.option("--adaptive-value-tol", type=float, default=0.05, show_default=True,
              help="Adaptive, regression tasks: largest spread of the predicted value over the window.")
@click.option("--adaptive-min-steps", type=int, default=8, show_default=True, callback=positive_int,
              help="Adaptive: never stop before this step.")
@click.option("--adaptive-check-every", type=int, default=4, show_default=True, callback=positive_int,
              help="Adaptive: steps between two checks.")
@click.option("--adaptive-batch-size", type=int, default=None, callback=positive_int,
              help="Adaptive: sequences that stop together [default: --batch-size; 1 decides per example].")
@click.option("--limit", type=int, default=None, callback=positive_int, help="Score the first N examples.")
@click.option("--batch-size", type=int, default=32, show_default=True, callback=positive_int,
              help="Sequences simulated at once.")
@click.option("--max-length", type=int, default=128, show_default=True, callback=positive_int,
              help="Tokens per example.")
@click.option("--engine", type=click.Choice(["fast", "reference"]), default="fast", show_default=True,
              help="Simulation engine.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where to simulate.")
@click.option("--analog", is_flag=True,
              help="Also score the analog equilibrium (T -> infinity, every neuron at its steady-state rate): "
                   "the rate network the simulation approaches and --method steady_state trains.")
@initial_membrane_option
@click.option("--label", default=None, help="Name of this model in reports and figures [default: from the checkpoint].")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Also write the JSON report to this file (atomically); `spikesim plot` draws its sweep.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def evaluate(checkpoint, task, data_dir, split, timesteps, sweep, adaptive, adaptive_window, adaptive_asr_tol,
             adaptive_value_tol, adaptive_min_steps, adaptive_check_every, adaptive_batch_size, limit, batch_size,
             max_length, engine, device, analog, initial_membrane, label, out, as_json):
    """Score a spiking checkpoint on a GLUE split with T-step spiking simulation.

    With --sweep, the metric at every listed T (accuracy versus time steps); with --adaptive, the
    metric and the mean time steps used when every batch stops once it has settled; with --analog,
    the metric of the analog (T -> infinity) equilibrium too.
    """
    import json
    import time

    import torch

    from .data import GlueDataset, get_task, load_glue
    from .errors import ConfigError
    from .evaluation import evaluate_adaptive, evaluate_analog, metrics_by_timesteps, sweep_logits
    from .fileio import atomic_write_text
    from .trainer import evaluate_student, resolve_device

    options = _adaptive_options(adaptive_window, adaptive_asr_tol, adaptive_value_tol, adaptive_min_steps,
                                adaptive_check_every) if adaptive else None
    info = get_task(task)
    ckpt, tokenizer = load_simulated(checkpoint, initial_membrane)
    model = ckpt.model
    if model.config.num_labels != info.num_labels:
        raise ConfigError(f"{checkpoint} has a {model.config.num_labels}-label head but task {info.name} "
                          f"needs {info.num_labels}")
    if max_length > model.config.max_position_embeddings:
        raise ConfigError(f"max_length {max_length} exceeds the model's {model.config.max_position_embeddings} positions")
    split_data = load_glue(info.name, split, data_dir, limit=limit)
    if len(split_data) == 0:
        raise ConfigError(f"task {info.name} split {split} has no examples")
    tensors = GlueDataset.from_split(split_data, tokenizer, max_length).tensors
    top = int(tensors["input_ids"].max())
    if top >= model.config.vocab_size:
        raise ConfigError(f"the tokenizer produces id {top} but the model's vocabulary has {model.config.vocab_size}")
    dev = resolve_device(device)
    model.to(dev)
    bars = sys.stderr.isatty()
    start = time.time()
    report = {"checkpoint": str(checkpoint), "label": label or Path(checkpoint).stem, "task": info.name,
              "split": split_data.split, "examples": len(split_data), "timesteps": timesteps,
              "weight_mode": model.config.weight_mode, "main_metric": info.main_metric,
              "initial_membrane": model.config.initial_membrane, "readout": model.config.readout,
              # where it ran: float32 sums in another order (another thread count or device) can move a
              # membrane that sits on its threshold across it, which flips a sentence now and then
              "device": str(dev), "threads": torch.get_num_threads(), "torch": torch.__version__}
    # per-example predictions (class ids, or STS-B scores) beside the labels: `spikesim significance`
    # compares two reports example by example
    predictions = {"labels": tensors["labels"].tolist()}
    if sweep:
        logits = sweep_logits(model, tensors, sorted(set(sweep) | {timesteps}), batch_size, dev, engine=engine,
                              progress=bars)
        points = metrics_by_timesteps(info.name, logits, tensors["labels"])
        report["metrics"] = points[timesteps]
        report["sweep"] = [{"timesteps": t, "metrics": m} for t, m in points.items() if t in sweep]
        predictions["spiking"] = _predictions(info, logits[timesteps])
    else:
        report["metrics"], logits = evaluate_student(model, info.name, tensors, timesteps, batch_size, dev,
                                                     engine=engine, progress=bars)
        predictions["spiking"] = _predictions(info, logits)
    if options is not None:
        result = evaluate_adaptive(model, info.name, tensors, timesteps, options, adaptive_batch_size or batch_size,
                                   dev, engine=engine, progress=bars)
        report["adaptive"] = {**result.to_dict(), "batch_size": adaptive_batch_size or batch_size,
                              "criterion": {"window": options.window, "asr_tol": options.asr_tol,
                                            "value_tol": options.value_tol, "min_steps": options.min_steps,
                                            "check_every": options.check_every}}
        predictions["adaptive"] = _predictions(info, result.logits)
    if analog:
        report["analog"], logits = evaluate_analog(model, info.name, tensors, batch_size, dev, progress=bars)
        predictions["analog"] = _predictions(info, logits)
    report["seconds"] = round(time.time() - start, 2)
    report["predictions"] = predictions
    text = json.dumps(report, indent=2)
    if out:
        atomic_write_text(out, text + "\n")
    if as_json:
        click.echo(text)
        return
    fmt = lambda m: ", ".join(f"{k}={v:.4f}" for k, v in m.items())  # noqa: E731
    click.echo(f"{checkpoint} on {info.name} {split_data.split} ({len(split_data)} examples, T={timesteps}, "
               f"weights {model.config.weight_mode}): " + fmt(report["metrics"]))
    for point in report.get("sweep", []):
        click.echo(f"  T={point['timesteps']:>4}: " + fmt(point["metrics"]))
    if "analog" in report:
        click.echo("  analog (T -> infinity): " + fmt(report["analog"]))
    if "adaptive" in report:
        a = report["adaptive"]
        click.echo(f"  adaptive (at most T={timesteps}): {fmt(a['metrics'])}; mean {a['mean_timesteps']:.1f} "
                   f"time steps, {100 * a['stopped_early_fraction']:.1f} % stopped early")


@_command
@click.command()
@click.argument("report_a", type=click.Path(dir_okay=False))
@click.argument("report_b", type=click.Path(dir_okay=False))
@click.option("--which", type=click.Choice(PREDICTION_KINDS), default="spiking", show_default=True,
              help="Predictions of REPORT_A to compare: at its T, of the analog equilibrium, or adaptive "
                   "(and of REPORT_B unless --which-b).")
@click.option("--which-b", type=click.Choice(PREDICTION_KINDS), default=None,
              help="Predictions of REPORT_B [default: --which], e.g. one model's spiking against its analog ones.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def significance(report_a, report_b, which, which_b, as_json):
    """Is B more accurate than A on the same examples? McNemar's exact test on two `spikesim eval --out`
    reports, example by example, with a 95 % interval for the accuracy difference."""
    from .evaluation import compare_reports, read_report

    result = compare_reports(read_report(report_a), read_report(report_b), which, which_b,
                             names=(str(report_a), str(report_b)))
    if as_json:
        echo_json(result)
        return
    r = result
    for key, path in (("a", report_a), ("b", report_b)):
        side = r[key]
        at = f"T={side['timesteps']}" if side["predictions"] != "analog" else "T -> infinity"
        click.echo(f"{key.upper()}: {side['label'] or path} ({side['predictions']}, {at}): accuracy "
                   f"{100 * r['accuracy_' + key]:.2f} %")
    click.echo(f"B - A: {100 * r['difference']:+.2f} points (95 % CI {100 * r['ci_low']:+.2f} to "
               f"{100 * r['ci_high']:+.2f}) on {r['examples']} {r['task']} {r['split']} examples; "
               f"{r['disagree']} predicted differently, {r['a_only']} right only in A, {r['b_only']} only in B; "
               f"McNemar exact p = {r['p_value']:.3g}")


@_command
@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--metric", default=None,
              help="Dev metric to summarize [default: accuracy where the task has it, else its first metric].")
@click.option("--stage", default=None, help="Only evaluations of this stage (kd, predict, finetune).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (metrics as fractions).")
def summary(runs, metric, stage, as_json):
    """Best-dev and last-checkpoint metrics of training runs (folders of `spikesim train --out`),
    and their mean, sample standard deviation, minimum and maximum over the runs (e.g. seeds)."""
    from .runs import format_summary, summarize_runs

    result = summarize_runs(list(runs), metric=metric, stage=stage)
    if as_json:
        echo_json(result.to_dict())
    else:
        click.echo(format_summary(result))


@_command
@click.command()
@click.option("--task", required=True, help="GLUE task whose inputs to augment.")
@click.option("--data", "data_dir", type=click.Path(file_okay=False),
              help="GLUE data folder (classic TSV layout); omit to use the datasets hub.")
@click.option("--split", default="train", show_default=True, help="Split to augment.")
@click.option("--limit", type=int, default=None, callback=positive_int, help="Augment the first N examples.")
@click.option("--copies", type=int, default=20, show_default=True, callback=positive_int,
              help="Augmented copies per example (TinyBERT: 20); copies equal to their source are dropped.")
@click.option("--prob", type=click.FloatRange(0, 1, min_open=True), default=0.4, show_default=True,
              help="Chance that each whole word of a copy is replaced.")
@click.option("--neighbours", type=int, default=15, show_default=True, callback=positive_int,
              help="Substitutes per word: its nearest vocabulary words by input-embedding cosine similarity.")
@click.option("--model", default=None,
              help="BERT folder or hub name whose tokenizer and word embeddings are used [default: the offline "
                   "MiniLM]; a teacher folder works.")
@click.option("--seed", type=int, default=42, show_default=True, help="Seed of the replacements.")
@click.option("--filter-teacher", "filter_teacher", default=None, type=click.Path(file_okay=False),
              help="Keep only the copies on which this teacher (a `spikesim teacher` folder) gives the answer "
                   "it gives on their source example.")
@click.option("--max-score-change", type=click.FloatRange(0, min_open=True), default=0.5, show_default=True,
              help="With --filter-teacher on a regression task (STS-B): the largest change of the "
                   "teacher's score from source to copy that is kept.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="TSV file to write (atomically).")
@click.option("--force", is_flag=True, help="Overwrite an existing --out file.")
def augment(task, data_dir, split, limit, copies, prob, neighbours, model, seed, filter_teacher, max_score_change,
            out, force):
    """Write augmented copies of a task's inputs (TinyBERT-style word replacement) for
    `spikesim train --transfer-file`: the teacher labels them in the kd and predict stages."""
    from .augment import AugmentOptions, augment_split, filter_by_teacher, write_inputs_tsv
    from .data import get_task, load_glue
    from .errors import ConfigError
    from .hf import load_bert, load_tokenizer
    from .teacher import load_teacher, quiet_transformers

    if Path(out).exists() and not force:
        raise ConfigError(f"{out} exists (add --force to overwrite it)")
    options = AugmentOptions(copies=copies, prob=prob, neighbours=neighbours, seed=seed)
    info = get_task(task)
    source = load_glue(info.name, split, data_dir, limit=limit)
    if len(source) == 0:
        raise ConfigError(f"task {info.name} split {split} has no examples")
    quiet_transformers()
    tokenizer = load_tokenizer(model)
    embeddings = load_bert(model).get_input_embeddings().weight.detach()
    teacher = load_teacher(filter_teacher, info.name) if filter_teacher else None  # refuse a bad folder early
    rows = augment_split(source, tokenizer, embeddings, options)
    note = ""
    if teacher is not None:
        made = list(rows)
        rows, _ = filter_by_teacher(made, source, *teacher, max_score_change=max_score_change)
        same = f"score within {max_score_change}" if info.is_regression else "answer"
        note = f"; kept {len(rows)} of {len(made)} on which the teacher keeps its {same}" if made else ""
    written = write_inputs_tsv(out, rows, info.is_pair)
    click.echo(f"{out}: {written} augmented inputs from {len(source)} {info.name} {source.split} examples "
               f"({copies} copies each, p={prob}, {neighbours} neighbours, seed {seed}{note})")
