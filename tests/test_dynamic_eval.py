"""Dynamic evaluation (metrics.dynamic_nats, Model.evaluate(dynamic=...), charloom evaluate --dynamic)."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

import charloom
from charloom.metrics import dynamic_nats, gradient_rms, stateful_nats
from tests.test_cli import cli

# Few statistics batches: the tiny run's training split is short and the tests stay fast.
QUICK = charloom.DynamicEval(stats_segments=8)


@pytest.fixture()
def model(tiny_run):
    return charloom.load(tiny_run)


def _ids(model, text: str) -> np.ndarray:
    return np.asarray(model.tokenizer.encode(text), dtype=np.int64)


def test_a_segment_is_scored_before_the_model_learns_from_it(model):
    # However large the step, the first segment sees the trained weights, so a text of one segment
    # scores exactly as the static pass does; the next segment sees adapted weights.
    ids = _ids(model, "over the lazy dog the quick brown fox. " * 4)
    wild = dataclasses.replace(QUICK, lr=1e-2, segment=24)
    rms = gradient_rms(model.net, *model.run_data()[:2], wild)
    one, n = dynamic_nats(model.net, ids, 1, 25, rms, wild)
    static, m = stateful_nats(model.net, ids, 1, 25)
    assert (n, one) == (m, pytest.approx(static, rel=1e-5))
    two, _ = dynamic_nats(model.net, ids, 1, 49, rms, wild)
    assert abs(two - stateful_nats(model.net, ids, 1, 49)[0]) > 1e-3


def test_it_adapts_to_a_text_and_leaves_the_model_as_it_was(model):
    # A sentence the corpus never had, read many times: a model that learns as it reads gains a lot
    # (this barely trained one, ~4.6 bits/char, more than half with a large step).
    text = "dog jumps; brown lazy fox; quick over the. " * 30
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    static = model.evaluate(text)
    adapted = model.evaluate(text, dynamic=dataclasses.replace(QUICK, lr=3e-3))
    assert adapted.tokens == static.tokens and adapted.chars == static.chars
    assert adapted.bits_per_char < static.bits_per_char / 2
    assert all(torch.equal(before[k], v) for k, v in model.net.state_dict().items())
    assert model.evaluate(text).total_nats == static.total_nats


def test_no_step_and_no_decay_is_the_exact_pass_also_under_inference_mode(model):
    exact = model.evaluate()
    with torch.inference_mode():
        still = model.evaluate(dynamic=dataclasses.replace(QUICK, lr=0.0, decay=0.0))
    assert still.total_nats == pytest.approx(exact.total_nats, rel=1e-5)
    assert all(p.requires_grad for p in model.net.parameters())  # as the loaded model had them


@pytest.mark.parametrize("settings, flag", [
    (charloom.DynamicEval(lr=-1.0), "--dynamic-lr"),
    (charloom.DynamicEval(lr=float("nan")), "--dynamic-lr"),
    (charloom.DynamicEval(decay=1.5), "--dynamic-decay"),
    (charloom.DynamicEval(segment=0), "--dynamic-segment"),
    (charloom.DynamicEval(stats_segments=0), "--dynamic-stats-segments"),
])
def test_bad_settings_are_refused_by_name(model, settings, flag):
    with pytest.raises(charloom.CharloomError, match=f"^{flag}: must be"):
        model.evaluate(dynamic=settings)


def test_what_it_cannot_do_is_refused_in_one_line(model, tiny_run, tmp_path):
    with pytest.raises(charloom.CharloomError, match="cannot score pieces side by side; drop --fast"):
        model.evaluate(exact=False, dynamic=True)
    book = charloom.load(tiny_run)
    book.train_config = dataclasses.replace(book.train_config, generation_window=60)
    with pytest.raises(charloom.CharloomError, match="fixed windows of 60 tokens"):
        book.evaluate(dynamic=True)
    # A checkpoint copied out of its run has no training split to take gradient statistics from.
    alone = tmp_path / "alone"
    shutil.copytree(model.path, alone)
    with pytest.raises(charloom.CharloomError, match="reads the run's training split"):
        charloom.load(alone).evaluate("the quick brown fox jumps", dynamic=QUICK)
    assert np.isfinite(charloom.load(alone).evaluate("the quick brown fox jumps").loss)  # static still works


def test_cli_dynamic_flags(tiny_run):
    code, out, _ = cli("evaluate", str(tiny_run), "--json")
    static = json.loads(out)
    code, out, err = cli("evaluate", str(tiny_run), "--json", "--dynamic", "--dynamic-lr", "1e-4", "--dynamic-segment", "10",
                         "--dynamic-stats-segments", "8")
    data = json.loads(out)
    assert code == 0 and data["split"] == "validation" and data["tokens"] == static["tokens"]
    adapted = data["dynamic_evaluation"]
    assert adapted["settings"] == dataclasses.asdict(charloom.DynamicEval(lr=1e-4, segment=10, stats_segments=8))
    # The headline stays the static score of the network; dynamic evaluation comes beside it.
    assert data["bits_per_char"] == static["bits_per_char"] != adapted["bits_per_char"]
    assert adapted["tokens"] == static["tokens"]
    code, out, _ = cli("evaluate", str(tiny_run), "--dynamic")
    first, second = out.splitlines()
    assert code == 0 and first.startswith("validation: ") and second.startswith("validation, with dynamic evaluation: ")
    assert "bits per char" in second
    code, out, err = cli("evaluate", str(tiny_run), "--dynamic", "--dynamic-decay", "2")
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("charloom: --dynamic-decay: must be in [0, 1]")
    code, out, err = cli("evaluate", str(tiny_run), "--dynamic", "--dynamic-stats-segments", "0")
    assert code == 2 and err.startswith("charloom: --dynamic-stats-segments: must be >= 1, got 0")
    code, out, err = cli("evaluate", str(tiny_run), "--dynamic", "--fast")
    assert code == 2 and err.count("\n") == 1 and "drop --fast" in err
