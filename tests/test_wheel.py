"""Packaging: what a newcomer installs. The wheel carries the corpora, the C source and the page, and a
fresh virtualenv with nothing but that wheel trains on Tiny Shakespeare and generates, with no network.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import SHARED_CORPORA

REPO = Path(__file__).resolve().parents[1]
INIT = REPO / "src" / "charloom" / "__init__.py"

# Put first on sys.path of the fresh venv's Python (as a .pth "import" line, which site runs at start):
# any attempt to open a connection fails loudly, so "works offline" is checked, not assumed.
NO_NETWORK_PTH = (
    "import socket; exec(\"def _refuse(*a, **k):\\n    raise OSError('test_wheel: no network here')\\n"
    "socket.socket.connect = socket.create_connection = socket.getaddrinfo = _refuse\")\n"
)


def _written_version() -> str:
    """``__version__`` as written in the source, read without importing charloom."""
    for node in ast.parse(INIT.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("no __version__ in src/charloom/__init__.py")


def test_version_is_written_once():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^dynamic = \["version"\]', pyproject, re.MULTILINE)
    assert not re.search(r"^version\s*=\s*\"", pyproject, re.MULTILINE), "pyproject.toml writes a version itself"
    assert 'attr = "charloom.__version__"' in pyproject
    assert re.fullmatch(r"\d+\.\d+\.\d+", _written_version())


def test_license_is_mit_by_the_charloom_authors():
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and "the charloom authors" in text
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'license = "MIT"' in pyproject and 'license-files = ["LICENSE"]' in pyproject


def test_import_without_the_resource_module():
    """Windows has no ``resource``: charloom must import, and the memory check must still answer."""
    code = ("import sys; sys.modules['resource'] = None\n"  # None in sys.modules makes the import fail
            "import charloom\nfrom charloom.text import preflight\n"
            "assert preflight.resource is None\n"
            "have, what = preflight.available_memory()\n"
            "assert have > 0 and 'ulimit' not in what, (have, what)\n"
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def _copy_source(dest: Path) -> Path:
    """The files a build reads, copied, so the build writes nothing into (or picks up leftovers from) the tree."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "src", dest / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "*.so"))
    return dest


def _run(args: list, env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    assert done.returncode == 0, f"{args[:3]} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wheel_installs_and_trains_offline(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CHARLOOM_", "PIP_", "PYTHON", "VIRTUAL_ENV", "XDG_"))}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull,
               HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    (tmp_path / "home").mkdir()
    work = tmp_path / "work"  # the cwd of everything below: no source tree to import from by accident
    work.mkdir()

    # Build the wheel with the outer environment's setuptools (no build isolation: no download).
    source = _copy_source(tmp_path / "source")
    (tmp_path / "source" / "dist").mkdir()
    _run([sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation", "--no-index",
          "-w", source / "dist"], env, work, 180)
    wheels = list((source / "dist").glob("charloom-*.whl"))
    assert [w.name for w in wheels] == [f"charloom-{_written_version()}-py3-none-any.whl"]
    with zipfile.ZipFile(wheels[0]) as zf:
        names = set(zf.namelist())
    for needed in ("charloom/text/corpora/nietzsche.txt.xz", "charloom/text/corpora/tinyshakespeare.txt.xz",
                   "charloom/text/corpora/SOURCES.md", "charloom/kernels/native/rnn.c", "charloom/server/static/index.html",
                   "charloom/py.typed", f"charloom-{_written_version()}.dist-info/licenses/LICENSE",
                   "charloom/pretrained/base/model.safetensors", "charloom/pretrained/base/manifest.json"):
        assert needed in names, f"the wheel lacks {needed}"

    # A fresh venv that sees the outer dependencies (torch, numpy, ...) through a .pth file; its own
    # site-packages comes first on sys.path, and the outer editable install's own .pth is not run from there.
    # The outer pip installs into it (--python), which saves seeding the venv with a pip of its own.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], env, work, 120)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], env, work, 60).stdout.strip())
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheels[0]], env, work, 120)
    (site / "outer.pth").write_text(sysconfig.get_path("purelib") + "\n")
    (site / "aaa_no_network.pth").write_text(NO_NETWORK_PTH)

    found = _run([python, "-c", "import charloom, socket; print(charloom.__file__); print(charloom.__version__)\n"
                  "try:\n    socket.create_connection(('127.0.0.1', 9))\nexcept OSError as e:\n    print(e)"],
                 env, work, 120).stdout.split("\n")
    assert Path(found[0]).is_relative_to(venv), f"charloom imported from {found[0]}, not from the wheel"
    assert found[1] == _written_version()
    assert found[2] == "test_wheel: no network here"

    charloom = venv / "bin" / "charloom"
    run_dir = tmp_path / "runs"
    _run([charloom, "train", "shakespeare", "--max-steps", "20", "--out", run_dir, "--hidden", "64",
          "--layers", "1", "--batch-size", "16", "--seq-len", "32", "--sample-length", "20", "--threads", "1",
          "--quiet"], env, work, 240)
    cached = tmp_path / "cache" / "charloom" / "tinyshakespeare.txt"
    assert cached.is_file(), "the bundled corpus was not unpacked into $XDG_CACHE_HOME/charloom"
    assert cached.stat().st_size == 1_115_394

    # The bundled base model, read from the installed package: a fine-tune of a few steps starts from it.
    names = work / "names.txt"
    names.write_text("Ada\nBea\nCyd\nDot\n" * 10, encoding="utf-8")
    _run([charloom, "train", names, "--records", "line", "--init-from", "base", "--max-steps", "2", "--out",
          tmp_path / "tuned", "--threads", "1", "--quiet"], env, work, 240)

    sample = _run([charloom, "generate", run_dir, "--length", "50", "--seed", "1", "--no-echo"],
                  env, work, 120).stdout
    alphabet = set((SHARED_CORPORA / "tinyshakespeare.txt").read_text())
    assert sample.endswith("\n") and len(sample) == 50 + 1, f"not 50 characters and a newline: {sample!r}"
    text = sample[:-1]
    assert set(text) <= alphabet, f"characters Tiny Shakespeare does not have: {set(text) - alphabet}"
    again = _run([charloom, "generate", run_dir, "--length", "50", "--seed", "1", "--no-echo"], env, work, 120).stdout
    assert again == sample  # the same seed, the same text
