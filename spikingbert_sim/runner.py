"""Simulating a checkpoint on texts or task data: tokenize, batch, aggregate, save, summarise.

What ``spikesim run`` / ``compare`` / ``plot`` do, as a Python API:

>>> ckpt = load_checkpoint("ckpt.pt")
>>> inputs = texts_to_inputs(["a gripping film"])
>>> result = simulate_inputs(ckpt.model, tokenizer, inputs, timesteps=80)
>>> summary = summarize(result, ckpt.model)
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ConfigError, DataError
from .fileio import atomic_write_bytes, atomic_write_text  # noqa: F401  (re-exported for the CLI)
from .model import SpikingBertForSequenceClassification
from .simulation import DEFAULT_SETTLE_TOL, RecordOptions, SimulationResult, settling_step, simulate

PAIR_TASKS = ("mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")


@dataclass
class Inputs:
    """Texts to classify: single sentences, or pairs when ``text_b`` is given; labels optional."""

    text_a: list[str]
    text_b: list[str] | None = None
    labels: list[Any] | None = None
    task: str | None = None

    def __len__(self) -> int:
        return len(self.text_a)


def texts_to_inputs(texts: list[str], pairs: bool = False) -> Inputs:
    """``--text`` values as inputs; with ``pairs`` they are taken two at a time (sentence 1, 2)."""
    if not texts:
        raise ConfigError("no input: give --text (repeatable) or --task with --data")
    for i, t in enumerate(texts):
        if not t.strip():
            raise ConfigError(f"--text number {i + 1} is empty")
    if pairs:
        if len(texts) % 2:
            raise ConfigError(f"this model classifies sentence pairs: give --text an even number of times, got {len(texts)}")
        return Inputs(text_a=list(texts[0::2]), text_b=list(texts[1::2]))
    return Inputs(text_a=list(texts))


def check_head_fits_task(model: SpikingBertForSequenceClassification, task: str) -> None:
    """Refuse to score a model on a task whose label count its head does not have."""
    from .data import get_task

    info = get_task(task)
    if model.config.num_labels != info.num_labels:
        raise ConfigError(f"the model has {model.config.num_labels} output(s) but task {info.name} has "
                          f"{info.num_labels} label(s); convert or train a model for {info.name}")


def task_inputs(task: str, data_dir: str | None, split: str = "validation", limit: int | None = None) -> Inputs:
    """Examples of a GLUE task split (see :mod:`spikingbert_sim.data`)."""
    from .data import load_glue

    s = load_glue(task, split=split, data_dir=data_dir, limit=limit)
    if len(s) == 0:
        raise DataError(f"task {task} split {split} has no examples")
    return Inputs(text_a=list(s.text_a), text_b=list(s.text_b) if s.text_b is not None else None,
                  labels=list(s.labels), task=task)


def tokenize(tokenizer, inputs: Inputs, max_length: int = 128) -> dict[str, torch.Tensor]:
    """Tokenize every input, padded to the longest one (one L for all batches)."""
    args = (inputs.text_a,) if inputs.text_b is None else (inputs.text_a, inputs.text_b)
    enc = tokenizer(*args, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    out["token_type_ids"] = enc.get("token_type_ids", torch.zeros_like(enc["input_ids"]))
    return out


def merge_results(results: list[SimulationResult]) -> SimulationResult:
    """One result for several batches: logits and per-neuron values concatenated along the batch,
    mean traces weighted by each batch's valid neurons, spike counts summed, rasters of the first."""
    if len(results) == 1:
        return results[0]
    first = results[0]
    sites = list(first.asr_trace)
    counts = {s: sum(r.neuron_counts[s] for r in results) for s in sites}
    traces = {s: sum(r.asr_trace[s] * r.neuron_counts[s] for r in results) / max(counts[s], 1) for s in sites}
    return SimulationResult(
        logits=torch.cat([r.logits for r in results]),
        timesteps=first.timesteps,
        leak=first.leak,
        asr={s: torch.cat([r.asr[s] for r in results]) for s in first.asr},
        asr_trace=traces,
        spike_counts={s: sum(r.spike_counts[s] for r in results) for s in sites},
        neuron_counts=counts,
        neuron_asr_trace={s: torch.cat([r.neuron_asr_trace[s] for r in results], dim=1)
                          for s in first.neuron_asr_trace},
        rasters=first.rasters,
        raster_index=first.raster_index,
    )


def simulate_inputs(model: SpikingBertForSequenceClassification, tokenizer, inputs: Inputs, timesteps: int,
                    engine: str = "fast", batch_size: int = 32, max_length: int = 128,
                    record: RecordOptions | None = None, device: str | torch.device = "cpu",
                    progress: bool = False) -> SimulationResult:
    """Tokenize ``inputs`` and simulate them in batches on ``device``; one merged result."""
    if batch_size <= 0:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size}")
    enc = tokenize(tokenizer, inputs, max_length)
    if int(enc["input_ids"].max()) >= model.config.vocab_size:
        raise ConfigError(f"the tokenizer produces ids up to {int(enc['input_ids'].max())} but the model's "
                          f"vocabulary has {model.config.vocab_size}")
    model = model.to(device)
    n = enc["input_ids"].shape[0]
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"simulating T={timesteps}", unit="batch", file=__import__("sys").stderr)
    results = []
    for i, start in enumerate(starts):
        batch = {k: v[start:start + batch_size].to(device) for k, v in enc.items()}
        rec = record if i == 0 or record is None else RecordOptions(
            per_neuron=record.per_neuron, sites=record.sites)  # rasters of the first batch only
        r = simulate(model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                     timesteps=timesteps, engine=engine, record=rec)
        results.append(_to_cpu(r))
    return merge_results(results)


def _to_cpu(r: SimulationResult) -> SimulationResult:
    r.logits = r.logits.cpu()
    r.asr = {k: v.cpu() for k, v in r.asr.items()}
    r.neuron_asr_trace = {k: v.cpu() for k, v in r.neuron_asr_trace.items()}
    return r


def label_name(model: SpikingBertForSequenceClassification, class_id: int) -> str:
    names = model.config.label_names
    return names[class_id] if names and 0 <= class_id < len(names) else str(class_id)


def summarize(result: SimulationResult, model: SpikingBertForSequenceClassification, inputs: Inputs | None = None,
              settle_tol: float = DEFAULT_SETTLE_TOL, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON summary of a run: predictions, per-layer final ASR and settling step, spike totals,
    and task metrics when the inputs have labels."""
    predictions = []
    logits = result.logits.float()
    for i in range(logits.shape[0]):
        entry: dict[str, Any] = {}
        if inputs is not None:
            entry["text"] = inputs.text_a[i]
            if inputs.text_b is not None:
                entry["text_b"] = inputs.text_b[i]
            if inputs.labels is not None:
                entry["gold"] = inputs.labels[i]
        if model.config.is_regression:
            entry["prediction"] = float(logits[i, 0])
        else:
            probs = torch.softmax(logits[i], -1)
            k = int(probs.argmax())
            entry.update(prediction=k, label=label_name(model, k), probability=round(float(probs[k]), 6),
                         logits=[round(float(x), 6) for x in logits[i]])
        predictions.append(entry)
    spikes_per_neuron = result.spikes_per_neuron()
    layers = {
        site: {
            "final_asr": round(float(trace[-1]), 6),
            "settled_at": settling_step(trace, settle_tol),
            "spikes_per_neuron": round(spikes_per_neuron[site], 6),
        }
        for site, trace in result.asr_trace.items()
    }
    summary: dict[str, Any] = {
        "timesteps": result.timesteps,
        "settle_tolerance": settle_tol,
        "settle_criterion": "first t with |ASR(t') - ASR(T)| <= tol for all t' >= t (mean ASR over valid neurons)",
        "num_inputs": int(logits.shape[0]),
        "weight_mode": model.config.weight_mode,
        "predictions": predictions,
        "layers": layers,
        "total_spikes": result.total_spikes(),
    }
    if inputs is not None and inputs.labels is not None and inputs.task:
        from .metrics import compute_metrics

        check_head_fits_task(model, inputs.task)

        summary["metrics"] = {k: float(v) for k, v in compute_metrics(
            inputs.task, result.logits.float().numpy(), np.asarray(inputs.labels)).items()}
    if extra:
        summary.update(extra)
    return summary


# --- traces.npz ----------------------------------------------------------------------------------

def save_traces(path: str | os.PathLike, result: SimulationResult, meta: dict[str, Any] | None = None) -> Path:
    """Write ``asr/<site>`` (T,) mean traces, ``asr_neuron/<site>`` (T, B, L, W) per-neuron traces if
    recorded, ``raster/<site>`` (T, sequences, tokens, neurons) uint8 rasters, ``spikes/<site>``
    total spikes and ``meta`` (JSON: timesteps, site order, raster index, free fields)."""
    arrays: dict[str, np.ndarray] = {}
    for site, trace in result.asr_trace.items():
        arrays[f"asr/{site}"] = trace.numpy().astype(np.float64)
        arrays[f"spikes/{site}"] = np.asarray([result.spike_counts[site], result.neuron_counts[site]], np.float64)
    for site, t in result.neuron_asr_trace.items():
        arrays[f"asr_neuron/{site}"] = t.float().numpy()
    for site, r in result.rasters.items():
        arrays[f"raster/{site}"] = r.numpy().astype(np.uint8)
    info = {"timesteps": result.timesteps, "sites": list(result.asr_trace),
            "raster_index": {s: [list(x) for x in idx] for s, idx in result.raster_index.items()}}
    info.update(meta or {})
    arrays["meta"] = np.asarray(json.dumps(info))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


@dataclass
class Traces:
    """What :func:`load_traces` reads back."""

    asr: dict[str, np.ndarray]
    meta: dict[str, Any]
    asr_neuron: dict[str, np.ndarray] = field(default_factory=dict)
    rasters: dict[str, np.ndarray] = field(default_factory=dict)
    spikes: dict[str, np.ndarray] = field(default_factory=dict)


def load_traces(path: str | os.PathLike) -> Traces:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such traces file: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            files = {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - allow_pickle=False runs no code; seen: OSError, ValueError, BadZipFile
        raise DataError(f"{path} is not a readable traces .npz file ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})") from None
    if "meta" not in files or not any(k.startswith("asr/") for k in files):
        raise DataError(f"{path} holds no ASR traces (expected keys asr/<site> and meta)")
    try:
        meta = json.loads(str(files["meta"]))
    except json.JSONDecodeError:
        raise DataError(f"{path} has an unreadable meta entry") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path} has an unreadable meta entry (expected a JSON object)")
    out = Traces(asr={}, meta=meta)
    for key, value in files.items():
        kind, _, site = key.partition("/")
        target = {"asr": out.asr, "asr_neuron": out.asr_neuron, "raster": out.rasters, "spikes": out.spikes}.get(kind)
        if target is not None and site:
            target[site] = value
    order = meta.get("sites") or list(out.asr)
    out.asr = {s: out.asr[s] for s in order if s in out.asr}
    return out
