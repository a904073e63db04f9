"""Reading text: named corpora (bundled, cached, offline), files, folders, normalisation, and each bad input."""

import hashlib
import os
import sys

import pytest

from charloom.errors import CharloomError
from charloom.text.named import NAMED_CORPORA, bundled_sha256, cache_dir, named_corpus_path
from charloom.text.sources import load_corpus
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


# --- the bundled corpora: offline, cached, verified -------------------------------------------------

def _shared_sha256(filename: str) -> str:
    """The checksum of the reference copy in the shared corpora folder, computed here, not read from charloom."""
    return hashlib.sha256((SHARED_CORPORA / filename).read_bytes()).hexdigest()


@pytest.fixture()
def offline(tmp_path, monkeypatch):
    """No CHARLOOM_DATA, an empty cache in tmp_path, and any attempt to reach the network recorded and refused."""
    import socket
    import urllib.request

    attempts: list[str] = []

    def refuse(what):
        def refused(*args, **kwargs):
            attempts.append(what)
            raise OSError(f"test: network access ({what}) is not allowed")
        return refused

    monkeypatch.setattr(urllib.request, "urlopen", refuse("urlopen"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.delenv("CHARLOOM_DATA", raising=False)
    monkeypatch.setenv("CHARLOOM_CACHE", str(tmp_path / "cache"))
    yield tmp_path / "cache"
    assert attempts == [], f"tried the network: {attempts}"


@pytest.mark.parametrize("name, filename", [
    ("nietzsche", "nietzsche.txt"),
    ("shakespeare", "tinyshakespeare.txt"),
    ("tinyshakespeare", "tinyshakespeare.txt"),
])
def test_bundled_corpus_is_unpacked_into_the_cache_without_network(offline, name, filename):
    path = named_corpus_path(name)
    assert path == offline / filename
    assert hashlib.sha256(path.read_bytes()).hexdigest() == _shared_sha256(filename)
    assert [p.name for p in offline.iterdir()] == [filename]  # no temporary file left behind
    assert named_corpus_path(name) == path  # the second call finds the cached copy


def test_sources_md_holds_the_checksums_of_the_reference_texts():
    assert bundled_sha256() == {f: _shared_sha256(f) for f in ("nietzsche.txt", "tinyshakespeare.txt")}
    assert {spec.sha256 for spec in NAMED_CORPORA.values()} == set(bundled_sha256().values())


def test_shakespeare_is_a_name_for_tiny_shakespeare(offline):
    corpus = load_corpus("shakespeare")
    assert corpus.name == "tinyshakespeare"
    assert len(corpus.text) == 1_115_394  # char-rnn's figure
    assert not corpus.lowercase_default


def test_damaged_cached_copy_is_rebuilt(offline):
    path = named_corpus_path("nietzsche")
    path.write_bytes(path.read_bytes()[:1000])  # as a full disk or a killed copy would leave it
    assert named_corpus_path("nietzsche") == path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == _shared_sha256("nietzsche.txt")


def test_data_folder_copy_wins_over_the_bundled_one(offline, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "tinyshakespeare.txt").write_bytes((SHARED_CORPORA / "tinyshakespeare.txt").read_bytes())
    monkeypatch.setenv("CHARLOOM_DATA", str(data))
    assert named_corpus_path("shakespeare") == data / "tinyshakespeare.txt"
    assert not offline.exists()  # nothing was unpacked
    # A data folder without the file falls back to the bundled copy.
    assert named_corpus_path("nietzsche") == offline / "nietzsche.txt"


def test_damaged_bundled_copy_is_refused_in_one_line(offline, tmp_path, monkeypatch):
    import lzma

    from charloom.text import named as corpus_module

    good = (SHARED_CORPORA / "nietzsche.txt").read_bytes()
    broken = {"truncated": lzma.compress(good)[:5000],  # a cut-off download of the wheel
              "other text": lzma.compress(good[:-1] + b"?")}  # decompresses, but is not the book
    for label, packed in broken.items():
        fake = tmp_path / label / "nietzsche.txt.xz"
        fake.parent.mkdir()
        fake.write_bytes(packed)
        monkeypatch.setattr(corpus_module, "_bundled", lambda filename, fake=fake: fake)
        with pytest.raises(CharloomError, match="reinstall charloom") as info:
            named_corpus_path("nietzsche")
        assert "\n" not in info.value.message
        assert not any(offline.iterdir()), f"{label}: left a file in the cache"


def test_cache_folder_that_cannot_be_written_is_refused(offline, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("CHARLOOM_CACHE", str(blocker / "cache"))
    with pytest.raises(CharloomError, match="CHARLOOM_CACHE") as info:
        named_corpus_path("nietzsche")
    assert str(blocker / "cache") in info.value.message


def test_unknown_name_is_refused_with_the_known_ones():
    with pytest.raises(CharloomError, match="nietzsche, shakespeare, tinyshakespeare"):
        named_corpus_path("moby-dick")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="XDG_CACHE_HOME is the Linux convention")
def test_cache_dir_follows_xdg_and_charloom_cache_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("CHARLOOM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "charloom"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "charloom"
    monkeypatch.setenv("CHARLOOM_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
