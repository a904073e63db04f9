import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charloom.text.tokenizers import CharTokenizer, UnknownSymbolsError, tokenizer_from_dict


@given(st.text(min_size=1))
@settings(max_examples=200, deadline=None)
def test_round_trip_any_text(text):
    tok = CharTokenizer.fit(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_corpus(text).tolist() == tok.encode(text)


@given(st.text(min_size=1))
@settings(max_examples=100, deadline=None)
def test_json_round_trip(text):
    tok = CharTokenizer.fit(text)
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.chars == tok.chars and again.encode(text) == tok.encode(text)


def test_ids_are_sorted_alphabet_and_small_dtype():
    tok = CharTokenizer.fit("hello world\n")
    assert tok.alphabet == "\n dehlorw"
    assert tok.encode_corpus("hello").dtype == np.uint8


def test_unknown_policies():
    tok = CharTokenizer.fit("ab c")
    with pytest.raises(UnknownSymbolsError) as info:
        tok.encode("abxyx")
    assert info.value.symbols == ["x", "y"]
    assert tok.decode(tok.encode("axb", unknown="skip")) == "ab"
    assert tok.decode(tok.encode("axb", unknown="replace")) == "a b"
    with pytest.raises(UnknownSymbolsError):
        tok.encode_corpus("abz")


@given(st.text(min_size=1, max_size=12), st.integers(0, 9), st.integers(1, 4), st.integers(0, 2**31))
@settings(max_examples=60, deadline=None)
def test_decode_rows_equals_decoding_each_row(alphabet, width, rows, seed):
    # Any alphabet, NUL and characters outside the BMP included (numpy's str arrays drop trailing NULs).
    tok = CharTokenizer(sorted(set(alphabet)))
    ids = np.random.default_rng(seed).integers(0, tok.vocab_size, (rows, width))
    assert tok.decode_rows(ids) == [tok.decode(row) for row in ids.tolist()]
    assert CharTokenizer(["\0", "a"]).decode_rows(np.array([[1, 0], [0, 0]])) == ["a\0", "\0\0"]
