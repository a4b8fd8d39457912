"""GLUE task data: task metadata, a strict reader of the classic ``glue_data/`` TSV files, the
Hugging Face ``datasets`` hub as a fallback, and tokenization into tensors.

Two sources give the same :class:`GlueSplit`:

- ``load_glue(task, split, data_dir=...)`` reads the TSV files that GLUE's ``download_glue_data.py``
  produces (``SST-2/dev.tsv``, ``MNLI/dev_matched.tsv``, ...). Every row is checked: a short row,
  an unknown label or a non-numeric STS-B score raises :class:`DataError` naming the file and line,
  because silently skipping rows would change the reported dev scores.
- ``load_glue(task, split)`` without ``data_dir`` calls ``datasets.load_dataset("glue", task)``.

Labels follow the hub's ``ClassLabel`` order in both cases, so a model trained on one source
evaluates correctly on the other.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import torch
from torch.utils.data import Dataset

from .errors import DataError

TASK_TO_KEYS: dict[str, tuple[str, str | None]] = {
    "cola": ("sentence", None),
    "sst2": ("sentence", None),
    "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "stsb": ("sentence1", "sentence2"),
    "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
"""Text columns of each task on the ``datasets`` hub (as in Hugging Face ``run_glue.py``)."""


# --- task metadata --------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskInfo:
    """What the rest of the toolkit needs to know about one GLUE task."""

    name: str  # task name as `datasets` spells it: sst2, mrpc, ..., stsb
    num_labels: int  # classes of the head; 1 for the STS-B regression
    is_regression: bool  # True only for stsb (a similarity score in [0, 5])
    label_names: tuple[str, ...]  # class names in the hub's ClassLabel order (empty for stsb)
    metric_names: tuple[str, ...]  # keys that metrics.compute_metrics returns for this task
    main_metric: str  # the key to rank checkpoints by
    folder: str  # folder of the classic glue_data/ layout: SST-2, MRPC, STS-B, ...
    # canonical split name (hub spelling) -> TSV file name inside `folder`; excluded from the hash
    # because a mapping is unhashable, and it is determined by `name` anyway.
    split_files: Mapping[str, str] = field(hash=False)

    @property
    def splits(self) -> tuple[str, ...]:
        """Canonical split names (the hub's): ``train``, ``validation`` or MNLI's two dev sets."""
        return tuple(self.split_files)

    @property
    def is_pair(self) -> bool:
        """Whether each example is a sentence pair (``text_b`` present)."""
        return TASK_TO_KEYS[self.name][1] is not None

    def canonical_split(self, split: str) -> str:
        """Map a split alias to the hub's name: ``dev`` → ``validation``; for MNLI ``dev`` and
        ``validation`` mean ``validation_matched`` (as GLUE reports matched accuracy as MNLI-m)."""
        key = split.strip().lower().replace("-", "_")
        if self.name == "mnli":
            aliases = {"dev": "validation_matched", "validation": "validation_matched",
                       "dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"}
        else:
            aliases = {"dev": "validation"}
        key = aliases.get(key, key)
        if key not in self.split_files:
            choices = ", ".join(list(self.split_files) + sorted(aliases))
            raise DataError(f"unknown split {split!r} for task {self.name} (choose from {choices})")
        return key


def _task(name: str, label_names: tuple[str, ...], metrics: tuple[str, ...], main: str, folder: str,
          split_files: dict[str, str] | None = None) -> TaskInfo:
    is_regression = not label_names
    files = split_files or {"train": "train.tsv", "validation": "dev.tsv"}
    return TaskInfo(name=name, num_labels=1 if is_regression else len(label_names),
                    is_regression=is_regression, label_names=label_names, metric_names=metrics,
                    main_metric=main, folder=folder, split_files=MappingProxyType(files))


_PAIR_METRICS = ("accuracy", "f1", "combined")  # GLUE reports MRPC and QQP as accuracy and F1
_CORR_METRICS = ("pearson", "spearman", "combined")

TASKS: dict[str, TaskInfo] = {t.name: t for t in (
    _task("cola", ("unacceptable", "acceptable"), ("matthews",), "matthews", "CoLA"),
    _task("sst2", ("negative", "positive"), ("accuracy",), "accuracy", "SST-2"),
    _task("mrpc", ("not_equivalent", "equivalent"), _PAIR_METRICS, "combined", "MRPC"),
    _task("qqp", ("not_duplicate", "duplicate"), _PAIR_METRICS, "combined", "QQP"),
    _task("stsb", (), _CORR_METRICS, "combined", "STS-B"),
    _task("mnli", ("entailment", "neutral", "contradiction"), ("accuracy",), "accuracy", "MNLI",
          {"train": "train.tsv", "validation_matched": "dev_matched.tsv",
           "validation_mismatched": "dev_mismatched.tsv"}),
    _task("qnli", ("entailment", "not_entailment"), ("accuracy",), "accuracy", "QNLI"),
    _task("rte", ("entailment", "not_entailment"), ("accuracy",), "accuracy", "RTE"),
    # The WNLI TSV writes 1 for entailment, so the hub lists not_entailment first.
    _task("wnli", ("not_entailment", "entailment"), ("accuracy",), "accuracy", "WNLI"),
)}
"""Every GLUE task with labels (the diagnostic set AX has none and is not a task here)."""


def get_task(name: str) -> TaskInfo:
    """The :class:`TaskInfo` of a task; accepts the classic spellings too (``SST-2``, ``STS-B``)."""
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise DataError(f"unknown task {name!r} (choose from {', '.join(TASKS)})")
    return TASKS[key]


# --- examples -------------------------------------------------------------------------------------

@dataclass
class GlueSplit:
    """The examples of one task split, column-wise (``text_b`` is ``None`` for single sentences)."""

    task: str  # canonical task name (sst2, ...)
    split: str  # canonical split name (train, validation, validation_matched, ...)
    text_a: list[str]
    text_b: list[str] | None
    labels: list[int | float]  # class ids in label_names order, or STS-B scores in [0, 5]

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.text_a) or (self.text_b is not None and len(self.text_b) != len(self.text_a)):
            raise DataError(f"{self.task} {self.split}: text_a, text_b and labels differ in length")

    def __len__(self) -> int:
        return len(self.text_a)


# --- classic TSV files ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _TsvFormat:
    """Where a task's fields sit in its classic TSV file.

    Columns are header names, except in headerless files (CoLA), where they are 0-based indices.
    """

    text_a: str | int
    text_b: str | int | None
    label: str | int
    label_values: tuple[str, ...] | None  # raw label strings in class-id order; None: float score
    num_columns: int | None = None  # headerless files only: the fixed number of columns


_TSV_FORMATS: dict[str, _TsvFormat] = {
    # CoLA train/dev: source, label, original-label mark ("*", "?", ...), sentence; no header.
    "cola": _TsvFormat(3, None, 1, ("0", "1"), num_columns=4),
    "sst2": _TsvFormat("sentence", None, "label", ("0", "1")),
    # MRPC: Quality, #1 ID, #2 ID, #1 String, #2 String (file starts with a BOM).
    "mrpc": _TsvFormat("#1 String", "#2 String", "Quality", ("0", "1")),
    "qqp": _TsvFormat("question1", "question2", "is_duplicate", ("0", "1")),
    # STS-B: index, genre, filename, year, old_index, source1, source2, sentence1, sentence2, score;
    # these names are columns 7, 8 and the last, where transformers' StsbProcessor reads them.
    "stsb": _TsvFormat("sentence1", "sentence2", "score", None),
    # MNLI: 12 columns in train, 16 in dev (five annotator labels); gold_label is always last.
    "mnli": _TsvFormat("sentence1", "sentence2", "gold_label", ("entailment", "neutral", "contradiction")),
    "qnli": _TsvFormat("question", "sentence", "label", ("entailment", "not_entailment")),
    "rte": _TsvFormat("sentence1", "sentence2", "label", ("entailment", "not_entailment")),
    "wnli": _TsvFormat("sentence1", "sentence2", "label", ("0", "1")),
}

STSB_RANGE = (0.0, 5.0)  # STS-B similarity scores are annotated on a 0-5 scale


def _find_task_dir(info: TaskInfo, data_dir: Path, file_name: str) -> Path:
    """The folder holding the task's files: ``data_dir/<folder>`` or ``data_dir`` itself."""
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} does not exist")
    for candidate in (info.folder, info.folder.lower(), info.name):
        if (data_dir / candidate).is_dir():
            return data_dir / candidate
    # The user may point at the task folder itself; refuse another task's folder, which could hold
    # a file of the same name and format (RTE and WNLI share theirs).
    other = get_task(data_dir.name) if data_dir.name.lower().replace("-", "") in TASKS else None
    if other is not None and other.name != info.name:
        raise DataError(f"{data_dir} is the folder of task {other.name}, not {info.name}")
    if (data_dir / file_name).is_file() or other is not None:
        return data_dir
    raise DataError(f"no {info.folder} folder for task {info.name} in {data_dir}")


def read_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """``(line number, fields)`` of each row, with quoting disabled: GLUE sentences may begin with
    a bare double quote, which the default dialect would take as the start of a multi-line field."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig drops MRPC's BOM
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            try:
                for fields in reader:
                    yield reader.line_num, fields
            except csv.Error as e:  # e.g. a field over csv.field_size_limit()
                raise DataError(f"{path}:{reader.line_num}: {e}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def _column_index(path: Path, header: list[str], column: str) -> int:
    try:
        return header.index(column)
    except ValueError:
        raise DataError(f"{path}:1: no column {column!r} in the header ({', '.join(header)})") from None


def _read_tsv(info: TaskInfo, path: Path, split: str, limit: int | None) -> GlueSplit:
    """Parse one classic GLUE TSV file, checking every row it reads."""
    fmt = _TSV_FORMATS[info.name]
    rows = read_rows(path)
    if fmt.num_columns is None:
        first = next(rows, None)
        if first is None:
            raise DataError(f"{path} is empty (expected a header line)")
        header = first[1]
        num_columns = len(header)
        a, label = (_column_index(path, header, c) for c in (fmt.text_a, fmt.label))
        b = _column_index(path, header, fmt.text_b) if fmt.text_b is not None else None
    else:
        num_columns, a, b, label = fmt.num_columns, fmt.text_a, fmt.text_b, fmt.label

    label_ids = {raw: i for i, raw in enumerate(fmt.label_values or ())}
    text_a: list[str] = []
    text_b: list[str] | None = [] if b is not None else None
    labels: list[int | float] = []
    for line, fields in rows:
        if limit is not None and len(labels) >= limit:
            break
        # Extra columns are as wrong as missing ones: with quoting off they mean a stray tab inside
        # a sentence, and every later field would be read from the wrong column.
        if len(fields) != num_columns:
            raise DataError(f"{path}:{line}: expected {num_columns} columns, got {len(fields)}")
        raw = fields[label]
        if fmt.label_values is None:
            labels.append(_parse_score(path, line, raw))
        elif raw in label_ids:
            labels.append(label_ids[raw])
        else:
            raise DataError(f"{path}:{line}: label {raw!r} not in {', '.join(fmt.label_values)}")
        text_a.append(fields[a])  # verbatim: no stripping, so tokenization matches the hub's text
        if text_b is not None:
            text_b.append(fields[b])
    if not labels and limit != 0:  # a header-only (or empty headerless) file: a truncated download
        raise DataError(f"{path} has no examples")
    return GlueSplit(task=info.name, split=split, text_a=text_a, text_b=text_b, labels=labels)


def _parse_score(path: Path, line: int, raw: str) -> float:
    try:
        score = float(raw)
    except ValueError:
        raise DataError(f"{path}:{line}: score {raw!r} is not a number") from None
    low, high = STSB_RANGE
    if not math.isfinite(score):
        raise DataError(f"{path}:{line}: score {raw!r} is not a finite number")
    if not low <= score <= high:
        raise DataError(f"{path}:{line}: score {raw!r} not in [{low:g}, {high:g}]")
    return score


# --- the datasets hub -----------------------------------------------------------------------------

def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _load_hub(info: TaskInfo, split: str, limit: int | None) -> GlueSplit:
    """Download (or read from the `datasets` cache) a split and convert it to a GlueSplit."""
    where = f"glue/{info.name} split {split} from the datasets hub"
    try:
        import datasets

        ds = datasets.load_dataset("glue", info.name, split=split)
        # Slicing gives plain column lists; slice before converting so `limit` saves the work.
        columns = ds[: len(ds) if limit is None else min(limit, len(ds))]
    except Exception as e:  # no network, unknown config, corrupt cache, missing package, ...
        raise DataError(f"could not load {where}: {_one_line(e)}") from e

    key_a, key_b = TASK_TO_KEYS[info.name]
    for key in (key_a, key_b, "label"):
        if key is not None and key not in columns:
            raise DataError(f"{where} has no column {key!r} (found: {', '.join(columns)})")
    if info.is_regression:
        labels: list[int | float] = [float(v) for v in columns["label"]]
    else:
        labels = [int(v) for v in columns["label"]]
        bad = next((v for v in labels if not 0 <= v < info.num_labels), None)
        if bad is not None:  # the hub's test splits carry -1
            raise DataError(f"{where}: label {bad} not in 0..{info.num_labels - 1} (an unlabelled split?)")
    return GlueSplit(task=info.name, split=split, text_a=list(columns[key_a]),
                     text_b=list(columns[key_b]) if key_b is not None else None, labels=labels)


# --- public loader --------------------------------------------------------------------------------

def load_glue(task: str, split: str = "train", data_dir: str | Path | None = None,
              limit: int | None = None) -> GlueSplit:
    """Load one split of a GLUE task.

    Args:
        task: ``sst2``, ``mrpc``, ``qqp``, ``mnli``, ``qnli``, ``rte``, ``stsb``, ``cola`` or
            ``wnli`` (classic spellings such as ``SST-2`` are accepted).
        split: ``train``, ``validation`` (alias ``dev``); for MNLI ``validation_matched``
            (also ``validation`` / ``dev``) or ``validation_mismatched``.
        data_dir: a classic ``glue_data/`` folder holding task folders, or one task's folder.
            ``None`` loads from the Hugging Face ``datasets`` hub instead.
        limit: keep only the first ``limit`` examples.

    Raises:
        DataError: unknown task or split, missing folder or file, a malformed row (the message
            names the file and 1-based line), or a failure of the hub download.
    """
    info = get_task(task)
    split = info.canonical_split(split)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise DataError(f"limit must be a non-negative integer, got {limit!r}")
    if data_dir is None:
        return _load_hub(info, split, limit)
    file_name = info.split_files[split]
    task_dir = _find_task_dir(info, Path(data_dir), file_name)
    path = task_dir / file_name
    if not path.is_file():
        raise DataError(f"no {file_name} for task {info.name} in {task_dir}")
    return _read_tsv(info, path, split, limit)


# --- tensors --------------------------------------------------------------------------------------

def encode(split: GlueSplit, tokenizer, max_length: int = 128) -> dict[str, torch.Tensor]:
    """Tokenize a split into fixed-size tensors, as ``run_glue.py`` does with ``pad_to_max_length``.

    Returns ``input_ids``, ``attention_mask``, ``token_type_ids`` (each a LongTensor of shape
    ``(N, max_length)``) and ``labels`` (``(N,)``, long, or float32 for STS-B). Pairs are truncated
    ``longest_first`` so both sentences keep tokens. ``token_type_ids`` are zeros for tokenizers
    that do not produce them, so every model input is always present.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"max_length must be an integer >= 2 (room for [CLS] and [SEP]), got {max_length!r}")
    info = get_task(split.task)
    label_dtype = torch.float32 if info.is_regression else torch.long
    labels = torch.tensor(split.labels, dtype=label_dtype)
    if len(split) == 0:  # tokenizers index the first encoding, so an empty batch would fail inside
        empty = torch.zeros(0, max_length, dtype=torch.long)
        return {"input_ids": empty, "attention_mask": empty.clone(), "token_type_ids": empty.clone(),
                "labels": labels}
    args = (split.text_a,) if split.text_b is None else (split.text_a, split.text_b)
    enc = tokenizer(*args, padding="max_length", truncation="longest_first", max_length=max_length,
                    return_tensors="pt")
    input_ids = enc["input_ids"].long()  # (N, max_length)
    token_type_ids = enc.get("token_type_ids")
    return {
        "input_ids": input_ids,
        "attention_mask": enc["attention_mask"].long(),
        "token_type_ids": token_type_ids.long() if token_type_ids is not None else torch.zeros_like(input_ids),
        "labels": labels,
    }


class GlueDataset(Dataset):
    """A ``torch.utils.data.Dataset`` over :func:`encode`'s tensors: item ``i`` is a dict of the
    ``i``-th row of each tensor, so the default collate function stacks them back into a batch."""

    def __init__(self, encoded: Mapping[str, torch.Tensor]):
        sizes = {name: t.shape[0] for name, t in encoded.items()}
        if len(set(sizes.values())) > 1:
            raise DataError(f"tensors differ in their number of examples: {sizes}")
        self.tensors = dict(encoded)
        self._len = next(iter(sizes.values()), 0)

    @classmethod
    def from_split(cls, split: GlueSplit, tokenizer, max_length: int = 128) -> GlueDataset:
        """Tokenize ``split`` with :func:`encode` and wrap the result."""
        return cls(encode(split, tokenizer, max_length=max_length))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: t[index] for name, t in self.tensors.items()}
