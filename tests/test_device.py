"""``--device`` on generate, evaluate and serve, and ``charloom.load(device=...)``: the parameters land on
the device asked for; ``auto`` is what this machine has; a device it lacks is a one-line error, exit 2;
any device but the CPU takes generate through torch, around the torch-free path."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

import charloom
from charloom.cli.commands import main
from charloom.errors import CharloomError

HAS_CUDA = torch.cuda.is_available()
MPS = getattr(torch.backends, "mps", None)
HAS_MPS = bool(MPS is not None and MPS.is_available())
AUTO = "cuda" if HAS_CUDA else "mps" if HAS_MPS else "cpu"  # what auto must pick, in its documented order


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("device, kind", [("cpu", "cpu"), ("auto", AUTO)])
def test_load_puts_every_parameter_on_the_device_asked_for(tiny_run: Path, device: str, kind: str):
    model = charloom.load(tiny_run, device=device)
    assert {p.device.type for p in model.net.parameters()} == {kind}
    dist = model.next_token_distribution("the ")
    assert sum(dist.probs) == pytest.approx(1.0, abs=1e-4)
    assert next(charloom.load(tiny_run).net.parameters()).device.type == "cpu"  # the default stays the CPU


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a CUDA GPU")
def test_a_missing_gpu_is_refused_before_anything_is_read(tmp_path: Path):
    with pytest.raises(CharloomError, match="cuda requested but"):
        charloom.load(tmp_path / "no-such-run", device="cuda")  # the device is checked first


@pytest.mark.parametrize("command", [["generate", "--prompt", "the "], ["evaluate"], ["serve", "--port", "0"]])
@pytest.mark.parametrize("device, why", [
    pytest.param("cuda", "cuda requested but", marks=pytest.mark.skipif(HAS_CUDA, reason="this machine has a CUDA GPU")),
    pytest.param("cuda:7", "", marks=pytest.mark.skipif(torch.cuda.device_count() > 7, reason="eight GPUs here")),
    pytest.param("mps", "mps requested but", marks=pytest.mark.skipif(HAS_MPS, reason="this machine has MPS")),
    ("gpu", "unknown device 'gpu'"),
])
def test_a_device_this_machine_lacks_is_one_line_and_exit_2(tiny_run: Path, command: list[str], device: str, why: str):
    code, out, err = cli(command[0], str(tiny_run), *command[1:], "--device", device)
    assert code == 2 and out == ""
    assert err.startswith("charloom: --device: ") and why in err and err.count("\n") == 1


def test_generate_on_another_device_goes_around_the_torch_free_path(tiny_run: Path, monkeypatch: pytest.MonkeyPatch):
    from charloom.generation import light

    args = ("generate", str(tiny_run), "--prompt", "the ", "--length", "60", "--seed", "3", "--temperature", "0.7")
    code, plain, err = cli(*args)  # the CPU's torch-free path, as before the option existed
    assert code == 0, err
    opened = []
    real = light.open_light
    monkeypatch.setattr(light, "open_light", lambda *a, **k: opened.append(a) or real(*a, **k))
    assert cli(*args, "--device", "cpu")[1] == plain and len(opened) == 1
    code, auto, err = cli(*args, "--device", "auto")
    assert code == 0, err
    assert len(opened) == 1  # not asked again: auto loads through torch
    expected = charloom.load(tiny_run).generate("the ", length=60, seed=3, temperature=0.7).text
    assert plain == auto == "the " + expected + "\n"


def test_evaluate_and_serve_take_the_device(tiny_run: Path, monkeypatch: pytest.MonkeyPatch):
    import gc

    import uvicorn

    from charloom.server import app as server

    assert cli("evaluate", str(tiny_run), "--json", "--device", "auto")[1] == cli("evaluate", str(tiny_run), "--json")[1]
    served, socks = [], []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: socks.extend(sockets))
    real = server.create_app
    monkeypatch.setattr(server, "create_app", lambda models, *a: served.append(models) or real(models, *a))
    try:
        assert cli("serve", str(tiny_run), "--port", "0", "--device", "auto")[0] == 0
    finally:
        gc.unfreeze()
        for sock in socks:
            sock.close()
    assert {p.device.type for p in served[0]["run"].net.parameters()} == {AUTO}


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_a_gpu_model_generates_and_scores_as_the_cpu_one(tiny_run: Path):
    cpu, gpu = charloom.load(tiny_run), charloom.load(tiny_run, device="cuda")
    assert {p.device.type for p in gpu.net.parameters()} == {"cuda"}
    assert gpu.evaluate("the quick brown fox jumps").loss == pytest.approx(cpu.evaluate("the quick brown fox jumps").loss, abs=1e-3)
    assert gpu.next_token_distribution("the ").probs == pytest.approx(cpu.next_token_distribution("the ").probs, abs=1e-4)
    assert len(gpu.generate("the ", length=20, seed=1, temperature=0.5).tokens) == 20
