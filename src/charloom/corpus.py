"""Read the text to learn from: a named corpus, files, or folders of ``.txt``; normalise; split.

Named corpora are looked for in ``$CHARLOOM_DATA`` first (how tests and offline machines supply
them), then in the cache (``$CHARLOOM_CACHE`` or ``~/.cache/charloom``), and only then downloaded,
always verified by sha256.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .errors import CharloomError


@dataclass(frozen=True)
class NamedCorpus:
    """A corpus known by name: where the book (or char-rnn) got it and its checksum."""

    filename: str
    url: str
    sha256: str
    lowercase: bool


NAMED_CORPORA: dict[str, NamedCorpus] = {
    # Deep Learning with Python, section 8.1 (600,893 chars once decoded; the book lowercases it).
    "nietzsche": NamedCorpus(
        "nietzsche.txt",
        "https://s3.amazonaws.com/text-datasets/nietzsche.txt",
        "23cf69874ab69d3d256099ab530ea4be24d47d9675b673bcc67cbcd6298ec647",
        lowercase=True,
    ),
    # char-rnn's Tiny Shakespeare (1,115,394 chars, case kept).
    "tinyshakespeare": NamedCorpus(
        "tinyshakespeare.txt",
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        lowercase=False,
    ),
}
DEFAULT_CORPUS = "nietzsche"


@dataclass
class Corpus:
    """Decoded, normalised text plus where it came from and what was changed on the way."""

    text: str
    name: str
    files: list[str]
    notes: list[str] = field(default_factory=list)
    lowercase_default: bool = False

    def split(self, val_fraction: float) -> tuple[str, str]:
        """Contiguous split: the first part trains, the last ``val_fraction`` validates."""
        cut = len(self.text) - int(round(len(self.text) * val_fraction))
        return self.text[:cut], self.text[cut:]


def cache_dir() -> Path:
    """Where downloaded corpora are kept."""
    return Path(os.environ.get("CHARLOOM_CACHE") or Path.home() / ".cache" / "charloom")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def named_corpus_path(name: str) -> Path:
    """The verified local file of a named corpus, downloading it into the cache if needed."""
    spec = NAMED_CORPORA[name]
    data_dir = os.environ.get("CHARLOOM_DATA")
    candidates = [Path(data_dir) / spec.filename] if data_dir else []
    candidates.append(cache_dir() / spec.filename)
    for path in candidates:
        if path.is_file():
            if sha256_file(path) != spec.sha256:
                raise CharloomError(
                    str(path), f"sha256 does not match the {name} corpus",
                    "delete the file or point CHARLOOM_DATA at a folder with the original")
            return path
    target = cache_dir() / spec.filename
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False, suffix=".part") as tmp:
            with urllib.request.urlopen(spec.url, timeout=30) as response:
                for block in iter(lambda: response.read(1 << 20), b""):
                    tmp.write(block)
        if sha256_file(Path(tmp.name)) != spec.sha256:
            os.unlink(tmp.name)
            raise CharloomError(spec.url, "the download's sha256 does not match", "try again later")
        os.replace(tmp.name, target)
    except OSError as exc:
        raise CharloomError(
            f"corpus {name}", f"cannot download {spec.url} ({exc.__class__.__name__})",
            f"put {spec.filename} in a folder and set CHARLOOM_DATA to it") from None
    return target


def _text_files(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not found:
            raise CharloomError(str(path), "the folder holds no .txt files", "point to a text file or a folder of .txt files")
        return found
    if path.is_file():
        return [path]
    if path.exists():
        raise CharloomError(str(path), "not a regular file or folder", "point to a text file or a folder of .txt files")
    raise CharloomError(str(path), "no such file or folder", "check the path")


def _sniff(path: Path, head: bytes, encoding: str, notes: list[str]) -> tuple[int, str]:
    """Bytes to skip and the codec to use, from a file's first 8 KiB: BOMs and binary files are caught here."""
    if encoding.lower().replace("-", "") in ("utf8", "utf8sig"):
        if head.startswith(b"\xef\xbb\xbf"):
            notes.append(f"{path}: dropped the UTF-8 byte-order mark")
            return 3, "utf-8"
        if head.startswith((b"\xff\xfe", b"\xfe\xff")):
            notes.append(f"{path}: read as UTF-16 (byte-order mark found)")
            return 0, "utf-16"  # the codec reads and drops the BOM itself
        if b"\x00" in head:
            raise CharloomError(str(path), "looks like a binary file (NUL bytes)", "give a text file")
    return 0, encoding


def decode_file(path: Path, encoding: str = "utf-8", errors: str = "strict", notes: list[str] | None = None) -> str:
    """Read one file as text: BOMs dropped, CRLF to LF; binary or undecodable files raise a CharloomError."""
    notes = notes if notes is not None else []
    try:
        raw = path.read_bytes()
    except PermissionError:
        raise CharloomError(str(path), "permission denied", "make the file readable") from None
    except OSError as exc:
        raise CharloomError(str(path), f"cannot read ({exc.strerror})", "check the file") from None
    if not raw:
        raise CharloomError(str(path), "the file is empty", "give a file with text in it")
    skip, enc = _sniff(path, raw[:8192], encoding, notes)
    raw = raw[skip:]
    try:
        text = raw.decode(enc, errors=errors)
    except UnicodeDecodeError as exc:
        raise CharloomError(
            str(path), f"not valid {exc.encoding} at byte offset {exc.start}",
            "pass --encoding (e.g. latin-1) or --errors replace") from None
    except LookupError:
        raise CharloomError("--encoding", f"unknown encoding {encoding!r}", "use a Python codec name such as utf-8 or latin-1") from None
    if "\r\n" in text:
        notes.append(f"{path}: converted {text.count(chr(13) + chr(10))} CRLF line endings to LF")
        text = text.replace("\r\n", "\n")
    if not text:
        raise CharloomError(str(path), "the file is empty", "give a file with text in it")
    return text


def load_corpus(sources: str | os.PathLike | list[str | os.PathLike] | None = None, *,
                encoding: str = "utf-8", errors: str = "strict") -> Corpus:
    """Read a named corpus, a file, several files, or folders of .txt files (in sorted order)."""
    sources_found = resolve_sources(sources, errors)
    notes: list[str] = []
    pieces: list[str] = []
    for path in sources_found.paths:
        text = decode_file(path, encoding, errors, notes)
        # Keep files apart by a newline so the last word of one does not run into the next.
        if pieces and not pieces[-1].endswith("\n"):
            pieces.append("\n")
        pieces.append(text)
    return Corpus("".join(pieces), sources_found.name, [str(p) for p in sources_found.paths], notes,
                  sources_found.lowercase_default)


@dataclass(frozen=True)
class Sources:
    """The files a corpus argument names, in reading order, and what the corpus is called."""

    name: str
    paths: list[Path]
    lowercase_default: bool


def resolve_sources(sources: str | os.PathLike | list[str | os.PathLike] | None = None,
                    errors: str = "strict") -> Sources:
    """The files behind a named corpus, a file, several files, or folders of .txt files (sorted)."""
    if sources is None or sources == [] or sources == "":
        sources = [DEFAULT_CORPUS]
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if errors not in ("strict", "replace", "ignore"):
        raise CharloomError("--errors", f"unknown policy {errors!r}", "use strict, replace or ignore")
    paths: list[Path] = []
    names: list[str] = []
    lowercase_default = False
    for source in sources:
        source_str = os.fspath(source)
        if source_str in NAMED_CORPORA and not Path(source_str).exists():
            paths.append(named_corpus_path(source_str))
            lowercase_default = lowercase_default or NAMED_CORPORA[source_str].lowercase
            names.append(source_str)
        else:
            paths.extend(_text_files(Path(source_str)))
            names.append(Path(source_str).stem or source_str)
    return Sources("+".join(names), paths, lowercase_default)


def stream_text(paths: list[Path], *, encoding: str = "utf-8", errors: str = "strict", lowercase: bool = False,
                notes: list[str] | None = None, block: int = 1 << 20,
                on_bytes: Callable[[bytes], None] | None = None) -> Iterator[str]:
    """The text ``load_corpus`` would return (lowercased if asked), in pieces of about ``block`` chars.

    Memory stays at a few blocks whatever the corpus size; errors and notes are those of
    :func:`decode_file`. A piece ends after a newline (or, in a line longer than 4 blocks, a space),
    so neither a CRLF pair nor a word (``str.lower`` reads a word's context for a final sigma) is split. ``on_bytes``
    is given every raw block read, so the files can be hashed in the same pass.
    """
    notes = notes if notes is not None else []
    last = ""  # the last character yielded
    for path in paths:
        if last and last != "\n":
            yield "\n"  # keep files apart, as load_corpus does
            last = "\n"
        carry, crlf = "", 0  # carry: text after the last cut, at most a few blocks
        for text in _decode_blocks(path, encoding, errors, notes, block, on_bytes):
            carry += text
            cut = carry.rfind("\n") + 1
            if cut == 0 and len(carry) >= 4 * block:
                # One endless line: cut after its last space, else anywhere but inside a CRLF.
                cut = carry.rfind(" ") + 1 or len(carry) - carry.endswith("\r")
            if cut:
                piece, carry = carry[:cut], carry[cut:]
                crlf += piece.count("\r\n")
                last = piece[-1]
                yield _normalise(piece, lowercase)
        if carry:
            crlf += carry.count("\r\n")
            last = carry[-1]
            yield _normalise(carry, lowercase)
        if crlf:
            notes.append(f"{path}: converted {crlf} CRLF line endings to LF")


def _normalise(piece: str, lowercase: bool) -> str:
    piece = piece.replace("\r\n", "\n")
    return piece.lower() if lowercase else piece


def _decode_blocks(path: Path, encoding: str, errors: str, notes: list[str], block: int,
                   on_bytes: Callable[[bytes], None] | None) -> Iterator[str]:
    """Decoded text of one file, block by block (BOM dropped; CRLF left for the caller)."""
    try:
        fh = open(path, "rb")
    except PermissionError:
        raise CharloomError(str(path), "permission denied", "make the file readable") from None
    except OSError as exc:
        raise CharloomError(str(path), f"cannot read ({exc.strerror})", "check the file") from None
    with fh:
        raw = fh.read(max(block, 8192))  # at least the head that _sniff reads
        if not raw:
            raise CharloomError(str(path), "the file is empty", "give a file with text in it")
        skip, enc = _sniff(path, raw[:8192], encoding, notes)
        try:
            decoder = codecs.getincrementaldecoder(enc)(errors)
        except LookupError:
            raise CharloomError("--encoding", f"unknown encoding {encoding!r}", "use a Python codec name such as utf-8 or latin-1") from None
        fed, data, produced = 0, raw[skip:], False  # fed: bytes already given to the decoder
        while True:
            if on_bytes is not None and raw:
                on_bytes(raw)
            pending = len(decoder.getstate()[0])  # bytes of an unfinished character held from the last block
            try:
                text = decoder.decode(data, final=not raw)
            except UnicodeDecodeError as exc:
                raise CharloomError(
                    str(path), f"not valid {exc.encoding} at byte offset {fed - pending + exc.start}",
                    "pass --encoding (e.g. latin-1) or --errors replace") from None
            fed += len(data)
            if text:
                produced = True
                yield text
            if not raw:
                break
            raw = fh.read(block)
            data = raw
        if not produced:
            raise CharloomError(str(path), "the file is empty", "give a file with text in it")
