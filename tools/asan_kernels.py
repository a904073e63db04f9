"""Run the native kernel's tests with the library built under AddressSanitizer (issue 28, item 12).

    python tools/asan_kernels.py [pytest arguments...]

Builds the kernel with ``-fsanitize=address`` into a private cache folder (``CHARLOOM_NATIVE_FLAGS``),
preloads the compiler's libasan into Python (the interpreter itself is not instrumented) and runs the
kernel tests; an out-of-bounds read or write stops the run with ASan's report and a non-zero exit.
Leak checking is off: the interpreter keeps memory to the end on purpose. Takes a few minutes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_native.py", "tests/test_native_training.py", "tests/test_light.py",
         "tests/test_hardening_kernels.py"]


def libasan(cc: str) -> str:
    """The compiler's AddressSanitizer runtime, or "" when it has none."""
    done = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True)
    path = done.stdout.strip()
    return os.path.realpath(path) if done.returncode == 0 and os.path.isabs(path) and os.path.exists(path) else ""


def main(argv: list[str]) -> int:
    """Run the tests under ASan; the exit code of pytest (2 when no ASan runtime is found)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or ""
    runtime = libasan(cc) if cc else ""
    if not runtime:
        print("asan_kernels: no libasan for the C compiler; install it (e.g. apt-get install libasan8)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="charloom-asan-") as cache:
        env = {**os.environ, "CHARLOOM_CACHE": cache, "LD_PRELOAD": runtime,
               "CHARLOOM_NATIVE_FLAGS": "-fsanitize=address -fno-omit-frame-pointer -g",
               "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:halt_on_error=1",
               "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
        args = argv or [*TESTS, "-m", "not slow"]
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args],
                              cwd=REPO, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
