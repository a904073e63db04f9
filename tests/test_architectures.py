"""Every registered architecture x every token kind through the public API: train -> save -> load -> generate -> evaluate."""

import io
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import charloom
from charloom.cli.commands import main
from charloom.models import MODELS
from charloom.text.sources import load_corpus
from charloom.text.tokenizers import Tokenizer
from tests.conftest import TINY_SETTINGS, TINY_TEXT

ARCHS = sorted(MODELS)
TOKENS = sorted(Tokenizer.registry)


def test_every_architecture_and_token_kind_is_covered():
    assert {"lstm", "gru", "conv", "transformer"} <= set(ARCHS) and TOKENS == ["bpe", "char", "word"]


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("arch", ARCHS)
def test_train_save_load_generate_evaluate(tmp_path, arch, tokens):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    trained = charloom.train(corpus, out=tmp_path / "run", model=arch, tokens=tokens, **TINY_SETTINGS)
    assert trained.net.config.model == arch and trained.tokenizer.kind == tokens

    # Save -> load: the last checkpoint computes what the trained network computes.
    loaded = charloom.load(tmp_path / "run", which="last")
    assert loaded.tokenizer.kind == tokens and loaded.tokenizer.vocab_size == trained.tokenizer.vocab_size
    probe = torch.as_tensor([trained.tokenizer.encode("the quick brown fox jumps", unknown="replace")])
    with torch.no_grad():
        assert torch.allclose(loaded.net(probe)[0], trained.net(probe)[0], atol=1e-6)

    # Generate: one batch at two temperatures, every token decodes, banned ids never drawn, and the
    # stream (one piece per token, decoded incrementally) spells exactly the generated text.
    samples = loaded.generate("the quick", length=15, temperature=[0.2, 1.2], seed=3)
    for sample in samples:
        assert len(sample.tokens) == 15 and not set(sample.tokens) & set(loaded.tokenizer.banned_ids)
        assert sample.text == loaded.tokenizer.decode(sample.tokens)
    pieces = list(loaded.stream("the quick", length=15, temperature=0.7, seed=5))
    assert len(pieces) == 15
    assert "".join(pieces) == loaded.generate("the quick", length=15, temperature=0.7, seed=5).text

    # Evaluate: bits per character over the validation split, checked against an independent pass.
    result = loaded.evaluate()
    text = load_corpus(corpus).text
    train_text, val_text = text[:len(text) - round(len(text) * 0.1)], text[len(text) - round(len(text) * 0.1):]
    val_ids = loaded.tokenizer.encode_corpus(val_text).astype(np.int64)
    last_train_id = int(loaded.tokenizer.encode_corpus(train_text)[-1])
    assert result.chars == len(val_text) and result.tokens == len(val_ids)
    inputs = torch.as_tensor(np.concatenate([[last_train_id], val_ids[:-1]]))[None]
    with torch.no_grad():
        logits, _ = loaded.net(inputs)  # one full forward; a transformer slides inside it
    nats = float(F.cross_entropy(logits[0], torch.as_tensor(val_ids), reduction="sum"))
    assert result.total_nats == pytest.approx(nats, rel=1e-4)
    assert result.bits_per_char == pytest.approx(nats / len(val_text) / math.log(2), rel=1e-4)
    assert result.perplexity == pytest.approx(math.exp(nats / len(val_ids)), rel=1e-4)
    assert loaded.evaluate("a stitch in time saves nine.").chars == len("a stitch in time saves nine.") - len(
        loaded.tokenizer.decode(loaded.tokenizer.encode("a stitch in time saves nine.")[:1]))

    # Dynamic evaluation runs on every architecture: with no step it is the exact pass; with steps
    # the weights come back as they were.
    still = charloom.DynamicEval(lr=0.0, decay=0.0, stats_segments=3)
    assert loaded.evaluate(dynamic=still).total_nats == pytest.approx(result.total_nats, rel=1e-5)
    before = {k: v.clone() for k, v in loaded.net.state_dict().items()}
    assert math.isfinite(loaded.evaluate(dynamic=charloom.DynamicEval(stats_segments=3)).total_nats)
    assert all(torch.equal(before[k], v) for k, v in loaded.net.state_dict().items())


def test_cli_trains_and_generates_with_model_and_tokens_flags(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    code = main(["train", str(corpus), "--out", str(tmp_path / "run"), "--model", "transformer", "--tokens", "bpe",
                 "--vocab-size", "300", "--positions", "rotary", "--hidden", "32", "--layers", "1", "--seq-len", "32",
                 "--batch-size", "8", "--max-steps", "4", "--threads", "1", "--sample-length", "10", "--quiet"], out, err)
    assert code == 0, err.getvalue()
    model = charloom.load(tmp_path / "run")
    assert model.net.config.positions == "rotary" and model.net.config.context == 32 and model.tokenizer.vocab_size <= 300
    assert model.train_config.batching == "windows"  # declared by the architecture, not asked for
    out = io.StringIO()
    assert main(["generate", str(tmp_path / "run"), "--prompt", "the ", "--length", "12", "--seed", "1"], out, err) == 0
    assert out.getvalue().startswith("the ")


@pytest.mark.parametrize("argv, message", [
    (["--tokens", "char", "--vocab-size", "50"], "--vocab-size applies to word and bpe"),
    (["--tokens", "bpe", "--vocab-size", "100"], "at least 256"),
    (["--model", "transformer", "--batching", "stream"], "--batching windows"),
    (["--model", "transformer", "--hidden", "30"], "multiple of --heads"),
    (["--model", "rnn"], "unknown architecture 'rnn'"),
    (["--tokens", "syllable"], "--tokens must be one of"),
])
def test_bad_model_or_token_settings_are_one_line_errors(tmp_path, argv, message):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    assert main(["train", str(corpus), "--out", str(tmp_path / "run"), "--max-steps", "1", *argv], out, err) == 2
    line = err.getvalue().strip()
    assert line.startswith("charloom: ") and message in line and "\n" not in line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_word_generation_on_nietzsche_never_draws_unk(tmp_path):
    """A small word-level LSTM on the book's corpus: every drawn token is a real word, space or mark."""
    model = charloom.train("nietzsche", out=tmp_path / "run", tokens="word", vocab_size=2000, hidden=64,
                           embedding_dim=32, seq_len=32, batch_size=32, max_steps=40, eval_every=40,
                           sample_temperatures=(), threads=1)
    tok = model.tokenizer
    samples = model.generate("the philosopher ", length=150, temperature=[0.2, 0.5, 1.0, 1.2], seed=0)
    for sample in samples:
        assert 0 not in sample.tokens and "<unk>" not in sample.text
        pieces = [tok.decode([i]) for i in sample.tokens]
        assert all(p and re.fullmatch(r"\w+|\s+|[^\w\s]", p) for p in pieces)
        assert "".join(pieces) == sample.text
    # At low temperature the model has already learned that words are separated: few word-word joins.
    cold = [tok.decode([i]) for i in samples[0].tokens]
    joins = sum(a[-1].isalnum() and b[0].isalnum() for a, b in zip(cold, cold[1:]))
    assert joins <= len(cold) // 10


class _Bigram(torch.nn.Module):
    """A fixed bigram 'model': after token a comes follow[a] (greedy), whatever the history."""

    def __init__(self, follow: dict[int, int], vocab: int) -> None:
        super().__init__()
        self.table = torch.full((vocab, vocab), -10.0)
        for a in range(vocab):
            self.table[a, follow.get(a, next(iter(follow.values())))] = 10.0

    def forward(self, idx, state=None):
        return self.table[idx], state  # (B, T, V)

    def select_state(self, state, index):
        return state


def test_stream_never_emits_half_a_character():
    """Byte-level tokens: é is two byte tokens; the stream holds the first back instead of printing U+FFFD."""
    from charloom.api import Model
    from charloom.text.tokenizers import BPETokenizer

    tok = BPETokenizer.fit("é", vocab_size=256)  # bytes only: no merge joins é's two bytes
    first, second = tok.encode("é")
    model = Model(_Bigram({first: second, second: first}, tok.vocab_size), tok, {"train": {}})
    pieces = list(model.stream("é", length=6, temperature=0.0, seed=0))
    assert pieces == ["é", "é", "é"]  # a token that completes no character yields nothing yet
    assert [tok.decode([i]) for i in tok.encode("éé")] == ["\ufffd"] * 4  # what decoding one token at a time would print
    odd = list(model.stream("é", length=5, temperature=0.0, seed=0))
    assert odd[-1] == "\ufffd"  # a character cut off by the length limit is shown, not dropped
