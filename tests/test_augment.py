"""TinyBERT-style augmentation: embedding neighbours, word replacement, the inputs file, and
`spikesim train --transfer-file`."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from click.testing import CliRunner

from spikingbert_sim.augment import (AugmentOptions, NeighbourTable, augment_split, augment_text, read_inputs_tsv,
                                     read_sources, word_vocabulary, write_inputs_tsv)
from spikingbert_sim.cli import main
from spikingbert_sim.data import GlueSplit, load_glue
from spikingbert_sim.errors import ConfigError, DataError

from _train_helpers import (SPECIALS, WORDS, load_example, make_teacher, make_tokenizer, split_teacher_answers,
                            write_sst2, write_stsb)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def clustered_embeddings(tokenizer, groups):
    """Word embeddings where the words of each group point the same way (slightly spread) and
    groups are orthogonal; every other token gets its own direction far from all groups."""
    vocab = tokenizer.get_vocab()
    dim = len(vocab) + len(groups)
    emb = torch.zeros(len(vocab), dim)
    for token, i in vocab.items():
        emb[i, len(groups) + i] = 1.0
    for g, words in enumerate(groups):
        for rank, w in enumerate(words):
            emb[vocab[w]] = 0
            emb[vocab[w], g] = 1.0
            emb[vocab[w], len(groups) + vocab[w]] = 0.1 * (rank + 1)  # nearer the group direction: earlier rank
    return emb


def test_word_vocabulary_keeps_whole_words_only(tokenizer):
    words = word_vocabulary(tokenizer)
    assert set(words) == {w for w in WORDS if len(w) >= 2}  # not [CLS] etc., not the one-letter "a"
    assert all(not w.startswith("[") for w in words)


def test_neighbours_are_nearest_by_cosine_without_the_word_itself(tokenizer):
    groups = [["good", "great", "fine", "nice"], ["bad", "awful", "poor"]]
    table = NeighbourTable(clustered_embeddings(tokenizer, groups), word_vocabulary(tokenizer), k=2)
    # within a group, cosine similarity falls with the rank's off-axis component
    assert table["good"] == ("great", "fine")
    assert table["nice"] == ("good", "great")
    assert table["awful"] == ("bad", "poor")
    assert "good" not in table["good"]
    big = NeighbourTable(clustered_embeddings(tokenizer, groups), word_vocabulary(tokenizer), k=10_000)
    assert len(big["good"]) == len(word_vocabulary(tokenizer)) - 1  # k is capped at the vocabulary
    with pytest.raises(ConfigError, match="fewer than two"):
        NeighbourTable(torch.zeros(40, 4), {"good": 5}, k=2)
    with pytest.raises(ConfigError, match="only 3 rows"):
        NeighbourTable(torch.zeros(3, 4), word_vocabulary(tokenizer), k=2)


def test_augment_text_replaces_whole_words_by_neighbours_and_keeps_the_rest(tokenizer):
    groups = [["good", "great", "fine"], ["film", "movie", "story"]]
    table = NeighbourTable(clustered_embeddings(tokenizer, groups), word_vocabulary(tokenizer), k=2)
    text = "A Good film, 42 zzunknown!"
    every = augment_text(text, tokenizer, table, prob=1.0, rng=random.Random(0))
    words = every.split(" ")
    # lower-cased by the uncased tokenizer; "a" (one letter), numbers, punctuation, unknown words kept
    assert words[0] == "a" and words[1] in ("great", "fine") and words[2].rstrip(",") in ("movie", "story")
    assert words[2].endswith(",") and words[3:] == ["42", "zzunknown!"]
    assert augment_text(text, tokenizer, table, prob=1e-9, rng=random.Random(0)) == "a good film, 42 zzunknown!"
    same = [augment_text(text, tokenizer, table, 0.5, random.Random(s)) for s in (1, 1)]
    assert same[0] == same[1]
    seen = {augment_text(text, tokenizer, table, 0.5, random.Random(s)) for s in range(200)}
    assert "a good film, 42 zzunknown!" in seen and len(seen) == 9  # 3 choices for each of the two words


def pair_split():
    return GlueSplit(task="stsb", split="train", text_a=["the good film", "a bad plot"],
                     text_b=["the great movie", "the plot was dull"], labels=[4.0, 1.0])


def test_augment_split_is_deterministic_and_drops_copies_equal_to_the_source(tokenizer):
    emb = clustered_embeddings(tokenizer, [["good", "great", "fine", "nice"], ["film", "movie", "story", "scene"],
                                           ["bad", "awful", "poor", "weak"], ["plot", "actor"]])
    opts = AugmentOptions(copies=6, prob=0.5, neighbours=3, seed=7)
    rows = list(augment_split(pair_split(), tokenizer, emb, opts))
    assert rows == list(augment_split(pair_split(), tokenizer, emb, opts))
    assert rows != list(augment_split(pair_split(), tokenizer, emb, dataclasses.replace(opts, seed=8)))
    by_source = {0: [], 1: []}
    for src, a, b in rows:
        by_source[src].append((a, b))
    for src, copies in by_source.items():
        assert 0 < len(copies) <= 6 and len(set(copies)) == len(copies)
        source = (pair_split().text_a[src], pair_split().text_b[src])
        assert source not in copies
    assert any(a != "the good film" for a, _ in by_source[0]) and any(b != "the great movie" for _, b in by_source[0])
    assert [src for src, _, _ in rows] == sorted(src for src, _, _ in rows)  # grouped by source row


def test_options_are_checked():
    for kwargs, field in (({"copies": 0}, "copies"), ({"prob": 0.0}, "prob"), ({"prob": 1.5}, "prob"),
                          ({"neighbours": 0}, "neighbours"), ({"copies": True}, "copies")):
        with pytest.raises(ConfigError, match=field):
            AugmentOptions(**kwargs)


def test_inputs_file_round_trip_and_refusals(tmp_path):
    path = tmp_path / "aug.tsv"
    n = write_inputs_tsv(path, [(0, "one\ttab", "two\nlines"), (3, "x y", "z")], is_pair=True)
    assert n == 2 and path.read_text().splitlines()[0] == "source\tsentence1\tsentence2"
    split = read_inputs_tsv(path, "mrpc")
    assert split.text_a == ["one tab", "x y"] and split.text_b == ["two lines", "z"] and split.labels == [0, 0]
    assert read_inputs_tsv(path, "stsb").labels == [0.0, 0.0]
    assert read_inputs_tsv(path, "rte", limit=1).text_a == ["one tab"]
    with pytest.raises(DataError, match="takes single sentences: no column 'sentence'"):
        read_inputs_tsv(path, "sst2")
    single = tmp_path / "single.tsv"
    write_inputs_tsv(single, [(0, "a film", None)], is_pair=False)
    assert read_inputs_tsv(single, "sst2").text_a == ["a film"]
    with pytest.raises(DataError, match="takes sentence pairs: no column 'sentence1'"):
        read_inputs_tsv(single, "mrpc")
    (tmp_path / "bad.tsv").write_text("source\tsentence\n0\ta\tb\n")
    with pytest.raises(DataError, match=r"bad.tsv:2: expected 2 columns, got 3"):
        read_inputs_tsv(tmp_path / "bad.tsv", "sst2")
    (tmp_path / "empty.tsv").write_text("source\tsentence\n")
    with pytest.raises(DataError, match="has no rows"):
        read_inputs_tsv(tmp_path / "empty.tsv", "sst2")
    with pytest.raises(DataError, match="no such inputs file"):
        read_inputs_tsv(tmp_path / "missing.tsv", "sst2")


def test_read_sources_gives_each_copys_training_row_and_stops_at_below(tmp_path):
    path = tmp_path / "aug.tsv"
    write_inputs_tsv(path, [(0, "a", "b"), (0, "c", "d"), (2, "e", "f"), (5, "g", "h")], is_pair=True)
    assert read_sources(path) == [0, 0, 2, 5]
    assert read_sources(path, below=3) == [0, 0, 2]
    assert read_sources(path, below=0) == []
    (tmp_path / "plain.tsv").write_text("sentence\nno source here\n")
    with pytest.raises(DataError, match=r"plain.tsv:1: no 'source' column"):
        read_sources(tmp_path / "plain.tsv")
    (tmp_path / "bad.tsv").write_text("source\tsentence\n0\ta\nx\tb\n")
    with pytest.raises(DataError, match=r"bad.tsv:3: the source column is not a row number"):
        read_sources(tmp_path / "bad.tsv")
    (tmp_path / "neg.tsv").write_text("source\tsentence\n-1\ta\n")
    with pytest.raises(DataError, match=r"neg.tsv:2: negative source row -1"):
        read_sources(tmp_path / "neg.tsv")
    with pytest.raises(DataError, match="no such inputs file"):
        read_sources(tmp_path / "missing.tsv")


def test_cli_augment_then_train_with_the_file(tmp_path):
    from spikingbert_sim.trainer import TrainConfig, Trainer, train

    data = write_sst2(tmp_path / "glue", n_train=16, n_dev=8)
    write_stsb(data)
    teacher = make_teacher(tmp_path / "teacher")
    out = tmp_path / "aug" / "sst2.tsv"
    runner = CliRunner()
    args = ["augment", "--task", "sst2", "--data", str(data), "--copies", "3", "--model", str(teacher), "--out", str(out)]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    split = read_inputs_tsv(out, "sst2")
    assert f"{out}: {len(split)} augmented inputs from 16 sst2 train examples" in res.output
    assert 16 <= len(split) <= 48  # a copy equal to its source is dropped
    source = load_glue("sst2", "train", data)
    assert not set(split.text_a) & set(source.text_a)
    vocab = set(WORDS) | set(SPECIALS)
    assert all(w in vocab for line in split.text_a for w in line.split())  # replacements come from the vocabulary

    refused = runner.invoke(main, args)  # no silent overwrite
    assert refused.exit_code != 0 and "exists (add --force" in refused.output and "Traceback" not in refused.output
    for bad in (["--copies", "0"], ["--prob", "0"], ["--task", "imdb"]):
        res = runner.invoke(main, args + ["--force"] + bad)
        assert res.exit_code != 0 and "Traceback" not in res.output and res.output.count("Error") == 1, res.output

    base = dict(task="sst2", data_dir=str(data), teacher=str(teacher), weights="ternary", timesteps=4, stage="kd",
                max_steps=2, batch_size=8, lr=1e-3, device="cpu", layers=2)
    trainer = Trainer(TrainConfig(out=str(tmp_path / "inspect"), transfer_files=(str(out),), **base))
    trainer.setup()
    rows = trainer.stage_tensors("kd")["input_ids"]
    assert rows.shape[0] == 16 + len(split)
    assert torch.equal(rows[:16], trainer.train_tensors["input_ids"])
    plain = Trainer(TrainConfig(out=str(tmp_path / "plain"), **base))
    plain.setup()
    assert plain.transfer_tensors is None and plain.fingerprint != trainer.fingerprint

    run = tmp_path / "run"
    res = runner.invoke(main, ["train", "--task", "sst2", "--data", str(data), "--teacher", str(teacher), "--weights",
                               "ternary", "--timesteps", "4", "--stage", "kd", "--max-steps", "2", "--batch-size", "8",
                               "--lr", "1e-3", "--device", "cpu", "--layers", "2", "--no-progress",
                               "--transfer-file", str(out), "--out", str(run)])
    assert res.exit_code == 0, res.output
    missing = runner.invoke(main, ["train", "--task", "sst2", "--data", str(data), "--teacher", str(teacher),
                                   "--stage", "kd", "--transfer-file", str(tmp_path / "nope.tsv"), "--out",
                                   str(tmp_path / "run2")])
    assert missing.exit_code != 0 and "no such inputs file" in missing.output and "Traceback" not in missing.output
    moved = tmp_path / "moved.tsv"
    moved.write_bytes(out.read_bytes())  # the file is identified by its content, not its path
    train(TrainConfig(out=str(run), transfer_files=(str(moved),), **base), resume=True,
          progress=False)
    moved.write_text(moved.read_text().replace("film", "plot"))
    with pytest.raises(ConfigError, match="another configuration"):
        train(TrainConfig(out=str(run), transfer_files=(str(moved),), **base), resume=True,
              progress=False)
    with pytest.raises(ConfigError, match="listed twice"):
        TrainConfig(out=str(run), transfer_files=(str(out), str(out)), **base)


def test_teacher_on_augmented_example_compares_each_copy_with_its_source(tmp_path):
    example = load_example("teacher_on_augmented")

    data = write_sst2(tmp_path / "glue", n_train=12, n_dev=4)
    teacher = make_teacher(tmp_path / "teacher", seed=3)
    source = load_glue("sst2", "train", data)
    n = 6
    # copy 1 of source i is its own sentence, copy 2 is the next source's; source n (beyond --limit) is cut
    rows = [r for i in range(n) for r in ((i, source.text_a[i], None), (i, source.text_a[(i + 1) % n], None))]
    rows.append((n, source.text_a[n], None))
    inputs = tmp_path / "aug.tsv"
    write_inputs_tsv(inputs, rows, is_pair=False)

    answers = split_teacher_answers(teacher, source.text_a[:n])
    assert 0 < sum(answers) < n  # mixed answers, so a wrong pairing of copies and sources changes the agreement
    expected_agreement = (n + sum(answers[i] == answers[(i + 1) % n] for i in range(n))) / (2 * n)
    share_positive = sum(answers) / n

    report = example.compare(teacher, "sst2", data, inputs, n)
    assert report["originals"] == n and report["copies"] == 2 * n
    assert report["agreement"] == pytest.approx(expected_agreement, abs=1e-4)
    # every source sentence appears twice among the copies, so the copies' answer shares equal the originals'
    assert report["on_originals"]["answers"]["positive"] == pytest.approx(share_positive, abs=1e-4)
    assert report["on_copies"]["answers"] == report["on_originals"]["answers"]
    assert 0 <= report["on_copies"]["mean_entropy_nats"] <= 0.7

    inputs.write_text("sentence\nthe film\n", encoding="utf-8")  # not an augment file
    with pytest.raises(DataError, match="no 'source' column"):
        example.compare(teacher, "sst2", data, inputs, n)


def test_teacher_consistent_compares_each_copy_with_its_own_source():
    from spikingbert_sim.augment import teacher_consistent

    src = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    copies = torch.tensor([[1.0, 0.0], [5.0, 0.0], [0.0, 1.0]])
    assert teacher_consistent(src, copies, torch.tensor([0, 1, 1])).tolist() == [True, False, True]
    assert teacher_consistent(src, copies, torch.tensor([1, 0, 0])).tolist() == [False, True, False]
    scores = torch.tensor([[2.0], [4.0]])
    out = torch.tensor([[2.4], [3.0], [4.5]])
    assert teacher_consistent(scores, out, torch.tensor([0, 1, 1])).tolist() == [True, False, True]
    assert teacher_consistent(scores, out, torch.tensor([0, 1, 1]), max_score_change=1.0).tolist() == [True] * 3
    with pytest.raises(ConfigError, match="do not match"):
        teacher_consistent(src, out, torch.tensor([0, 1, 1]))
    with pytest.raises(ConfigError, match="source rows"):
        teacher_consistent(src, copies, torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="max_score_change"):
        teacher_consistent(scores, out, torch.tensor([0, 1, 1]), max_score_change=0.0)


def test_cli_augment_filter_teacher_keeps_the_copies_with_their_source_answer(tmp_path):
    import transformers

    data = write_sst2(tmp_path / "glue", n_train=12, n_dev=4)
    teacher = make_teacher(tmp_path / "teacher", seed=3)
    source = load_glue("sst2", "train", data)
    answers = split_teacher_answers(teacher, source.text_a)
    assert 0 < sum(answers) < len(answers)
    runner = CliRunner()
    base = ["augment", "--task", "sst2", "--data", str(data), "--copies", "4", "--prob", "0.6", "--model", str(teacher)]
    res = runner.invoke(main, base + ["--out", str(tmp_path / "all.tsv")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, base + ["--filter-teacher", str(teacher), "--out", str(tmp_path / "kept.tsv")])
    assert res.exit_code == 0, res.output

    def rows(path):
        lines = path.read_text(encoding="utf-8").splitlines()[1:]
        return [(int(line.split("\t")[0]), line.split("\t")[1]) for line in lines]

    made, kept = rows(tmp_path / "all.tsv"), rows(tmp_path / "kept.tsv")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(teacher).eval()
    tok = transformers.AutoTokenizer.from_pretrained(teacher)
    with torch.no_grad():
        copy_answers = model(**tok([t for _, t in made], padding=True, return_tensors="pt")).logits.argmax(-1)
    expected = [r for r, a in zip(made, copy_answers.tolist()) if a == answers[r[0]]]
    assert 0 < len(expected) < len(made)  # the filter keeps some copies and drops others
    assert kept == expected
    assert f"kept {len(expected)} of {len(made)} on which the teacher keeps its answer" in res.output

    bad = runner.invoke(main, base + ["--filter-teacher", str(tmp_path / "none"), "--out", str(tmp_path / "x.tsv")])
    assert bad.exit_code != 0 and "does not exist" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "x.tsv").exists()
    bad = runner.invoke(main, base + ["--filter-teacher", str(teacher), "--max-score-change", "0", "--out",
                                      str(tmp_path / "x.tsv")])
    assert bad.exit_code != 0 and "Traceback" not in bad.output
