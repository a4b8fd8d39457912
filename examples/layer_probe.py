"""How much of the task does each layer of a spiking student carry, beside each layer of its teacher?

    python examples/layer_probe.py --checkpoint runs/mrpc/fp-s-kd/last.pt --teacher runs/teachers/mrpc \\
        --task mrpc --data ../shared/glue --out results/mrpc/layer-probe-fp-s-kd.json

A linear probe per layer: ridge regression from a layer's pooled activity (the [CLS] position, and
the mean over valid tokens) to the teacher's logits on the training examples (the target the
student's head is distilled on), scored with the task's main metric (MRPC: the mean of accuracy and
F1) against the true labels on the training examples it was fitted on and on the dev split (every
metric of the task on dev in ``dev_metrics``). The student's layers are its layer-output
ASRs (``embeddings``, ``layer.i.output``), at the analog equilibrium by default or, with
``--timesteps T``, measured by a T-step spiking simulation; the teacher's are its hidden states
0 (embeddings) to M. Features are standardized on the training rows; the ridge penalty is
``--ridge`` times the number of training rows.

A probe's dev score tells which teacher depth a student layer's information reaches: a student
whose last layer probes like the teacher's second layer has not learned what the teacher's later
layers add, whatever its own head scores. Prints one JSON object (and writes it with ``--out``).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import Tensor

from spikingbert_sim.checkpoint import load_checkpoint
from spikingbert_sim.data import encode, get_task, load_glue
from spikingbert_sim.equilibrium import equilibrium_forward, steady_state_forward
from spikingbert_sim.errors import SpikingBertError
from spikingbert_sim.evaluation import length_batches, trim_batch
from spikingbert_sim.fileio import atomic_write_text
from spikingbert_sim.metrics import compute_metrics
from spikingbert_sim.model import token_mean
from spikingbert_sim.runner import check_head_fits_task
from spikingbert_sim.teacher import load_teacher, teacher_forward

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def pool(h: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
    """(B, L, D) -> {"cls": (B, D), "mean": (B, D) over valid tokens}."""
    return {"cls": h[:, 0], "mean": token_mean(h, attention_mask)}


@torch.no_grad()
def layer_features(model, teacher, tensors: dict[str, Tensor], timesteps: int | None, batch_size: int = 32):
    """Pooled features of every student layer output and teacher hidden state, and the teacher's
    logits: ``({(name, pool): (N, D)}, (N, num_labels))``. Student names are its site names,
    teacher ones ``teacher.j`` (hidden state j)."""
    n = tensors["input_ids"].shape[0]
    feats: dict[tuple[str, str], Tensor] = {}
    logits = None
    sites = model.layer_output_sites()
    for idx in length_batches(tensors, batch_size):
        b = trim_batch({k: tensors[k][idx] for k in INPUTS}, "cpu")
        args = (b["input_ids"], b["attention_mask"], b["token_type_ids"])
        asr = (steady_state_forward(model, *args, sites=sites) if timesteps is None
               else equilibrium_forward(model, *args, timesteps=timesteps, sites=sites)).asr
        t = teacher_forward(teacher, b["input_ids"], b["attention_mask"], b["token_type_ids"])
        layers = [(s, asr[s]) for s in sites] + [(f"teacher.{j}", h) for j, h in enumerate(t.hidden_states)]
        for name, h in layers:
            for kind, v in pool(h.float(), b["attention_mask"]).items():
                feats.setdefault((name, kind), torch.empty(n, v.shape[-1]))[idx] = v
        if logits is None:
            logits = torch.empty(n, t.logits.shape[-1])
        logits[idx] = t.logits.float()
    return feats, logits


def ridge_probe(x_train: Tensor, y_train: Tensor, x_eval: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """Fit ``y ≈ standardized(x) W + b`` on the training rows (penalty ``ridge · N`` on W, none on b);
    returns the fitted values on the training rows and on ``x_eval``."""
    mu, sd = x_train.double().mean(0), x_train.double().std(0).clamp_min(1e-6)
    a = torch.cat([(x_train.double() - mu) / sd, torch.ones(len(x_train), 1, dtype=torch.float64)], 1)
    e = torch.cat([(x_eval.double() - mu) / sd, torch.ones(len(x_eval), 1, dtype=torch.float64)], 1)
    penalty = torch.eye(a.shape[1], dtype=torch.float64) * ridge * len(a)
    penalty[-1, -1] = 0.0
    w = torch.linalg.solve(a.T @ a + penalty, a.T @ y_train.double())
    return (a @ w).float(), (e @ w).float()


def probe(checkpoint, teacher_dir, task: str, data, limit_train: int | None, timesteps: int | None,
          ridge: float) -> dict:
    info = get_task(task)
    loaded = load_checkpoint(checkpoint)
    model = loaded.model.eval()
    teacher, tokenizer = load_teacher(teacher_dir, info.name)
    check_head_fits_task(model, info.name)
    train = encode(load_glue(info.name, "train", data, limit=limit_train), tokenizer)
    dev = encode(load_glue(info.name, "validation", data), tokenizer)
    f_train, t_train = layer_features(model, teacher, train, timesteps)
    f_dev, t_dev = layer_features(model, teacher, dev, timesteps)
    metric = info.main_metric
    def scores(fit_train: Tensor, fit_dev: Tensor) -> dict:
        train_m = compute_metrics(info.name, fit_train.numpy(), train["labels"].numpy())
        dev_m = compute_metrics(info.name, fit_dev.numpy(), dev["labels"].numpy())
        return {"train": round(100 * train_m[metric], 2), "dev": round(100 * dev_m[metric], 2),
                "dev_metrics": {k: round(100 * v, 2) for k, v in dev_m.items()}}

    layers = []
    for (name, kind), x in f_train.items():
        layers.append({"layer": name, "pool": kind, **scores(*ridge_probe(x, t_train, f_dev[(name, kind)], ridge))})
    return {"checkpoint": str(checkpoint), "teacher": str(teacher_dir), "task": info.name, "metric": metric,
            "features": "analog equilibrium" if timesteps is None else f"spiking, T = {timesteps}",
            "train_rows": len(train["labels"]), "dev_rows": len(dev["labels"]), "ridge": ridge,
            "teacher_logits": scores(t_train, t_dev), "layers": layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a spiking student checkpoint")
    parser.add_argument("--teacher", required=True, help="its teacher folder (spikesim teacher --out)")
    parser.add_argument("--task", required=True)
    parser.add_argument("--data", default=None, help="GLUE folder (default: the hub)")
    parser.add_argument("--limit-train", type=int, default=None, help="fit on the first N training examples")
    parser.add_argument("--timesteps", type=int, default=None,
                        help="probe the spiking ASRs of a T-step simulation (default: the analog equilibrium)")
    parser.add_argument("--ridge", type=float, default=1e-4, help="ridge penalty per training row")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()

    for name in ("limit_train", "timesteps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            sys.exit(f"error: --{name.replace('_', '-')} must be a positive integer")
    if not args.ridge >= 0:
        sys.exit("error: --ridge must be >= 0")
    try:
        report = probe(args.checkpoint, args.teacher, args.task, args.data, args.limit_train, args.timesteps,
                       args.ridge)
    except SpikingBertError as exc:
        sys.exit(f"error: {exc}")
    text = json.dumps(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, text + "\n")
    print(text)


if __name__ == "__main__":
    main()
