"""GLUE data: the classic TSV layouts of all nine tasks, strict row checks, the hub path, encode()."""

import pytest
import torch

from spikingbert_sim import data as data_mod
from spikingbert_sim.data import TASKS, GlueDataset, GlueSplit, encode, get_task, load_glue
from spikingbert_sim.errors import DataError

MNLI_DEV_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                   "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\t"
                   "label5\tgold_label")
MNLI_TRAIN_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                     "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label")
STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"


def mnli_row(i, s1, s2, gold, columns=16):
    parses = ["( x )", "( y )", "(ROOT x)", "(ROOT y)"]
    labels = [gold] * (5 if columns == 16 else 1)
    return "\t".join([str(i), "31193", f"{i}n", "government", *parses, s1, s2, *labels, gold])


def stsb_row(i, s1, s2, score):
    return "\t".join([str(i), "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", s1, s2, score])


# (folder, file, bytes) of each task; sentences starting with a bare double quote must stay verbatim
FILES = {
    "cola": ("CoLA", "dev.tsv",
             'gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\n'
             'gj04\t0\t*\t"The more you eat, the fatter.\n'
             'cj99\t1\t\tHe left.\n'),
    "sst2": ("SST-2", "dev.tsv",
             "sentence\tlabel\nit 's a charming journey . \t1\n\" bleak and desperate \t0\n"),
    "mrpc": ("MRPC", "dev.tsv",
             "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
             '1\t1355540\t1355592\tHe said the pie business does n\'t fit .\t" The pie business does not fit .\n'
             '0\t2029631\t2029565\tMagnarelli said " 100 percent " .\tHis wife said so .\n'),
    "stsb": ("STS-B", "dev.tsv",
             "\n".join([STSB_HEADER, stsb_row(0, "A man is dancing.", "A man dances.", "5.000"),
                        stsb_row(1, '"A child rides.', "A kid rides a horse.", "4.750"),
                        stsb_row(2, "Cats.", "Dogs.", "0")]) + "\n"),
    "mnli": ("MNLI", "dev_matched.tsv",
             "\n".join([MNLI_DEV_HEADER, mnli_row(0, "The new rights are nice.", "Everyone loves them.", "neutral"),
                        mnli_row(1, '"This site includes a list.', "The list is here.", "entailment"),
                        mnli_row(2, "It rained.", "It was dry.", "contradiction")]) + "\n"),
    "qnli": ("QNLI", "dev.tsv",
             "index\tquestion\tsentence\tlabel\n"
             "0\tWhat came into force?\tThe constitution came into force.\tentailment\n"
             "1\tWhat city?\tThe Ill flows below Strasbourg.\tnot_entailment\n"),
    "rte": ("RTE", "dev.tsv",
            "index\tsentence1\tsentence2\tlabel\n"
            "0\tDana Reeve died.\tChristopher Reeve had an accident.\tnot_entailment\n"
            "1\tBacteria are mutating.\tBacteria is winning.\tentailment\n"),
    "wnli": ("WNLI", "dev.tsv",
             "index\tsentence1\tsentence2\tlabel\n"
             "0\tThe drain is clogged with hair.\tThe hair has to be cleaned.\t0\n"
             "1\tJane knocked but she did not answer.\tSusan did not answer.\t1\n"),
    "qqp": ("QQP", "dev.tsv",
            "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
            "201359\t303345\t303346\tWhy are people so rude?\tWhy are some people rude?\t1\n"
            '263843\t69383\t380476\t"Quoted" question?\tAnother one?\t0\n'),
}

EXPECTED = {
    "cola": (["The sailors rode the breeze clear of the rocks.", '"The more you eat, the fatter.', "He left."],
             None, [1, 0, 1]),
    "sst2": (["it 's a charming journey . ", '" bleak and desperate '], None, [1, 0]),
    "mrpc": (["He said the pie business does n't fit .", 'Magnarelli said " 100 percent " .'],
             ['" The pie business does not fit .', "His wife said so ."], [1, 0]),
    "stsb": (["A man is dancing.", '"A child rides.', "Cats."], ["A man dances.", "A kid rides a horse.", "Dogs."],
             [5.0, 4.75, 0.0]),
    "mnli": (["The new rights are nice.", '"This site includes a list.', "It rained."],
             ["Everyone loves them.", "The list is here.", "It was dry."], [1, 0, 2]),
    "qnli": (["What came into force?", "What city?"],
             ["The constitution came into force.", "The Ill flows below Strasbourg."], [0, 1]),
    "rte": (["Dana Reeve died.", "Bacteria are mutating."],
            ["Christopher Reeve had an accident.", "Bacteria is winning."], [1, 0]),
    "wnli": (["The drain is clogged with hair.", "Jane knocked but she did not answer."],
             ["The hair has to be cleaned.", "Susan did not answer."], [0, 1]),
    "qqp": (["Why are people so rude?", '"Quoted" question?'], ["Why are some people rude?", "Another one?"], [1, 0]),
}


@pytest.fixture
def glue(tmp_path):
    root = tmp_path / "glue_data"
    for folder, name, text in FILES.values():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / name).write_text(text, encoding="utf-8")
    return root


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- reading the nine layouts ---------------------------------------------------------------------

@pytest.mark.parametrize("task", list(FILES))
def test_reads_classic_layout(glue, task):
    split = load_glue(task, "validation", data_dir=glue)
    text_a, text_b, labels = EXPECTED[task]
    assert split.text_a == text_a
    assert split.text_b == text_b
    assert split.labels == labels
    assert split.task == task and split.split == ("validation_matched" if task == "mnli" else "validation")
    assert len(split) == len(text_a)
    if task == "stsb":
        assert all(isinstance(x, float) for x in split.labels)
    else:
        assert all(type(x) is int for x in split.labels)


def test_mnli_mismatched_and_train_layouts(glue):
    write(glue / "MNLI" / "dev_mismatched.tsv",
          MNLI_DEV_HEADER + "\n" + mnli_row(0, "Mismatched premise.", "Hyp.", "contradiction") + "\n")
    write(glue / "MNLI" / "train.tsv",
          MNLI_TRAIN_HEADER + "\n" + mnli_row(0, "Train premise.", "Train hyp.", "neutral", columns=12) + "\n")
    mm = load_glue("mnli", "validation_mismatched", data_dir=glue)
    assert (mm.text_a, mm.labels, mm.split) == (["Mismatched premise."], [2], "validation_mismatched")
    assert load_glue("mnli", "dev_mismatched", data_dir=glue).text_a == ["Mismatched premise."]
    train = load_glue("mnli", "train", data_dir=glue)
    assert (train.text_a, train.text_b, train.labels) == (["Train premise."], ["Train hyp."], [1])
    for alias in ("dev", "validation", "dev_matched", "validation-matched"):
        assert load_glue("mnli", alias, data_dir=glue).split == "validation_matched"


def test_dev_alias_limit_and_classic_task_names(glue):
    assert load_glue("SST-2", "dev", data_dir=glue).labels == [1, 0]
    assert load_glue("sts-b", "Dev", data_dir=glue).labels == [5.0, 4.75, 0.0]
    assert load_glue("cola", "validation", data_dir=glue, limit=2).labels == [1, 0]
    assert len(load_glue("cola", "validation", data_dir=glue, limit=0)) == 0
    assert len(load_glue("cola", "validation", data_dir=glue, limit=99)) == 3


def test_task_folder_itself_and_lowercase_folder(glue, tmp_path):
    assert load_glue("rte", "dev", data_dir=glue / "RTE").labels == [1, 0]
    lower = write(tmp_path / "other" / "sst2" / "dev.tsv", "sentence\tlabel\nfine\t1\n").parent.parent
    assert load_glue("sst2", "dev", data_dir=lower).text_a == ["fine"]
    # RTE and WNLI files share a layout: the RTE folder must not be read as WNLI
    with pytest.raises(DataError, match="folder of task rte, not wnli"):
        load_glue("wnli", "dev", data_dir=glue / "RTE")


def test_a_line_starting_with_a_quote_does_not_swallow_the_next_rows(tmp_path):
    # with csv's default quoting the opening quote would join these lines into one field
    root = write(tmp_path / "SST-2" / "dev.tsv",
                 'sentence\tlabel\n"a\t1\nb "quoted" c\t0\n"\t1\n').parent.parent
    split = load_glue("sst2", "dev", data_dir=root)
    assert split.text_a == ['"a', 'b "quoted" c', '"']
    assert split.labels == [1, 0, 1]


# --- row errors name file and line ----------------------------------------------------------------

@pytest.mark.parametrize("task,rel,text,where,what", [
    ("sst2", "SST-2/dev.tsv", "sentence\tlabel\ngood\t1\nno label here\n", ":3:", "expected 2 columns, got 1"),
    ("sst2", "SST-2/dev.tsv", "sentence\tlabel\ngood\t1\nstray\ttab\t0\n", ":3:", "expected 2 columns, got 3"),
    ("sst2", "SST-2/dev.tsv", "sentence\tlabel\ngood\t2\n", ":2:", "label '2' not in 0, 1"),
    ("rte", "RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n", ":2:", "label 'maybe'"),
    ("cola", "CoLA/dev.tsv", "gj04\t1\t\tok.\ngj04\t1\tonly three\n", ":2:", "expected 4 columns, got 3"),
    ("stsb", "STS-B/dev.tsv", STSB_HEADER + "\n" + stsb_row(0, "a", "b", "high") + "\n", ":2:",
     "score 'high' is not a number"),
    ("stsb", "STS-B/dev.tsv", STSB_HEADER + "\n" + stsb_row(0, "a", "b", "5.5") + "\n", ":2:", "not in [0, 5]"),
    ("stsb", "STS-B/dev.tsv", STSB_HEADER + "\n" + stsb_row(0, "a", "b", "nan") + "\n", ":2:", "not a finite number"),
    ("mnli", "MNLI/dev_matched.tsv", MNLI_DEV_HEADER + "\n" + mnli_row(0, "a", "b", "-") + "\n", ":2:", "label '-'"),
    ("mrpc", "MRPC/dev.tsv", "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\ta\n", ":2:",
     "expected 5 columns"),
    ("qqp", "QQP/dev.tsv", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n1\t1\t2\ta\tb\tyes\n", ":2:",
     "label 'yes'"),
])
def test_malformed_rows_name_file_and_line(tmp_path, task, rel, text, where, what):
    path = write(tmp_path / rel, text)
    with pytest.raises(DataError) as info:
        load_glue(task, "dev", data_dir=tmp_path)
    message = str(info.value)
    assert f"{path}{where}" in message and what in message
    assert "\n" not in message


def test_file_level_errors(tmp_path):
    write(tmp_path / "SST-2" / "dev.tsv", "")
    with pytest.raises(DataError, match="is empty"):
        load_glue("sst2", "dev", data_dir=tmp_path)
    write(tmp_path / "SST-2" / "dev.tsv", "sentence\tlabel\n")
    with pytest.raises(DataError, match="has no examples"):
        load_glue("sst2", "dev", data_dir=tmp_path)
    write(tmp_path / "SST-2" / "dev.tsv", "text\tlabel\na\t1\n")
    with pytest.raises(DataError, match=r"dev.tsv:1: no column 'sentence'"):
        load_glue("sst2", "dev", data_dir=tmp_path)
    (tmp_path / "SST-2" / "dev.tsv").write_bytes(b"sentence\tlabel\n\xff\xfe bad\t1\n")
    with pytest.raises(DataError, match="not UTF-8"):
        load_glue("sst2", "dev", data_dir=tmp_path)


def test_unknown_task_split_and_missing_paths(glue, tmp_path):
    with pytest.raises(DataError, match="unknown task 'ax'"):
        load_glue("ax", "dev", data_dir=glue)
    with pytest.raises(DataError, match="unknown split 'test'"):
        load_glue("sst2", "test", data_dir=glue)
    with pytest.raises(DataError, match="does not exist"):
        load_glue("sst2", "dev", data_dir=tmp_path / "nowhere")
    with pytest.raises(DataError, match="no train.tsv for task sst2"):
        load_glue("sst2", "train", data_dir=glue)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no SST-2 folder"):
        load_glue("sst2", "dev", data_dir=empty)
    with pytest.raises(DataError, match="limit"):
        load_glue("sst2", "dev", data_dir=glue, limit=-1)


# --- task metadata --------------------------------------------------------------------------------

def test_task_metadata():
    assert sorted(TASKS) == sorted(["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"])
    assert get_task("STS-B").is_regression and get_task("stsb").num_labels == 1
    assert get_task("MNLI").label_names == ("entailment", "neutral", "contradiction")
    assert get_task("wnli").label_names == ("not_entailment", "entailment")
    assert get_task("mnli").splits == ("train", "validation_matched", "validation_mismatched")
    assert get_task("sst2").is_pair is False and get_task("qqp").is_pair is True
    assert get_task("mrpc").metric_names == ("accuracy", "f1", "combined")
    assert get_task("cola").main_metric == "matthews"
    assert hash(get_task("rte")) == hash(get_task("RTE"))


# --- the datasets hub -----------------------------------------------------------------------------

@pytest.fixture
def fake_hub(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []
    tables = {}

    def load_dataset(path, name, split=None, **kwargs):
        calls.append((path, name, split))
        if (name, split) not in tables:
            raise ConnectionError("Couldn't reach 'glue' on the Hub (LocalEntryNotFoundError)\nmore details")
        return datasets.Dataset.from_dict(tables[(name, split)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return tables, calls


def test_hub_path_pairs_and_limit(fake_hub):
    tables, calls = fake_hub
    tables[("mrpc", "validation")] = {"sentence1": ["a", "b", "c"], "sentence2": ["x", "y", "z"],
                                      "label": [1, 0, 1], "idx": [0, 1, 2]}
    split = load_glue("mrpc", "dev", limit=2)
    assert calls == [("glue", "mrpc", "validation")]
    assert (split.text_a, split.text_b, split.labels) == (["a", "b"], ["x", "y"], [1, 0])


def test_hub_path_regression_and_mnli_split(fake_hub):
    tables, calls = fake_hub
    tables[("stsb", "train")] = {"sentence1": ["a"], "sentence2": ["b"], "label": [3.2]}
    tables[("mnli", "validation_mismatched")] = {"premise": ["p"], "hypothesis": ["h"], "label": [2]}
    assert load_glue("stsb", "train").labels == [pytest.approx(3.2)]
    mm = load_glue("mnli", "dev_mismatched")
    assert (mm.text_a, mm.text_b, mm.labels) == (["p"], ["h"], [2])
    assert calls[-1] == ("glue", "mnli", "validation_mismatched")


def test_hub_path_errors(fake_hub):
    tables, _ = fake_hub
    with pytest.raises(DataError) as info:
        load_glue("sst2", "validation")  # the fake hub has nothing: like having no network
    assert "could not load glue/sst2" in str(info.value) and "\n" not in str(info.value)
    tables[("sst2", "train")] = {"sentence": ["a", "b"], "label": [1, -1]}
    with pytest.raises(DataError, match="label -1"):
        load_glue("sst2", "train")
    tables[("qnli", "train")] = {"question": ["q"], "label": [0]}
    with pytest.raises(DataError, match="no column 'sentence'"):
        load_glue("qnli", "train")


# --- tensors --------------------------------------------------------------------------------------

def test_encode_single_sentences(tiny_tokenizer):
    split = GlueSplit("sst2", "validation", ["the film is good", "bad"], None, [1, 0])
    enc = encode(split, tiny_tokenizer, max_length=8)
    assert set(enc) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert enc[key].shape == (2, 8) and enc[key].dtype == torch.long
    assert enc["labels"].dtype == torch.long and enc["labels"].tolist() == [1, 0]
    assert enc["input_ids"][1, :3].tolist() == [2, tiny_tokenizer.get_vocab()["bad"], 3]
    assert enc["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert int(enc["token_type_ids"].sum()) == 0


def test_encode_pairs_regression_and_truncation(tiny_tokenizer):
    split = GlueSplit("stsb", "validation", ["a film", "the plot is very very bad"], ["good", "the acting is awful"],
                      [4.5, 0.25])
    enc = encode(split, tiny_tokenizer, max_length=7)
    assert enc["labels"].dtype == torch.float32 and enc["labels"].tolist() == [4.5, 0.25]
    assert enc["input_ids"].shape == (2, 7)
    # [CLS] a film [SEP] good [SEP] [PAD]: the second sentence has token type 1
    assert enc["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 0]
    # longest_first truncation keeps tokens of both sentences and both [SEP]s
    assert enc["input_ids"][1].tolist().count(3) == 2 and int(enc["token_type_ids"][1].sum()) >= 1


def test_encode_empty_split_and_bad_max_length(tiny_tokenizer):
    empty = encode(GlueSplit("rte", "validation", [], [], []), tiny_tokenizer, max_length=5)
    assert empty["input_ids"].shape == (0, 5) and empty["labels"].shape == (0,)
    with pytest.raises(DataError, match="max_length"):
        encode(GlueSplit("sst2", "train", ["a"], None, [0]), tiny_tokenizer, max_length=1)


def test_glue_split_length_check():
    with pytest.raises(DataError, match="differ in length"):
        GlueSplit("sst2", "train", ["a", "b"], None, [1])


def test_glue_dataset_batches(tiny_tokenizer):
    split = GlueSplit("qnli", "validation", ["what?", "why?", "who?"], ["a", "b", "c"], [0, 1, 0])
    ds = GlueDataset.from_split(split, tiny_tokenizer, max_length=6)
    assert len(ds) == 3
    item = ds[1]
    assert item["labels"].item() == 1 and item["input_ids"].shape == (6,)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["input_ids"].shape == (2, 6) and batch["labels"].tolist() == [0, 1]
    with pytest.raises(DataError, match="number of examples"):
        GlueDataset({"input_ids": torch.zeros(3, 4), "labels": torch.zeros(2)})


def test_module_exposes_task_keys():
    assert data_mod.TASK_TO_KEYS["qqp"] == ("question1", "question2")
    assert data_mod.TASK_TO_KEYS["cola"] == ("sentence", None)
