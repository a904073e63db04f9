"""Reading text: named corpora, files, folders, normalisation, and each bad input."""

import hashlib
import os

import pytest

from charloom.corpus import NAMED_CORPORA, load_corpus
from charloom.errors import CharloomError
from tests.conftest import SHARED_CORPORA


def test_nietzsche_is_the_books_file():
    corpus = load_corpus("nietzsche")
    raw = (SHARED_CORPORA / "nietzsche.txt").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == NAMED_CORPORA["nietzsche"].sha256
    assert len(corpus.text) == 600_893  # the book's figure
    assert len(set(corpus.text.lower())) == 57  # "57 distinct" once lowercased
    assert corpus.lowercase_default


def test_default_is_nietzsche():
    assert load_corpus(None).name == "nietzsche"


def test_wrong_checksum_in_data_folder_is_refused(tmp_path, monkeypatch):
    (tmp_path / "nietzsche.txt").write_text("not the book")
    monkeypatch.setenv("CHARLOOM_DATA", str(tmp_path))
    with pytest.raises(CharloomError, match="sha256"):
        load_corpus("nietzsche")


def test_bom_and_crlf_are_normalised_and_reported(tmp_path):
    path = tmp_path / "win.txt"
    path.write_bytes(b"\xef\xbb\xbfline one\r\nline two\r\n")
    corpus = load_corpus(path)
    assert corpus.text == "line one\nline two\n"
    assert any("byte-order mark" in n for n in corpus.notes) and any("CRLF" in n for n in corpus.notes)


def test_utf16_with_bom(tmp_path):
    path = tmp_path / "u16.txt"
    path.write_bytes("héllo wörld\n".encode("utf-16"))
    assert load_corpus(path).text == "héllo wörld\n"


def test_folder_of_txt_files_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "skip.md").write_text("not text")
    assert load_corpus(tmp_path).text == "first\nsecond"


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
    (b"good text then \xff\xfe bad", "byte offset 15"),
])
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(CharloomError, match=message) as info:
        load_corpus(path)
    assert str(path) in info.value.message


def test_invalid_utf8_can_be_replaced_or_decoded_otherwise(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("café".encode("latin-1"))
    assert load_corpus(path, errors="replace").text == "caf\ufffd"
    assert load_corpus(path, encoding="latin-1").text == "café"


def test_missing_and_empty_folder(tmp_path):
    with pytest.raises(CharloomError, match="no such file"):
        load_corpus(tmp_path / "nope.txt")
    with pytest.raises(CharloomError, match="no .txt files"):
        load_corpus(tmp_path)


def test_split_is_contiguous():
    corpus = load_corpus(SHARED_CORPORA / "tinyshakespeare.txt")
    train, val = corpus.split(0.1)
    assert train + val == corpus.text
    assert abs(len(val) - 0.1 * len(corpus.text)) <= 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.txt"
    path.write_text("secret")
    path.chmod(0)
    with pytest.raises(CharloomError, match="permission"):
        load_corpus(path)
