"""Read the text to learn from: a named corpus (see :mod:`.named`), files, or folders of ``.txt``; normalise; split."""

from __future__ import annotations

import codecs
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from ..errors import CharloomError
from .named import DEFAULT_CORPUS, NAMED_CORPORA, cache_dir, corpus_name, named_corpus_path, not_the_corpus

if TYPE_CHECKING:
    pass

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
        cut = split_point(len(self.text), val_fraction)
        return self.text[:cut], self.text[cut:]


def split_point(n_chars: int, val_fraction: float) -> int:
    """Characters of a corpus of ``n_chars`` that train: the last ``val_fraction`` (rounded) validates."""
    return n_chars - int(round(n_chars * val_fraction))


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
    unverified: dict[Path, str] = field(default_factory=dict)  # named copies not yet hashed: path -> corpus name

    @property
    def label(self) -> str:
        """What an error about the whole corpus names: its one file, else the corpus name."""
        return str(self.paths[0]) if len(self.paths) == 1 else self.name

    def confirm(self, sha256: dict[Path, str]) -> bool:
        """Check the unverified named copies against their ``sha256`` as read; False for a damaged cached copy
        (resolve again with ``verify=True`` to rebuild it); a wrong ``$CHARLOOM_DATA`` copy raises."""
        for path, name in self.unverified.items():
            if sha256.get(path) != NAMED_CORPORA[name].sha256:
                if path.parent != cache_dir():
                    raise not_the_corpus(path, name)
                return False
        return True


def resolve_sources(sources: str | os.PathLike | list[str | os.PathLike] | None = None,
                    errors: str = "strict", verify: bool = True) -> Sources:
    """The files behind a named corpus, a file, several files, or folders of .txt files (sorted).

    ``verify=False`` leaves existing named copies unread, listed in ``unverified`` for the one pass
    that reads them anyway to check (:func:`charloom.text.prepare.prepare`)."""
    if sources is None or sources == [] or sources == "":
        sources = [DEFAULT_CORPUS]
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if errors not in ("strict", "replace", "ignore"):
        raise CharloomError("--errors", f"unknown policy {errors!r}", "use strict, replace or ignore")
    paths: list[Path] = []
    names: list[str] = []
    lowercase_default = False
    unverified: dict[Path, str] = {}
    for source in sources:
        source_str = os.fspath(source)
        named = corpus_name(source_str)
        if named is not None and not Path(source_str).exists():  # a file of that name in the cwd wins
            paths.append(named_corpus_path(named, verify))
            if not verify:
                unverified[paths[-1]] = named
            lowercase_default = lowercase_default or NAMED_CORPORA[named].lowercase
            names.append(named)
        else:
            paths.extend(_text_files(Path(source_str)))
            names.append(Path(source_str).stem or source_str)
    return Sources("+".join(names), paths, lowercase_default, unverified)


def stream_text(paths: list[Path], *, encoding: str = "utf-8", errors: str = "strict", lowercase: bool = False,
                notes: list[str] | None = None, block: int = 1 << 20,
                on_bytes: Callable[[Path, bytes], None] | None = None) -> Iterator[str]:
    """The text ``load_corpus`` would return (lowercased if asked), in pieces of about ``block`` chars.

    Memory stays at a few blocks whatever the corpus size; errors and notes are those of
    :func:`decode_file`. A piece ends after a newline (or, in a line longer than 4 blocks, a space),
    so neither a CRLF pair nor a word (``str.lower`` reads a word's context for a final sigma) is split. ``on_bytes``
    is given every raw block read (with its file), so the files can be hashed in the same pass.
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
                   on_bytes: Callable[[Path, bytes], None] | None) -> Iterator[str]:
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
                on_bytes(path, raw)
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
