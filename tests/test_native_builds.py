"""The kernel tests pass with each build a user's CPU may get: 512-bit (AVX-512), 256-bit (AVX2, most
laptops and AMD desktops) and, as a floor, 128-bit vectors. The suite itself ran with this CPU's
native build; here the other builds run the same tests in a subprocess with their own cache folder."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from charloom.kernels import native
from charloom.kernels.native.build import NARROWER_BUILDS, build_environment
from tests.conftest import REPO

# The kernel's own tests (every tile shape, the draws, training against nn.LSTM); test_light.py steps the
# same C functions through the torch-free path, so it is left to the native build.
KERNEL_TESTS = ["tests/test_native.py", "tests/test_native_training.py"]
# Tests of the build machinery (rebuilds, the cache, the tanh fit script), not of a build's arithmetic:
# each compiles the library again, and the native build's run of them covers them.
NOT_ARITHMETIC = "not another_abi_version and not built_once and not fit_script"
BUILDS = NARROWER_BUILDS


def _cpu_has(flag: str) -> bool:
    try:
        return any(flag in line.split() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except OSError:
        return False


def _env(bits: int, cache: Path) -> dict:
    return {**os.environ, **build_environment(bits, cache)}


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[int, Path]:
    """One cache folder per build for this module's tests: each build is compiled once."""
    return {bits: tmp_path_factory.mktemp(f"build{bits}") for bits in BUILDS}


@pytest.mark.skipif(native.library() is None or not _cpu_has("avx2"), reason="needs the native kernel on an x86-64 CPU with AVX2")
@pytest.mark.parametrize("bits", sorted(BUILDS, reverse=True))
def test_each_narrower_build_reports_its_width(bits, caches):
    done = subprocess.run([sys.executable, "-c", "from charloom.kernels import native; print(native.describe())"],
                          capture_output=True, text=True, env=_env(bits, caches[bits]), timeout=300)
    expected = "native AVX2" if bits == 256 else "native 128-bit vectors"
    assert done.stdout.startswith(expected), done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.skipif(native.library() is None or not _cpu_has("avx2"), reason="needs the native kernel on an x86-64 CPU with AVX2")
@pytest.mark.parametrize("bits", sorted(BUILDS, reverse=True))
def test_the_kernel_tests_pass_with_a_narrower_build(bits, caches):
    if bits == 256 and not _cpu_has("avx512f"):
        pytest.skip("this CPU has no AVX-512: its native build is the 256-bit one, which the suite ran")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", NOT_ARITHMETIC, *KERNEL_TESTS],
                          capture_output=True, text=True, cwd=REPO, env=_env(bits, caches[bits]), timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
