"""Fine-tuning (issue 27): --init-from a run or the bundled base model, the vocabulary grown, the parent recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import charloom
from charloom.errors import CharloomError
from charloom.training.finetune import BASE_DIR, FINETUNE_LR_SCALE, FINETUNE_WARMUP

from .conftest import TINY_TEXT, run_cli

SMALL = dict(hidden=32, layers=1, embedding_dim=16, seq_len=16, batch_size=8, max_steps=4, eval_every=2,
             warmup_steps=1, threads=1, sample_temperatures=())


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("parent")
    corpus = root / "parent.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    charloom.train(corpus, out=root / "run", **SMALL)
    return root / "run"


def _child_corpus(tmp_path: Path) -> Path:
    path = tmp_path / "child.txt"
    path.write_text(("Zebra quartz {jump} " * 60) + TINY_TEXT[:500], encoding="utf-8")
    return path


@pytest.mark.parametrize("input_kind", ["embedding", "onehot"])
def test_vocabulary_grows_and_known_rows_are_kept(tmp_path, input_kind):
    parent_run = tmp_path / "parent"
    charloom.train(_write(tmp_path / "p.txt", TINY_TEXT), out=parent_run, input=input_kind, **SMALL)
    old = charloom.load(parent_run, which="last")
    child = charloom.train(_child_corpus(tmp_path), out=tmp_path / "child", init_from=str(parent_run),
                           **{**SMALL, "max_steps": 1, "lr": 1e-12, "ema": 0.0})
    new_chars = sorted(set(child.tokenizer.chars) - set(old.tokenizer.chars))
    assert new_chars == sorted(set("Zbqz{}") - set(old.tokenizer.chars)) and new_chars
    assert child.config["parent"]["new_chars"] == len(new_chars)
    assert child.config["parent"]["init_from"] == str(parent_run)
    assert child.net.config.hidden == old.net.config.hidden and child.net.config.input == input_kind
    # With a learning rate of 1e-12 the one step leaves the weights as grown: known rows equal the parent's.
    old_sd, new_sd = old.net.state_dict(), child.net.state_dict()
    head_w, head_b = new_sd["head.weight"], new_sd["head.bias"]
    for c in old.tokenizer.chars:
        i, j = old.tokenizer.index[c], child.tokenizer.index[c]
        assert torch.allclose(head_w[j], old_sd["head.weight"][i], atol=1e-6)
        assert torch.allclose(head_b[j], old_sd["head.bias"][i], atol=1e-6)
    for c in new_chars:
        assert head_b[child.tokenizer.index[c]] == pytest.approx(float(old_sd["head.bias"].min()), abs=1e-5)
    # The same text gives the parent's distribution over the characters it knew, once the new ones are left out.
    p_old = old.next_token_distribution("the quick brown ").probs
    p_new = child.next_token_distribution("the quick brown ").probs
    known = torch.tensor([p_new[child.tokenizer.index[c]] for c in old.tokenizer.chars])
    assert torch.allclose(known / known.sum(), torch.tensor(p_old), atol=1e-5)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_finetune_schedule_and_parent_record(parent, tmp_path):
    scratch = charloom.train(_child_corpus(tmp_path), out=tmp_path / "scratch", **{**SMALL, "warmup_steps": 50})
    child = charloom.train(_child_corpus(tmp_path), out=tmp_path / "child", init_from=str(parent),
                           **{k: v for k, v in SMALL.items() if k != "warmup_steps"})
    assert child.train_config.lr == pytest.approx(scratch.train_config.lr * FINETUNE_LR_SCALE)
    assert child.train_config.warmup_steps == FINETUNE_WARMUP
    assert child.history[0]["step"] == 2  # a fresh run: its own steps, a fresh optimiser
    saved = json.loads(next((tmp_path / "child" / "checkpoints").glob("step-*/config.json")).read_text())
    assert saved["parent"]["model_sha256"] and saved["train"]["init_from"] == str(parent)


def test_a_different_architecture_is_refused(parent, tmp_path):
    with pytest.raises(CharloomError) as err:
        charloom.train(_child_corpus(tmp_path), out=tmp_path / "x", init_from=str(parent), **{**SMALL, "hidden": 64})
    assert "--hidden" in str(err.value) and "differs" in str(err.value)
    assert not (tmp_path / "x").exists()


def test_bad_init_from_is_one_line(tmp_path):
    done = run_cli("train", str(_child_corpus(tmp_path)), "--init-from", str(tmp_path / "nowhere"), "--max-steps", "1",
                   "--out", str(tmp_path / "run"))
    assert done.returncode == 2 and "Traceback" not in done.stderr and "no such run" in done.stderr


def test_the_base_model_ships_and_loads():
    assert (BASE_DIR / "model.safetensors").stat().st_size < 5_000_000
    card = (BASE_DIR / "CARD.md").read_text(encoding="utf-8")
    assert "bits per character" in card and "tools/train_base.py" in card
    base = charloom.load(BASE_DIR)
    assert set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\n") <= set(base.tokenizer.chars)
    # It knows English: "the" after "in " is far likelier than uniform.
    dist = base.next_token_distribution("It was written in t")
    assert dist.probs[base.tokenizer.index["h"]] > 0.5


def test_records_finetune_from_base(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("\n".join(["Alice", "Bruno", "Chloé", "Dmitri", "Eve", "Farid"] * 10) + "\n", encoding="utf-8")
    done = run_cli("train", str(names), "--records", "line", "--init-from", "base", "--max-steps", "3",
                   "--threads", "1", "--out", str(tmp_path / "run"), "--quiet")
    assert done.returncode == 0, done.stderr
    model = charloom.load(tmp_path / "run")
    assert model.config["parent"]["init_from"] == "base" and model.config["parent"]["new_chars"] >= 1  # the END, é
    assert model.net.config.hidden == charloom.load(BASE_DIR).net.config.hidden
