"""Word and byte-level BPE tokenizers: exact round trips, vocabulary limits, unknown policies, streaming."""

import json
import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charloom.text.tokenizers import (
    BPETokenizer,
    UnknownSymbolsError,
    WordTokenizer,
    fit_tokenizer,
    tokenizer_from_dict,
)
from tests.conftest import TINY_TEXT

MIXED = "Der Übermensch — “Ja!”\tsagte er.\n\n日本語のテキスト 😀 ok  done\r\n"


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.fit(TINY_TEXT + MIXED, vocab_size=300)


@given(st.text(min_size=1))
@settings(max_examples=200, deadline=None)
def test_word_round_trip_any_text(text):
    tok = WordTokenizer.fit(text, vocab_size=10**6)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_corpus(text).tolist() == ids
    assert 0 not in ids  # nothing unknown when the whole text fits in the vocabulary


@given(st.text())
@settings(max_examples=200, deadline=None)
def test_bpe_round_trip_any_text_and_stream_never_breaks_a_character(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert bpe.hf.decode(ids) == text  # the library agrees with our byte table
    decoder = bpe.stream_decoder()
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text


@given(st.text(min_size=1))
@settings(max_examples=50, deadline=None)
def test_json_round_trips(bpe, text):
    for tok in (WordTokenizer.fit(text), bpe):
        again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
        assert type(again) is type(tok) and again.encode(text, unknown="replace") == tok.encode(text, unknown="replace")
        assert again.vocab_size == tok.vocab_size


def test_words_punctuation_and_whitespace_are_tokens():
    tok = WordTokenizer.fit("a  b\t\n\nc, d!")
    pieces = [tok.decode([i]) for i in tok.encode("a  b\t\n\nc, d!")]
    assert pieces == ["a", "  ", "b", "\t\n\n", "c", ",", " ", "d", "!"]


def test_vocab_size_keeps_the_most_frequent_and_unk_is_banned():
    text = "the cat and the dog and the bird. " * 3 + "zebra"
    tok = WordTokenizer.fit(text, vocab_size=5)
    # Counted independently: " " 22, "the" 9, "and" 6, then cat/dog/bird/"." 3 each (ties by the token).
    counts = Counter(re.findall(r"\w+|\s+|[^\w\s]", text))
    top = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:4]]
    assert tok.tokens == ["<unk>", *top] == ["<unk>", " ", "the", "and", "."]
    assert tok.vocab_size == 5 and tok.banned_ids == [0] and tok.unk_id == 0
    assert tok.encode_corpus("the zebra").tolist() == [2, 1, 0]


def test_word_unknown_policies():
    tok = WordTokenizer.fit("the cat sat on the mat.")
    with pytest.raises(UnknownSymbolsError) as info:
        tok.encode("the dog sat on the log")
    assert info.value.symbols == ["dog", "log"] and "words the model never saw: 'dog', 'log'" in info.value.describe()
    assert tok.decode(tok.encode("the dog sat", unknown="skip")) == "the  sat"
    assert tok.encode("the dog", unknown="replace")[-1] == 0
    with pytest.raises(ValueError, match="unknown policy"):
        tok.encode("the", unknown="guess")


def test_bpe_encodes_anything_and_respects_vocab_size(bpe):
    assert bpe.vocab_size == 300 and bpe.banned_ids == [] and bpe.unk_id is None
    text = "ein völlig neuer Text ✓"
    assert bpe.decode(bpe.encode(text, unknown="error")) == text
    assert len(bpe.encode("the quick brown fox")) < len("the quick brown fox")  # merges learned on the corpus
    with pytest.raises(ValueError, match="at least 256"):
        BPETokenizer.fit("abc", vocab_size=100)


def test_stream_decoder_holds_back_a_split_character(bpe):
    ids = bpe.encode("😀")  # four bytes the tiny vocabulary has no merge for
    decoder = bpe.stream_decoder()
    assert [decoder.push(i) for i in ids] == [""] * (len(ids) - 1) + ["😀"]
    half = bpe.stream_decoder()
    half.push(ids[0])
    assert half.flush() == "\ufffd"  # an incomplete character at the very end is shown, not dropped


def test_fit_tokenizer_picks_the_text_each_kind_learns_from():
    char = fit_tokenizer("char", "abc", "abcxyz")
    assert char.vocab_size == 6  # the alphabet covers the validation split: there is no <unk>
    word = fit_tokenizer("word", "abc abc", "abc abc xyz")
    assert word.encode("xyz", unknown="replace") == [0]  # validation words unseen in training are <unk>
    with pytest.raises(ValueError, match="unknown token kind"):
        fit_tokenizer("morpheme", "a", "a")
