"""``charloom export RUN --format hf``: a folder that transformers loads with its Auto classes, offline,
and that predicts and writes what charloom does; recurrent models and missing packages are one-line errors."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import pytest
import torch

import charloom
from charloom.cli.commands import main
from charloom.config import ModelConfig
from charloom.errors import CharloomError
from charloom.export import export_model
from charloom.models import build_model
from charloom.text.tokenizers import BPETokenizer, WordTokenizer
from tests.conftest import TINY_TEXT

transformers = pytest.importorskip("transformers")

CONTEXT = 64
HF_CLASSES = {"learned": ("gpt2", "GPT2LMHeadModel"), "rotary": ("gpt_neox", "GPTNeoXForCausalLM")}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test here may reach the network: the Hub client is told so."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", params=["learned", "rotary"])
def transformer_run(request, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp(f"transformer-{request.param}")
    corpus = root / "tiny.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    charloom.train(corpus, out=root / "run", model="transformer", positions=request.param, hidden=32, layers=2,
                   heads=4, seq_len=CONTEXT, batch_size=8, max_steps=40, eval_every=10, warmup_steps=2,
                   sample_length=10, threads=1)
    return root / "run"


def export_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["export", *args], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_a_run_loads_with_the_auto_classes_and_matches_charloom(transformer_run, tmp_path):
    folder = tmp_path / "hf"
    code, out, err = export_cli(str(transformer_run), "--format", "hf", "--out", str(folder))
    assert code == 0, err
    assert f"{folder / 'model.safetensors'}" in out and "largest logit difference" in out
    model = charloom.load(transformer_run)
    model_type, arch = HF_CLASSES[model.net.config.positions]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == model_type and config["architectures"] == [arch]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert type(hf).__name__ == arch and tok.is_fast

    text = TINY_TEXT[100:100 + CONTEXT]
    ids = tok(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == model.tokenizer.encode(text)
    with torch.inference_mode():
        want = model.net(ids)[0]  # (1, CONTEXT, V)
        got = hf(input_ids=ids).logits
    assert float((got - want).abs().max()) <= 1e-4

    prompt = "the quick "  # prompt and continuation within the context, where both read the same window
    greedy = hf.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=50, do_sample=False)
    assert tok.decode(greedy[0]) == prompt + str(model.generate(prompt, length=50, temperature=0.0))
    for sample in ("a b\n c", "  the   end.\n\n"):
        assert tok.decode(tok(sample).input_ids) == sample  # no spaces added or removed


def test_the_model_card_quotes_the_runs_data_and_scores(transformer_run, tmp_path):
    code, _, err = export_cli(str(transformer_run), "--format", "hf", "--out", str(tmp_path))
    assert code == 0, err
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    model = charloom.load(transformer_run)
    with open(transformer_run / "metrics.csv", newline="") as fh:
        best = min(float(row["val_bpc"]) for row in csv.DictReader(fh))
    assert f"**{best:.3f} bits per character**" in card
    assert model.config["corpus"]["sha256"] in card and "`tiny.txt`" in card
    assert HF_CLASSES[model.net.config.positions][1] in card
    assert json.dumps(model.config["train"]["lr"]) in card and "AutoModelForCausalLM.from_pretrained" in card


def test_recurrent_models_are_refused_in_one_line(tiny_run, tmp_path):
    code, out, err = export_cli(str(tiny_run), "--format", "hf", "--out", str(tmp_path / "x"), "--no-cache")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "transformers has no architecture" in err and "use --format onnx" in err
    assert not (tmp_path / "x").exists()


def test_without_transformers_the_export_says_what_to_install(transformer_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    code, _, err = export_cli(str(transformer_run), "--format", "hf", "--out", str(tmp_path / "x"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "charloom[hf]" in err
    assert not (tmp_path / "x").exists()


def random_transformer(tokenizer, hidden: int, head_bias: float, tie: bool = True) -> torch.nn.Module:
    """An untrained transformer with wide random weights, LayerNorms near 1 and a head bias of this spread."""
    torch.manual_seed(3)
    mcfg = ModelConfig(model="transformer", layers=1, hidden=hidden, heads=4, context=16, tie_weights=tie, dropout=0.0)
    net = build_model(mcfg, tokenizer.vocab_size).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.normal_(1.0 if name.endswith(("ln1.weight", "ln2.weight", "ln_f.weight")) else 0.0,
                      0.3 if p.dim() > 1 else 0.1)
        net.head.bias.normal_(0.0, head_bias)
    return net


def test_word_tokens_lowercased_and_an_untied_head(tmp_path):
    tokenizer = WordTokenizer.fit(TINY_TEXT)
    net = random_transformer(tokenizer, hidden=64, head_bias=0.5, tie=False)
    assert tokenizer.vocab_size <= 64  # a bias can be moved into the final LayerNorm
    config = {"model": net.config.__dict__, "train": {"lowercase": True}, "tokenizer": "word"}
    export_model(net, tokenizer.to_dict(), config, "hf", tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = tok("The Quick brown fox. A stitch", add_special_tokens=False).input_ids
    assert ids == tokenizer.encode("the quick brown fox. a stitch")
    assert tok.decode(ids) == "the quick brown fox. a stitch"
    assert tok("zebra quick").input_ids[0] == 0  # an unseen word is <unk>, id 0, as in charloom
    with torch.inference_mode():
        x = torch.tensor([ids])
        assert float((hf(input_ids=x).logits - net(x)[0]).abs().max()) <= 1e-4


def test_bpe_tokens_and_a_bias_that_cannot_be_moved(tmp_path):
    tokenizer = BPETokenizer.fit(TINY_TEXT + "caf\u00e9 na\u00efve", vocab_size=300)
    net = random_transformer(tokenizer, hidden=32, head_bias=0.0)  # 300 tokens over width 32, no bias: exact
    export_model(net, tokenizer.to_dict(), {"model": net.config.__dict__, "train": {}}, "hf", tmp_path / "a")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "a")
    text = "the caf\u00e9 is na\u00efve\n"
    assert tok(text).input_ids == tokenizer.encode(text) and tok.decode(tok(text).input_ids) == text
    biased = random_transformer(tokenizer, hidden=32, head_bias=0.5)
    with pytest.raises(CharloomError, match="bias has no equivalent.*300 tokens over a width of 32.*--format onnx"):
        export_model(biased, tokenizer.to_dict(), {"model": biased.config.__dict__, "train": {}}, "hf", tmp_path / "b")
    assert not (tmp_path / "b").exists()  # refused before anything is written
