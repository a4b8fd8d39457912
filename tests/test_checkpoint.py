"""Checkpoint files: exact round trips, packed storage, atomic writes, one-line errors on bad files."""

import builtins
import math
import os
import pickle
import sys

import pytest
import torch

from spikingbert_sim import __version__
from spikingbert_sim.checkpoint import (FORMAT_NAME, FORMAT_VERSION, checkpoint_dict, load_checkpoint,
                                        save_checkpoint)
from spikingbert_sim.errors import CheckpointError
from spikingbert_sim.quantization import QuantLinear, quantize
from spikingbert_sim.simulation import simulate

T = 10


@pytest.mark.parametrize("mode", ["fp", "binary", "ternary"])
def test_round_trip_gives_identical_simulation(make_model, tiny_ids, tmp_path, mode):
    model = make_model(mode)
    path = save_checkpoint(model, tmp_path / "m.pt", meta={"note": "x", "numbers": [1, 2]})
    loaded = load_checkpoint(path)
    assert loaded.meta == {"note": "x", "numbers": [1, 2]}
    assert loaded.package_version == __version__
    assert loaded.path == str(path)
    assert not loaded.model.training
    a, b = simulate(model, tiny_ids, timesteps=T), simulate(loaded.model, tiny_ids, timesteps=T)
    assert torch.equal(a.logits, b.logits)
    assert a.spike_counts == b.spike_counts
    # no temporary files left beside the checkpoint
    assert os.listdir(tmp_path) == ["m.pt"]


@pytest.mark.parametrize("mode,bits", [("binary", 1), ("ternary", 2)])
def test_quantized_weights_are_packed(make_model, tmp_path, mode, bits):
    model = make_model(mode)
    d = checkpoint_dict(model)
    assert d["format"] == FORMAT_NAME and d["format_version"] == FORMAT_VERSION
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert sorted(d["packed"]) == sorted(f"{n}.qweight" for n in names)
    for n in names:
        assert f"{n}.weight" not in d["state"]
        layer = model.get_submodule(n)
        entry = d["packed"][f"{n}.qweight"]
        assert entry["mode"] == mode and entry["shape"] == list(layer.weight.shape)
        assert entry["data"].dtype == torch.uint8
        assert entry["data"].numel() == math.ceil(layer.weight.numel() * bits / 8)
        assert float(d["state"][f"{n}.scale"]) == pytest.approx(float(quantize(layer.weight.detach(), mode)[1]))
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "m.pt")).model
    for n in names:
        values, _ = model.get_submodule(n).quantized()
        assert torch.equal(loaded.get_submodule(n).qweight.float(), values)


def test_packed_false_keeps_latent_weights(make_model, tmp_path):
    model = make_model("ternary")
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "m.pt", packed=False)).model
    layer = loaded.layers[0].key
    assert not layer.frozen
    assert torch.equal(layer.weight, model.layers[0].key.weight)


def test_word_embeddings_stored_in_half_precision(make_model, tmp_path):
    model = make_model()
    with torch.no_grad():
        model.embeddings.word_embeddings.weight[3, 0] = 0.1  # not representable in float16
    d = checkpoint_dict(model)
    assert d["state"]["embeddings.word_embeddings.weight"].dtype == torch.float16
    w = load_checkpoint(save_checkpoint(model, tmp_path / "h.pt")).model.embeddings.word_embeddings.weight
    assert w.dtype == torch.float32
    assert torch.equal(w, model.embeddings.word_embeddings.weight.half().float())
    exact = load_checkpoint(save_checkpoint(model, tmp_path / "f.pt", half_embeddings=False)).model
    assert torch.equal(exact.embeddings.word_embeddings.weight, model.embeddings.word_embeddings.weight)


def test_packed_checkpoint_is_smaller(make_model, tmp_path):
    model = make_model("binary", hidden_size=64, intermediate_size=128, num_attention_heads=4)
    packed = save_checkpoint(model, tmp_path / "p.pt")
    latent = save_checkpoint(model, tmp_path / "l.pt", packed=False)
    assert packed.stat().st_size < 0.5 * latent.stat().st_size


# --- atomic writes --------------------------------------------------------------------------------

@pytest.fixture
def existing(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"precious old bytes")
    return path


def assert_untouched(path):
    assert path.read_bytes() == b"precious old bytes"
    assert os.listdir(path.parent) == [path.name]  # no temporary file left behind


def test_failed_save_of_unpicklable_meta_leaves_existing_file(make_model, existing):
    with pytest.raises(Exception):
        save_checkpoint(make_model(), existing, meta={"callback": lambda: 0})
    assert_untouched(existing)


def test_failed_write_midway_leaves_existing_file(make_model, existing, monkeypatch):
    def half_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(make_model(), existing)
    assert_untouched(existing)


def test_interrupted_save_leaves_existing_file(make_model, existing, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(make_model(), existing)
    assert_untouched(existing)


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_save_into_unwritable_directory_leaves_existing_file(make_model, existing):
    os.chmod(existing.parent, 0o500)
    try:
        with pytest.raises(OSError):
            save_checkpoint(make_model(), existing)
    finally:
        os.chmod(existing.parent, 0o700)
    assert_untouched(existing)


def test_save_when_no_temporary_file_can_be_created_leaves_existing_file(make_model, existing, monkeypatch):
    # what an unwritable directory does, also when the tests run as root (which ignores permissions)
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(existing.parent))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(PermissionError):
        save_checkpoint(make_model(), existing)
    assert_untouched(existing)


def test_successful_save_replaces_existing_file(make_model, existing):
    save_checkpoint(make_model(), existing)
    assert load_checkpoint(existing).model.config.hidden_size == 16
    assert os.listdir(existing.parent) == [existing.name]


# --- bad files ------------------------------------------------------------------------------------

class _Evil:
    """Unpickling this would create the marker file (a stand-in for arbitrary code)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


def _valid_dict(make_model):
    return checkpoint_dict(make_model("binary"))


def _write_bad(kind, path, make_model):
    good = path.parent / "good.pt"
    if kind == "missing":
        return path  # never written
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        save_checkpoint(make_model(), good)
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random":
        path.write_bytes(torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.uint8).numpy().tobytes())
    elif kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "pickle_stop":  # a protocol-2 header and STOP: torch.load raises IndexError
        path.write_bytes(b"\x80\x02.")
    elif kind == "plain_dict":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "plain_list":
        torch.save([torch.zeros(3)], path)
    elif kind == "future_version":
        d = _valid_dict(make_model)
        d["format_version"] = FORMAT_VERSION + 1
        torch.save(d, path)
    elif kind == "string_version":
        d = _valid_dict(make_model)
        d["format_version"] = "1"
        torch.save(d, path)
    elif kind == "bad_config":
        d = _valid_dict(make_model)
        d["config"]["hidden_size"] = 0
        torch.save(d, path)
    elif kind == "unknown_config_field":
        d = _valid_dict(make_model)
        d["config"]["dropout"] = 0.1
        torch.save(d, path)
    elif kind == "missing_weight":
        d = _valid_dict(make_model)
        del d["state"]["classifier.weight"]
        torch.save(d, path)
    elif kind == "wrong_shape":
        d = _valid_dict(make_model)
        d["state"]["classifier.weight"] = torch.zeros(5, 5)
        torch.save(d, path)
    elif kind == "bad_packing":
        d = _valid_dict(make_model)
        entry = next(iter(d["packed"].values()))
        entry["data"] = entry["data"][:-1]
        torch.save(d, path)
    elif kind == "malformed_state":
        d = _valid_dict(make_model)
        d["state"] = [1, 2, 3]
        torch.save(d, path)
    return path


BAD_KINDS = ["missing", "directory", "empty", "truncated", "random", "text", "pickle_stop", "plain_dict",
             "plain_list", "future_version", "string_version", "bad_config", "unknown_config_field", "missing_weight",
             "wrong_shape", "bad_packing", "malformed_state"]
EXPECTED = {"missing": "no such file", "directory": "not a file", "pickle_stop": "not a readable checkpoint",
            "plain_dict": "not a spikingbert_sim checkpoint", "plain_list": "not a spikingbert_sim checkpoint",
            "future_version": "format version 2",
            "string_version": "format version '1'", "bad_config": "hidden_size", "unknown_config_field": "dropout",
            "missing_weight": "classifier.weight", "wrong_shape": "do not fit", "bad_packing": "do not fit",
            "malformed_state": "malformed 'state'"}


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_checkpoint_raises_one_line_checkpoint_error(make_model, tmp_path, kind):
    path = _write_bad(kind, tmp_path / "bad.pt", make_model)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message and message
    assert "\x1b" not in message
    assert str(path) in message
    if kind in EXPECTED:
        assert EXPECTED[kind] in message


@pytest.mark.parametrize("writer", ["pickle", "torch_save"])
def test_malicious_pickle_is_refused_without_running_code(tmp_path, writer):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    payload = {"format": FORMAT_NAME, "format_version": 1, "x": _Evil(marker)}
    if writer == "pickle":
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    else:
        torch.save(payload, path)
    assert b"open" in path.read_bytes()  # the call is in the file (see the sanity check below)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert not marker.exists()
    assert "refused" in str(info.value) and "\n" not in str(info.value)


def test_malicious_payload_would_run_if_loaded_unsafely(tmp_path):
    # sanity check of the test payload itself: plain pickle.loads does create the marker
    marker = tmp_path / "PWNED"
    pickle.loads(pickle.dumps(_Evil(marker))).close()
    assert marker.exists()
