"""The training loop: distil a spiking student from a BERT teacher on a GLUE task (SPEC §5, §6).

``spikesim train`` is a thin wrapper around :func:`train`. One run goes through the stages of
:data:`~spikingbert_sim.distill.STAGES` it is given (``all``: ``kd`` → ``predict`` → ``finetune``),
each with the same budget (``epochs`` or ``max_steps``) and a fresh AdamW optimizer with linear
warm-up and decay. Each step simulates the spiking student and differentiates it with the
equilibrium method (or BPTT), see :mod:`spikingbert_sim.equilibrium`.

The output folder::

    metrics.jsonl   one JSON line per evaluation: step, stage, train loss, lr, dev metrics, ...
    last.pt         the latest state: a spikingbert_sim checkpoint (latent full-precision
                    weights) plus a "training" entry (optimizer, scheduler, counters, RNG states,
                    data position, configuration fingerprint) from which --resume continues
    best.pt         the checkpoint with the best dev main metric so far (quantized weights packed)

Both ``.pt`` files load with :func:`spikingbert_sim.checkpoint.load_checkpoint` (so ``spikesim
run`` / ``eval`` read them) and are written atomically. Resuming reproduces the uninterrupted run
bit for bit: the data order of every epoch is a pure function of (seed, epoch) — a
``DistributedSampler`` permutation — and the position inside it is saved, as are every state the
next step depends on. A resume refuses a folder written with another configuration, and a fresh
run refuses a folder that already holds checkpoints.

Distributed data parallel: under ``torchrun`` (``WORLD_SIZE`` > 1) each process joins the process
group (gloo on CPU, NCCL on CUDA), takes its shard of every epoch's permutation, and gradients are
averaged with one all-reduce per step (the same arithmetic on every rank, so weights stay
identical); ``batch_size`` is per process. Only rank 0 evaluates and writes files.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .config import READOUTS
from .distill import STAGES, Distiller, default_layer_map, label_loss, prediction_loss
from .equilibrium import METHODS, SURROGATES, student_forward
from .errors import CheckpointError, ConfigError, DataError
from .evaluation import evaluate_student, trim_batch
from .model import SpikingBertForSequenceClassification
from .runs import METRICS_FILE
from .solvers import SOLVERS

STAGE_CHOICES = STAGES + ("all",)
INIT_CHOICES = ("teacher", "random")
LAST, BEST = "last.pt", "best.pt"
DEFAULT_LOG_EVERY = 50
"""Steps between progress lines when no progress bar is shown (stderr not a terminal)."""
STATE_VERSION = 1


# --- small shared helpers (also used by the teacher's fine-tuning) ----------------------------------

def _positive(obj: Any, name: str, optional: bool = False) -> None:
    value = getattr(obj, name)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def check_common(cfg: Any) -> None:
    """Validate the options the teacher and student trainers share (errors name the field)."""
    _positive(cfg, "epochs")
    _positive(cfg, "batch_size")
    _positive(cfg, "max_steps", optional=True)
    _positive(cfg, "limit", optional=True)
    _positive(cfg, "eval_limit", optional=True)
    if isinstance(cfg.max_length, bool) or not isinstance(cfg.max_length, int) or cfg.max_length < 2:
        raise ConfigError(f"max_length must be an integer >= 2, got {cfg.max_length!r}")
    if not (isinstance(cfg.lr, (int, float)) and cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ConfigError(f"lr must be a positive number, got {cfg.lr!r}")
    if not 0 <= cfg.warmup_ratio < 1:
        raise ConfigError(f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio!r}")
    if not cfg.weight_decay >= 0:
        raise ConfigError(f"weight_decay must be >= 0, got {cfg.weight_decay!r}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {cfg.seed!r}")
    every = cfg.log_every
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 0):
        raise ConfigError(f"log_every must be a non-negative integer, got {every!r}")
    if not (cfg.device in ("auto", "cpu", "cuda") or str(cfg.device).startswith("cuda:")):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; refuses CUDA on a machine without it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("CUDA is not available on this machine (use --device cpu)")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def total_steps(epochs: int, max_steps: int | None, steps_per_epoch: int) -> int:
    """Optimizer steps of a stage: ``max_steps`` when given (it overrides epochs, as in
    transformers' Trainer), else ``epochs`` full passes."""
    return max_steps if max_steps is not None else epochs * steps_per_epoch


def linear_schedule(optimizer: torch.optim.Optimizer, total: int, warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_ratio · total`` steps, then linear decay to 0 at ``total``."""
    warmup = int(warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices (linear weights, embedding tables), none on biases
    and LayerNorm parameters (BERT's recipe)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def batch_order(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[Tensor]:
    """Index batches of one epoch: ``DistributedSampler``'s seeded permutation (seed + epoch),
    this rank's shard of it, cut into batches (the last one may be smaller)."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=False)
    sampler.set_epoch(epoch)
    indices = torch.tensor(list(sampler), dtype=torch.long)
    return list(indices.split(batch_size))


# --- configuration ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    """Options of :func:`train` (``spikesim train``). Fields in :data:`RUN_ONLY_FIELDS` may change
    on ``--resume``; every other field must match the run being resumed."""

    task: str  # GLUE task
    out: str  # output folder (metrics.jsonl, last.pt, best.pt)
    data_dir: str | None = None  # classic GLUE folder; None: the datasets hub
    teacher: str | None = None  # BERT folder or spiking checkpoint (needed for kd / predict, --init teacher)
    weights: str = "fp"  # student precision: fp | binary | ternary
    timesteps: int = 16  # T simulated per training step
    stage: str = "all"  # kd | predict | finetune | all
    epochs: int = 3  # passes per stage (ignored when max_steps is set)
    max_steps: int | None = None  # optimizer steps per stage; overrides epochs
    batch_size: int = 32  # per process
    lr: float = 5e-5  # peak learning rate of every stage
    seed: int = 42
    init: str = "teacher"  # teacher | random | path of a spiking checkpoint (latent or packed weights)
    layers: int = 4  # student encoder layers
    method: str = "equilibrium"  # equilibrium | bptt
    layer_map: tuple[int, ...] | None = None  # teacher hidden state per student layer; None: evenly spaced
    attention_kd: bool = True  # also match pre-softmax attention scores in the kd stage
    temperature: float = 1.0  # prediction-layer KD temperature
    max_length: int = 128
    limit: int | None = None  # first N training examples (and dev examples, unless eval_limit)
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0  # gradient clipping (0 disables)
    feedback: bool = False  # student with a last-layer -> input feedback connection
    threshold: float = 1.0  # V_th of the student's neurons
    readout: str | None = None  # what the head reads (config.READOUTS); None: the --init checkpoint's, else cls
    solver: str = "anderson"  # implicit backward solver (feedback only)
    solver_tol: float = 1e-4
    solver_max_iter: int = 30
    time_chunk: int | None = None  # time steps simulated at once while measuring; None: planned
    surrogate: str = "atan"  # BPTT surrogate gradient
    transfer: tuple[str, ...] = ()  # GLUE tasks whose training inputs (labels dropped) join kd and predict
    transfer_files: tuple[str, ...] = ()  # inputs files (`spikesim augment`) joining kd and predict; by content
    # run-only fields: may differ on --resume
    eval_every: int | None = None  # evaluate and save every N steps (default: every epoch and stage end)
    save_every: int | None = None  # also save last.pt every N steps
    eval_limit: int | None = None
    eval_timesteps: int | None = None  # T of dev evaluation (default: timesteps)
    log_every: int | None = None  # log a progress line every N steps (None: 50 without progress bars; 0: never)
    device: str = "auto"

    def __post_init__(self) -> None:
        check_common(self)
        for name in ("timesteps", "layers", "solver_max_iter"):
            _positive(self, name)
        for name in ("eval_every", "save_every", "eval_timesteps", "time_chunk"):
            _positive(self, name, optional=True)
        if self.weights not in ("fp", "binary", "ternary"):
            raise ConfigError(f"weights must be fp, binary or ternary, got {self.weights!r}")
        if self.stage not in STAGE_CHOICES:
            raise ConfigError(f"stage must be one of {', '.join(STAGE_CHOICES)}, got {self.stage!r}")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.solver not in SOLVERS:
            raise ConfigError(f"solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if self.surrogate not in SURROGATES:
            raise ConfigError(f"surrogate must be one of {', '.join(SURROGATES)}, got {self.surrogate!r}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature!r}")
        if not self.threshold > 0:
            raise ConfigError(f"threshold must be > 0, got {self.threshold!r}")
        if self.readout is not None and self.readout not in READOUTS:
            raise ConfigError(f"readout must be one of {', '.join(READOUTS)}, got {self.readout!r}")
        if not self.solver_tol > 0:
            raise ConfigError(f"solver_tol must be > 0, got {self.solver_tol!r}")
        if not self.max_grad_norm >= 0:
            raise ConfigError(f"max_grad_norm must be >= 0, got {self.max_grad_norm!r}")
        if self.layer_map is not None:
            object.__setattr__(self, "layer_map", tuple(int(v) for v in self.layer_map))
        object.__setattr__(self, "transfer", tuple(self.transfer))
        object.__setattr__(self, "transfer_files", tuple(str(p) for p in self.transfer_files))
        if len(set(self.transfer_files)) != len(self.transfer_files):
            raise ConfigError("--transfer-file: a file is listed twice")
        if self.transfer:
            _check_transfer(self.task, self.transfer)
        needs_teacher = self.init == "teacher" or any(s in ("kd", "predict") for s in self.stages)
        if needs_teacher and not self.teacher:
            raise ConfigError(f"stage {self.stage} with --init {self.init} needs a teacher (--teacher DIR)")

    @property
    def stages(self) -> tuple[str, ...]:
        return STAGES if self.stage == "all" else (self.stage,)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_map"] = list(self.layer_map) if self.layer_map is not None else None
        d["transfer"] = list(self.transfer)
        d["transfer_files"] = list(self.transfer_files)
        return d


def _check_transfer(task: str, transfer: tuple[str, ...]) -> None:
    """Transfer tasks must exist, differ from the task and each other, and have its input layout
    (sentence pairs for a pair task, single sentences otherwise): the teacher labels their inputs."""
    from .data import get_task

    info = get_task(task)
    seen = {info.name}
    for name in transfer:
        other = get_task(name)
        if other.name in seen:
            raise ConfigError(f"--transfer {name}: listed twice or the task itself")
        if other.is_pair != info.is_pair:
            kind = "sentence pairs" if info.is_pair else "single sentences"
            raise ConfigError(f"--transfer {name}: task {info.name} takes {kind}, {other.name} does not")
        seen.add(other.name)


RUN_ONLY_FIELDS = frozenset({"out", "data_dir", "teacher", "transfer_files", "eval_every", "save_every",
                             "eval_limit", "eval_timesteps", "log_every", "device"})
"""Fields that do not change the trained weights (the data and teacher are identified by content)."""


# --- distributed -----------------------------------------------------------------------------------

@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this module created the process group (and destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    info = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())), owns_group=owns)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    return info, device


def _barrier(d: DistInfo) -> None:
    if d.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def _average_gradients(params: list[nn.Parameter], d: DistInfo) -> None:
    """Mean of every rank's gradients, one flat all-reduce (identical result on every rank)."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= d.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _broadcast_parameters(modules: list[nn.Module], d: DistInfo) -> None:
    import torch.distributed as dist

    for m in modules:
        for t in m.state_dict().values():
            dist.broadcast(t, 0)


def _all_mean(value: float, d: DistInfo, device: torch.device) -> float:
    if d.world_size == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / d.world_size


# --- evaluation ------------------------------------------------------------------------------------

# --- state -----------------------------------------------------------------------------------------

def _split_hash(split) -> str:
    h = hashlib.sha256()
    for i, a in enumerate(split.text_a):
        h.update(a.encode())
        h.update(b"\x00")
        if split.text_b is not None:
            h.update(split.text_b[i].encode())
        h.update(b"\x01")
        h.update(repr(split.labels[i]).encode())
        h.update(b"\n")
    return h.hexdigest()


def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": _to_lists(random.getstate()),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(_to_tuples(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass
class Progress:
    """Where training stands: the next step to take is step ``stage_step`` of stage ``stage_index``,
    batch ``position`` of epoch ``epoch`` (epochs count within a stage)."""

    stage_index: int = 0
    stage_step: int = 0
    global_step: int = 0
    epoch: int = 0
    position: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    done: bool = False


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    out: Path
    global_step: int
    best_metric: float | None
    best_step: int | None
    last_metrics: dict[str, float] = field(default_factory=dict)
    model: SpikingBertForSequenceClassification | None = None


# --- the trainer -----------------------------------------------------------------------------------

def _duration(seconds: float) -> str:
    """``3725`` -> ``'1 h 02 min'``; ``95`` -> ``'1 min 35 s'``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


def log_interval(log_every: int | None, bars: bool) -> int:
    """Steps between progress lines: ``log_every``, or by default none beside a progress bar and
    every :data:`DEFAULT_LOG_EVERY` steps without one (logs, batch jobs)."""
    if log_every is not None:
        return log_every
    return 0 if bars else DEFAULT_LOG_EVERY


class ProgressLog:
    """Progress lines every ``every`` steps: mean loss and s/step since the last line, time left.

    ``pause()`` ... ``resume()`` brackets work that is not a training step (evaluation, saving), so
    that it counts neither in s/step nor in the time left. ``every`` 0: never log.
    """

    def __init__(self, every: int, total: int, log: Callable[[str], None], scope: str = "") -> None:
        self.every, self.total, self.log, self.scope = every, total, log, scope
        self._loss, self._steps, self._start, self._paused = 0.0, 0, time.time(), None

    def step(self, done: int, loss: float, label: str) -> None:
        """Count one finished step (``done`` of ``total``); log a line when ``done`` is a multiple of ``every``."""
        self._loss += loss
        self._steps += 1
        if self.every and done % self.every == 0:
            seconds = (time.time() - self._start) / self._steps
            self.log(f"{label} loss {self._loss / self._steps:.4f}, {seconds:.2f} s/step, "
                     f"{_duration(seconds * (self.total - done))} left{self.scope}")
            self._loss, self._steps, self._start = 0.0, 0, time.time()

    def pause(self) -> None:
        self._paused = time.time()

    def resume(self) -> None:
        if self._paused is not None:
            self._start += time.time() - self._paused
            self._paused = None


class Trainer:
    """Holds everything one training run needs; :meth:`run` trains. See the module doc."""

    def __init__(self, config: TrainConfig, progress: bool | None = None,
                 log: Callable[[str], None] | None = None, command: str | None = None) -> None:
        self.config = config
        self.out = Path(config.out)
        self.show_progress = progress
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.command = command or "spikesim train " + " ".join(shlex.quote(a) for a in sys.argv[2:])

    def log(self, msg: str) -> None:
        if self.dist.is_main:
            self._log(msg)

    # --- setup -----------------------------------------------------------------------------

    def _check_out_folder(self) -> dict[str, Any] | None:
        """The saved state to resume from, or None for a fresh start; refuses to overwrite."""
        from .checkpoint import safe_torch_load

        last, best = self.out / LAST, self.out / BEST
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out} exists and is not a folder")
        if not self.resume:
            if last.exists() or best.exists():
                raise ConfigError(f"{self.out} already holds checkpoints; pass --resume to continue that run "
                                  "or choose another --out")
            return None
        if not last.exists():
            if best.exists():
                raise CheckpointError(f"{self.out} has best.pt but no last.pt to resume from")
            return None
        obj = safe_torch_load(last)
        training = obj.get("training") if isinstance(obj, dict) else None
        if not isinstance(training, dict) or training.get("version") != STATE_VERSION:
            raise CheckpointError(f"{last} holds no training state this version can resume")
        return obj

    def _load_data(self) -> None:
        from .data import GlueDataset, get_task, load_glue

        c = self.config
        self.info = get_task(c.task)
        train = load_glue(self.info.name, "train", c.data_dir, limit=c.limit)
        dev = load_glue(self.info.name, "validation", c.data_dir,
                        limit=c.eval_limit if c.eval_limit is not None else c.limit)
        if len(train) == 0:
            raise DataError(f"task {self.info.name}: the training split has no examples")
        if len(dev) == 0:
            raise DataError(f"task {self.info.name}: the dev split has no examples")
        self.data_hash = _split_hash(train)
        self.train_tensors = GlueDataset.from_split(train, self.tokenizer, c.max_length).tensors
        # the transfer set: the task's inputs, then each transfer task's (the teacher supplies targets)
        self.transfer_tensors = None
        if c.transfer or c.transfer_files:
            from .augment import read_inputs_tsv

            parts = [{k: v for k, v in self.train_tensors.items() if k != "labels"}]
            h = hashlib.sha256(self.data_hash.encode())
            extras = []
            for name in c.transfer:
                extra = load_glue(name, "train", c.data_dir, limit=c.limit)
                if len(extra) == 0:
                    raise DataError(f"--transfer {name}: the training split has no examples")
                extras.append(extra)
            extras += [read_inputs_tsv(path, self.info.name, c.limit) for path in c.transfer_files]  # identified by content
            for extra in extras:
                h.update(_split_hash(extra).encode())
                enc = GlueDataset.from_split(extra, self.tokenizer, c.max_length).tensors
                parts.append({k: v for k, v in enc.items() if k != "labels"})
            self.transfer_tensors = {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
            self.data_hash = h.hexdigest()
        self.dev_tensors = GlueDataset.from_split(dev, self.tokenizer, c.max_length).tensors
        top = max(int(t["input_ids"].max()) for t in (self.train_tensors, self.transfer_tensors) if t is not None)
        if top >= self.student.config.vocab_size:
            raise ConfigError(f"the tokenizer produces id {top} but the student's vocabulary has "
                              f"{self.student.config.vocab_size} entries")

    def _load_teacher(self) -> None:
        from .teacher import load_teacher, teacher_fingerprint

        c = self.config
        self.teacher = None
        self.teacher_id = None
        if c.teacher:
            self.teacher, self.tokenizer = load_teacher(c.teacher, c.task, self.device)
            self.teacher_id = teacher_fingerprint(self.teacher)
            tc = self.teacher.config
            if c.max_length > tc.max_position_embeddings:
                raise ConfigError(f"max_length {c.max_length} exceeds the teacher's {tc.max_position_embeddings} positions")
        elif c.init not in INIT_CHOICES:
            from .checkpoint import load_checkpoint
            from .hf import checkpoint_tokenizer

            self.tokenizer = checkpoint_tokenizer(load_checkpoint(c.init).meta)
        else:
            from .hf import load_tokenizer

            self.tokenizer = load_tokenizer(None)

    def _build_student(self) -> SpikingBertForSequenceClassification:
        from .hf import convert_from_hf
        from .teacher import is_spiking

        c = self.config
        info = self.info
        extra = dict(task=info.name, threshold=c.threshold, feedback=c.feedback,
                     label_names=tuple(info.label_names) if not info.is_regression else ())
        if c.readout is not None:
            extra["readout"] = c.readout
        torch.manual_seed(c.seed)
        if c.init == "teacher" and is_spiking(self.teacher):  # a spiking teacher: start as a copy of it
            model = self._student_from_checkpoint(c.teacher, info, extra, loaded=copy.deepcopy(self.teacher))
        elif c.init == "teacher":
            if 0 in self.layer_map:
                raise ConfigError(f"layer map {self.layer_map} matches a student layer to the embeddings; "
                                  "such a layer cannot start as a teacher layer (use --init random)")
            indices = [j - 1 for j in self.layer_map]  # student layer i starts as the teacher layer it matches
            model = convert_from_hf(self.teacher, weight_mode=c.weights, layer_indices=indices,
                                    num_labels=info.num_labels, **extra)
        elif c.init == "random":
            from .config import SpikingBertConfig

            if self.teacher is not None:
                base = self.teacher.config
            else:
                import transformers

                from .hf import default_model_path

                base = transformers.AutoConfig.from_pretrained(default_model_path())
            config = SpikingBertConfig.from_bert_config(base, num_hidden_layers=c.layers, weight_mode=c.weights,
                                                        num_labels=info.num_labels, **extra)
            model = SpikingBertForSequenceClassification(config)
        else:
            model = self._student_from_checkpoint(c.init, info, extra)
        if c.max_length > model.config.max_position_embeddings:
            raise ConfigError(f"max_length {c.max_length} exceeds the student's {model.config.max_position_embeddings} positions")
        return model

    def _student_from_checkpoint(self, path: str, info, extra: dict[str, Any],
                                 loaded: SpikingBertForSequenceClassification | None = None,
                                 ) -> SpikingBertForSequenceClassification:
        """A student that starts as the spiking model in ``path`` (``loaded``: that model, already
        read, e.g. a copy of the spiking teacher; it is thawed in place)."""
        from .checkpoint import load_checkpoint

        c = self.config
        if loaded is None:
            loaded = load_checkpoint(path).model
        loaded = loaded.thaw_quantized(c.weights)  # packed: latent weights that quantize back
        if loaded.config.num_hidden_layers != c.layers:
            raise ConfigError(f"{path} has {loaded.config.num_hidden_layers} layers but --layers is {c.layers}")
        config = loaded.config.replace(weight_mode=c.weights, num_labels=info.num_labels, **extra)
        model = SpikingBertForSequenceClassification(config)
        state = loaded.state_dict()
        if loaded.config.num_labels != info.num_labels:  # a head for another task: keep the fresh one
            state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        if (model.feedback is None) != (loaded.feedback is None):
            state = {k: v for k, v in state.items() if not k.startswith("feedback.")}
        model.load_state_dict(state, strict=False)
        if self.teacher is not None and config.vocab_size != self.teacher.config.vocab_size:
            raise ConfigError(f"{path} has a vocabulary of {config.vocab_size} but the teacher's has "
                              f"{self.teacher.config.vocab_size}: they cannot share a tokenizer")
        return model

    def _check_fit(self) -> None:
        """Student and teacher must be able to exchange targets."""
        c = self.config
        if self.teacher is None:
            return
        t, s = self.teacher.config, self.student.config
        if s.vocab_size != t.vocab_size:
            raise ConfigError(f"student vocabulary {s.vocab_size} differs from the teacher's {t.vocab_size}")
        if self.attention_kd and s.num_attention_heads != t.num_attention_heads:
            raise ConfigError(f"attention-score distillation needs equal head counts (student {s.num_attention_heads}, "
                              f"teacher {t.num_attention_heads}); pass --no-attention-kd")

    def setup(self, resume: bool = False) -> None:
        c = self.config
        self.resume = resume
        device = resolve_device(c.device)
        self.dist, self.device = init_distributed(device)
        if self.dist.is_main:  # one run per output folder; released by close()
            from .fileio import exclusive

            self._held = contextlib.ExitStack()
            self._held.enter_context(exclusive(self.out))
        saved = self._check_out_folder()
        seed_everything(c.seed)
        self._load_teacher()
        from .data import get_task

        self.info = get_task(c.task)
        n_teacher = self.teacher.config.num_hidden_layers if self.teacher is not None else None
        if c.layer_map is not None and n_teacher is None:
            raise ConfigError("--layer-map needs a teacher")
        if c.init == "teacher" and c.layers > n_teacher:
            raise ConfigError(f"--layers {c.layers} exceeds the teacher's {n_teacher} layers (use --init random "
                              "for a deeper student)")
        if n_teacher is not None:
            from .distill import check_layer_map

            self.layer_map = list(c.layer_map) if c.layer_map is not None else default_layer_map(c.layers, n_teacher)
            check_layer_map(self.layer_map, c.layers, n_teacher)
        self.attention_kd = c.attention_kd and "kd" in c.stages
        self.student = self._build_student().to(self.device)
        self._check_fit()
        self._load_data()
        self.distiller = None
        if self.teacher is not None and "kd" in c.stages:
            torch.manual_seed(c.seed + 1)
            self.distiller = Distiller(self.student.config.hidden_size, self.teacher.config.hidden_size,
                                       c.layers, n_teacher, self.layer_map, attention=self.attention_kd).to(self.device)
        fingerprint_config = {k: v for k, v in c.to_dict().items() if k not in RUN_ONLY_FIELDS}
        if not c.transfer:  # runs saved before --transfer existed resume unchanged
            del fingerprint_config["transfer"]
        if c.readout is None:  # likewise for --readout
            del fingerprint_config["readout"]
        fingerprint_config.update(world_size=self.dist.world_size, train_data_sha256=self.data_hash,
                                  teacher_sha256=self.teacher_id)
        self.fingerprint_config = fingerprint_config
        self.fingerprint = hashlib.sha256(json.dumps(fingerprint_config, sort_keys=True).encode()).hexdigest()
        self.progress = Progress()
        self.saved_training = None
        if saved is not None:
            self._restore(saved)
        if self.dist.world_size > 1:
            _broadcast_parameters([m for m in (self.student, self.distiller) if m is not None], self.dist)

    def _restore(self, saved: dict[str, Any]) -> None:
        training = saved["training"]
        if training.get("fingerprint") != self.fingerprint:
            theirs = training.get("config") or {}
            diffs = [k for k in sorted(set(theirs) | set(self.fingerprint_config))
                     if theirs.get(k) != self.fingerprint_config.get(k)]
            detail = ", ".join(f"{k} {theirs.get(k)!r} there vs {self.fingerprint_config.get(k)!r} here"
                               for k in diffs[:3]) or "different fingerprint"
            raise ConfigError(f"cannot resume {self.out / LAST}: it was written with another configuration ({detail})")
        state = {k: v for k, v in saved["state"].items()}
        missing, unexpected = self.student.load_state_dict({k: v.to(self.device) for k, v in state.items()},
                                                           strict=False)
        if missing or unexpected or saved.get("packed"):
            raise CheckpointError(f"{self.out / LAST} does not hold this student's latent weights")
        if self.distiller is not None and training.get("distiller") is not None:
            self.distiller.load_state_dict(training["distiller"])
        self.progress = Progress(**training["progress"])
        self.saved_training = training
        _set_rng_state(training["rng"], self.device)
        self._truncate_metrics(self.progress.global_step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metrics lines written after the state being resumed (a run killed between its
        metrics line and its checkpoint), so the file reads as one uninterrupted run."""
        from .fileio import atomic_write_text

        path = self.out / METRICS_FILE
        if not self.dist.is_main or not path.exists():
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
        atomic_write_text(path, "".join(l + "\n" for l in keep))

    # --- pieces of a step ------------------------------------------------------------------------

    def stage_tensors(self, stage: str) -> dict[str, Tensor]:
        """Training rows of ``stage``: the transfer set (task inputs + --transfer tasks' inputs) for
        kd and predict, which need only the teacher; the task's labelled rows for finetune."""
        if stage in ("kd", "predict") and self.transfer_tensors is not None:
            return self.transfer_tensors
        return self.train_tensors

    def _trainable(self, stage: str) -> list[nn.Parameter]:
        params = [p for p in self.student.parameters() if p.requires_grad]
        if stage == "kd" and self.distiller is not None:
            params += [p for p in self.distiller.parameters() if p.requires_grad]
        return params

    def _optimizer(self, stage: str, total: int):
        modules = [self.student] + ([self.distiller] if stage == "kd" and self.distiller is not None else [])
        groups = []
        for m in modules:
            groups += param_groups(m, self.config.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=self.config.lr)
        return optimizer, linear_schedule(optimizer, total, self.config.warmup_ratio)

    def _loss(self, stage: str, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        from .teacher import teacher_forward

        c = self.config
        regression = self.info.is_regression
        kd = stage == "kd"
        sites = self.distiller.student_sites if kd else None
        out = student_forward(self.student, batch, c.method, c.timesteps, sites=sites,
                              attention_scores=kd and self.attention_kd, time_chunk=c.time_chunk,
                              solver=c.solver, solver_options={"tol": c.solver_tol, "max_iter": c.solver_max_iter},
                              surrogate=c.surrogate)
        extra: dict[str, Any] = {"_out": out}
        if stage == "finetune":
            return label_loss(out.logits, batch["labels"], regression), extra
        t = teacher_forward(self.teacher, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                            attention_layers=self.distiller.teacher_attention_layers if kd else ())
        if stage == "predict":
            return prediction_loss(out.logits, t.logits, c.temperature, regression), extra
        kd_loss = self.distiller.intermediate_loss(out.asr, t.hidden_states, batch["attention_mask"],
                                                   out.attention_scores, t.attention_scores)
        extra.update(hidden=kd_loss.hidden, attention=kd_loss.attention)
        return kd_loss.total, extra

    # --- files -----------------------------------------------------------------------------------

    def _meta(self, stage: str, metrics: dict[str, float] | None) -> dict[str, Any]:
        from .hf import tokenizer_to_meta

        if not hasattr(self, "_tokenizer_meta"):
            self._tokenizer_meta = tokenizer_to_meta(self.tokenizer)
        return {"tokenizer": self._tokenizer_meta, "task": self.info.name, "timesteps": self.config.timesteps,
                "method": self.config.method, "stage": stage, "step": self.progress.global_step,
                "dev_metrics": metrics or {}, "teacher": self.config.teacher, "command": self.command}

    def _save_last(self, stage: str, optimizer, scheduler, metrics: dict[str, float] | None) -> None:
        from .checkpoint import atomic_torch_save, checkpoint_dict

        if not self.dist.is_main:
            return
        ckpt = checkpoint_dict(self.student, self._meta(stage, metrics), packed=False, half_embeddings=False)
        ckpt["training"] = {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "config": self.fingerprint_config,
            "progress": dataclasses.asdict(self.progress),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "distiller": self.distiller.state_dict() if self.distiller is not None else None,
            "rng": _rng_state(self.device),
        }
        atomic_torch_save(ckpt, self.out / LAST)

    def _save_best(self, stage: str, metrics: dict[str, float]) -> None:
        from .checkpoint import atomic_torch_save, checkpoint_dict

        if self.dist.is_main:
            atomic_torch_save(checkpoint_dict(self.student, self._meta(stage, metrics), packed=True,
                                              half_embeddings=False), self.out / BEST)

    def _append_metrics(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _evaluate(self) -> dict[str, float]:
        c = self.config
        metrics: dict[str, float] = {}
        if self.dist.is_main:
            metrics, _ = evaluate_student(self.student, self.info.name, self.dev_tensors,
                                          c.eval_timesteps or c.timesteps, c.batch_size, self.device,
                                          progress=self._bars)
        _barrier(self.dist)
        return metrics

    # --- the loop --------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        c = self.config
        p = self.progress
        d = self.dist
        self._bars = d.is_main and (sys.stderr.isatty() if self.show_progress is None else self.show_progress)
        if d.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if p.global_step == 0 and not self.saved_training:
                (self.out / METRICS_FILE).unlink(missing_ok=True)  # leftovers of a run killed before its first checkpoint
        last_metrics: dict[str, float] = {}
        main = self.info.main_metric
        if p.done:
            self.log(f"{self.out}: training already finished at step {p.global_step}")
        start_time = time.time()
        while not p.done:
            stage = c.stages[p.stage_index]
            tensors = self.stage_tensors(stage)
            n = tensors["input_ids"].shape[0]
            steps_per_epoch = len(batch_order(n, c.batch_size, c.seed, 0, d.rank, d.world_size))
            total = total_steps(c.epochs, c.max_steps, steps_per_epoch)
            optimizer, scheduler = self._optimizer(stage, total)
            saved = self.saved_training
            if saved is not None and saved.get("optimizer") is not None:
                optimizer.load_state_dict(saved["optimizer"])
                scheduler.load_state_dict(saved["scheduler"])
            self.saved_training = None
            self.student.train()
            bar = tqdm(total=total, initial=p.stage_step, desc=f"{stage} ({c.method}, T={c.timesteps})",
                       unit="step", disable=not self._bars, file=sys.stderr, dynamic_ncols=True)
            loss_sum, loss_count, last_stats = 0.0, 0, None
            progress_log = ProgressLog(log_interval(c.log_every, self._bars), total, self.log, " in the stage")
            order: tuple[int, list[Tensor]] | None = None
            while p.stage_step < total:
                if order is None or order[0] != p.epoch:
                    order = (p.epoch, batch_order(n, c.batch_size, c.seed, p.epoch, d.rank, d.world_size))
                batches = order[1]
                idx = batches[p.position]
                batch = trim_batch({k: v[idx] for k, v in tensors.items()}, self.device)
                loss, extra = self._loss(stage, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                params = self._trainable(stage)
                if d.world_size > 1:
                    _average_gradients(params, d)
                if c.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
                optimizer.step()
                scheduler.step()
                if extra["_out"].solver_stats:
                    last_stats = extra["_out"].solver_stats[-1].to_dict()
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise ConfigError(f"the {stage} loss became {loss_value} at step {p.global_step + 1}; "
                                      "lower --lr")
                loss_sum += loss_value
                loss_count += 1
                p.stage_step += 1
                p.global_step += 1
                p.position += 1
                if p.position == len(batches):
                    p.epoch, p.position = p.epoch + 1, 0
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}")
                stage_done = p.stage_step >= total
                progress_log.step(p.stage_step, loss_value, f"step {p.global_step} [{stage} {p.stage_step}/{total}]")
                epoch_end = p.position == 0
                evaluate = stage_done or (c.eval_every is not None and p.global_step % c.eval_every == 0) or \
                    (c.eval_every is None and epoch_end)
                save = evaluate or (c.save_every is not None and p.global_step % c.save_every == 0)
                if not save:
                    continue
                progress_log.pause()  # evaluation and saving are not training steps: keep them out of s/step
                record = None
                if evaluate:
                    last_metrics = self._evaluate()
                    train_loss = _all_mean(loss_sum / max(loss_count, 1), d, self.device)
                    loss_sum, loss_count = 0.0, 0
                    record = {"step": p.global_step, "stage": stage, "stage_step": p.stage_step,
                              "epoch": p.epoch + p.position / len(batches), "train_loss": train_loss,
                              "lr": scheduler.get_last_lr()[0], "dev": last_metrics,
                              "elapsed_s": round(time.time() - start_time, 2)}
                    if last_stats is not None:
                        record["solver"] = last_stats
                    if "hidden" in extra:
                        record["kd_hidden"] = extra["hidden"]
                        record["kd_attention"] = extra["attention"]
                    value = last_metrics.get(main)
                    improved = value is not None and (p.best_metric is None or value > p.best_metric)
                    if improved:
                        p.best_metric, p.best_step = value, p.global_step
                    record["best"] = bool(improved)
                    self._append_metrics(record)
                    if improved:
                        self._save_best(stage, last_metrics)
                    if d.is_main:
                        self.log(f"step {p.global_step} [{stage}] loss {train_loss:.4f} dev " +
                                 ", ".join(f"{k}={v:.4f}" for k, v in last_metrics.items()) +
                                 (" (best)" if improved else ""))
                if stage_done:  # the saved state points at the next stage
                    p.stage_index, p.stage_step, p.epoch, p.position = p.stage_index + 1, 0, 0, 0
                    p.done = p.stage_index >= len(c.stages)
                    self._save_last(stage, None, None, last_metrics)
                    _barrier(d)
                    break
                self._save_last(stage, optimizer, scheduler, last_metrics)
                _barrier(d)
                progress_log.resume()
            bar.close()
        result = TrainResult(out=self.out, global_step=p.global_step, best_metric=p.best_metric,
                             best_step=p.best_step, last_metrics=last_metrics, model=self.student)
        return result

    def close(self) -> None:
        held = getattr(self, "_held", None)
        if held is not None:
            self._held = None
            held.close()
        if getattr(self, "dist", None) is not None and self.dist.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def train(config: TrainConfig, resume: bool = False, progress: bool | None = None,
          log: Callable[[str], None] | None = None, command: str | None = None) -> TrainResult:
    """Train a spiking student as ``config`` says; see the module doc. ``resume`` continues the run
    whose ``last.pt`` is in ``config.out`` (or starts fresh when there is none)."""
    trainer = Trainer(config, progress=progress, log=log, command=command)
    try:
        trainer.setup(resume=resume)
        return trainer.run()
    finally:
        trainer.close()
