"""Data augmentation for distillation on small tasks: word replacement by embedding neighbours.

TinyBERT (Jiao et al. 2020, Sec. 3.3) distils its small-task students on an augmented set: every
training sentence is copied N times (N = 20), and in each copy every word is replaced, with
probability p (0.4), by one of its K (15) most likely substitutes: BERT's masked-LM predictions for
single-piece words, GloVe neighbours for the others. The teacher then labels the copies, so the
replacements need not keep the meaning, only the input distribution. The offline MiniLM has no
masked-LM head, so here the substitutes of a single-piece word are its K nearest vocabulary words by
cosine similarity of the BERT's input word embeddings (the same space GloVe neighbours live in);
words that the tokenizer splits into several pieces, punctuation and numbers are kept::

    from spikingbert_sim.augment import AugmentOptions, augment_split
    rows = augment_split(load_glue("mrpc", "train", "../shared/glue"), tokenizer, embeddings,
                         AugmentOptions(copies=4, prob=0.4, neighbours=15, seed=42))

``spikesim augment`` writes the copies as a TSV file of inputs (``sentence`` or ``sentence1``,
``sentence2``, and the ``source`` row they came from), which ``spikesim train --transfer-file``
adds to the ``kd`` and ``predict`` stages, where the teacher supplies every target.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .errors import ConfigError, DataError

WORD = re.compile(r"[^\W\d_]{2,}")  # a candidate vocabulary word: two or more letters, nothing else


@dataclass(frozen=True)
class AugmentOptions:
    copies: int = 20  # augmented copies per example (TinyBERT: 20)
    prob: float = 0.4  # chance that each eligible word of a copy is replaced (TinyBERT: 0.4)
    neighbours: int = 15  # substitutes per word, drawn uniformly (TinyBERT: K = 15)
    seed: int = 42

    def __post_init__(self) -> None:
        if isinstance(self.copies, bool) or not isinstance(self.copies, int) or self.copies < 1:
            raise ConfigError(f"copies must be a positive integer, got {self.copies!r}")
        if not 0.0 < self.prob <= 1.0:
            raise ConfigError(f"prob must be in (0, 1], got {self.prob!r}")
        if isinstance(self.neighbours, bool) or not isinstance(self.neighbours, int) or self.neighbours < 1:
            raise ConfigError(f"neighbours must be a positive integer, got {self.neighbours!r}")


def word_vocabulary(tokenizer) -> dict[str, int]:
    """The tokenizer's whole-word entries (letters only, not ``##`` pieces, special or unused tokens)."""
    specials = set(tokenizer.all_special_tokens)
    return {w: i for w, i in tokenizer.get_vocab().items() if w not in specials and WORD.fullmatch(w)}


class NeighbourTable:
    """The ``k`` nearest whole-word vocabulary entries of each queried word, by cosine similarity of
    the rows of ``embeddings`` (``[vocab, dim]``); computed for the queried words only, in chunks."""

    def __init__(self, embeddings: Tensor, vocabulary: dict[str, int], k: int):
        if embeddings.dim() != 2:
            raise ConfigError(f"word embeddings must be a [vocab, dim] matrix, got shape {tuple(embeddings.shape)}")
        if len(vocabulary) < 2:
            raise ConfigError("the tokenizer has fewer than two whole-word vocabulary entries to substitute")
        top = max(vocabulary.values())
        if top >= embeddings.shape[0]:
            raise ConfigError(f"the tokenizer has id {top} but the embedding matrix only {embeddings.shape[0]} rows")
        self.words = sorted(vocabulary, key=vocabulary.get)
        self.ids = torch.tensor([vocabulary[w] for w in self.words])
        self.index = {w: i for i, w in enumerate(self.words)}
        unit = torch.nn.functional.normalize(embeddings.detach().float(), dim=1)
        self.unit = unit[self.ids]  # candidates only
        self.k = min(k, len(self.words) - 1)
        self._table: dict[str, tuple[str, ...]] = {}

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def prepare(self, words: set[str], chunk: int = 1024) -> None:
        """Compute the neighbours of ``words`` (those in the vocabulary) in one pass of chunked products."""
        todo = sorted(w for w in words if w in self.index and w not in self._table)
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            rows = torch.tensor([self.index[w] for w in part])
            sim = self.unit[rows] @ self.unit.T  # [chunk, candidates]
            sim[torch.arange(len(part)), rows] = -float("inf")  # never the word itself
            best = sim.topk(self.k, dim=1).indices
            for w, idx in zip(part, best.tolist()):
                self._table[w] = tuple(self.words[j] for j in idx)

    def __getitem__(self, word: str) -> tuple[str, ...]:
        if word not in self._table:
            self.prepare({word})
        return self._table[word]


def words_with_offsets(tokenizer, text: str) -> tuple[str, list[tuple[str, tuple[int, int]]]]:
    """The tokenizer-normalized text (lower-cased, accents stripped for an uncased BERT) and its
    pre-tokenized words with their character spans in it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError("augmentation needs a fast (Rust) tokenizer, which reports word offsets")
    normalized = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
    return normalized, backend.pre_tokenizer.pre_tokenize_str(normalized)


def augment_text(text: str, tokenizer, table: NeighbourTable, prob: float, rng: random.Random) -> str:
    """One copy of ``text`` with each whole word that has neighbours replaced by a random one of them
    with probability ``prob``; everything else (spacing, punctuation, split words) as normalized."""
    normalized, words = words_with_offsets(tokenizer, text)
    out, pos = [], 0
    for word, (start, end) in words:
        if word in table and rng.random() < prob:
            out.append(normalized[pos:start])
            out.append(rng.choice(table[word]))
            pos = end
    out.append(normalized[pos:])
    return "".join(out)


def augment_split(split, tokenizer, embeddings: Tensor, options: AugmentOptions) -> Iterator[tuple[int, str, str | None]]:
    """``(source row, text_a, text_b)`` for ``options.copies`` copies of every example of ``split``
    (a :class:`~spikingbert_sim.data.GlueSplit`); both sentences of a pair are varied independently.
    Copies identical to their source are dropped. Deterministic for a given seed."""
    table = NeighbourTable(embeddings, word_vocabulary(tokenizer), options.neighbours)
    texts = list(split.text_a) + list(split.text_b or [])
    table.prepare({w for t in texts for w, _ in words_with_offsets(tokenizer, t)[1]})
    rng = random.Random(options.seed)
    for row in range(len(split)):
        a = split.text_a[row]
        b = split.text_b[row] if split.text_b is not None else None
        seen = {(words_with_offsets(tokenizer, a)[0], words_with_offsets(tokenizer, b)[0] if b is not None else None)}
        for _ in range(options.copies):
            new_a = augment_text(a, tokenizer, table, options.prob, rng)
            new_b = augment_text(b, tokenizer, table, options.prob, rng) if b is not None else None
            if (new_a, new_b) not in seen:  # not the source itself, nor an earlier copy
                seen.add((new_a, new_b))
                yield row, new_a, new_b


def teacher_consistent(source_logits: Tensor, copy_logits: Tensor, sources: Tensor,
                       max_score_change: float = 0.5) -> Tensor:
    """Which copies keep their source's teacher answer: ``(copies,)`` bool.

    ``source_logits`` ``(N, C)`` and ``copy_logits`` ``(M, C)`` are the teacher's outputs, ``sources``
    ``(M,)`` the source row of each copy. Classification (C > 1): the same arg-max class. Regression
    (C = 1, STS-B): a predicted score within ``max_score_change`` of the source's.
    """
    if source_logits.dim() != 2 or copy_logits.dim() != 2 or source_logits.shape[1] != copy_logits.shape[1]:
        raise ConfigError(f"teacher outputs of shapes {tuple(source_logits.shape)} and {tuple(copy_logits.shape)} "
                          "do not match")
    if sources.shape != (copy_logits.shape[0],):
        raise ConfigError(f"{sources.numel()} source rows for {copy_logits.shape[0]} copies")
    if not max_score_change > 0:
        raise ConfigError(f"max_score_change must be > 0, got {max_score_change!r}")
    own = source_logits[sources]
    if copy_logits.shape[1] == 1:
        return (copy_logits[:, 0] - own[:, 0]).abs() <= max_score_change
    return copy_logits.argmax(1) == own.argmax(1)


def filter_by_teacher(rows: list[tuple[int, str, str | None]], source, teacher, tokenizer,
                      max_score_change: float = 0.5, batch_size: int = 64,
                      max_length: int = 128) -> tuple[list[tuple[int, str, str | None]], Tensor]:
    """Keep the copies (``augment_split`` rows) on which ``teacher`` keeps its answer on their
    source example (:func:`teacher_consistent`); returns them and the ``(len(rows),)`` keep mask.

    Word replacement can change what a pair means (a paraphrase that no longer is one); the
    teacher labels every copy anyway, so an unfiltered set can teach a label distribution unlike the
    task's."""
    from .data import GlueSplit, encode
    from .teacher import teacher_logits

    if not rows:
        return [], torch.zeros(0, dtype=torch.bool)
    copies = GlueSplit(task=source.task, split="augmented", text_a=[r[1] for r in rows],
                       text_b=[r[2] for r in rows] if source.text_b is not None else None, labels=[0] * len(rows))
    src = teacher_logits(teacher, encode(source, tokenizer, max_length), batch_size)
    out = teacher_logits(teacher, encode(copies, tokenizer, max_length), batch_size)
    keep = teacher_consistent(src, out, torch.tensor([r[0] for r in rows]), max_score_change)
    return [r for r, k in zip(rows, keep.tolist()) if k], keep


def write_inputs_tsv(path: str | Path, rows, is_pair: bool) -> int:
    """Write augmented inputs atomically as TSV (header ``source, sentence`` or ``source, sentence1,
    sentence2``); tabs and newlines inside a sentence become spaces. Returns the row count."""
    from .fileio import atomic_path

    clean = lambda s: s.replace("\t", " ").replace("\r", " ").replace("\n", " ")  # noqa: E731
    count = 0
    with atomic_path(path, suffix=".tsv") as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write("source\tsentence1\tsentence2\n" if is_pair else "source\tsentence\n")
            for row, a, b in rows:
                f.write(f"{row}\t{clean(a)}\t{clean(b)}\n" if is_pair else f"{row}\t{clean(a)}\n")
                count += 1
    return count


def _open_inputs(path: str | Path):
    """``(path, header, rows)`` of an inputs TSV; ``rows`` iterates ``(line number, fields)`` after the header."""
    from .data import read_rows

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such inputs file")
    rows = read_rows(path)
    first = next(rows, None)
    if first is None:
        raise DataError(f"{path} is empty (expected a header line)")
    return path, first[1], rows


def read_sources(path: str | Path, below: int | None = None) -> list[int]:
    """The ``source`` column of a ``spikesim augment`` file: the training row each copy came from, in
    file order. ``below``: stop at the first copy whose source row is ``below`` or later (the file lists
    copies in source order, so this gives the copies of the first ``below`` training examples)."""
    path, header, rows = _open_inputs(path)
    if "source" not in header:
        raise DataError(f"{path}:1: no 'source' column in the header (not a spikesim augment file)")
    col = header.index("source")
    sources: list[int] = []
    for line, fields in rows:
        try:
            src = int(fields[col])
        except (ValueError, IndexError):
            raise DataError(f"{path}:{line}: the source column is not a row number") from None
        if src < 0:
            raise DataError(f"{path}:{line}: negative source row {src}")
        if below is not None and src >= below:
            break
        sources.append(src)
    return sources


def read_inputs_tsv(path: str | Path, task: str, limit: int | None = None):
    """An inputs file (``spikesim augment`` output, or any TSV with a ``sentence`` column, or
    ``sentence1`` and ``sentence2`` for pair tasks) as a :class:`~spikingbert_sim.data.GlueSplit`
    of ``task`` with placeholder labels (the teacher labels these rows); ``limit``: the first rows only."""
    from .data import GlueSplit, get_task

    info = get_task(task)
    path, header, rows = _open_inputs(path)
    wanted = ("sentence1", "sentence2") if info.is_pair else ("sentence",)
    missing = [c for c in wanted if c not in header]
    if missing:
        kind = "sentence pairs" if info.is_pair else "single sentences"
        raise DataError(f"{path}:1: task {info.name} takes {kind}: no column {missing[0]!r} in the header "
                        f"({', '.join(header)})")
    cols = [header.index(c) for c in wanted]
    texts: list[list[str]] = [[] for _ in cols]
    for line, fields in rows:
        if limit is not None and len(texts[0]) >= limit:
            break
        if len(fields) != len(header):
            raise DataError(f"{path}:{line}: expected {len(header)} columns, got {len(fields)}")
        for out, c in zip(texts, cols):
            out.append(fields[c])
    if not texts[0]:
        raise DataError(f"{path} has no rows")
    zero = 0.0 if info.is_regression else 0
    return GlueSplit(task=info.name, split="transfer", text_a=texts[0], text_b=texts[1] if info.is_pair else None,
                     labels=[zero] * len(texts[0]))
