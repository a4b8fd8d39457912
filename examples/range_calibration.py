"""Convert a fine-tuned BERT into a spiking student whose analog rates cover the teacher's value ranges.

    python examples/range_calibration.py --teacher runs/teachers/mrpc --task mrpc --data ../shared/glue \\
        --out runs/mrpc/calibrated.pt
    spikesim eval -c runs/mrpc/calibrated.pt --task mrpc --data ../shared/glue -T 1 --analog
    spikesim eval -c runs/mrpc/calibrated.pt --task mrpc --data ../shared/glue -T 80

``spikesim convert`` copies the teacher's weights as they are, so every neuron sees the teacher's
value and fires ``clip(value / V_th, 0, 1)``: the negative half of every LayerNorm output, key and
value is lost, and values above ``V_th`` saturate. This script rescales each site instead, from the
teacher's own activity on ``--rows`` training examples, so that a site's rate is an affine code
``a = s·x + c`` of the teacher's value ``x`` that maps its ``--quantiles`` (percent) to 0 and 1:

* residual sites (embeddings, attention output, output): one scale and one offset per site, folded
  into the LayerNorm's weight and bias; LayerNorm ignores a common scale and offset of its input, so
  the residual sums stay exact;
* keys and values: a scale and offset per feature, folded into their weights and biases; the query
  takes the inverse key scale (a per-query constant added to every score leaves the softmax
  unchanged, and the value offset passes through the softmax's convex combination);
* intermediate: ``--intermediate`` ``keep`` leaves the GELU's input as the teacher's; ``fit`` scales it
  per feature so the GELU output's upper quantile reaches ``V_th`` (GELU is not homogeneous, so this
  one is approximate);
* ``--shift C`` instead keeps every scale at 1 and only moves each median to ``C`` (no compression).

In the analog network (``clip(I / V_th, 0, 1)`` at every site) this is the teacher's first layers up
to clipping beyond the quantiles. The head, which the teacher's tanh pooler cannot be folded into,
is fitted by ridge regression from the analog [CLS] rates to the teacher's logits on ``--head-rows``
training examples. What the spiking network does with it is another matter: the softmax, LayerNorm
and GELU act on each step's binary spikes, and a compressed code puts rates mid-way, where the
spikes of a step are farthest from their rate (results/mrpc/README.md, step 15).
"""

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor

from spikingbert_sim.checkpoint import save_checkpoint
from spikingbert_sim.data import encode, get_task, load_glue
from spikingbert_sim.equilibrium import steady_state_forward
from spikingbert_sim.errors import SpikingBertError
from spikingbert_sim.evaluation import length_batches, trim_batch
from spikingbert_sim.hf import convert_from_hf, tokenizer_to_meta
from spikingbert_sim.teacher import load_teacher, teacher_logits

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MAX_SAMPLES = 200_000  # values per feature (or per site) that the quantiles are estimated from


@torch.no_grad()
def teacher_activity(bert, tensors: dict[str, Tensor], layers: int) -> dict[str, Tensor]:
    """The teacher's values at each site of its first ``layers`` layers over the valid tokens, in row order:
    ``E`` (embeddings), ``j.k``, ``j.v``, ``j.so`` (attention output), ``j.i`` (GELU output), ``j.o``."""
    found: dict[str, list[Tensor]] = {}
    masks: list[Tensor] = []

    def keep(name):
        return lambda module, args, out: found.setdefault(name, []).append(out.detach().float())

    hooks = [bert.embeddings.LayerNorm.register_forward_hook(keep("E"))]
    for j, layer in enumerate(bert.encoder.layer[:layers]):
        hooks += [layer.attention.self.key.register_forward_hook(keep(f"{j}.k")),
                  layer.attention.self.value.register_forward_hook(keep(f"{j}.v")),
                  layer.attention.output.LayerNorm.register_forward_hook(keep(f"{j}.so")),
                  layer.intermediate.register_forward_hook(keep(f"{j}.i")),
                  layer.output.LayerNorm.register_forward_hook(keep(f"{j}.o"))]
    try:
        for idx in torch.arange(tensors["input_ids"].shape[0]).split(64):  # row order
            b = trim_batch({k: tensors[k][idx] for k in INPUTS}, "cpu")
            bert(**b)
            masks.append(b["attention_mask"].bool())
    finally:
        for h in hooks:
            h.remove()
    return {name: torch.cat([x[m] for x, m in zip(outs, masks)]) for name, outs in found.items()}


def _sample(values: Tensor, generator: torch.Generator) -> Tensor:
    if len(values) <= MAX_SAMPLES:
        return values
    return values[torch.randperm(len(values), generator=generator)[:MAX_SAMPLES]]


def affine_code(values: Tensor, quantiles: tuple[float, float], shift: float | None, per_feature: bool,
                generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Scale ``s`` and offset ``c`` with ``s·x + c`` mapping the quantiles of ``values`` (N, D) to 0
    and 1 (per feature, or one pair for all features); with ``shift``, ``s = 1`` and the median goes
    to ``shift``."""
    x = _sample(values if per_feature else values.reshape(-1, 1), generator)
    if shift is not None:
        s = torch.ones(x.shape[1])
        c = shift - torch.quantile(x, 0.5, dim=0)
    else:
        lo = torch.quantile(x, quantiles[0] / 100, dim=0)
        hi = torch.quantile(x, quantiles[1] / 100, dim=0)
        s = 1.0 / (hi - lo).clamp_min(1e-3)
        c = -lo * s
    return (s, c) if per_feature else (s[0], c[0])


@torch.no_grad()
def calibrate(model, bert, activity: dict[str, Tensor], quantiles=(1.0, 99.0), shift: float | None = None,
              intermediate: str = "keep", seed: int = 0) -> None:
    """Rescale the converted ``model`` (``convert_from_hf`` of ``bert``'s first layers) in place."""
    g = torch.Generator().manual_seed(seed)
    theta = model.config.threshold
    code = lambda name, per_feature: affine_code(activity[name], quantiles, shift, per_feature, g)

    def norm(dst, src, s, c):  # LayerNorm output -> theta * (s * value + c)
        dst.weight.copy_(theta * s * src.weight)
        dst.bias.copy_(theta * (s * src.bias + c))

    s_in, c_in = code("E", False)
    norm(model.embeddings.LayerNorm, bert.embeddings.LayerNorm, s_in, c_in)
    for j, (layer, src) in enumerate(zip(model.layers, bert.encoder.layer)):
        # the layer's input rate is a = s_in * x + c_in, so x = (a - c_in) / s_in
        sk, ck = code(f"{j}.k", True)
        sv, cv = code(f"{j}.v", True)
        pairs = ((layer.key, src.attention.self.key, sk, ck), (layer.value, src.attention.self.value, sv, cv))
        for dst, lin, s, c in pairs:
            dst.weight.copy_(theta * s[:, None] * lin.weight / s_in)
            dst.bias.copy_(theta * (s * (lin.bias - lin.weight.sum(1) * c_in / s_in) + c))
        q = src.attention.self.query  # real valued: q = Q / sk, so q . (sk K + ck) = Q . K + a per-query constant
        layer.query.weight.copy_(q.weight / sk[:, None] / s_in / theta)
        layer.query.bias.copy_((q.bias - q.weight.sum(1) * c_in / s_in) / sk / theta)
        # the attention rate is (sv * context + cv) / theta; the residual sum keeps the input's code
        o = src.attention.output.dense
        layer.attention_output.weight.copy_(s_in * theta * o.weight / sv[None, :])
        layer.attention_output.bias.copy_(s_in * (o.bias - (o.weight / sv[None, :]) @ cv))
        s_so, c_so = code(f"{j}.so", False)
        norm(layer.attention_norm, src.attention.output.LayerNorm, s_so, c_so)
        i = src.intermediate.dense
        if intermediate == "fit":
            hi = torch.quantile(_sample(activity[f"{j}.i"], g), quantiles[1] / 100, dim=0)
            r = theta / hi.clamp_min(1e-3)
        else:
            r = torch.ones(i.out_features)
        layer.intermediate.weight.copy_(r[:, None] * i.weight / s_so)
        layer.intermediate.bias.copy_(r * (i.bias - i.weight.sum(1) * c_so / s_so))
        out = src.output.dense
        layer.output.weight.copy_(s_so * theta * out.weight / r[None, :])
        layer.output.bias.copy_(s_so * out.bias)
        s_in, c_in = code(f"{j}.o", False)
        norm(layer.output_norm, src.output.LayerNorm, s_in, c_in)


@torch.no_grad()
def fit_head(model, teacher, tensors: dict[str, Tensor], ridge: float = 1.0) -> None:
    """Set the classifier to the ridge regression of the teacher's logits on the analog [CLS] rates."""
    n = tensors["input_ids"].shape[0]
    feats = torch.empty(n, model.config.hidden_size, dtype=torch.float64)
    for idx in length_batches(tensors, 64):
        b = trim_batch({k: tensors[k][idx] for k in INPUTS}, "cpu")
        out = steady_state_forward(model, b["input_ids"], b["attention_mask"], b["token_type_ids"],
                                   sites=[model.output_site])
        feats[idx] = model.pool(out.asr[model.output_site], b["attention_mask"]).double()
    a = torch.cat([feats, torch.ones(n, 1, dtype=torch.float64)], 1)
    target = teacher_logits(teacher, tensors).double()
    w = torch.linalg.solve(a.T @ a + ridge * torch.eye(a.shape[1], dtype=torch.float64), a.T @ target)
    model.classifier.weight.copy_(w[:-1].T.float())
    model.classifier.bias.copy_(w[-1].float())


def build(teacher_dir, task: str, data, layers: int, rows: int, head_rows: int, quantiles, shift, intermediate,
          seed: int):
    info = get_task(task)
    teacher, tokenizer = load_teacher(teacher_dir, info.name)
    bert = getattr(teacher, "bert", None)
    if bert is None:
        raise SpikingBertError(f"{teacher_dir} is not a fine-tuned BERT folder (a spiking teacher has no values "
                               "to calibrate to)")
    if layers > len(bert.encoder.layer):
        raise SpikingBertError(f"cannot take {layers} layers from a BERT with {len(bert.encoder.layer)}")
    train = encode(load_glue(info.name, "train", data), tokenizer)
    n = train["input_ids"].shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    model = convert_from_hf(teacher, num_layers=layers)
    calibrate(model, bert, teacher_activity(bert, {k: v[order[:rows]] for k, v in train.items()}, layers),
              quantiles, shift, intermediate, seed)
    fit_head(model.eval(), teacher, {k: v[order[:head_rows]] for k, v in train.items()})
    return model, tokenizer, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="a fine-tuned BERT folder (spikesim teacher --out)")
    parser.add_argument("--task", required=True)
    parser.add_argument("--data", default=None, help="GLUE folder (default: the hub)")
    parser.add_argument("--layers", type=int, default=4, help="the teacher's first N layers")
    parser.add_argument("--rows", type=int, default=512, help="training examples the ranges come from")
    parser.add_argument("--head-rows", type=int, default=4000, help="training examples the head is fitted on")
    parser.add_argument("--quantiles", type=float, nargs=2, default=(1.0, 99.0), metavar=("LOW", "HIGH"),
                        help="percentiles of each site's values mapped to rates 0 and 1")
    parser.add_argument("--shift", type=float, default=None, help="no scaling: move each median to this rate")
    parser.add_argument("--intermediate", choices=("keep", "fit"), default="keep")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="the spiking checkpoint to write")
    args = parser.parse_args()

    for name in ("layers", "rows", "head_rows"):
        if getattr(args, name) < 1:
            sys.exit(f"error: --{name.replace('_', '-')} must be a positive integer")
    low, high = args.quantiles
    if not 0 <= low < high <= 100:
        sys.exit("error: --quantiles needs 0 <= LOW < HIGH <= 100")
    if args.shift is not None and not 0 <= args.shift <= 1:
        sys.exit("error: --shift must be a rate in [0, 1]")
    try:
        model, tokenizer, info = build(args.teacher, args.task, args.data, args.layers, args.rows, args.head_rows,
                                       (low, high), args.shift, args.intermediate, args.seed)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(model, args.out, meta={"tokenizer": tokenizer_to_meta(tokenizer), "task": info.name,
                                               "command": " ".join(["python"] + sys.argv)})
    except SpikingBertError as exc:
        sys.exit(f"error: {exc}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
