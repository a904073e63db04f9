"""The named corpora (``nietzsche``; ``tinyshakespeare``, also called ``shakespeare``): they ship inside the
package, xz-compressed in ``charloom/text/corpora/``, so they work with no network: nothing here ever
downloads. :func:`named_corpus_path` looks for a corpus

1. in ``$CHARLOOM_DATA/<file>`` when that variable is set (a copy of your own; refused if its
   sha256 differs), then
2. in the cache folder (:func:`cache_dir`), where the bundled copy is decompressed on first use
   (to a temporary file, checked, then renamed into place, so a crash never leaves half a text).
   A cached copy whose sha256 is wrong is rebuilt from the bundled one.

The checksums and the provenance of both texts live in ``corpora/SOURCES.md``, read here.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import platformdirs

from ..errors import CharloomError
from ..files import sha256_stream

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
    """Hex sha256 of a corpus file (a link is followed: a ``$CHARLOOM_DATA`` copy may be one)."""
    with open(path, "rb") as fh:
        return sha256_stream(fh)


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
            raise not_the_corpus(path, canonical)
        return path
    target = cache_dir() / spec.filename
    if target.is_file() and (not verify or sha256_file(target) == spec.sha256):
        return target
    # Missing, or damaged (a full disk, an edit by hand): the cache is ours, so rebuild it from the package.
    _unpack_bundled(spec, target)
    return target


def not_the_corpus(path: Path, canonical: str) -> CharloomError:
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
