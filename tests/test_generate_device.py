"""Generation with the model on a device other than the CPU, tested on a machine that has none.

:class:`FakeGPU` (a ``TorchFunctionMode``) plays a CUDA device on the CPU: a tensor made with
``device="cuda"``, moved there with ``.to``/``.cuda``, or computed from such tensors is computed on the
CPU but tagged ``cuda:0`` (``tensor.device`` says so), and every op refuses what CUDA refuses: tensors
of two devices in one op (a 0-dim CPU tensor excepted, as on CUDA), and ``.numpy()`` of a GPU tensor.
A model whose weights are tagged is "on the GPU", so ``next(net.parameters()).device`` is ``cuda:0`` and
generation takes its non-CPU paths; the arithmetic is the CPU's, so the text must equal the CPU's torch
path exactly. With ``float64=False`` it plays an MPS device, which has no float64.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from charloom.api import Model
from charloom.config import ModelConfig
from charloom.generation import engine
from charloom.generation import processors as sampling
from charloom.generation.noise import Noise
from charloom.kernels import choice
from charloom.kernels.choice import Stepping
from charloom.models import build_model
from charloom.text.tokenizers import CharTokenizer
from tests.conftest import LETTERS

CPU = torch.device("cpu")
MOVES = ("to", "cpu", "cuda", "copy_")  # ops whose job is to cross devices


def _device(d: object) -> torch.device:
    d = torch.device(d)  # type: ignore[arg-type]
    return torch.device(d.type, 0) if d.type != "cpu" and d.index is None else d


def placed(t: torch.Tensor) -> torch.device:
    """Where the fake says ``t`` is (an untagged tensor is on the CPU)."""
    return getattr(t, "_fake_device", CPU)


def _tensors(obj: object) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


class FakeGPU(TorchFunctionMode):
    """A CUDA device (``kind="cuda"``) or an MPS one (``kind="mps"``: no float64) played on the CPU."""

    def __init__(self, kind: str = "cuda") -> None:
        super().__init__()
        self.gpu = _device(kind)
        self.float64 = kind != "mps"

    def place(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module.to(gpu)``: tag its weights and buffers."""
        for t in [*module.parameters(), *module.buffers()]:
            t._fake_device = self.gpu
        return module

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a property: only `device` is played
            return placed(args[0]) if func.__self__.__name__ == "device" else func(*args, **kwargs)
        if name in ("to", "cpu", "cuda") and isinstance(args[0], torch.Tensor):
            return self._move(name, args[0], args[1:], kwargs)
        if name == "numpy" and placed(args[0]) != CPU:
            raise TypeError(f"can't convert {placed(args[0])} device type tensor to numpy")
        target = None
        if kwargs.get("device") is not None:  # a factory: made on the CPU, tagged where it was asked for
            target, kwargs["device"] = _device(kwargs["device"]), CPU
        checked = _tensors((args, kwargs))
        if name in ("__getitem__", "__setitem__"):
            # Index tensors may be on the CPU ("indices should be either on cpu or on the same device"); a
            # value written through basic indexing is copied across devices.
            keys = _tensors(args[1:2])
            checked = [t for t in checked if not any(t is k for k in keys) or placed(t) != CPU]
            if name == "__setitem__" and not keys:
                checked = checked[:1]
        if name not in MOVES:
            devices = {placed(t) for t in checked if t.dim() > 0 or placed(t) != CPU}
            if len(devices) > 1:
                raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                                   f"{' and '.join(map(str, sorted(devices, key=str)))}! ({name})")
        if target is None:
            on = [placed(t) for t in _tensors((args, kwargs)) if placed(t) != CPU]
            target = placed(args[0]) if name == "copy_" else (on[0] if on else CPU)
        out = func(*args, **kwargs)
        for t in _tensors(out):
            if t.dtype == torch.float64 and target != CPU and not self.float64:
                raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support float64")
            t._fake_device = target
        return out

    def _move(self, name: str, t: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        if name == "to":
            device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        else:
            device, dtype = (CPU if name == "cpu" else self.gpu), None
        target = placed(t) if device is None else _device(device)
        out = t.to(dtype) if dtype is not None else t
        if target != placed(t):
            out = out.clone()  # a copy on the other device
        if out.dtype == torch.float64 and target != CPU and not self.float64:
            raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support float64")
        out._fake_device = target
        return out


def test_the_fake_gpu_refuses_what_a_gpu_refuses():
    with FakeGPU() as gpu:
        a = torch.ones(3, device="cuda")
        assert a.device == torch.device("cuda", 0) and (a + torch.tensor(2.0)).device == a.device
        with pytest.raises(RuntimeError, match="same device"):
            a + torch.ones(3)
        with pytest.raises(RuntimeError, match="same device"):
            a.index_select(0, torch.tensor([0, 1]))
        assert a[torch.tensor([0, 1])].device == a.device  # CPU indices are allowed, as on CUDA
        with pytest.raises(TypeError, match="numpy"):
            a.numpy()
        a[:2] = torch.zeros(2)  # basic indexing copies across devices, as on CUDA
        assert a.cpu().numpy().tolist() == [0, 0, 1] and a.to(CPU).device == CPU and torch.zeros_like(a).device == a.device
        net = gpu.place(torch.nn.Linear(2, 2))
        assert next(net.parameters()).device == a.device and net(torch.ones(1, 2, device=a.device)).device == a.device
    with FakeGPU("mps"):
        with pytest.raises(TypeError, match="float64"):
            torch.ones(2, device="mps").double()


# -- whole runs: the same text as the CPU's torch path --------------------------------------------

ARCHS = {
    "lstm": dict(model="lstm", input="onehot", layers=2),
    "gru": dict(model="gru", layers=1),
    "mogrifier": dict(model="mogrifier", input="onehot", layers=1),
    "conv": dict(model="conv", layers=2),
    "transformer": dict(model="transformer", layers=1, embedding_dim=24),
    "cached lstm": dict(model="lstm", layers=1, cache_size=40),
}


def api(arch: str, window: int = 0) -> Model:
    torch.manual_seed(0)
    cfg = ModelConfig(**{"hidden": 24, "embedding_dim": 8, "dropout": 0.0, **ARCHS[arch]})
    return Model(build_model(cfg, 27).eval(), CharTokenizer(list(LETTERS + " ")), {"train": {"generation_window": window}})


@pytest.fixture()
def cpu_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU's torch stepper for the reference texts (the native and NumPy steppers round differently)."""
    monkeypatch.setattr(engine, "generation_stepper", lambda *a, **k: Stepping("torch"))


def both(model: Model, run, kind: str = "cuda"):
    """``run(model)`` on the CPU, then with the model on the fake GPU."""
    expected = run(model)
    with FakeGPU(kind) as gpu:
        gpu.place(model.net)
        got = run(model)
    return expected, got


@pytest.mark.parametrize("window", [0, 6])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_architecture_generates_on_the_gpu_the_cpu_text(cpu_torch, arch: str, window: int):
    if window and arch == "cached lstm":
        pytest.skip("a continuous cache carries its state; it reads no window")
    model = api(arch, window)
    expected, got = both(model, lambda m: m.generate("the ", length=40, temperature=[0.5, 1.0, 0.0], num_samples=2, seed=4))
    assert [c.text for c in got] == [c.text for c in expected]
    assert [c.tokens for c in got] == [c.tokens for c in expected]


OPTIONS = [dict(repetition_penalty=1.3), dict(frequency_penalty=0.5, presence_penalty=0.4, penalty_last_n=8),
           dict(no_repeat_ngram_size=2), dict(ban=["e", "th"]), dict(logit_bias=(("e", 2.0), ("x", -3.0))),
           dict(top_k=5), dict(top_p=0.8), dict(min_p=0.1), dict(typical_p=0.7),
           dict(temperature_schedule="0.3,1.2"), dict(temperature_schedule="1.5:0"), dict(stop=["ee"]),
           dict(logprobs=3)]


@pytest.mark.parametrize("kind", ["cuda", "mps"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o))
def test_every_sampling_option_runs_on_the_gpu_and_gives_the_cpu_text(cpu_torch, options: dict, kind: str):
    model = api("lstm")
    run = lambda m: m.generate("the ", length=50, temperature=[0.7, 1.3], seed=9, **options)  # noqa: E731
    expected, got = both(model, run, kind)
    assert [c.text for c in got] == [c.text for c in expected]
    assert [c.finish_reason for c in got] == [c.finish_reason for c in expected]
    if "logprobs" in options:
        for g, e in zip(got, expected):
            assert g.token_logprobs == pytest.approx(e.token_logprobs) and g.top_logprobs == e.top_logprobs


@pytest.mark.parametrize("kind", ["cuda", "mps"])
def test_streams_beams_and_distributions_run_on_the_gpu(cpu_torch, kind: str):
    model = api("lstm")
    expected, got = both(model, lambda m: "".join(m.stream("a ", length=30, seed=2, temperature=0.8)), kind)
    assert got == expected
    expected, got = both(model, lambda m: m.generate("a ", length=12, num_beams=3, logprobs=0), kind)
    assert [(c.text, c.logprob) for c in got] == [(c.text, pytest.approx(c.logprob)) for c in expected]
    expected, got = both(model, lambda m: m.next_token_distribution("ab", temperature=0.5, top_k=4), kind)
    assert got.reweighted == pytest.approx(expected.reweighted) and got.probs == pytest.approx(expected.probs)


def test_generation_on_the_gpu_never_takes_the_cpu_steppers(monkeypatch: pytest.MonkeyPatch):
    """The native and NumPy steppers read the weights as CPU memory: a GPU model must not reach them,
    whatever size the choice of stepper would take them for."""
    assert choice.generation_stepper(10, 1, native_runs=True, on_cpu=False) == Stepping("torch")
    made: list[str] = []
    for name in ("NativeStepper", "NumpyStepper"):
        real = getattr(engine, name)
        spy = type(name, (real,), {"__init__": lambda self, *a, real=real, name=name: made.append(name) or real.__init__(self, *a)})
        monkeypatch.setattr(engine, name, spy)
    for window in (0, 4):
        model = api("lstm", window)
        with FakeGPU() as gpu:
            gpu.place(model.net)
            assert len(model.generate("the ", length=20, seed=1).tokens) == 20
        assert made == []
    assert len(api("lstm").generate("the ", length=20, seed=1).tokens) == 20 and made  # on the CPU they are used


def test_every_processor_keeps_the_logits_device():
    """Each processor alone on GPU logits and history: what it builds lives there, and so does its output."""
    history = torch.tensor([[1, 2, 3, 1, 2], [4, 4, 5, 6, 4]])
    logits = torch.randn(2, 26, generator=torch.Generator().manual_seed(0))
    processors = [sampling.temperature([0.5, 0.0]), sampling.temperature(2.0), sampling.top_k(3), sampling.top_p(0.5),
                  sampling.min_p(0.2), sampling.typical_p(0.5), sampling.repetition_penalty(1.5, 3),
                  sampling.frequency_presence_penalty(0.5, 0.5), sampling.no_repeat_ngram(2),
                  sampling.ban_sequences([[2], [1, 2, 3]]), sampling.ban([0, 25]), sampling.logit_bias({3: 1.5}, 26),
                  sampling.Temperature(1.0, sampling.schedule_fn("cycle", [0.5, 0.0], 4), 3)]
    expected = [p(history, logits) for p in processors]
    with FakeGPU() as gpu:
        h, x = history.to(gpu.gpu), logits.to(gpu.gpu)
        for proc, want in zip(processors, expected):
            out = proc(h, x)
            assert out.device == gpu.gpu and torch.equal(out.cpu(), want)
        uniforms = next(Noise([5]).rows(torch.tensor([0, 0])))  # drawn on the CPU: a seed is a seed everywhere
        ids = engine.draw(x, uniforms)
        assert ids.device == gpu.gpu and torch.equal(ids.cpu(), engine.draw(logits, uniforms))


def test_scoring_runs_on_the_gpu():
    model = api("gru")
    expected, got = both(model, lambda m: m.evaluate("the quick brown fox jumps over the lazy dog " * 3).loss)
    assert got == pytest.approx(expected)


# -- a real device, where this machine has one ----------------------------------------------------

MPS = getattr(torch.backends, "mps", None)
REAL = [pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
        pytest.param("mps", marks=pytest.mark.skipif(not (MPS is not None and MPS.is_available()), reason="needs MPS"))]


@pytest.mark.parametrize("device", REAL)
def test_a_real_gpu_gives_the_cpu_text(cpu_torch, device: str):
    """The fake's promise on the real thing: the same seed gives the same text, whatever the options
    (up to the device's float rounding, which moves a draw only when its uniform lands within ~1e-6 of a
    boundary of the CDF)."""
    cpu, gpu = api("lstm"), api("lstm")
    gpu.net.to(device)
    for options in [{}, *OPTIONS]:
        run = dict(length=50, temperature=[0.7, 1.3], seed=9, **options)
        expected, got = cpu.generate("the ", **run), gpu.generate("the ", **run)
        assert [c.text for c in got] == [c.text for c in expected], options
        if "logprobs" in options:
            assert got[0].token_logprobs == pytest.approx(expected[0].token_logprobs, abs=1e-4)
    beams = dict(length=12, num_beams=3)
    assert [c.text for c in gpu.generate("a ", **beams)] == [c.text for c in cpu.generate("a ", **beams)]
    assert "".join(gpu.stream("a ", length=30, seed=2)) == "".join(cpu.stream("a ", length=30, seed=2))
