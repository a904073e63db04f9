"""The GPU side: the benchmark script (checked on the CPU), and CUDA tests that run where a GPU is present."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import charloom
from tests.conftest import REPO
from tests.test_distributed import SETTINGS, _flags, assert_same_weights, torchrun, weights

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.slow
def test_gpu_benchmark_script_runs_end_to_end_in_smoke_mode(tmp_path, tiny_file):
    """benchmarks/gpu.py gets one try on a lent GPU: its whole path runs here, on the CPU, first."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--smoke", "--corpus", str(tiny_file),
                           "--results", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout)
    assert doc == json.loads((tmp_path / "gpu-smoke.json").read_text(encoding="utf-8"))
    assert [run["budget_s"] for run in doc["runs"]] == [4.0, 8.0]
    for run in doc["runs"]:
        assert run["steps"] > 0 and 0 < run["val_nats"] < 4 and run["stop_reason"] == "reached max time"
    assert doc["generation"]["cpu_1_rows_chars_per_s"] > 0
    assert "| 8 s |" in (tmp_path / "gpu-smoke.md").read_text(encoding="utf-8")


@cuda
def test_cuda_run_with_bf16_loads_and_generates_on_the_cpu(tmp_path, tiny_file):
    model = charloom.train(tiny_file, out=tmp_path / "run", batch_size=8, max_steps=20, eval_every=10,
                           **{**SETTINGS, "device": "cuda"})
    assert next(model.net.parameters()).device.type == "cuda"
    assert len(model.generate("the ", length=40, temperature=0.7, seed=1)) == 40  # generation on the GPU
    cpu = charloom.load(tmp_path / "run", which="last")
    assert next(cpu.net.parameters()).device.type == "cpu"
    assert len(cpu.generate("the ", length=40, temperature=0.7, seed=1)) == 40
    idx = torch.randint(0, model.net.vocab_size, (2, 50))
    with torch.inference_mode():
        on_gpu, _ = model.net.eval()(idx.cuda())
        on_cpu, _ = cpu.net(idx)
    assert torch.allclose(on_gpu.cpu(), on_cpu, atol=1e-2)  # TF32 matmuls on the GPU
    assert cpu.evaluate(exact=False).loss == pytest.approx(model.history[-1]["val_loss"], rel=5e-3)


@cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_with_nccl_match_one_gpu(tmp_path, tiny_file):
    settings = dict(batch_size=8, max_steps=6, eval_every=3, **{**SETTINGS, "device": "cuda", "precision": "fp32"})
    charloom.train(tiny_file, out=tmp_path / "one", **settings)
    torchrun(2, "train", str(tiny_file), "--out", str(tmp_path / "two"), "--quiet", *_flags(settings), cwd=tmp_path)
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"), atol=1e-4)  # cuDNN sums in its own order


@pytest.mark.slow
def test_compiled_training_step_learns_like_the_eager_one(tmp_path, tiny_file):
    settings = dict(batch_size=8, max_steps=6, eval_every=6, **SETTINGS)
    charloom.train(tiny_file, out=tmp_path / "eager", **settings)
    compiled = charloom.train(tiny_file, out=tmp_path / "compiled", compile=True, **settings)
    assert compiled.train_config.compile
    # Inductor fuses and reorders float work, so equal to float tolerance, not bit for bit.
    assert_same_weights(weights(tmp_path / "eager"), weights(tmp_path / "compiled"), atol=1e-4)
