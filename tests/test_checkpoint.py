"""Checkpoints: save -> load -> generate, integrity checks, atomic layout."""

import json

import pytest
import torch

import charloom
from charloom.checkpoint import RunDir, resolve
from charloom.errors import CheckpointError


def test_load_generates_the_same_text_as_the_trained_model(tiny_run):
    model = charloom.load(tiny_run)
    a = model.generate("the quick", length=50, temperature=0.8, seed=3)
    b = charloom.load(tiny_run).generate("the quick", length=50, temperature=0.8, seed=3)
    assert a == b and len(a) == 50 and a.finish_reason == "length"
    streamed = "".join(model.stream("the quick", length=50, temperature=0.8, seed=3))
    assert streamed == a


def test_run_directory_layout(tiny_run):
    run = RunDir(tiny_run)
    index = run.index()
    assert {"last", "best"} <= set(index)
    ckpt = resolve(tiny_run, "last")
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["config.json", "manifest.json", "model.safetensors", "tokenizer.json", "training_state.pt"]
    config = json.loads((ckpt / "config.json").read_text())
    assert config["model"]["model"] == "lstm" and config["tokenizer"] == "char" and config["torch_version"]
    assert not [p for p in run.checkpoints.iterdir() if p.name.startswith(".")]  # no temporaries left
    assert run.metrics_path.read_text().startswith("step,epoch,seconds,lr,train_loss,val_loss,val_bpc")


def _copy(run, tmp_path):
    import shutil
    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    return dst, resolve(dst, "best")


def test_flipped_byte_is_refused(tiny_run, tmp_path):
    run, ckpt = _copy(tiny_run, tmp_path)
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum") as info:
        charloom.load(run)
    assert info.value.exit_code == 3 and "model.safetensors" in info.value.message


def test_missing_run_is_refused(tmp_path):
    with pytest.raises(charloom.CharloomError, match="no such run") as missing:
        charloom.load(tmp_path / "none")
    assert missing.value.exit_code == 2 and not isinstance(missing.value, CheckpointError)  # a wrong path: usage
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        charloom.load(tmp_path / "empty")


def test_weights_load_on_cpu_with_identical_values(tiny_run):
    model = charloom.load(tiny_run, "last")
    from safetensors.torch import load_file
    saved = load_file(str(model.path / "model.safetensors"))
    for name, tensor in model.net.state_dict().items():
        assert tensor.device.type == "cpu" and torch.equal(tensor, saved[name])
