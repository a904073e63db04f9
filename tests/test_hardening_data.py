"""Hardening, round two (issue 28): hostile config.json sizes (8), silent wrong results from the data (10),
extreme sampling values (15), a SIGTERM before training and an encoding error (16)."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

import charloom
from charloom import checkpoint
from charloom import model as model_module
from charloom.config import SampleConfig
from charloom.errors import CharloomError, CheckpointError
from charloom.generation import engine
from charloom.kernels.choice import Stepping
from charloom.text.encode import encode_to_disk, scan_corpus
from charloom.text.tokenizers import CharTokenizer
from tests.conftest import TINY_TEXT, rehash_manifest


@pytest.fixture()
def run_copy(tiny_run, tmp_path) -> Path:
    shutil.copytree(tiny_run, tmp_path / "run")
    return tmp_path / "run"


def _hostile(run: Path, section: str, values: dict) -> Path:
    ckpt = checkpoint.resolve(run)
    config = json.loads((ckpt / "config.json").read_text())
    config[section].update(values)
    (ckpt / "config.json").write_text(json.dumps(config))
    rehash_manifest(ckpt)
    return ckpt


def _limit_memory() -> None:
    # A fix that regresses must fail the test, not take the machine's memory with it.
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


# -- 8: hostile config.json -------------------------------------------------------------------------

HOSTILE = [("model", {"hidden": 30000}), ("model", {"hidden": 1024}), ("model", {"layers": 40}),
           ("model", {"embedding_dim": 4096}), ("train", {"generation_window": 10**7}), ("train", {"seq_len": -1})]


@pytest.mark.parametrize("section,values", HOSTILE, ids=[f"{s}-{next(iter(v))}-{next(iter(v.values()))}" for s, v in HOSTILE])
def test_hostile_config_is_refused_in_one_line_at_once(run_copy, section, values):
    """`charloom generate` (the torch-free path first, then the full one) and `evaluate`: exit 3, one line."""
    ckpt = _hostile(run_copy, section, values)
    for args in (["generate", str(run_copy), "--length", "5", "--seed", "1"], ["evaluate", str(run_copy)]):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "charloom", *args], capture_output=True, text=True, timeout=120,
                              preexec_fn=_limit_memory)
        assert done.returncode == 3, (args, done.returncode, done.stderr[-2000:])
        assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"charloom: {ckpt}"), done.stderr
        assert time.perf_counter() - start < 30  # torch's import included; the refusal itself is instant


def test_shapes_are_compared_before_the_network_is_built(run_copy, monkeypatch):
    """No real (non-meta) network is allocated for a config whose shapes are not the file's."""
    _hostile(run_copy, "model", {"hidden": 1024, "layers": 2})
    built: list[str] = []
    original = model_module.build_model

    def spy(*args, **kwargs):
        net = original(*args, **kwargs)
        built.append(next(net.parameters()).device.type)
        return net

    monkeypatch.setattr(model_module, "build_model", spy)
    with pytest.raises(CheckpointError, match="weights do not fit the model in config.json"):
        charloom.load(run_copy)
    assert set(built) <= {"meta"}, built


# -- 10: silent wrong results -----------------------------------------------------------------------

def test_a_corpus_that_changes_between_scan_and_encoding_is_refused(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    scan = scan_corpus([corpus])
    corpus.write_text(TINY_TEXT + TINY_TEXT[:100], encoding="utf-8")  # grows, same alphabet
    with pytest.raises(CharloomError) as err:
        encode_to_disk(scan, CharTokenizer(scan.alphabet), tmp_path / "ids.bin")
    assert "changed while it was read" in err.value.message and "\n" not in err.value.message
    corpus.write_text(TINY_TEXT.upper(), encoding="utf-8")  # same size, new characters: one line, no ValueError
    with pytest.raises(CharloomError, match="changed while it was read"):
        encode_to_disk(scan, CharTokenizer(scan.alphabet), tmp_path / "ids.bin")
    assert not list(tmp_path.glob("ids.bin*"))


@pytest.mark.parametrize("how", ["truncated", "grown", "empty-validation", "wrong-dtype"])
def test_ids_that_do_not_match_the_config_are_refused(run_copy, how):
    ids_path = run_copy / "data" / "ids.bin"
    ids = np.fromfile(ids_path, dtype=np.uint8)
    ckpt = checkpoint.resolve(run_copy)
    config = json.loads((ckpt / "config.json").read_text())
    split = config["corpus"]["split"]
    if how == "truncated":
        ids[: len(ids) // 2].tofile(ids_path)
    elif how == "grown":
        np.concatenate([ids, ids[:10]]).tofile(ids_path)
    elif how == "empty-validation":  # a config and file that agree, with nothing after the split
        ids[:split].tofile(ids_path)
        _hostile(run_copy, "corpus", {"chars": split, "tokens": split})
    else:
        _hostile(run_copy, "corpus", {"dtype": "uint16"})
    model = charloom.load(run_copy)
    with pytest.raises(CheckpointError) as err:
        model.evaluate()
    assert "\n" not in err.value.message and str(ids_path) in err.value.message
    if how == "empty-validation":
        assert "validation split is empty" in err.value.message
    code = subprocess.run([sys.executable, "-m", "charloom", "train", "--resume", str(run_copy), "--max-steps", "14"],
                          capture_output=True, text=True, timeout=300)
    assert code.returncode == 3 and code.stderr.count("\n") == 1 and str(ids_path) in code.stderr, code.stderr


# -- 16: a SIGTERM before training, an encoding error -----------------------------------------------

SLOW_ENCODE = r"""
import sys, time
from charloom.text import encode
original, calls = encode.stream_text, []
def slow(*a, **k):  # the second reading (the encoding, after the scan) stops at its first piece
    calls.append(1)
    for piece in original(*a, **k):
        if len(calls) == 2:
            print("encoding", flush=True)
            time.sleep(60)
        yield piece
encode.stream_text = slow
from charloom.cli.commands import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_while_encoding_leaves_no_temporary_ids(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_ENCODE, "train", str(corpus), "--out", str(tmp_path / "run"),
                             "--quiet", "--max-steps", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "encoding"
        assert list((tmp_path / "run" / "data").glob("ids.bin.tmp-*"))  # the temporary file exists now
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=30)[1]
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130 and err.strip().splitlines() == ["charloom: interrupted"], (proc.returncode, err)
    assert not list((tmp_path / "run" / "data").glob("ids.bin*")), list((tmp_path / "run" / "data").iterdir())


# -- 15: extreme sampling values --------------------------------------------------------------------

def _ends(f) -> list:
    """The range ends of SampleConfig field ``f`` (its bound): each end, and past 1e38 (float32's largest)
    and below 1e-38 (its smallest normal) where the range goes that far."""
    b = f.metadata["bound"]
    if b.whole:
        return [v for v in (b.low, 1, 2, 10**6 if b.high is None else b.high) if v is not None]
    low = -1e308 if b.low is None else (b.low if not b.low_open else 5e-324)
    high = 1e308 if b.high is None else (b.high if not b.high_open else b.high - 1e-9)
    out = [low, high, 1e-45, 1e39, -1e39, 1e-300]
    return sorted({v for v in out if b.accepts(v)})


NUMERIC = [f for f in fields(SampleConfig) if "bound" in f.metadata]
EXTREMES = [(f.name, v) for f in NUMERIC for v in _ends(f)] + [
    ("logit_bias", (("t", 1e308),)), ("logit_bias", (("t", -1e308), ("h", 1e308))),
    ("temperature_schedule", "1e-300,1e300"), ("temperature_schedule", "5e-324:1e308")]


@pytest.fixture(scope="module")
def tiny_model(tiny_run) -> charloom.Model:
    return charloom.load(tiny_run)


@pytest.mark.parametrize("path", ["torch", "numpy"])
def test_every_sampling_option_keeps_the_distribution_finite_at_its_ends(tiny_model, monkeypatch, path):
    """Each option at each end of its range, alone: no NaN or +inf reaches the draw, some token stays
    drawable, and the drawn token is one the scores allow (not token 0 by default)."""
    monkeypatch.setattr(engine, "generation_stepper", lambda *a, **k: Stepping(kind=path))
    seen: list[str] = []

    def checked(draw):
        def wrapper(scores, uniforms):
            s = torch.as_tensor(scores)
            assert not torch.isnan(s).any() and not (s == math.inf).any(), f"non-finite scores ({seen[-1]})"
            assert (s > -math.inf).any(dim=-1).all(), f"no drawable token ({seen[-1]})"
            ids = draw(scores, uniforms)
            assert bool((s.gather(1, torch.as_tensor(ids).view(-1, 1)) > -math.inf).all()), seen[-1]
            return ids
        return wrapper

    monkeypatch.setattr(engine, "draw", checked(engine.draw))
    monkeypatch.setattr(engine, "draw_numpy", checked(engine.draw_numpy))
    for name, value in EXTREMES:
        seen.append(f"{name}={value!r}")
        options = {name: value, "temperature": value} if name == "temperature" else {name: value}
        out = tiny_model.generate("the quick ", length=12, seed=3, **options)
        assert len(out) == 12, seen[-1]


@pytest.mark.parametrize("value", [1e-45, 5e-324])
def test_tiny_repetition_penalty_favours_the_repeated_tokens(tiny_model, value):
    """--repetition-penalty 1e-45 makes repeats overwhelmingly likely: every drawn token is one already
    in the window (today: +inf logits, then NaN, then always token 0)."""
    prompt = "the quick "
    out = tiny_model.generate(prompt, length=20, seed=5, repetition_penalty=value, penalty_last_n=0)
    assert set(out) <= set(prompt), repr(out)


def test_huge_temperature_is_uniform_and_tiny_is_greedy_on_every_path(tiny_model):
    greedy = tiny_model.generate("the ", temperature=0, length=30, seed=1)
    assert tiny_model.generate("the ", temperature=5e-324, length=30, seed=1) == greedy
    assert tiny_model.generate("the ", temperature_schedule="5e-324,1e-300", length=30, seed=1) == greedy
    wild = tiny_model.generate("the ", temperature=1e308, length=400, seed=1)
    assert len(set(wild)) > len(tiny_model.tokenizer.alphabet) // 2  # every token about as likely
