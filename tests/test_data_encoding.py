"""The data path: streaming read, ids on disk equal the in-memory encoding, the cache key, batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charloom.errors import CharloomError
from charloom.text.encode import encode_to_disk, scan_corpus
from charloom.text.sources import load_corpus, resolve_sources, stream_text
from charloom.text.tokenizers import CharTokenizer
from charloom.training.batches import StreamBatcher, WindowBatcher


def reference_ids(text: str) -> np.ndarray:
    """Ids by a dictionary lookup per character: independent of encode_corpus's vectorised path."""
    index = {c: i for i, c in enumerate(sorted(set(text)))}
    return np.array([index[c] for c in text], dtype=np.int64)


def encode_files(paths: list[Path], target: Path, lowercase: bool = False, block: int = 1 << 21):
    scan = scan_corpus(paths, lowercase=lowercase, block=block)
    return scan, encode_to_disk(scan, CharTokenizer(scan.alphabet), target, block=block)


@pytest.mark.parametrize("name", ["nietzsche", "tinyshakespeare"])
def test_memmap_encoding_equals_in_memory_encoding(name: str, tmp_path: Path) -> None:
    corpus = load_corpus(name)
    text = corpus.text.lower() if corpus.lowercase_default else corpus.text
    scan, encoded = encode_files(resolve_sources(name).paths, tmp_path / "ids.bin", corpus.lowercase_default, block=1 << 16)
    assert scan.chars == len(text)
    assert scan.alphabet == sorted(set(text))
    ids = encoded.open()
    assert isinstance(ids, np.memmap) and ids.dtype == np.uint8
    np.testing.assert_array_equal(ids, reference_ids(text))


# Text that stresses the cuts: CRLF pairs, multi-byte and astral characters, a final sigma, long lines.
PIECES = st.lists(st.sampled_from(["a", "B", " ", "\n", "\r\n", "\r", "é", "ΟΔΟΣ", "İ", "😀", "xyz " * 10]), min_size=1, max_size=60)


@settings(max_examples=60, deadline=None)
@given(files=st.lists(PIECES, min_size=1, max_size=3), bom=st.booleans(), block=st.integers(1, 40),
       lowercase=st.booleans())
def test_streaming_read_equals_load_corpus(tmp_path_factory: pytest.TempPathFactory, files: list[list[str]],
                                           bom: bool, block: int, lowercase: bool) -> None:
    folder = tmp_path_factory.mktemp("stream")
    paths = []
    for i, pieces in enumerate(files):
        path = folder / f"{i}.txt"
        path.write_bytes((b"\xef\xbb\xbf" if bom and i == 0 else b"") + "".join(pieces).encode("utf-8"))
        paths.append(path)
    if lowercase:
        # Lines without a space are cut only past 4 blocks: keep every such run (at most 60 x 4 chars)
        # inside one piece, so a final sigma sees its whole word.
        block = max(block, 64)
    whole = load_corpus(folder)
    expected = whole.text.lower() if lowercase else whole.text
    notes: list[str] = []
    got = "".join(stream_text(resolve_sources(folder).paths, lowercase=lowercase, block=block, notes=notes))
    assert got == expected
    assert notes == whole.notes  # the same notes, in the same order
    scan, encoded = encode_files(paths, folder / "ids.bin", lowercase, block=block)
    assert scan.alphabet == sorted(set(expected))
    np.testing.assert_array_equal(encoded.open(), reference_ids(expected))


def test_streaming_errors_match_load_corpus(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good text\n" * 500 + b"\xff oops")  # the bad byte lies several blocks in
    with pytest.raises(CharloomError) as whole:
        load_corpus(bad)
    with pytest.raises(CharloomError) as streamed:
        scan_corpus([bad], block=64)
    assert str(streamed.value) == str(whole.value)
    assert "byte offset 5000" in str(streamed.value)
    split_char = tmp_path / "split.txt"  # a valid 2-byte char cut by the block edge is no error
    split_char.write_bytes(b"a" * 63 + "é".encode() + b"\n")
    assert scan_corpus([split_char], block=64).chars == 65
    for content in (b"", b"abc\x00def"):
        odd = tmp_path / "odd.txt"
        odd.write_bytes(content)
        with pytest.raises(CharloomError) as whole:
            load_corpus(odd)
        with pytest.raises(CharloomError) as streamed:
            scan_corpus([odd])
        assert str(streamed.value) == str(whole.value)


def test_utf16_with_bom_streams(tmp_path: Path) -> None:
    path = tmp_path / "u16.txt"
    path.write_bytes("héllo\r\nwörld\n".encode("utf-16"))
    assert "".join(stream_text([path], block=3)) == load_corpus(path).text == "héllo\nwörld\n"


def test_cache_is_reused_and_invalidated(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("abc abd\n" * 100, encoding="utf-8")
    target = tmp_path / "run" / "data" / "ids.bin"
    _, first = encode_files([corpus], target)
    assert not first.reused
    _, again = encode_files([corpus], target)
    assert again.reused
    # The corpus changes (same length, same alphabet): re-encoded.
    corpus.write_text("abd abc\n" * 100, encoding="utf-8")
    _, changed = encode_files([corpus], target)
    assert not changed.reused
    np.testing.assert_array_equal(changed.open(), reference_ids("abd abc\n" * 100))
    # The tokenizer changes (a larger alphabet): re-encoded with the new ids.
    scan = scan_corpus([corpus])
    wider = CharTokenizer(sorted(set(scan.alphabet) | {"z", "A"}))
    redone = encode_to_disk(scan, wider, target)
    assert not redone.reused
    np.testing.assert_array_equal(redone.open(), np.array([wider.index[c] for c in "abd abc\n" * 100]))
    # Reading it differently (lowercase) is a different key too.
    corpus.write_text("ABD abc\n" * 100, encoding="utf-8")
    _, upper = encode_files([corpus], target)
    _, lower = encode_files([corpus], target, lowercase=True)
    assert not upper.reused and not lower.reused
    # A damaged cache (wrong length) is not trusted.
    with open(target, "ab") as fh:
        fh.write(b"\x00")
    _, repaired = encode_files([corpus], target, lowercase=True)
    assert not repaired.reused and len(repaired.open()) == 800


def test_train_writes_the_same_ids_as_in_memory(tiny_file: Path, tmp_path: Path) -> None:
    import charloom
    from tests.conftest import TINY_SETTINGS

    model = charloom.train(tiny_file, out=tmp_path / "run", **{**TINY_SETTINGS, "max_steps": 1, "eval_every": 0,
                                                               "sample_temperatures": ()})
    text = tiny_file.read_text(encoding="utf-8")
    ids = np.fromfile(tmp_path / "run" / "data" / "ids.bin", dtype=np.uint8)
    np.testing.assert_array_equal(ids, reference_ids(text))
    assert model.config["corpus"]["split"] == len(text) - round(len(text) * 0.1)
    assert (tmp_path / "run" / "data" / "ids.bin.json").is_file()


@pytest.mark.parametrize("batch_size,seq_len", [(4, 16), (7, 5), (1, 33)])
def test_stream_batches_cover_the_split_without_crossing_into_validation(batch_size: int, seq_len: int) -> None:
    ids = np.arange(2000, dtype=np.int64)  # each id is its own position
    split = 1700
    batcher = StreamBatcher(ids[:split], batch_size, seq_len, seed=3)
    for _epoch in range(3):
        seen = np.zeros(len(ids), dtype=bool)
        x, y, first = batcher.next()
        assert first
        steps = batcher.steps_per_epoch
        for k in range(steps):
            if k:
                x, y, first = batcher.next()
                assert not first
            assert int(y.max()) < split  # no target, hence no input, from validation
            np.testing.assert_array_equal(y.numpy(), x.numpy() + 1)  # targets are the next id
            seen[x.numpy().ravel()] = True
            seen[y.numpy().ravel()] = True
        covered = np.flatnonzero(seen)
        # Each stream is read without gaps; the streams together leave out less than one window per stream
        # at the end plus the random start offset.
        assert len(covered) >= split - batch_size * (2 * seq_len + 1) - seq_len
        assert covered.max() < split


def test_windows_cover_the_split_without_crossing_into_validation() -> None:
    ids = np.arange(500, dtype=np.int64)
    split, seq_len, step = 400, 20, 3
    batcher = WindowBatcher(ids[:split], 16, seq_len, seed=0, step=step)
    starts = []
    for _ in range(batcher.steps_per_epoch):
        x, y, _first = batcher.next()
        assert int(y.max()) < split
        starts.extend(x[:, 0].tolist())
    assert sorted(starts) == list(range(0, split - seq_len, step))  # every window exactly once


# -- prepare: each step once ---------------------------------------------------------------------

def _count_opens(monkeypatch) -> list[Path]:
    """Every file the text modules open (the streaming reads and the sha256 checks both go through open)."""
    import builtins

    from charloom.text import sources as sources_module

    opened: list[Path] = []

    def counting(file, *args, **kwargs):
        opened.append(Path(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(sources_module, "open", counting, raising=False)
    return opened


@pytest.mark.parametrize("tokens, reads", [("word", 1), ("char", 2)])
def test_prepare_reads_a_named_corpus_once_per_pass(tmp_path, monkeypatch, tokens, reads):
    from charloom.config import TrainConfig
    from charloom.text.prepare import prepare

    opened = _count_opens(monkeypatch)
    vocab = 100_000 if tokens == "word" else 0  # every training word in the vocabulary
    prepared = prepare("nietzsche", TrainConfig(tokens=tokens, vocab_size=vocab).validate())
    prepared.write(tmp_path / "ids.bin")
    # word: one pass that scans, hashes and keeps the text; char: the scan, then the encoding to disk.
    assert opened == [prepared.sources.paths[0]] * reads
    text = load_corpus("nietzsche").text.lower()
    assert prepared.chars == len(text) and prepared.train_chars == len(text) - round(len(text) * 0.1)
    ids = np.fromfile(tmp_path / "ids.bin", dtype=prepared.dtype)
    assert len(ids) == prepared.n_tokens
    assert prepared.tokenizer.decode(ids[:prepared.split].tolist()) == text[:prepared.train_chars]


def test_prepare_checks_a_named_copy_while_reading_it(tmp_path, monkeypatch):
    from charloom.config import TrainConfig
    from charloom.text.prepare import prepare

    config = TrainConfig().validate()
    monkeypatch.setenv("CHARLOOM_CACHE", str(tmp_path / "cache"))
    good = load_corpus("nietzsche").text
    # A damaged cached copy is rebuilt from the package and read again.
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("CHARLOOM_DATA", str(data))
    cached = resolve_sources("nietzsche").paths[0]
    assert cached.parent == tmp_path / "cache"
    cached.write_bytes(cached.read_bytes()[:1001])  # cut inside a line, as a full disk would leave it
    assert prepare("nietzsche", config).chars == len(good)
    assert cached.read_text(encoding="utf-8") == good
    # A wrong copy in $CHARLOOM_DATA is refused, as named_corpus_path refuses it.
    (data / "nietzsche.txt").write_text(good[:5000] + "x", encoding="utf-8")
    with pytest.raises(CharloomError, match="sha256 does not match the nietzsche corpus"):
        prepare("nietzsche", config)
