"""What does the teacher say about an augmented inputs file? Its answers on original training
examples beside its answers on their augmented copies (``spikesim augment`` output).

    python examples/teacher_on_augmented.py --teacher runs/teachers/mrpc --task mrpc \\
        --data ../shared/glue --inputs runs/aug/mrpc-8.tsv --limit 400

Prints one JSON object. For a classification task: the share of each class among the teacher's
answers on the originals and on the copies, the teacher's mean entropy (nats) on each, and
``agreement``, the share of copies that the teacher puts in the class it gives their source example.
For STS-B: the mean predicted score on each and the mean absolute change from source to copy.
Word replacement that flips many answers (a paraphrase that no longer is one) shifts the distribution
of the soft labels that the student is distilled on; `spikesim augment --filter-teacher` drops those copies.
"""

import argparse
import json
import sys

import torch

from spikingbert_sim.augment import read_inputs_tsv, read_sources, teacher_consistent
from spikingbert_sim.data import encode, get_task, load_glue
from spikingbert_sim.errors import DataError, SpikingBertError
from spikingbert_sim.teacher import load_teacher, teacher_logits


def summarize(logits: torch.Tensor, regression: bool, label_names) -> dict:
    if regression:
        return {"mean_score": round(float(logits[:, 0].mean()), 4)}
    p = logits.softmax(-1)
    answers = p.argmax(-1)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
    return {"answers": {name: round(float((answers == c).float().mean()), 4) for c, name in enumerate(label_names)},
            "mean_entropy_nats": round(float(entropy.mean()), 4)}


def compare(teacher_dir, task: str, data, inputs, limit: int) -> dict:
    """The report for the first ``limit`` training examples of ``task`` and their copies in ``inputs``."""
    info = get_task(task)
    teacher, tokenizer = load_teacher(teacher_dir, info.name)
    originals = load_glue(info.name, "train", data, limit=limit)
    sources = read_sources(inputs, below=len(originals.text_a))
    if not sources:
        raise DataError(f"{inputs}: no copies of the first {len(originals.text_a)} training examples")
    copies = read_inputs_tsv(inputs, info.name, limit=len(sources))
    orig_out = teacher_logits(teacher, encode(originals, tokenizer))
    copy_out = teacher_logits(teacher, encode(copies, tokenizer))
    index = torch.tensor(sources)
    report = {"task": info.name, "originals": len(originals.text_a), "copies": len(sources),
              "on_originals": summarize(orig_out, info.is_regression, info.label_names),
              "on_copies": summarize(copy_out, info.is_regression, info.label_names)}
    if info.is_regression:
        report["mean_abs_score_change"] = round(float((copy_out[:, 0] - orig_out[index, 0]).abs().mean()), 4)
    else:
        report["agreement"] = round(float(teacher_consistent(orig_out, copy_out, index).float().mean()), 4)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="teacher folder (spikesim teacher --out)")
    parser.add_argument("--task", required=True)
    parser.add_argument("--data", default=None, help="GLUE folder (default: the hub)")
    parser.add_argument("--inputs", required=True, help="augmented inputs TSV with a 'source' column")
    parser.add_argument("--limit", type=int, default=400, help="the first N training examples and their copies")
    args = parser.parse_args()

    if args.limit < 1:
        sys.exit("error: --limit must be a positive integer")
    try:
        print(json.dumps(compare(args.teacher, args.task, args.data, args.inputs, args.limit)))
    except SpikingBertError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
