"""``spikesim`` commands through click's CliRunner: results, files written, and one-line errors."""

import builtins
import json
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from spikingbert_sim import __version__
from spikingbert_sim.checkpoint import load_checkpoint, save_checkpoint
from spikingbert_sim.cli import main

T = 8
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


def invoke(runner, *args):
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=True)


def assert_ok(result):
    assert result.exit_code == 0, result.output
    assert result.exception is None
    return result


def assert_user_error(result, code=None, contains=None):
    """Non-zero exit, no traceback, and a one-line 'Error: ...' (click usage errors add a usage header)."""
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("Error")]
    assert len(error_lines) == 1, result.output
    if result.exit_code == 1:  # runtime error: the message is the whole output
        assert lines == error_lines, result.output
    else:  # usage error: "Usage: ...", "Try ...", then the error line
        assert lines[0].startswith("Usage:") and lines[-1] == error_lines[0], result.output
    if contains:
        assert contains in error_lines[0], result.output
    return error_lines[0]


@pytest.fixture(scope="module")
def ckpts(tiny_hf_dir, tmp_path_factory):
    """fp and ternary 2-layer checkpoints converted from the tiny BERT (3 labels) by the CLI."""
    folder = tmp_path_factory.mktemp("ckpts")
    runner = CliRunner()
    paths = {}
    for mode in ("fp", "ternary"):
        paths[mode] = folder / f"{mode}.pt"
        result = invoke(runner, "convert", "--from-pretrained", tiny_hf_dir, "--layers", 2, "--weights", mode,
                        "--out", paths[mode])
        assert_ok(result)
        assert f"wrote {paths[mode]}: 2 spiking layers, weights {mode}" in result.output
    return paths


@pytest.fixture
def glue_dir(tmp_path):
    d = tmp_path / "glue"
    (d / "SST-2").mkdir(parents=True)
    (d / "SST-2" / "dev.tsv").write_text(
        "sentence\tlabel\nthe film is good \t1\na bad plot \t0\n\"great\" film\t1\nawful acting\t0\n")
    return d


# --- group ----------------------------------------------------------------------------------------

def test_version(runner):
    result = assert_ok(invoke(runner, "--version"))
    assert result.output.strip() == f"spikesim, version {__version__}"


@pytest.mark.parametrize("command", ["run", "convert", "compare", "plot", "energy", "export", "average", "widen"])
def test_help_of_each_command(runner, command):
    result = assert_ok(invoke(runner, command, "--help"))
    assert result.output.startswith(f"Usage: main {command} [OPTIONS]")
    assert "--out" in result.output or command == "energy"
    assert_ok(invoke(runner, command, "-h"))


def test_group_help_lists_commands(runner):
    out = assert_ok(invoke(runner, "--help")).output
    for command in ("run", "convert", "compare", "plot", "energy", "export", "average", "widen"):
        assert f"  {command} " in out


# --- export ---------------------------------------------------------------------------------------

def test_export_packs_and_halves_and_keeps_the_model(runner, tmp_path, make_model):
    import torch

    from spikingbert_sim.checkpoint import load_checkpoint, save_checkpoint
    from spikingbert_sim.simulation import simulate

    ids = torch.randint(5, 40, (2, 6), generator=torch.Generator().manual_seed(4))
    for mode in ("fp", "ternary"):
        model = make_model(mode, hidden_size=64, intermediate_size=128, num_attention_heads=4)
        latent = save_checkpoint(model, tmp_path / f"{mode}_latent.pt", packed=False, half_embeddings=False,
                                 meta={"tokenizer": {"kind": "test"}})
        out = tmp_path / f"{mode}_export.pt"
        assert_ok(invoke(runner, "export", "-c", latent, "-o", out))
        assert out.stat().st_size < 0.6 * latent.stat().st_size
        shipped = load_checkpoint(out)
        assert shipped.meta["tokenizer"] == {"kind": "test"} and shipped.meta["exported_from"] == str(latent)
        # the exported model is the latent one with its matrices rounded to float16 (fp) or its
        # weights quantized and packed (ternary: exactly the same inference model)
        expected = make_model(mode, hidden_size=64, intermediate_size=128, num_attention_heads=4)
        with torch.no_grad():
            for name, p in expected.named_parameters():
                if p.dim() >= 2 and (mode == "fp" or "word_embeddings" in name):
                    p.copy_(p.half().float())
        a = simulate(shipped.model, ids, timesteps=6)
        b = simulate(expected.freeze_quantized() if mode != "fp" else expected, ids, timesteps=6)
        assert torch.equal(a.logits, b.logits)
        assert_user_error(invoke(runner, "export", "-c", latent, "-o", out), code=2, contains="exists")
    assert_user_error(invoke(runner, "export", "-c", tmp_path / "nothing.pt", "-o", tmp_path / "x.pt"), code=1,
                      contains="no such file")


# --- average --------------------------------------------------------------------------------------

def _soup_members(tmp_path, make_model, mode, seeds=(0, 1), **meta):
    """Latent checkpoints of one config with different weights, as siblings of a schedule would be."""
    paths = []
    for seed in seeds:
        model = make_model(mode, seed=seed, hidden_size=32, intermediate_size=64, num_attention_heads=2)
        paths.append(save_checkpoint(model, tmp_path / f"{mode}_{seed}.pt", packed=False, half_embeddings=False,
                                     meta={"tokenizer": {"kind": "test"}, "step": 7 + seed, **meta}))
    return paths


def test_average_is_the_weighted_mean_of_every_float_tensor(runner, tmp_path, make_model):
    a, b = _soup_members(tmp_path, make_model, "fp")
    out = tmp_path / "soup.pt"
    result = assert_ok(invoke(runner, "average", "-c", a, "-c", b, "-w", 1, "-w", 3, "-o", out))
    assert f"wrote {out}: mean of 2 checkpoints, weights fp" in result.output
    assert f"{a}: weight 0.250" in result.output and "quantized" not in result.output  # no such weights in fp
    soup = load_checkpoint(out)
    sa, sb = load_checkpoint(a).model.state_dict(), load_checkpoint(b).model.state_dict()
    for key, value in soup.model.state_dict().items():
        expected = (sa[key].double() * 0.25 + sb[key].double() * 0.75).float()
        assert torch.equal(value, expected), key
    # the run-point entries of the members do not describe the average; the tokenizer does
    assert "step" not in soup.meta and soup.meta["tokenizer"] == {"kind": "test"}
    assert soup.meta["averaged_from"] == [str(a), str(b)] and soup.meta["average_weights"] == [0.25, 0.75]
    assert soup.meta["command"].startswith("spikesim average")


def test_average_of_quantized_members_quantizes_their_mean_latent_weights(runner, tmp_path, make_model):
    from spikingbert_sim.quantization import QuantLinear, quantize

    latent, other = _soup_members(tmp_path, make_model, "ternary")
    packed = tmp_path / "packed.pt"  # an export: its packed values thaw to latent weights that quantize back to them
    save_checkpoint(load_checkpoint(other).model, packed, meta={"tokenizer": {"kind": "test"}})
    out = tmp_path / "soup.pt"
    result = assert_ok(invoke(runner, "average", "-c", latent, "-c", packed, "-o", out))
    soup = load_checkpoint(out).model
    thawed = load_checkpoint(packed).model.thaw_quantized()
    first = dict(load_checkpoint(latent).model.named_modules())
    second = dict(thawed.named_modules())
    differ = total = 0
    for name, module in soup.named_modules():
        if isinstance(module, QuantLinear):
            mean = (first[name].weight.double() + second[name].weight.double()).div(2).float()
            assert torch.equal(module.weight, mean), name
            values, scale = module.quantized()
            assert torch.equal(values, quantize(mean, "ternary")[0]) and torch.equal(scale, quantize(mean, "ternary")[1])
            differ += int(values.ne(quantize(first[name].weight, "ternary")[0]).sum())
            total += values.numel()
    # the printed disagreement is the measured one, and members drawn apart do disagree
    assert 0 < differ < total
    assert f"{latent}: weight 0.500, {100 * differ / total:.1f} % of its quantized weights differ" in result.output
    # weights 1 and 0: the average is the first member itself, to the bit
    same = tmp_path / "same.pt"
    result = assert_ok(invoke(runner, "average", "-c", latent, "-c", packed, "-w", 1, "-w", 0, "-o", same))
    assert f"{latent}: weight 1.000, 0.0 % of its quantized weights differ" in result.output
    expected = load_checkpoint(latent).model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in load_checkpoint(same).model.state_dict().items())


def test_average_refuses_what_cannot_be_averaged(runner, tmp_path, make_model):
    fp_a, fp_b = _soup_members(tmp_path, make_model, "fp")
    (ternary,) = _soup_members(tmp_path, make_model, "ternary", seeds=(0,))
    other_tok = tmp_path / "tok.pt"
    save_checkpoint(load_checkpoint(fp_b).model, other_tok, meta={"tokenizer": {"kind": "other"}})
    out = tmp_path / "soup.pt"
    cases = [
        (("-c", fp_a), 1, "at least two checkpoints"),
        (("-c", fp_a, "-c", fp_a), 1, "given twice"),
        (("-c", fp_a, "-c", ternary), 1, "config weight_mode is 'ternary', not 'fp'"),
        (("-c", fp_a, "-c", other_tok), 1, "another tokenizer"),
        (("-c", fp_a, "-c", fp_b, "-w", 1), 1, "1 weights for 2 checkpoints"),
        (("-c", fp_a, "-c", fp_b, "-w", 1, "-w", -1), 1, "non-negative"),
        (("-c", fp_a, "-c", fp_b, "-w", 0, "-w", 0), 1, "not all zero"),
        (("-c", fp_a, "-c", tmp_path / "missing.pt"), 1, "no such file"),
        (("-c", fp_a, "-c", fp_b, "-o", fp_a), 2, "must differ"),
    ]
    for args, code, message in cases:
        full = [*args] if "-o" in args else [*args, "-o", out]
        assert_user_error(invoke(runner, "average", *full), code=code, contains=message)
        assert not out.exists()
    assert_ok(invoke(runner, "average", "-c", fp_a, "-c", fp_b, "-o", out))
    assert_user_error(invoke(runner, "average", "-c", fp_a, "-c", fp_b, "-o", out), code=2, contains="exists")


# --- convert --------------------------------------------------------------------------------------

def test_convert_writes_self_contained_checkpoint(ckpts, tiny_hf_dir, tiny_tokenizer):
    ckpt = load_checkpoint(ckpts["ternary"])
    cfg = ckpt.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_labels, cfg.weight_mode) == (2, 32, 3, "ternary")
    assert ckpt.meta["source"] == str(tiny_hf_dir)
    assert ckpt.meta["command"].startswith("spikesim convert")
    vocab = tiny_tokenizer.get_vocab()
    assert ckpt.meta["tokenizer"]["vocab"].split("\n") == sorted(vocab, key=vocab.get)
    assert ckpt.meta["tokenizer"]["do_lower_case"] is True
    assert ckpt.model.layers[0].key.frozen


def test_convert_with_task_and_layer_indices(runner, tiny_hf_dir, tmp_path):
    out = tmp_path / "sst2.pt"
    assert_ok(invoke(runner, "convert", "--from-pretrained", tiny_hf_dir, "--layer-indices", "2,0", "--task", "SST-2",
                     "--threshold", 0.5, "-o", out))
    m = load_checkpoint(out).model
    assert m.config.task == "sst2" and m.config.label_names == ("negative", "positive")
    assert m.config.num_labels == 2 and m.config.num_hidden_layers == 2 and m.config.threshold == 0.5
    from transformers import BertForSequenceClassification

    bert = BertForSequenceClassification.from_pretrained(tiny_hf_dir).bert
    assert torch.equal(m.layers[0].query.weight, bert.encoder.layer[2].attention.self.query.weight)
    assert torch.equal(m.layers[1].query.weight, bert.encoder.layer[0].attention.self.query.weight)


def test_convert_refuses_to_overwrite_without_force(runner, tiny_hf_dir, tmp_path):
    out = tmp_path / "existing.pt"
    out.write_bytes(b"do not touch")
    assert_user_error(invoke(runner, "convert", "--from-pretrained", tiny_hf_dir, "--layers", 1, "-o", out),
                      code=2, contains="--force")
    assert out.read_bytes() == b"do not touch"
    assert_ok(invoke(runner, "convert", "--from-pretrained", tiny_hf_dir, "--layers", 1, "-o", out, "--force"))
    assert load_checkpoint(out).model.config.num_hidden_layers == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.pt"]


@pytest.mark.parametrize("args,code,contains", [
    (["--layer-indices", "0,x"], 2, "comma-separated"),
    (["--layer-indices", "0,7"], 1, "layer indices"),
    (["--layers", 9], 1, "cannot take 9 layers"),
    (["--layers", 0], 2, "positive"),
    (["--weights", "int4"], 2, "int4"),
    (["--task", "nosuchtask"], 1, "unknown task"),
])
def test_convert_bad_options(runner, tiny_hf_dir, tmp_path, args, code, contains):
    out = tmp_path / "x.pt"
    assert_user_error(invoke(runner, "convert", "--from-pretrained", tiny_hf_dir, *args, "-o", out),
                      code=code, contains=contains)
    assert not out.exists()


def test_convert_missing_model_folder(runner, tmp_path):
    assert_user_error(invoke(runner, "convert", "--from-pretrained", tmp_path / "nowhere", "-o", tmp_path / "x.pt"),
                      code=1, contains="cannot load a BERT")
    assert not (tmp_path / "x.pt").exists()


# --- run ------------------------------------------------------------------------------------------

def test_run_json_summary(runner, ckpts):
    result = assert_ok(invoke(runner, "run", "--checkpoint", ckpts["fp"], "--timesteps", T,
                              "--text", "the film is good", "--text", "bad", "--json"))
    summary = json.loads(result.stdout)
    assert summary["timesteps"] == T and summary["num_inputs"] == 2 and summary["weight_mode"] == "fp"
    assert [p["text"] for p in summary["predictions"]] == ["the film is good", "bad"]
    for p in summary["predictions"]:
        assert len(p["logits"]) == 3 and p["prediction"] == int(np.argmax(p["logits"]))
        assert p["probability"] == pytest.approx(float(torch.softmax(torch.tensor(p["logits"]), 0).max()), abs=1e-5)
    layers = summary["layers"]
    assert list(layers)[0] == "embeddings" and "layer.1.output" in layers and len(layers) == 13
    for row in layers.values():
        assert 0.0 <= row["final_asr"] <= 1.0 and 1 <= row["settled_at"] <= T
        # IF neurons: spikes per neuron over T steps = T × final ASR
        assert row["spikes_per_neuron"] == pytest.approx(T * row["final_asr"], abs=1e-4)
    assert summary["checkpoint"] == str(ckpts["fp"]) and summary["engine"] == "fast"


def test_run_human_readable(runner, ckpts):
    out = assert_ok(invoke(runner, "run", "-c", ckpts["fp"], "-T", T, "--text", "a good film")).stdout
    assert f"T={T}, 1 input(s), weights fp" in out and "layer.1.output" in out and "'a good film'" in out


def test_run_out_writes_summary_traces_and_figures(runner, ckpts, tmp_path):
    out = tmp_path / "run"
    result = assert_ok(invoke(runner, "run", "-c", ckpts["ternary"], "-T", T, "--text", "a", "--text", "b",
                              "--json", "--out", out, "--per-neuron", "--raster-site", "layer.0.key",
                              "--raster-neurons", 7))
    assert json.loads((out / "summary.json").read_text()) == json.loads(result.stdout)
    assert sorted(p.name for p in out.iterdir()) == ["asr_convergence.png", "raster.png", "summary.json",
                                                   "traces.npz"]
    for png in ("raster.png", "asr_convergence.png"):
        assert (out / png).read_bytes()[:8] == PNG
    with np.load(out / "traces.npz") as z:
        assert z["asr/embeddings"].shape == (T,)
        assert z["asr/layer.1.output"].shape == (T,)
        assert z["asr/layer.1.output"][-1] == pytest.approx(
            json.loads(result.stdout)["layers"]["layer.1.output"]["final_asr"], abs=1e-6)
        assert z["raster/layer.0.key"].shape == (T, 1, 1, 7)
        assert z["asr_neuron/layer.0.output"].shape[:2] == (T, 2)
        assert json.loads(str(z["meta"]))["weight_mode"] == "ternary"


def test_run_engines_agree(runner, ckpts):
    outs = [json.loads(assert_ok(invoke(runner, "run", "-c", ckpts["fp"], "-T", 6, "--text", "good film",
                                        "--engine", engine, "--json")).stdout) for engine in ("fast", "reference")]
    # float32 here (bitwise equality is tested in float64 in test_simulation.py)
    assert outs[0]["layers"].keys() == outs[1]["layers"].keys()
    for site, row in outs[0]["layers"].items():
        assert row["final_asr"] == pytest.approx(outs[1]["layers"][site]["final_asr"], abs=0.01), site
    assert (outs[0]["engine"], outs[1]["engine"]) == ("fast", "reference")


def test_run_on_task_data(runner, tiny_hf_dir, glue_dir, tmp_path):
    ckpt = tmp_path / "sst2.pt"
    assert_ok(invoke(runner, "convert", "--from-pretrained", tiny_hf_dir, "--layers", 1, "--task", "sst2", "-o", ckpt))
    summary = json.loads(assert_ok(invoke(runner, "run", "-c", ckpt, "-T", 4, "--task", "sst2", "--data", glue_dir,
                                          "--split", "dev", "--limit", 3, "--batch-size", 2, "--json")).stdout)
    assert summary["num_inputs"] == 3
    assert [p["gold"] for p in summary["predictions"]] == [1, 0, 1]
    assert summary["predictions"][2]["text"] == '"great" film'
    preds = [p["prediction"] for p in summary["predictions"]]
    assert summary["metrics"]["accuracy"] == pytest.approx(np.mean(np.array(preds) == np.array([1, 0, 1])))
    assert all(p["label"] in ("negative", "positive") for p in summary["predictions"])


def test_pair_model_needs_even_texts(runner, tiny_hf_dir, tmp_path):
    ckpt = tmp_path / "mrpc.pt"
    assert_ok(invoke(runner, "convert", "--from-pretrained", tiny_hf_dir, "--layers", 1, "--task", "mrpc", "-o", ckpt))
    summary = json.loads(assert_ok(invoke(runner, "run", "-c", ckpt, "-T", 4, "--text", "a film", "--text", "the film",
                                          "--json")).stdout)
    assert summary["predictions"][0]["text_b"] == "the film"
    assert_user_error(invoke(runner, "run", "-c", ckpt, "-T", 4, "--text", "a film"), code=1, contains="even number")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


@pytest.fixture
def bad_checkpoints(tmp_path, ckpts):
    data = ckpts["fp"].read_bytes()
    files = {"missing": tmp_path / "missing.pt", "empty": tmp_path / "empty.pt",
             "truncated": tmp_path / "truncated.pt", "text": tmp_path / "notes.txt",
             "plain_dict": tmp_path / "plain.pt", "malicious": tmp_path / "evil.pt",
             "pickle_stop": tmp_path / "stop.pt"}
    files["pickle_stop"].write_bytes(b"\x80\x02.")
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(data[: len(data) // 3])
    files["text"].write_text("hello\n")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, files["plain_dict"])
    with open(files["malicious"], "wb") as f:
        pickle.dump({"format": "spikingbert_sim.checkpoint", "x": _Evil(tmp_path / "PWNED")}, f)
    return files


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "text", "pickle_stop", "plain_dict", "malicious"])
@pytest.mark.parametrize("command", ["run", "energy"])
def test_bad_checkpoint_is_a_one_line_error(runner, bad_checkpoints, tmp_path, kind, command):
    path = bad_checkpoints[kind]
    line = assert_user_error(invoke(runner, command, "-c", path, "-T", 4, "--text", "a"), code=1)
    assert str(path) in line
    assert not (tmp_path / "PWNED").exists()


def test_compare_with_a_bad_second_checkpoint(runner, bad_checkpoints, ckpts):
    assert_user_error(invoke(runner, "compare", "-c", ckpts["fp"], "-c", bad_checkpoints["truncated"], "--text", "a"),
                      code=1, contains="truncated.pt")


@pytest.mark.parametrize("args,code,contains", [
    (["--timesteps", 0, "--text", "a"], 2, "positive integer"),
    (["--timesteps", -3, "--text", "a"], 2, "positive integer"),
    (["--timesteps", "abc", "--text", "a"], 2, "not a valid integer"),
    (["-T", 1.5, "--text", "a"], 2, "not a valid integer"),
    (["--text", ""], 1, "--text number 1 is empty"),
    (["--text", "ok", "--text", "   "], 1, "--text number 2 is empty"),
    ([], 1, "no input"),
    (["--task", "nosuchtask", "--data", "."], 1, "unknown task 'nosuchtask'"),
    (["--text", "a", "--task", "sst2"], 2, "not both"),
    (["--text", "a", "--engine", "warp"], 2, "warp"),
    (["--text", "a", "--batch-size", 0], 2, "positive"),
    (["--text", "a", "--settle-tol", 1.5], 2, "(0, 1)"),
    (["--text", "a", "--raster-site", "layer.9.key"], 2, "layer.9.key"),
    (["--text", "a", "--split", "test"], 0, None),  # --split is only used with --task
])
def test_run_bad_options(runner, ckpts, args, code, contains):
    timesteps = [] if "-T" in args or "--timesteps" in args else ["-T", 4]
    result = invoke(runner, "run", "-c", ckpts["fp"], *timesteps, *args)
    if code == 0:
        assert_ok(result)
    else:
        assert_user_error(result, code=code, contains=contains)


def test_run_task_with_missing_data_folder(runner, ckpts, tmp_path, glue_dir):
    assert_user_error(invoke(runner, "run", "-c", ckpts["fp"], "--task", "sst2", "--data", tmp_path / "nope"),
                      code=1, contains="does not exist")
    assert_user_error(invoke(runner, "run", "-c", ckpts["fp"], "--task", "mrpc", "--data", glue_dir),
                      code=1, contains="no MRPC folder")
    assert_user_error(invoke(runner, "run", "-c", ckpts["fp"], "--task", "sst2", "--data", glue_dir,
                             "--split", "nosplit"), code=1, contains="unknown split")


def test_run_task_label_count_mismatch_is_a_clean_error(runner, ckpts, glue_dir):
    # the converted checkpoints have 3 outputs; SST-2 has 2 classes
    assert_user_error(invoke(runner, "run", "-c", ckpts["fp"], "-T", 4, "--task", "sst2", "--data", glue_dir),
                      code=1, contains="sst2")


# --- compare --------------------------------------------------------------------------------------

def test_compare_json_and_files(runner, ckpts, tmp_path):
    out = tmp_path / "cmp"
    result = assert_ok(invoke(runner, "compare", "-c", ckpts["fp"], "-c", ckpts["ternary"], "-T", T,
                              "--text", "the film is good", "--text", "bad plot", "--json", "--out", out))
    report = json.loads(result.stdout)
    assert json.loads((out / "compare.json").read_text()) == report
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "fig2b.png", "traces_0.npz", "traces_1.npz"]
    assert (out / "fig2b.png").read_bytes()[:8] == PNG
    fp, tern = report["models"]
    assert (fp["weight_mode"], tern["weight_mode"]) == ("fp", "ternary")
    assert report["spike_ratio"] == pytest.approx(tern["total_spikes"] / fp["total_spikes"])
    # the spike totals are those of the saved traces
    for i, m in enumerate(report["models"]):
        with np.load(out / f"traces_{i}.npz") as z:
            total = sum(z[k][0] for k in z.files if k.startswith("spikes/"))
            assert total == pytest.approx(m["total_spikes"])
            assert z["asr/layer.1.output"][-1] == pytest.approx(m["output_final_asr"], abs=1e-6)


def test_compare_same_checkpoint_twice(runner, ckpts):
    report = json.loads(assert_ok(invoke(runner, "compare", "-c", ckpts["fp"], "-c", ckpts["fp"], "-T", 4,
                                         "--text", "good", "--json")).stdout)
    assert report["spike_ratio"] == 1.0 and report["output_trace_max_abs_diff"] == 0.0
    text = assert_ok(invoke(runner, "compare", "-c", ckpts["fp"], "-c", ckpts["fp"], "-T", 4, "--text", "good")).stdout
    assert "spike ratio (second / first): 1.0000" in text


def test_compare_needs_two_checkpoints(runner, ckpts):
    assert_user_error(invoke(runner, "compare", "-c", ckpts["fp"], "--text", "a"), code=2, contains="exactly twice")


# --- plot -----------------------------------------------------------------------------------------

def test_plot_redraws_from_traces(runner, ckpts, tmp_path):
    run_dir, plot_dir = tmp_path / "run", tmp_path / "plots"
    assert_ok(invoke(runner, "run", "-c", ckpts["fp"], "-T", T, "--text", "a", "--out", run_dir))
    out = assert_ok(invoke(runner, "plot", run_dir / "traces.npz", "--out", plot_dir)).stdout
    assert out.splitlines() == [str(plot_dir / "asr_convergence.png"), str(plot_dir / "raster.png")]
    assert (plot_dir / "raster.png").read_bytes()[:8] == PNG
    two = assert_ok(invoke(runner, "plot", run_dir / "traces.npz", run_dir / "traces.npz", "--out", plot_dir)).stdout
    assert str(plot_dir / "fig2b.png") in two.splitlines()
    assert (plot_dir / "model_1" / "asr_convergence.png").exists()


def test_plot_bad_traces(runner, tmp_path):
    assert_user_error(invoke(runner, "plot", tmp_path / "none.npz", "--out", tmp_path), code=1,
                      contains="no such traces file")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 garbage")
    assert_user_error(invoke(runner, "plot", bad, "--out", tmp_path), code=1, contains="bad.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]


# --- energy ---------------------------------------------------------------------------------------

def test_energy_json_ratio(runner, ckpts):
    out = json.loads(assert_ok(invoke(runner, "energy", "-c", ckpts["fp"], "-c", ckpts["ternary"], "-T", T,
                                      "--text", "the film is good", "--json")).stdout)
    a, b = out["models"]
    assert (a["weight_mode"], b["weight_mode"]) == ("fp", "ternary") and a["num_inputs"] == 1
    assert out["normalized_ops_ratio"] == pytest.approx(b["total"]["normalized_ops"] / a["total"]["normalized_ops"])
    assert out["energy_ratio"] == pytest.approx(b["total"]["energy_pj"] / a["total"]["energy_pj"])
    for rep in (a, b):
        assert rep["timesteps"] == T and rep["tokens_per_sequence"] == 6.0  # [CLS] the film is good [SEP]
        assert rep["total"]["accumulates"] == pytest.approx(sum(l["accumulates"] for l in rep["layers"]))
    assert not any(l["integer_acs"] for l in a["layers"])
    assert all(l["integer_acs"] for l in b["layers"] if l["name"].endswith(".query"))


def test_energy_text_output_and_too_many_checkpoints(runner, ckpts):
    text = assert_ok(invoke(runner, "energy", "-c", ckpts["fp"], "-T", 4, "--text", "good")).stdout
    assert "layer.0.query" in text and "normalized OPS" in text
    assert_user_error(invoke(runner, "energy", "-c", ckpts["fp"], "-c", ckpts["fp"], "-c", ckpts["fp"],
                             "--text", "a"), code=2, contains="once or twice")
