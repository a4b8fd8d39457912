"""The non-spiking teacher (SPEC §6): fine-tune a Hugging Face BERT on a GLUE task, load it, and
compute the targets distillation needs (hidden states, pre-softmax attention scores, logits).

The teacher is a ``transformers.BertForSequenceClassification``; by default the offline
MiniLM-L6-H384 (:func:`spikingbert_sim.hf.default_model_path`), or any BERT folder / hub name.
Whenever it produces targets it is in eval mode (no dropout) and runs without autograd.

A **spiking checkpoint** can be the teacher too (:func:`load_teacher` on a ``.pt`` file): usually a
full-precision spiking student, teaching quantized students of its own architecture, as TernaryBERT
and BinaryBERT distil from the full-precision model they quantize. Its targets are those of its
analog equilibrium (T → ∞: every neuron at ``clip(I / V_th, 0, 1)``): the ASRs of its ``embeddings``
site and of each layer's output in place of hidden states, its pre-softmax attention scores, its
logits. A student of equal depth then matches it layer for layer (default layer map ``1..N``), and
with equal widths the projections start as the identity: the kd loss starts at the quantization error.
A fine-tuned teacher is saved with ``save_pretrained`` (weights, config with label names, and the
tokenizer) into a temporary folder beside the target, which is then renamed into place: a crash
never leaves a half-written teacher under the final name. While it trains, every ``save_every``
steps the whole training state (weights, optimizer, schedule, random generators, data position)
goes atomically to ``resume.pt`` in the output folder, from which ``resume=True`` (``spikesim
teacher --resume``) continues the run: the teacher it saves equals an uninterrupted run's, bit for
bit on the same machine.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError, DataError


def quiet_transformers() -> None:
    """Silence transformers' informational warnings (new-head notices, sdpa hints) on the CLI."""
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


# --- loading and targets ---------------------------------------------------------------------------

def load_teacher(source: str | os.PathLike, task: str | None = None, device: str | torch.device = "cpu"):
    """A fine-tuned BERT classifier (a folder) or a spiking checkpoint (a file), and its tokenizer,
    in eval mode on ``device`` with gradients off.

    Raises :class:`ConfigError` when the folder is not a BERT sequence classifier, or its label
    count does not fit ``task``; :class:`~spikingbert_sim.errors.CheckpointError` for a file that is
    not a spikingbert_sim checkpoint.
    """
    from .hf import load_bert, load_tokenizer

    quiet_transformers()
    source = str(source)
    if not Path(source).exists():
        raise ConfigError(f"teacher {source} does not exist")
    if Path(source).is_file():
        model, tokenizer = _load_spiking_teacher(source, task)
    else:
        model, tokenizer = load_bert(source), None
    if not is_spiking(model) and (not hasattr(model, "classifier") or not hasattr(model, "bert")):
        raise ConfigError(f"{source} is not a fine-tuned BERT classifier (no classification head); "
                          "fine-tune one with `spikesim teacher`")
    if task is not None:
        from .data import get_task

        info = get_task(task)
        if model.config.num_labels != info.num_labels:
            raise ConfigError(f"teacher {source} has {model.config.num_labels} label(s) but task {info.name} "
                              f"needs {info.num_labels}")
    if tokenizer is None:
        tokenizer = load_tokenizer(source)
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(f"teacher {source}: its tokenizer has {len(tokenizer)} tokens but the model's "
                          f"vocabulary only {model.config.vocab_size}")
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def is_spiking(teacher: nn.Module) -> bool:
    """True for a spiking teacher (a spikingbert_sim model), False for a Hugging Face BERT."""
    from .model import SpikingBertForSequenceClassification

    return isinstance(teacher, SpikingBertForSequenceClassification)


def _load_spiking_teacher(source: str, task: str | None):
    """A spiking checkpoint as teacher: its model and the tokenizer stored in it."""
    from .checkpoint import load_checkpoint
    from .hf import checkpoint_tokenizer

    loaded = load_checkpoint(source)
    ckpt_task = loaded.meta.get("task") or loaded.model.config.task
    if task is not None and ckpt_task:
        from .data import get_task

        if get_task(ckpt_task).name != get_task(task).name:
            raise ConfigError(f"teacher {source} was trained on {ckpt_task}, not {get_task(task).name}")
    return loaded.model, checkpoint_tokenizer(loaded.meta)


@dataclass
class TeacherOutput:
    """Targets for one batch."""

    logits: Tensor  # (B, num_labels)
    hidden_states: tuple[Tensor, ...]  # embeddings then every layer's output, each (B, L, D_teacher)
    attention_scores: dict[int, Tensor]  # teacher layer (0-based) -> pre-softmax scores (B, H, L, L)


@torch.no_grad()
def teacher_forward(teacher: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
                    token_type_ids: Tensor | None = None, attention_layers: Sequence[int] = ()) -> TeacherOutput:
    """Run the teacher in eval mode; collect hidden states and the pre-softmax attention scores
    ``Q·Kᵀ/√d_head`` (before the padding mask) of ``attention_layers``.

    Scores are rebuilt from the query and key projections (forward hooks), so they do not depend
    on the attention implementation (eager, sdpa, flash) the teacher was loaded with.
    """
    teacher.eval()
    if is_spiking(teacher):
        return _spiking_teacher_forward(teacher, input_ids, attention_mask, token_type_ids, attention_layers)
    bert = teacher.bert
    heads = bert.config.num_attention_heads
    captured: dict[tuple[int, str], Tensor] = {}
    handles = []
    for j in attention_layers:
        attn = bert.encoder.layer[j].attention.self
        for name in ("query", "key"):
            def hook(module, inputs, output, key=(j, name)):
                captured[key] = output
            handles.append(getattr(attn, name).register_forward_hook(hook))
    try:
        out = teacher(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                      output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    scores = {}
    for j in attention_layers:
        q, k = captured[(j, "query")], captured[(j, "key")]  # (B, L, D)
        B, L, D = q.shape
        dh = D // heads
        q = q.view(B, L, heads, dh).transpose(1, 2)  # (B, H, L, dh)
        k = k.view(B, L, heads, dh).transpose(1, 2)
        scores[j] = q @ k.transpose(-1, -2) / math.sqrt(dh)  # (B, H, L, L)
    return TeacherOutput(logits=out.logits, hidden_states=tuple(out.hidden_states), attention_scores=scores)


def _spiking_teacher_forward(teacher: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
                             token_type_ids: Tensor | None, attention_layers: Sequence[int]) -> TeacherOutput:
    """A spiking teacher's targets at its analog equilibrium: the ASRs of its ``embeddings`` site and
    of each layer's output stand for hidden states 0..N, its attention scores for the teacher's."""
    from .equilibrium import steady_state_forward
    from .model import INPUT_SITE

    n = teacher.config.num_hidden_layers
    sites = [INPUT_SITE] + [f"layer.{i}.output" for i in range(n)]
    out = steady_state_forward(teacher, input_ids, attention_mask, token_type_ids, sites=sites,
                               attention_scores=bool(attention_layers))  # under teacher_forward's no_grad
    scores = {j: out.attention_scores[f"layer.{j}.attention_scores"] for j in attention_layers}
    return TeacherOutput(logits=out.logits, hidden_states=tuple(out.asr[s] for s in sites), attention_scores=scores)


def teacher_fingerprint(teacher: nn.Module) -> str:
    """sha256 of the teacher's parameters and buffers (names, shapes, bytes): identifies the
    teacher a training run used, wherever its folder lives."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(teacher.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --- fine-tuning -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TeacherConfig:
    """Options of :func:`finetune_teacher` (``spikesim teacher``)."""

    task: str  # GLUE task
    out: str  # folder to write (must not exist, or be empty, unless force)
    data_dir: str | None = None  # classic GLUE folder; None: the datasets hub
    model: str | None = None  # BERT folder or hub name; None: the offline MiniLM-L6-H384
    epochs: int = 3  # passes over the training set (ignored when max_steps is set)
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 32
    lr: float = 2e-5  # peak learning rate (AdamW, linear warm-up then linear decay)
    seed: int = 42
    max_length: int = 128  # tokens per example (longer pairs are truncated)
    limit: int | None = None  # use the first N training examples (and dev, unless eval_limit)
    eval_limit: int | None = None  # use the first N dev examples
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    device: str = "cpu"
    force: bool = False  # replace an existing non-empty out folder
    log_every: int | None = None  # log a progress line every N steps (None: 50 without a progress bar; 0: never)
    save_every: int | None = 500  # save the training state (resume.pt) every N steps; None: never

    def __post_init__(self) -> None:
        from .trainer import _positive, check_common

        check_common(self)
        _positive(self, "save_every", optional=True)


RESUME = "resume.pt"
"""The training state of an unfinished teacher run, in its output folder."""
RESUME_FORMAT, RESUME_VERSION = "spikingbert_sim.teacher_state", 1
TEACHER_RUN_ONLY = frozenset({"out", "data_dir", "device", "force", "log_every", "save_every"})
"""Options that may differ when a run is resumed; every other one must match."""


def _resume_state(out: Path, config: TeacherConfig, resume: bool) -> dict[str, Any] | None:
    """The saved state of the unfinished run in ``out`` to continue (``resume``), or None for a
    fresh start; refuses to mix runs or to overwrite a folder without ``force``."""
    from .checkpoint import safe_torch_load
    from .errors import CheckpointError

    state_file = out / RESUME
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder")
    if not state_file.exists():
        if resume and out.is_dir() and (out / "config.json").exists():
            raise ConfigError(f"{out} holds a finished teacher; nothing to resume")
        _check_out_folder(out, config.force)
        return None
    if not resume:
        if config.force:
            return None  # start over; the folder is replaced when the new teacher is saved
        raise ConfigError(f"{out} holds an unfinished teacher run ({RESUME}); pass --resume to continue it "
                          "or --force to start over")
    state = safe_torch_load(state_file)
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT or state.get("version") != RESUME_VERSION:
        raise CheckpointError(f"{state_file} holds no teacher training state this version can resume")
    saved, now = state.get("config", {}), _fingerprint(config)
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        detail = ", ".join(f"{k}: {saved.get(k)!r} then, {now.get(k)!r} now" for k in diff)
        raise ConfigError(f"cannot resume {state_file}: it was written with another configuration ({detail})")
    return state


def _fingerprint(config: TeacherConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(config).items() if k not in TEACHER_RUN_ONLY}


def _check_out_folder(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out} exists and is not empty; choose another --out or pass --force to replace it")


def save_teacher_atomically(model: nn.Module, tokenizer, out: str | os.PathLike, extra_files: dict[str, str],
                            force: bool = False) -> Path:
    """``save_pretrained`` model and tokenizer into a temporary folder beside ``out``, then rename it
    to ``out`` (an existing folder is replaced only with ``force``, after the new one is complete)."""
    out = Path(out)
    _check_out_folder(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, text in extra_files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        old = None
        if out.exists():
            if any(out.iterdir()):
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
                old.rmdir()
                os.replace(out, old)
            else:
                out.rmdir()
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@torch.no_grad()
def evaluate_teacher(model: nn.Module, task: str, tensors: dict[str, Tensor], batch_size: int,
                     device: str | torch.device) -> dict[str, float]:
    """GLUE dev metrics of a (non-spiking) classifier on tokenized tensors."""
    from .metrics import compute_metrics

    logits = teacher_logits(model, tensors, batch_size, device, by_length=False)
    return compute_metrics(task, logits.numpy(), tensors["labels"].numpy())


def teacher_logits(model: nn.Module, tensors: dict[str, Tensor], batch_size: int = 64,
                   device: str | torch.device = "cpu", by_length: bool = True) -> Tensor:
    """A (non-spiking) classifier's float32 logits on the CPU, ``(N, num_labels)`` in row order, for
    tokenized ``tensors`` (``input_ids``, ``attention_mask``, ``token_type_ids``); with
    ``by_length`` the batches group rows of similar length (less padding), else they follow row order."""
    from .evaluation import length_batches, trim_batch

    model.eval()
    n = tensors["input_ids"].shape[0]
    batches = length_batches(tensors, batch_size) if by_length else torch.arange(n).split(batch_size)
    out = None
    with torch.no_grad():
        for idx in batches:
            b = trim_batch({k: tensors[k][idx] for k in ("input_ids", "attention_mask", "token_type_ids")}, device)
            logits = model(**b).logits.float().cpu()
            if out is None:
                out = logits.new_empty(n, logits.shape[1])
            out[idx] = logits
    if out is None:
        raise DataError("no rows to score")
    return out


def finetune_teacher(config: TeacherConfig, progress: bool | None = None,
                     log: Callable[[str], None] | None = None, resume: bool = False) -> dict[str, Any]:
    """Fine-tune a BERT classifier on ``config.task`` and save it (see the module doc); with
    ``resume``, continue the unfinished run whose state is in ``config.out`` (a fresh start if
    there is none). One run at a time per output folder.

    Returns a summary: dev metrics, steps, seconds, the output folder.
    """
    from .fileio import exclusive

    with exclusive(config.out):
        return _finetune_teacher(config, progress, log, resume)


def _finetune_teacher(config: TeacherConfig, progress: bool | None, log: Callable[[str], None] | None,
                      resume: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from .data import GlueDataset, get_task, load_glue
    from .hf import default_model_path, load_bert, load_tokenizer
    from .metrics import main_metric
    from .checkpoint import atomic_torch_save
    from .trainer import (ProgressLog, _rng_state, _set_rng_state, batch_order, linear_schedule, log_interval,
                          param_groups, resolve_device, seed_everything, total_steps, trim_batch)

    log = log or (lambda msg: print(msg, file=sys.stderr))
    quiet_transformers()
    info = get_task(config.task)
    out = Path(config.out)
    state = _resume_state(out, config, resume)
    device = resolve_device(config.device)
    source = config.model or default_model_path()
    seed_everything(config.seed)
    tokenizer = load_tokenizer(source)
    train = load_glue(info.name, "train", config.data_dir, limit=config.limit)
    dev = load_glue(info.name, "validation", config.data_dir,
                    limit=config.eval_limit if config.eval_limit is not None else config.limit)
    if len(train) == 0 or len(dev) == 0:
        raise DataError(f"task {info.name}: no training or dev examples")
    model = load_bert(source, num_labels=info.num_labels)
    if not hasattr(model, "classifier"):
        raise ConfigError(f"{source} did not load as a sequence classifier")
    if model.config.num_labels != info.num_labels:
        raise ConfigError(f"{source} has a {model.config.num_labels}-label head but task {info.name} needs "
                          f"{info.num_labels}; start from a BERT without a head")
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(f"{source}: tokenizer has {len(tokenizer)} tokens, model vocabulary {model.config.vocab_size}")
    if config.max_length > model.config.max_position_embeddings:
        raise ConfigError(f"max_length {config.max_length} exceeds the model's {model.config.max_position_embeddings} positions")
    if not info.is_regression:
        model.config.id2label = dict(enumerate(info.label_names))
        model.config.label2id = {name: i for i, name in enumerate(info.label_names)}
    model.config.problem_type = "regression" if info.is_regression else "single_label_classification"
    model.config.finetuning_task = info.name
    model.to(device)
    train_t = GlueDataset.from_split(train, tokenizer, config.max_length).tensors
    dev_t = GlueDataset.from_split(dev, tokenizer, config.max_length).tensors
    n = len(train)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total = total_steps(config.epochs, config.max_steps, steps_per_epoch)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr)
    scheduler = linear_schedule(optimizer, total, config.warmup_ratio)
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=total, desc=f"teacher {info.name}", unit="step", disable=not show, file=sys.stderr)
    progress_log = ProgressLog(log_interval(config.log_every, show), total, log)
    start_time = time.time()
    step = epoch = position = 0
    elapsed = 0.0
    losses = []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, position = state["step"], state["epoch"], state["position"]
        losses, elapsed = list(state["losses"]), float(state["elapsed"])
        _set_rng_state(state["rng"], device)
        bar.update(step)
        log(f"teacher {info.name}: resuming {out / RESUME} at step {step}/{total} (epoch {epoch + 1})")

    def save_state(position: int) -> None:
        atomic_torch_save({"format": RESUME_FORMAT, "version": RESUME_VERSION, "config": _fingerprint(config),
                           "step": step, "epoch": epoch, "position": position, "model": model.state_dict(),
                           "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                           "rng": _rng_state(device), "losses": losses,
                           "elapsed": elapsed + time.time() - start_time}, out / RESUME)

    model.train()
    while step < total:
        for pos, idx in enumerate(batch_order(n, config.batch_size, config.seed, epoch)):
            if pos < position:  # done before the run was interrupted
                continue
            b = trim_batch({k: v[idx] for k, v in train_t.items()}, device)
            outputs = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                            token_type_ids=b["token_type_ids"], labels=b["labels"])
            optimizer.zero_grad(set_to_none=True)
            outputs.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(float(outputs.loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            progress_log.step(step, losses[-1], f"teacher {info.name} step {step}/{total} (epoch {epoch + 1})")
            if step >= total:
                break
            if config.save_every and step % config.save_every == 0:
                out.mkdir(parents=True, exist_ok=True)
                save_state(pos + 1)
        epoch += 1
        position = 0
    bar.close()
    metrics = evaluate_teacher(model, info.name, dev_t, config.batch_size * 2, device)
    seconds = elapsed + time.time() - start_time
    summary = {
        "task": info.name, "source": str(source), "steps": step, "epochs_started": epoch,
        "train_examples": n, "dev_examples": len(dev), "final_train_loss": losses[-1] if losses else None,
        "dev_metrics": metrics, "main_metric": main_metric(info.name),
        "dev_main": metrics[main_metric(info.name)], "seconds": round(seconds, 1),
        "config": asdict(config),
    }
    model.eval().to("cpu")
    # the finished teacher replaces the folder, and with it the training state
    save_teacher_atomically(model, tokenizer, out, {"teacher_summary.json": json.dumps(summary, indent=2) + "\n"},
                            force=config.force or (out / RESUME).exists())
    summary["out"] = str(out)
    log(f"teacher {info.name}: {step} steps in {seconds:.0f} s; dev " +
        ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()) + f"; saved to {out}")
    return summary
