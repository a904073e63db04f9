"""The native generation kernel (charloom.kernels.native): same logits as forward, same tokens as numpy and torch."""

import shutil

import numpy as np
import pytest
import torch

from charloom.config import ModelConfig
from charloom.generation import npdraw
from charloom.generation.steppers import make_stepper
from charloom.kernels import choice, native
from charloom.kernels.native import build
from charloom.models import build_model
from tests.test_generate_engine import ids_of, small

HAVE_CC = bool(shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"))


@pytest.fixture()
def kernel():
    lib = native.library()
    if lib is None:
        assert not HAVE_CC, "a C compiler is on PATH but the native kernel did not build"
        pytest.skip("no C compiler: generation uses numpy and torch")
    return lib


MODELS = [("lstm", "onehot", 1, False), ("lstm", "embedding", 2, False), ("lstm", "embedding", 3, True),
          ("gru", "onehot", 1, False), ("gru", "embedding", 2, True), ("mogrifier", "onehot", 1, False),
          ("mogrifier", "embedding", 2, True)]


@pytest.mark.parametrize("arch,inp,layers,tie", MODELS)
@pytest.mark.parametrize("rows", [1, 5])
def test_native_step_equals_forward(kernel, arch, inp, layers, tie, rows):
    model = small(arch, inp, layers, tie=tie)
    nat = native.NativeStepper.create(make_stepper(model), rows)
    idx = torch.randint(0, 20, (rows, 15), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full, _ = model(idx)
    state = nat.from_torch(make_stepper(model).from_state(None, rows))
    for t in range(15):
        np.testing.assert_allclose(nat.step(idx[:, t].numpy(), state), full[:, t].numpy(), atol=1e-5)


@pytest.mark.parametrize("arch,hidden,vocab", [("lstm", 13, 57), ("lstm", 40, 200), ("gru", 21, 8), ("gru", 64, 17)])
def test_every_tile_shape_gives_the_forward_logits(kernel, arch, hidden, vocab):
    # 1-13 rows: every count of rows left over after the 6-row tiles; hidden sizes whose gate widths
    # end in a block of 8 or in single columns; vocabularies padded to 8 or not, and one wider than
    # the gates (the head's scratch must not overlap them).
    torch.manual_seed(0)
    cfg = ModelConfig(model=arch, input="embedding", layers=2, hidden=hidden, embedding_dim=8, dropout=0.0)
    model = build_model(cfg, vocab).eval()
    idx = torch.randint(0, vocab, (13, 6), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        full, _ = model(idx)
    for rows in range(1, 14):
        nat = native.NativeStepper.create(make_stepper(model), rows)
        state = nat.from_torch(make_stepper(model).from_state(None, rows))
        for t in range(6):
            np.testing.assert_allclose(nat.step(idx[:rows, t].numpy(), state), full[:rows, t].numpy(), atol=1e-5)


def test_native_sample_draws_what_numpy_draws_from_the_same_logits(kernel):
    model = small("lstm", "embedding", 2)
    rows, n = 3, 300
    stepper = make_stepper(model)
    nat = native.NativeStepper.create(stepper, rows)
    state, ref_state = nat.from_torch(stepper.from_state(None, rows)), nat.from_torch(stepper.from_state(None, rows))
    logits = nat.step(np.array([1, 2, 3]), state)
    ref_logits = nat.step(np.array([1, 2, 3]), ref_state)
    uniforms = np.random.default_rng(0).random((n, rows))
    uniforms[0] = 0.0  # the edges of [0, 1): the first and the last token with any probability
    uniforms[1] = np.nextafter(1.0, 0.0)
    temps = np.array([0.3, 1.0, 2.5], dtype=np.float32)
    got = nat.sample(state, logits, uniforms, temps, feed_last=True)
    for i in range(n):
        scaled = (ref_logits - ref_logits.max(axis=1, keepdims=True)) / temps[:, None]
        want = npdraw.draw_numpy(scaled, uniforms[i])
        assert got[i].tolist() == want.tolist(), f"step {i}"
        ref_logits = nat.step(want, ref_state)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-6)  # feed_last: the last draw was fed too


def test_a_token_with_zero_probability_is_never_drawn(kernel):
    model = small("lstm", "onehot", 1)
    nat = native.NativeStepper.create(make_stepper(model), 1)
    state = nat.from_torch(make_stepper(model).from_state(None, 1))
    logits = np.full((1, 20), -200.0, dtype=np.float32)  # exp(-200 / 0.5) underflows: probability 0
    logits[0, 7] = 0.0
    for u in (0.0, 0.5, np.nextafter(1.0, 0.0)):
        for temp in (0.5, 1e-40):  # 1e-40 has no float32 inverse: the kernel divides by T
            ids = nat.sample(state, logits.copy(), np.array([[u]]), np.array([temp], np.float32), feed_last=False)
            assert ids.tolist() == [[7]], (u, temp)


def test_bad_token_ids_are_refused_before_any_c_runs(kernel):
    model = small("gru", "onehot", 1)
    nat = native.NativeStepper.create(make_stepper(model), 2)
    state = nat.from_torch(make_stepper(model).from_state(None, 2))
    for bad in ([0, 20], [-1, 0], [0]):
        with pytest.raises(ValueError, match="token ids"):
            nat.step(np.array(bad), state)


@pytest.mark.parametrize("arch,inp,layers,tie", MODELS)
def test_native_numpy_and_torch_paths_give_the_same_text(kernel, arch, inp, layers, tie, monkeypatch):
    model = small(arch, inp, layers, tie=tie)
    temps = [1.0, 0.5, 1.5]
    fast = ids_of(model, [1, 2, 3], 400, temps)
    one = ids_of(model, [1, 2, 3], 400, [0.5])
    monkeypatch.setenv("CHARLOOM_NATIVE", "0")  # numpy for a few rows, torch beyond
    assert native.library() is None
    assert torch.equal(one, ids_of(model, [1, 2, 3], 400, [0.5]))
    monkeypatch.setattr(choice, "NUMPY_MAX_ROWS", 0)  # torch only
    assert torch.equal(fast, ids_of(model, [1, 2, 3], 400, temps))
    assert torch.equal(one, ids_of(model, [1, 2, 3], 400, [0.5]))


def test_without_a_compiler_there_is_no_kernel_and_generation_still_works(monkeypatch, tmp_path):
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("CHARLOOM_CACHE", str(tmp_path / "cache"))
    assert native.library() is None
    model = small("lstm", "onehot", 1)
    assert ids_of(model, [1], 50, [1.0]).shape == (1, 50)


def test_the_kernel_is_built_once_into_the_cache(kernel, monkeypatch, tmp_path):
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setenv("CHARLOOM_CACHE", str(tmp_path))
    assert native.library() is not None
    built = list((tmp_path / "native").glob("rnn-*.so"))
    assert len(built) == 1 and not [p for p in (tmp_path / "native").iterdir() if p not in built]  # no temp files left
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(build, "_compile", lambda cc, out: pytest.fail("compiled again"))
    assert native.library() is not None


def test_a_library_of_another_abi_version_is_rebuilt_then_refused_in_one_line(kernel, monkeypatch, tmp_path):
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setenv("CHARLOOM_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "ABI_VERSION", build.ABI_VERSION + 1)  # as a stale build would disagree
    compiled = []
    real = build._compile
    monkeypatch.setattr(build, "_compile", lambda cc, out: compiled.append(out) or real(cc, out))
    assert build.library() is None and len(compiled) == 2  # built, refused, built once more, refused
    line = native.describe()
    assert "\n" not in line and f"ABI version {build.ABI_VERSION - 1}, this charloom speaks {build.ABI_VERSION}" in line


def test_the_constants_python_uses_come_from_the_library(kernel):
    lim = native.limits()
    assert lim.max_layers >= 1 and lim.lstm_block >= 1 and lim.mog_max_rounds >= 1
    assert lim.vector_bits in (0, 128, 256, 512)


def test_a_stop_string_in_a_native_chunk_cuts_the_text_as_without_the_kernel(kernel, monkeypatch):
    from charloom.api import Model
    from charloom.text.tokenizers import CharTokenizer

    tok = CharTokenizer(list("abcdefghij "))
    torch.manual_seed(2)
    net = build_model(ModelConfig(model="lstm", layers=1, hidden=16, input="onehot", dropout=0.0), tok.vocab_size).eval()
    model = Model(net, tok, {"train": {}})
    with_kernel = model.generate("ab", length=300, seed=5, temperature=1.0, stop=["e"])
    monkeypatch.setenv("CHARLOOM_NATIVE", "0")
    without = model.generate("ab", length=300, seed=5, temperature=1.0, stop=["e"])
    assert str(with_kernel) == str(without) and with_kernel.tokens == without.tokens
    assert with_kernel.finish_reason == without.finish_reason == "stop"


@pytest.mark.parametrize("vocab", [20, 200])  # the head's scratch narrower and wider than the gates'
def test_threads_split_the_rows_and_draw_the_same_tokens(kernel, vocab):
    model = small("gru", "embedding", 2, vocab=vocab)
    rows, n = 37, 60  # uneven ranges: 37 rows over 2 and 3 threads
    stepper = make_stepper(model)
    nat = native.NativeStepper.create(stepper, rows)
    uniforms = np.random.default_rng(1).random((n, rows))
    temps = np.linspace(0.3, 2.0, rows).astype(np.float32)
    runs = []
    for threads in (1, 2, 3, 64):
        state = nat.from_torch(stepper.from_state(None, rows))
        logits = nat.step(np.arange(rows) % 20, state)
        runs.append((nat.sample(state, logits, uniforms, temps, feed_last=True, threads=threads), state, logits))
    for ids, state, logits in runs[1:]:
        assert np.array_equal(ids, runs[0][0])
        # Rows fall into different tiles per split: allow for last-bit differences in how each is compiled.
        np.testing.assert_allclose(state, runs[0][1], atol=1e-5)
        np.testing.assert_allclose(logits, runs[0][2], atol=1e-5)


def test_the_rational_tanh_in_the_kernel_is_the_one_the_fit_script_makes():
    # fastmath.h's coefficients come from tools/fit_tanh.py; refitting gives the same numbers and error.
    import importlib.util
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("fit_tanh", root / "tools" / "fit_tanh.py")
    fit_tanh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fit_tanh)
    p, q, _ = fit_tanh.fit()
    source = (root / "src" / "charloom" / "kernels" / "native" / "fastmath.h").read_text()
    # The two polynomials are macros that the scalar fast_tanh and the 512-bit tanh16 both expand.
    body = source[source.index("#define TANH_P(s)"):source.index("static inline float fast_tanh")]
    numbers = [float(n) for n in re.findall(r"([0-9.]+(?:e-?[0-9]+)?)f", body)]
    assert len(numbers) == 10
    kernel_p, kernel_q = np.array(numbers[4::-1]), np.array(numbers[:4:-1])  # Horner: highest degree first
    # Sixty reweighted least-squares rounds amplify the last bits of the LAPACK build: the refit agreed
    # to 1e-9 where it was written (AMD EPYC) and to 8e-5 on an Intel Xeon (2026-11-30), with the same error.
    np.testing.assert_allclose(kernel_p, p, rtol=1e-3)
    np.testing.assert_allclose(kernel_q, q, rtol=1e-3)
    assert fit_tanh.float32_error(kernel_p, kernel_q) < 5e-7 and fit_tanh.float32_error(p, q) < 5e-7


def test_several_rows_read_the_weights_as_panels(kernel):
    # A batch of more rows than a register tile holds reads every matrix in pack_panels' layout (tiles.h);
    # fewer rows read the row-major matrices. The step tests above (1-13 rows) check that both give the
    # network's logits.
    from charloom.kernels.native.stepper import panels

    stepper = make_stepper(small("lstm", "embedding", 2, tie=False))
    tile = native.limits().tile_rows  # more rows than one register tile: packed; up to one tile: not
    batch, few = native.NativeStepper.create(stepper, tile + 1), native.NativeStepper.create(stepper, tile)
    assert batch.net.w_hh_p[0] and batch.net.w_hh_p[1] and batch.net.w_ih_p[1] and batch.net.head_w_p
    assert not (few.net.w_hh_p[0] or few.net.head_w_p)
    w = np.arange(3 * 40, dtype=np.float32).reshape(3, 40)  # two whole panels of 16 columns, then 8
    expected = np.concatenate([w[:, :16].ravel(), w[:, 16:32].ravel(), w[:, 32:].ravel()])
    np.testing.assert_array_equal(panels(w), expected)
