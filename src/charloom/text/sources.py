"""Read the text to learn from: a named corpus, files, or folders of ``.txt``; normalise; split.

The named corpora (``nietzsche``; ``tinyshakespeare``, also called ``shakespeare``) ship inside the
package, xz-compressed in ``charloom/corpora/``, so they work with no network: nothing here ever
downloads. :func:`named_corpus_path` looks for a corpus

1. in ``$CHARLOOM_DATA/<file>`` when that variable is set (a copy of your own; refused if its
   sha256 differs), then
2. in the cache folder (:func:`cache_dir`), where the bundled copy is decompressed on first use
   (to a temporary file, checked, then renamed into place, so a crash never leaves half a text).
   A cached copy whose sha256 is wrong is rebuilt from the bundled one.

The checksums and the provenance of both texts live in ``corpora/SOURCES.md``, read here.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import platformdirs

from ..errors import CharloomError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

SOURCES_FILE = "SOURCES.md"  # in the package's corpora/ folder: provenance and the one copy of each sha256
_SOURCES_ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|\s*`([0-9a-f]{64})`", re.MULTILINE)


def _bundled(filename: str) -> Traversable:
    """A file in the package's corpora/ folder (a real file once installed, but not necessarily)."""
    return resources.files(__package__).joinpath("corpora").joinpath(filename)


@functools.lru_cache(maxsize=None)
def bundled_sha256() -> dict[str, str]:
    """The sha256 of each bundled text, by file name, from the table in ``corpora/SOURCES.md``."""
    try:
        table = _bundled(SOURCES_FILE).read_text(encoding="utf-8")
    except OSError as exc:
        raise CharloomError(f"corpora/{SOURCES_FILE}", f"missing from the installed package ({exc.__class__.__name__})",
                            "reinstall charloom") from None
    return {name: digest for name, digest in _SOURCES_ROW.findall(table)}


@dataclass(frozen=True)
class NamedCorpus:
    """A corpus known by name: its file, and whether its recipe lowercases it (see corpora/SOURCES.md)."""

    filename: str
    lowercase: bool

    @property
    def sha256(self) -> str:
        """Hex sha256 of the uncompressed text, as ``corpora/SOURCES.md`` records it."""
        try:
            return bundled_sha256()[self.filename]
        except KeyError:
            raise CharloomError(f"corpora/{SOURCES_FILE}", f"has no sha256 for {self.filename}",
                                "reinstall charloom") from None

    @property
    def bundled(self) -> str:
        """Name of the compressed copy inside the package's corpora/ folder."""
        return self.filename + ".xz"


NAMED_CORPORA: dict[str, NamedCorpus] = {
    # Deep Learning with Python, section 8.1 (600,893 chars once decoded; the book lowercases it).
    "nietzsche": NamedCorpus("nietzsche.txt", lowercase=True),
    # char-rnn's Tiny Shakespeare (1,115,394 chars, case kept).
    "tinyshakespeare": NamedCorpus("tinyshakespeare.txt", lowercase=False),
}
# Other names a user may type; a run records the name they stand for.
CORPUS_ALIASES: dict[str, str] = {"shakespeare": "tinyshakespeare"}
DEFAULT_CORPUS = "nietzsche"


def corpus_name(source: str) -> str | None:
    """The named corpus ``source`` stands for (``shakespeare`` -> ``tinyshakespeare``), or None."""
    source = CORPUS_ALIASES.get(source, source)
    return source if source in NAMED_CORPORA else None


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


def cache_dir() -> Path:
    """Where decompressed corpora and built kernels are kept: ``$CHARLOOM_CACHE``, else the platform's.

    The platform's folder comes from platformdirs: ``$XDG_CACHE_HOME/charloom`` or
    ``~/.cache/charloom`` on Linux, ``~/Library/Caches/charloom`` on macOS,
    ``%LOCALAPPDATA%\\charloom\\Cache`` on Windows.
    """
    override = os.environ.get("CHARLOOM_CACHE")
    # appauthor=False: on Windows the default would nest the folder twice (charloom\charloom\Cache).
    return Path(override) if override else Path(platformdirs.user_cache_dir("charloom", appauthor=False))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def named_corpus_path(name: str, verify: bool = True) -> Path:
    """The verified local file of a named corpus: ``$CHARLOOM_DATA``'s copy, else the cached bundled one.

    Never touches the network. Raises a CharloomError for an unknown name, a ``$CHARLOOM_DATA`` copy
    whose sha256 is wrong, a damaged installation, or a cache folder that cannot be written.
    ``verify=False`` returns an existing copy unread: the caller checks it (see :meth:`Sources.confirm`).
    """
    canonical = corpus_name(name)
    if canonical is None:
        known = ", ".join(sorted([*NAMED_CORPORA, *CORPUS_ALIASES]))
        raise CharloomError(f"corpus {name}", "no such named corpus", f"use one of {known}, or give a file")
    spec = NAMED_CORPORA[canonical]
    data_dir = os.environ.get("CHARLOOM_DATA")
    if data_dir and (Path(data_dir) / spec.filename).is_file():
        path = Path(data_dir) / spec.filename
        if verify and sha256_file(path) != spec.sha256:
            raise _not_the_corpus(path, canonical)
        return path
    target = cache_dir() / spec.filename
    if target.is_file() and (not verify or sha256_file(target) == spec.sha256):
        return target
    # Missing, or damaged (a full disk, an edit by hand): the cache is ours, so rebuild it from the package.
    _unpack_bundled(spec, target)
    return target


def _not_the_corpus(path: Path, canonical: str) -> CharloomError:
    """The error for a ``$CHARLOOM_DATA`` copy whose sha256 is not the named corpus's."""
    return CharloomError(str(path), f"sha256 does not match the {canonical} corpus",
                         "replace it with the original or unset CHARLOOM_DATA to use the copy bundled with charloom")


def _unpack_bundled(spec: NamedCorpus, target: Path) -> None:
    """Decompress the bundled copy of ``spec`` to ``target``: a temporary file, checked, then renamed.

    Two processes doing this at once each write their own temporary file; the renames are atomic,
    so either copy may win and both are whole.
    """
    try:
        import lzma
    except ImportError:  # a Python built without liblzma
        raise CharloomError(f"corpus {spec.filename}", "this Python has no lzma module to decompress the bundled copy",
                            f"put {spec.filename} in a folder and set CHARLOOM_DATA to it") from None
    try:
        packed = _bundled(spec.bundled).open("rb")
    except OSError as exc:
        raise CharloomError(f"corpora/{spec.bundled}", f"missing from the installed package ({exc.__class__.__name__})",
                            "reinstall charloom") from None
    digest = hashlib.sha256()
    tmp_name = None
    try:
        with packed, lzma.open(packed) as text:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{spec.filename}.", suffix=".part",
                                             delete=False) as tmp:
                tmp_name = tmp.name
                for block in iter(lambda: text.read(1 << 20), b""):
                    digest.update(block)
                    tmp.write(block)
        if digest.hexdigest() != spec.sha256:
            raise CharloomError(f"corpora/{spec.bundled}", f"the bundled copy's sha256 does not match {SOURCES_FILE}",
                                "reinstall charloom")
        os.replace(tmp_name, target)
        tmp_name = None
    except (lzma.LZMAError, EOFError) as exc:  # a truncated or damaged .xz in the installation
        raise CharloomError(f"corpora/{spec.bundled}", f"cannot decompress the bundled copy ({exc})",
                            "reinstall charloom") from None
    except OSError as exc:
        raise CharloomError(str(target.parent), f"cannot write the cache folder ({exc.strerror or exc.__class__.__name__})",
                            "set CHARLOOM_CACHE to a writable folder") from None
    finally:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)


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
                    raise _not_the_corpus(path, name)
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
