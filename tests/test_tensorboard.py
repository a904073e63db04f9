"""``--log tensorboard``: the events hold what metrics.csv and samples.jsonl hold, read back with TensorBoard's
own event reader; a resumed run's curves have no step twice; a missing package is one line before the corpus is
read; runs without the option never import TensorBoard; only rank 0 writes; the real TensorBoard page, offline,
in Chromium shows the run's scalars."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import charloom
from charloom.cli.commands import main
from charloom.config import TrainConfig
from charloom.errors import CharloomError
from tests.conftest import REPO, TINY_SETTINGS, TINY_TEXT, run_cli

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
tensor_util = pytest.importorskip("tensorboard.util.tensor_util")

CHROMIUM = Path("/usr/bin/chromium")
ENV = {"PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")])}


def events(run: Path):
    """TensorBoard's reader over RUN/tensorboard, every event loaded (0: nothing sampled away)."""
    acc = event_accumulator.EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def texts(acc, tag: str) -> list[tuple[int, str]]:
    """(step, text) of a text tag (torch's writer stores it as ``TAG/text_summary``)."""
    return [(e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode("utf-8"))
            for e in acc.Tensors(f"{tag}/text_summary")]


def unindent(markdown: str) -> str:
    """The text of a Markdown code block of four-space indented lines."""
    lines = markdown.split("\n")
    assert all(line.startswith("    ") for line in lines), markdown
    return "\n".join(line[4:] for line in lines)


def scalar_steps_and_values(acc, tag: str) -> tuple[list[int], np.ndarray]:
    found = acc.Scalars(tag)
    return [e.step for e in found], np.array([e.value for e in found], dtype=np.float32)


def train_args(corpus: Path, out: Path, **settings) -> list[str]:
    flags = [str(corpus), "--out", str(out)]
    for key, value in {**TINY_SETTINGS, **settings}.items():
        flags += ["--" + key.replace("_", "-"), ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return flags


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run trained with --log tensorboard over two epochs, so samples come at two steps."""
    root = tmp_path_factory.mktemp("tb-run")
    corpus = root / "tiny.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    settings = {**TINY_SETTINGS, "max_steps": 0, "epochs": 2, "eval_every": 10, "sample_temperatures": (0.5, 1.0)}
    charloom.train(corpus, out=root / "run", log="tensorboard", **settings)
    return root / "run"


def test_scalars_are_the_metrics_csv_columns_at_the_same_steps(logged_run):
    rows = metrics(logged_run)
    acc = events(logged_run)
    columns = [c for c in rows[0] if c != "step"]
    assert sorted(acc.Tags()["scalars"]) == sorted(columns)
    for column in columns:
        steps, values = scalar_steps_and_values(acc, column)
        assert steps == [int(r["step"]) for r in rows], column
        np.testing.assert_array_equal(values, np.array([float(r[column]) for r in rows], dtype=np.float32), column)


def test_samples_are_texts_at_their_steps(logged_run):
    records = [json.loads(line) for line in (logged_run / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    acc = events(logged_run)
    assert {r["epoch"] for r in records} == {1, 2}  # one sample per temperature at each epoch's end
    for temperature in (0.5, 1.0):
        want = [(r["step"], r["seed_text"] + r["text"]) for r in records if r["temperature"] == temperature]
        got = [(step, unindent(text)) for step, text in texts(acc, f"samples/temperature={temperature:g}")]
        assert got == want
    (step, config), = texts(acc, "config")
    assert step == 0 and json.loads(unindent(config))["train"]["log"] == "tensorboard"


def test_resumed_run_continues_its_curves_without_a_step_twice(tmp_path, tiny_file):
    """The first process is killed while saving the checkpoint of step 12 (index not yet updated), after its
    evaluation of step 12 reached metrics.csv and the events; the resumed run starts at step 6 and
    evaluates step 12 again. metrics.csv then has step 12 twice; the curves must not."""
    run = tmp_path / "run"
    killed = run_cli("train", *train_args(tiny_file, run, log="tensorboard"),
                     env={**ENV, "CHARLOOM_FAULT": "before-index", "CHARLOOM_FAULT_AT": "2"})
    assert killed.returncode != 0, killed.stderr[-2000:]
    assert [r["step"] for r in metrics(run)] == ["6", "12"]
    assert scalar_steps_and_values(events(run), "val_loss")[0] == [6, 12]

    charloom.train(resume=run)  # --log tensorboard is part of the run's settings
    rows = metrics(run)
    assert [r["step"] for r in rows] == ["6", "12", "12"]
    last = {int(r["step"]): r for r in rows}  # the resumed run's row wins
    acc = events(run)
    for column in ("val_loss", "train_loss", "lr"):
        steps, values = scalar_steps_and_values(acc, column)
        assert steps == [6, 12], column
        np.testing.assert_array_equal(values, np.array([float(last[s][column]) for s in steps], dtype=np.float32))


def test_log_can_be_turned_on_when_resuming(tmp_path, tiny_file):
    run = tmp_path / "run"
    charloom.train(tiny_file, out=run, **{**TINY_SETTINGS, "max_steps": 6})
    assert not (run / "tensorboard").exists()
    charloom.train(resume=run, max_steps=12, log="tensorboard")
    assert scalar_steps_and_values(events(run), "val_loss")[0] == [12]  # from where it was turned on


def test_missing_tensorboard_is_one_line_before_the_corpus_is_read(tmp_path, tiny_file, logged_run, monkeypatch):
    # None in sys.modules makes an import raise ImportError, as when the package is not installed.
    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)
    out, err = io.StringIO(), io.StringIO()
    code = main(["train", str(tiny_file), "--out", str(tmp_path / "run"), "--log", "tensorboard"], out, err)
    assert code == 2
    assert err.getvalue().count("\n") == 1 and "pip install 'charloom[tensorboard]'" in err.getvalue()
    assert not (tmp_path / "run").exists()
    before = sorted(p.name for p in (logged_run / "tensorboard").iterdir())
    with pytest.raises(CharloomError, match=r"charloom\[tensorboard\]"):
        charloom.train(resume=logged_run, epochs=3)
    assert sorted(p.name for p in (logged_run / "tensorboard").iterdir()) == before


def test_log_choices_come_from_the_config_field(tmp_path, tiny_file):
    choices = dict(TrainConfig.__dataclass_fields__["log"].metadata)["choices"]
    out, err = io.StringIO(), io.StringIO()
    assert main(["train", "--help"], out, err) == 0
    assert "--log {" + ",".join(choices) + "}" in out.getvalue()
    assert main(["train", str(tiny_file), "--out", str(tmp_path / "a"), "--log", "wandb"], out, err) == 2
    with pytest.raises(CharloomError, match="--log must be one of none, tensorboard"):
        charloom.train(tiny_file, out=tmp_path / "b", log="wandb")


def test_a_run_without_log_never_imports_tensorboard(tmp_path, tiny_file):
    code = (f"import sys, charloom; charloom.train({str(tiny_file)!r}, out={str(tmp_path / 'run')!r}, "
            f"**{ {**TINY_SETTINGS, 'max_steps': 2, 'eval_every': 0}!r}); "
            "print(sorted(m for m in sys.modules if m.startswith(('tensorboard', 'torch.utils.tensorboard'))))")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **ENV})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert not (tmp_path / "run" / "tensorboard").exists()


@pytest.mark.slow
def test_only_rank_0_writes_events(tmp_path, tiny_file):
    from tests.test_distributed import torchrun

    run = tmp_path / "run"
    # "--": torchrun would take --log for an abbreviation of its own --log-dir (and refuse it as ambiguous).
    torchrun(2, "--", "train", *train_args(tiny_file, run, log="tensorboard", sample_temperatures=(), device="cpu",
                                     dropout=0.0), cwd=tmp_path)
    assert len(list((run / "tensorboard").iterdir())) == 1
    assert scalar_steps_and_values(events(run), "val_loss")[0] == [int(r["step"]) for r in metrics(run)]


def screenshot_tool():
    """tools/tensorboard_screenshot.py, whose functions start the server and the offline page."""
    spec = importlib.util.spec_from_file_location("tensorboard_screenshot", REPO / "tools" / "tensorboard_screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium: apt-get install -y chromium")
def test_tensorboard_shows_the_run_offline_in_chromium(logged_run):
    sync_api = pytest.importorskip("playwright.sync_api")
    rows = metrics(logged_run)
    tool = screenshot_tool()
    proc, url = tool.start_tensorboard(logged_run.parent)
    blocked: list[str] = []
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=tool.ARGS)
            try:
                page = tool.offline_page(browser, url, blocked, 1600, 3000)  # tall: cards out of view are not drawn
                page.goto(url + "/#timeseries")
                page.fill(tool.TAG_FILTER, ".")  # every tag in one grid of cards
                page.wait_for_selector("card-view .tag")
                want = sorted(c for c in rows[0] if c != "step")
                page.wait_for_function("n => document.querySelectorAll('card-view .tag').length >= n", arg=len(want))
                assert sorted(set(page.locator("card-view .tag").all_text_contents())) == want
                # The val_loss card's table shows the last evaluation: its step and value (4 decimals).
                card = page.locator("card-view", has=page.locator(".tag", has_text="val_loss"))
                card.get_by_text(f"{float(rows[-1]['val_loss']):.4f}").first.wait_for()
                assert "run/tensorboard" in card.inner_text()
            finally:
                browser.close()
    finally:
        proc.kill()
        proc.wait()
    assert blocked == []
