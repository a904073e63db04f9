"""The run directory and the checkpoint format: the only code that knows file names on disk.

    RUN_DIR/
      .lock                        held (flock) by the process training the run: one writer at a time
      data/ids.bin                 the corpus as token ids (memory-mapped for training)
      metrics.csv                  one row per evaluation
      samples.jsonl                the per-epoch samples
      tensorboard/                 the same as TensorBoard events, with --log tensorboard
      checkpoints/index.json       {"last": "step-00000120", "best": "step-00000100", ...}
      checkpoints/step-00000120/
        model.safetensors          weights only
        config.json                model + training settings, tokenizer kind, versions
        tokenizer.json
        training_state.pt          optimiser, schedule, RNG, data cursor (tensors and numbers only)
        manifest.json              sha256 of every file above

A checkpoint is written into a temporary directory, every file fsynced, then renamed into place;
only then does ``index.json`` (itself replaced atomically) point at it. A crash at any moment
leaves the previous checkpoint whole and referenced. Nothing is ever unpickled: weights come from
safetensors and the training state from ``torch.load(weights_only=True)``. A tensor holding NaN or
infinity is refused on save as on load. A failed write (disk full) removes its temporary directory
and raises a one-line CharloomError; the previous checkpoint stays referenced.

Fault injection (for the reliability tests): ``CHARLOOM_FAULT=POINT[:ACTION]`` makes the N-th save
of this process (``CHARLOOM_FAULT_AT=N``, default 1) stop at POINT, one of :data:`FAULT_POINTS`.
ACTION is ``kill`` (SIGKILL, the default), ``enospc`` (raise a disk-full OSError) or ``sleep``
(wait ``CHARLOOM_FAULT_SLEEP`` seconds, default 120, so a test can signal the process mid-save).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from safetensors import SafetensorError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: runs are not locked there
    fcntl = None  # type: ignore[assignment]

from .errors import CharloomError, CheckpointError
from .files import fsync_dir, read_json, sha256_of, write_json_atomic

if TYPE_CHECKING:
    import torch

# torch is imported where a function needs it: reading a checkpoint's files (charloom.generation.light) needs none.

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "training_state.pt"
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.json"
LOCK_FILE = ".lock"  # in the run directory, held by the process that trains it (RunDir.locked)
FORMAT_VERSION = 1
FAULT_POINTS = ("after-temp-write", "before-rename", "after-rename", "before-index", "before-prune")
_saves_started = 0  # saves begun by this process, counted for CHARLOOM_FAULT_AT


def _fault(point: str) -> None:
    """The fault-injection hook (see the module docstring); does nothing unless CHARLOOM_FAULT names ``point``."""
    spec = os.environ.get("CHARLOOM_FAULT")
    if not spec:
        return
    where, _, action = spec.partition(":")
    if where != point or _saves_started != int(os.environ.get("CHARLOOM_FAULT_AT", "1")):
        return
    if action in ("", "kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    elif action == "sleep":
        time.sleep(float(os.environ.get("CHARLOOM_FAULT_SLEEP", "120")))


def _non_finite(tensors: Any, prefix: str = "") -> str:
    """The name of the first floating tensor in a nested dict/list/tuple holding NaN or infinity, or ''."""
    import torch

    if isinstance(tensors, torch.Tensor):
        return prefix if tensors.is_floating_point() and not bool(torch.isfinite(tensors).all()) else ""
    items = tensors.items() if isinstance(tensors, dict) else enumerate(tensors) if isinstance(tensors, (list, tuple)) else ()
    for key, value in items:
        found = _non_finite(value, f"{prefix}.{key}" if prefix else str(key))
        if found:
            return found
    return ""


class RunDir:
    """A training run's directory: data cache, logs and checkpoints."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @property
    def ids_path(self) -> Path:
        return self.path / "data" / "ids.bin"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def samples_path(self) -> Path:
        return self.path / "samples.jsonl"

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @contextlib.contextmanager
    def locked(self) -> Iterator["RunDir"]:
        """Hold this run for the process while the block runs: a second process that trains (or resumes)
        the same run gets a one-line error (exit 2) instead of both writing one directory.

        The lock is an ``flock`` on ``RUN/.lock``, so it goes away with the process however that ends (no
        stale lock after a kill). While it is held, dot-directories under checkpoints/ can only be
        leftovers of a dead process, which is what lets ``_prune`` delete them."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                    raise CharloomError(str(self.path), f"is being trained by another process{f' (pid {holder})' if holder.isdigit() else ''}",
                                        "wait for it to finish, or train into another directory (--out)") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
            yield self
        finally:
            os.close(fd)  # releases the flock

    def index(self) -> dict[str, Any]:
        """The index of checkpoints, or {} when none has been written yet."""
        path = self.checkpoints / INDEX_FILE
        if not os.path.lexists(path):
            return {}
        index = read_json(path)
        if not isinstance(index, dict) or not all(isinstance(v, str) for v in index.values()):
            raise CheckpointError(str(path), "is not an index of checkpoints", "the run is damaged; give a checkpoint directory instead")
        return index

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Add a row to metrics.csv (header written with the first row)."""
        new = not self.metrics_path.exists()
        with open(self.metrics_path, "a", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def append_sample(self, record: dict[str, Any]) -> None:
        """Add one sample to samples.jsonl."""
        with open(self.samples_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")

    def save(self, step: int, model: torch.nn.Module, config: dict[str, Any], tokenizer: dict[str, Any],
             training_state: dict[str, Any] | None, *, best: bool, extra_index: dict[str, Any] | None = None,
             keep_last: int = 1) -> Path:
        """Write checkpoint ``step`` atomically, point ``last`` (and ``best`` if asked) at it, keep the
        ``keep_last`` newest checkpoints plus the best, drop the rest."""
        global _saves_started
        _saves_started += 1
        bad = _non_finite(model.state_dict()) or _non_finite(training_state or {})
        if bad:
            raise CheckpointError(f"checkpoint at step {step}", f"refused to save: tensor {bad} holds NaN or infinity",
                                  "training diverged; lower the learning rate (--lr) and train again")
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        # A step saved again (an eval, then Ctrl-C after a resume) gets a new name, so the directory
        # the index points at is never moved or deleted before the index points elsewhere.
        name, n = f"step-{step:08d}", 0
        while (self.checkpoints / name).exists():
            n += 1
            name = f"step-{step:08d}-{n}"
        final = self.checkpoints / name
        tmp = self.checkpoints / f".tmp-{name}-{os.getpid()}"
        referenced = False
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            from safetensors.torch import save_model

            save_model(model, str(tmp / MODEL_FILE))
            with open(tmp / CONFIG_FILE, "w", encoding="utf-8") as fh:
                json.dump(config, fh, indent=2, ensure_ascii=False)
            with open(tmp / TOKENIZER_FILE, "w", encoding="utf-8") as fh:
                json.dump(tokenizer, fh, ensure_ascii=False)
            if training_state is not None:
                # Serialised in memory first: torch's zip writer reports a full disk as a bare RuntimeError.
                buffer = io.BytesIO()
                import torch

                torch.save(training_state, buffer)
                with open(tmp / STATE_FILE, "wb") as fh:
                    fh.write(buffer.getbuffer())
            _fault("after-temp-write")
            files = sorted(p.name for p in tmp.iterdir())
            for fname in files:
                with open(tmp / fname, "rb") as fh:
                    os.fsync(fh.fileno())
            manifest = {"format": FORMAT_VERSION, "step": step, "files": {f: sha256_of(tmp / f) for f in files}}
            write_json_atomic(tmp / MANIFEST_FILE, manifest)
            _fault("before-rename")
            os.rename(tmp, final)
            _fault("after-rename")
            fsync_dir(self.checkpoints)
            index = self.index()
            index["last"] = name
            if best or "best" not in index:
                index["best"] = name
            index.update(extra_index or {})
            _fault("before-index")
            write_json_atomic(self.checkpoints / INDEX_FILE, index)
            referenced = True
        except (OSError, SafetensorError) as exc:
            # Disk full or gone: drop the partial write; the index still names the previous checkpoint.
            shutil.rmtree(tmp, ignore_errors=True)
            if not referenced:
                shutil.rmtree(final, ignore_errors=True)
            # safetensors says "Error while serializing: I/O error: No space left on device (os error 28)"
            reason = exc.strerror if isinstance(exc, OSError) else str(exc).split("I/O error: ")[-1].split(" (os error")[0]
            raise CharloomError(str(final), f"cannot write the checkpoint ({reason or exc})",
                                f"free some disk space, then continue with: charloom train --resume {self.path}") from None
        _fault("before-prune")
        self._prune(index, keep_last)
        return final

    def _prune(self, index: dict[str, Any], keep_last: int = 1) -> None:
        steps = sorted(e.name for e in self.checkpoints.iterdir() if e.is_dir() and e.name.startswith("step-"))
        keep = set(steps[-max(1, keep_last):]) | {index.get("last"), index.get("best")}
        for entry in self.checkpoints.iterdir():
            if entry.is_dir() and entry.name not in keep and (entry.name.startswith("step-") or entry.name.startswith(".")):
                if not entry.name.startswith("."):
                    # Rename first: a crash mid-delete must not leave a half checkpoint under a step- name.
                    doomed = entry.with_name(f".del-{entry.name}-{os.getpid()}")
                    os.rename(entry, doomed)
                    entry = doomed
                shutil.rmtree(entry, ignore_errors=True)


def new_run_dir(base: Path) -> Path:
    """Create and return ``base``, or ``base-2``, ``base-3``... if taken: the first this process creates
    (``mkdir`` is atomic, so runs started in the same second by several processes get a directory each)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    path, n = base, 1
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")


def resolve(path: str | os.PathLike, which: str = "best") -> Path:
    """The checkpoint directory for a run directory (its ``best`` or ``last``) or a checkpoint directory."""
    p = Path(path)
    if (p / MANIFEST_FILE).is_file() or (p / MODEL_FILE).is_file():
        return p
    run = RunDir(p)
    if not p.exists():  # a wrong path is a usage error (exit 2), not a damaged checkpoint
        raise CharloomError(str(p), "no such run or checkpoint directory", "give the directory that charloom train printed")
    index = run.index()
    name = index.get(which) or index.get("last")
    if not name:
        raise CheckpointError(str(p), "holds no checkpoint", "train first, or give the directory that charloom train printed")
    return run.checkpoints / name


def verify(ckpt: Path) -> dict[str, Any]:
    """Check every file against the manifest; return the manifest."""
    manifest = read_json(ckpt / MANIFEST_FILE)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or MODEL_FILE not in files:
        raise CheckpointError(str(ckpt / MANIFEST_FILE), "lists no model file", "the checkpoint is damaged; use another one")
    unlisted = [name for name in (CONFIG_FILE, TOKENIZER_FILE) if name not in files]
    if unlisted:  # every file a load reads must be covered by a checksum
        raise CheckpointError(str(ckpt / MANIFEST_FILE), f"does not list {unlisted[0]}", "the checkpoint is damaged; use another one")
    for fname, digest in files.items():
        fpath = ckpt / fname
        if Path(fname).name != fname or not os.path.lexists(fpath):  # a FIFO or a link is refused when hashed
            raise CheckpointError(str(fpath), "missing", "the checkpoint is incomplete; use another one")
        if sha256_of(fpath) != digest:
            raise CheckpointError(str(fpath), "checksum does not match manifest.json", "the file is damaged; use another checkpoint")
    return manifest


def read_config(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config, tokenizer)`` dicts of a verified checkpoint."""
    verify(ckpt)
    config = read_json(ckpt / CONFIG_FILE)
    if not isinstance(config, dict) or config.get("format") != FORMAT_VERSION:
        raise CheckpointError(str(ckpt / CONFIG_FILE), "unknown checkpoint format", "upgrade charloom or use another checkpoint")
    tokenizer = read_json(ckpt / TOKENIZER_FILE)
    if not isinstance(tokenizer, dict):
        raise CheckpointError(str(ckpt / TOKENIZER_FILE), "is not a tokenizer description (a JSON object)", "use another checkpoint")
    return config, tokenizer


def weight_shapes(ckpt: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in the checkpoint's safetensors, read from its header (no weight is loaded)."""
    from safetensors import safe_open

    path = ckpt / MODEL_FILE
    try:
        with safe_open(str(path), framework="numpy") as fh:
            return {name: tuple(fh.get_slice(name).get_shape()) for name in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(str(path), f"cannot read the weights ({str(exc).splitlines()[0][:200]})",
                              "the checkpoint is damaged; use another one") from None


def check_shapes(ckpt: Path, expect: dict[str, tuple[int, ...]], unique: int) -> None:
    """Refuse a network whose tensors (``expect``: name -> shape; ``unique``: values in its distinct tensors)
    are not the file's, before it is built: a config.json may ask for any size."""
    found = weight_shapes(ckpt)
    where = str(ckpt / MODEL_FILE)
    wrong = sorted(set(found) - set(expect)) or sorted(k for k in found if found[k] != tuple(expect[k]))
    held = sum(math.prod(s) for s in found.values())
    if wrong or unique > held:
        what = (f"{wrong[0]}: {found[wrong[0]]} in the file, {tuple(expect[wrong[0]]) if wrong[0] in expect else 'none'} "
                "from config.json") if wrong else f"config.json asks for {unique:,} weights, the file holds {held:,}"
        raise CheckpointError(where, f"weights do not fit the model in config.json ({what})",
                              "the checkpoint is damaged or mismatched; use another one")


def load_weights(ckpt: Path, model: torch.nn.Module) -> None:
    """Fill ``model`` from the checkpoint's safetensors on the CPU; a shape or name mismatch raises."""
    import torch
    from safetensors.torch import load_model

    path = ckpt / MODEL_FILE
    try:
        missing, unexpected = load_model(model, str(path), strict=False, device="cpu")
    except (SafetensorError, RuntimeError, OSError, ValueError) as exc:
        raise CheckpointError(str(path), f"weights do not fit the model in config.json ({str(exc).splitlines()[0][:200]})",
                              "the checkpoint is damaged or mismatched; use another one") from None
    if missing or unexpected:
        raise CheckpointError(str(path), f"weights do not match config.json (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})",
                              "the checkpoint is damaged or mismatched; use another one")
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(str(path), f"tensor {name} holds NaN or infinity", "use an earlier checkpoint")


def load_training_state(ckpt: Path) -> dict[str, Any]:
    """The optimiser/schedule/RNG/cursor state, loaded with ``weights_only=True`` (no code runs)."""
    path = ckpt / STATE_FILE
    if not path.is_file():
        raise CheckpointError(str(path), "missing: this checkpoint cannot resume training", "resume from the run directory's last checkpoint")
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise CheckpointError(str(path), f"refused to load ({exc.__class__.__name__})", "the file is damaged or not charloom's; use another checkpoint") from None
