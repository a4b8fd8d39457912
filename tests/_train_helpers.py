"""Tiny teachers, tokenizers and GLUE files for the training tests (made on the fly, no downloads)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

WORDS = ("good great fine nice superb lovely bad awful poor dull boring weak the a film movie plot "
         "actor scene story was is very quite rather not").split()
POSITIVE, NEGATIVE = set(WORDS[:6]), set(WORDS[6:12])
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def load_example(name: str):
    """The module ``examples/<name>.py`` (the examples are scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_tokenizer(folder: Path):
    import transformers

    tokens = SPECIALS + list(WORDS)
    if int(transformers.__version__.split(".")[0]) >= 5:  # transformers 5 builds from a vocabulary dict
        return transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(tokens)}, do_lower_case=True)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return transformers.BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)


def tiny_bert_config(num_labels: int = 2, hidden: int = 32, layers: int = 4, heads: int = 4,
                     intermediate: int = 64, vocab_size: int | None = None):
    import transformers

    return transformers.BertConfig(
        vocab_size=vocab_size or len(SPECIALS) + len(WORDS), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=intermediate, max_position_embeddings=128,
        num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        initializer_range=0.2)  # larger than BERT's 0.02 so that a 32-wide student's neurons fire


def make_teacher(folder: Path, num_labels: int = 2, seed: int = 0, **config_kwargs) -> Path:
    """A randomly initialised tiny BertForSequenceClassification saved with its tokenizer."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(tiny_bert_config(num_labels, **config_kwargs))
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(folder.parent / f".{folder.name}_vocab")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def split_teacher_answers(teacher, texts: list[str]) -> list[int]:
    """Shift the saved teacher's classifier bias so that it answers "positive" on half of ``texts``
    (a random tiny teacher gives one answer to almost everything); its answers on them."""
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(teacher).eval()
    tok = transformers.AutoTokenizer.from_pretrained(teacher)
    with torch.no_grad():
        enc = tok(texts, padding=True, return_tensors="pt")
        margin = (model(**enc).logits @ torch.tensor([-1.0, 1.0])).sort().values
        # halfway between the two middle margins: no text sits on the boundary, where float noise
        # (another batch's padding) would decide its answer
        half = len(texts) // 2
        model.classifier.bias[1] -= float(margin[half - 1] + margin[half]) / 2
        model.save_pretrained(teacher)
        return model(**enc).logits.argmax(-1).tolist()


def sentence(rng: random.Random, label: int) -> str:
    sentiment = sorted(POSITIVE if label else NEGATIVE)
    neutral = WORDS[12:]
    words = [rng.choice(neutral) for _ in range(rng.randint(2, 7))]
    words.insert(rng.randint(0, len(words)), rng.choice(sentiment))
    return " ".join(words)


def write_sst2(root: Path, n_train: int = 48, n_dev: int = 16, seed: int = 0) -> Path:
    """``root/SST-2/{train,dev}.tsv`` in the classic format (header ``sentence<TAB>label``)."""
    rng = random.Random(seed)
    folder = root / "SST-2"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = ["sentence\tlabel"]
        for i in range(n):
            label = i % 2
            rows.append(f"{sentence(rng, label)}\t{label}")
        (folder / name).write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def write_stsb(root: Path, n_train: int = 24, n_dev: int = 12, seed: int = 0) -> Path:
    """``root/STS-B/{train,dev}.tsv`` (10 columns, score last)."""
    rng = random.Random(seed)
    folder = root / "STS-B"
    folder.mkdir(parents=True, exist_ok=True)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = [header]
        for i in range(n):
            score = round(rng.uniform(0, 5), 2)
            rows.append(f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\t{sentence(rng, i % 2)}\t{sentence(rng, 1 - i % 2)}\t{score}")
        (folder / name).write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root
