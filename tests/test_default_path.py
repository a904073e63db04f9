"""A model made by the default recipe generates, by default, on the native kernel's whole-run draws."""

import pytest

import charloom
from charloom.generation import engine as generate
from charloom.kernels import native


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("default")
    text = folder / "text.txt"
    text.write_text("a short text to learn from, read again and again. " * 400)
    charloom.train(str(text), out=str(folder / "run"), max_steps=3, sample_temperatures=(), progress=False)
    return folder / "run"


def _paths(monkeypatch):
    """Record which generation loop ran: the native kernel's whole runs, the per-step loop outside
    torch (native or NumPy step), or torch."""
    ran = []
    for name in ("_native_runs", "_numpy_steps", "_torch_steps"):
        real = getattr(generate, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            ran.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(generate, name, spy)
    return ran


@pytest.mark.skipif(native.library() is None, reason="no C compiler for the native kernel")
def test_default_generation_runs_on_the_native_kernel(default_run, monkeypatch):
    model = charloom.load(default_run)
    assert model.net.cache is None  # the continuous cache is a test-time option, off by default
    ran = _paths(monkeypatch)
    model.generate("the ", length=50, seed=1)  # default temperature 1.0: an empty pipeline
    assert ran == ["_numpy_steps", "_native_runs"]
    ran.clear()
    "".join(model.stream("the ", length=50, temperature=0.5, seed=1))
    assert ran == ["_numpy_steps", "_native_runs"]
    ran.clear()
    model.generate("the ", length=20, temperature=[0.2, 1.0], num_samples=3, seed=1)
    assert ran == ["_numpy_steps", "_native_runs"]


def test_a_cache_is_added_on_request_and_still_predicts(default_run, monkeypatch):
    plain, cached = charloom.load(default_run), charloom.load(default_run, cache=True)
    assert plain.net.cache is None and cached.net.cache is not None
    assert charloom.load(default_run, cache=False).net.cache is None
    ran = _paths(monkeypatch)
    text = cached.generate("the ", length=30, seed=1)
    assert ran == ["_torch_steps"] and len(text) == 30  # the native loop knows no cache: torch steps it
    # Scores differ from the network's once the cache holds entries, and both are finite.
    sample = "a short text to learn from, read again and again. " * 20
    a, b = plain.evaluate(sample), cached.evaluate(sample)
    assert a.bits_per_char != b.bits_per_char and b.bits_per_char < 20


def test_a_transformer_refuses_a_cache(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("abcdefgh " * 300)
    charloom.train(str(text), out=str(tmp_path / "run"), model="transformer", max_steps=1, hidden=32, layers=1,
                   heads=2, sample_temperatures=(), progress=False)
    with pytest.raises(charloom.CharloomError, match="--cache"):
        charloom.load(tmp_path / "run", cache=True)
