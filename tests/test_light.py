"""charloom.generation.light: the common generation request without torch gives Model.generate's text."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import charloom
from charloom.cli.commands import main
from charloom.generation import light
from charloom.kernels import native

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler for the native kernel")
TEXT = "the quick brown fox jumps over the lazy dog; then it rests. " * 300


@pytest.fixture(scope="module", params=[dict(model="lstm", layers=1, hidden=48),
                                        dict(model="lstm", layers=2, hidden=32, input="onehot"),
                                        dict(model="gru", layers=1, hidden=40),
                                        dict(model="lstm", layers=1, hidden=40, input="onehot", generation_window=9)],
                ids=["lstm", "lstm2-onehot", "gru", "windowed"])
def run(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("light")
    (folder / "text.txt").write_text(TEXT)
    charloom.train(str(folder / "text.txt"), out=str(folder / "run"), max_steps=8, sample_temperatures=(),
                   progress=False, **request.param)
    return folder / "run"


def test_uniforms_are_torchs_in_pieces_of_any_size():
    for seed in (0, 7, 2**31 + 5, 2**40 + 3):
        expected = torch.rand(300, generator=torch.Generator().manual_seed(seed)).numpy().astype(np.float64)
        lane = light.Uniforms(seed)
        assert np.array_equal(np.concatenate([lane.take(n) for n in (1, 2, 4, 93, 200)]), expected)


def test_the_same_text_as_model_generate(run):
    model, fast = charloom.load(run), light.open_light(run)
    assert fast is not None
    for prompt, temps, n, seed in (("the ", [1.0], 1, 3), ("", [0.5], 1, 0), ("fox", [0.2, 0.5, 1.0, 1.2], 2, 11)):
        ids = light.encode_prompt(fast.tokenizer, prompt, fast.lowercase)
        texts = ["".join(parts) for parts in zip(*fast.samples(ids, temps, n, 150, seed))]
        full = model.generate(prompt, temperature=temps, num_samples=n, length=150, seed=seed)
        full = full if isinstance(full, list) else [full]
        assert texts == [str(c) for c in full]


def _cli(*argv):
    import io

    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_the_cli_answers_plain_requests_without_torch_and_the_same_as_the_full_path(run):
    args = [str(run), "--prompt", "the ", "--length", "120", "--seed", "4", "--temperature", "0.5,1.0", "--num-samples", "2"]
    script = ("import io, sys\nfrom charloom.cli.commands import main\nout = io.StringIO()\n"
              f"code = main(['generate', *{args!r}], stdout=out)\n"
              "print(code, 'torch' in sys.modules)\nprint(out.getvalue(), end='')")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    status, text = done.stdout.split("\n", 1)
    assert status == "0 False", done.stderr
    # --max-time makes the request one the light path leaves to the full path: the same text.
    assert _cli("generate", *args, "--max-time", "60") == (0, text, "")
    code, one, _ = _cli("generate", str(run), "--prompt", "fox", "--length", "80", "--seed", "2")
    assert code == 0 and one == "fox" + str(charloom.load(run).generate("fox", length=80, seed=2)) + "\n"


def test_requests_it_cannot_answer_go_the_full_way(run, monkeypatch):
    calls = []
    real = light.open_light
    monkeypatch.setattr(light, "open_light", lambda *a: calls.append(a) or real(*a))
    code, out, _ = _cli("generate", str(run), "--top-k", "3", "--length", "20", "--seed", "1")
    assert code == 0 and len(out) == 21 and calls == []  # top-k: the full path, not asked of light
    assert charloom.load(run, cache=True).net.cache is not None
    _cli("generate", str(run), "--cache", "--length", "5")
    assert calls == []
    # A prompt with unknown characters fails the same way on the light path.
    code, out, err = _cli("generate", str(run), "--prompt", "Zebra€", "--length", "5")
    assert calls and code == 2 and out == "" and err.startswith("charloom: prompt:") and err.count("\n") == 1


def test_a_checkpoint_whose_weights_do_not_match_its_config_is_refused(run, tmp_path):
    import shutil

    from charloom.checkpoint import MANIFEST_FILE, resolve
    from charloom.files import sha256_of

    ckpt = tmp_path / "ckpt"
    shutil.copytree(resolve(run), ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["model"]["hidden"] += 8  # shapes no longer match the safetensors file; manifest rehashed
    (ckpt / "config.json").write_text(json.dumps(config))
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    manifest["files"]["config.json"] = sha256_of(ckpt / "config.json")
    (ckpt / MANIFEST_FILE).write_text(json.dumps(manifest))
    code, out, err = _cli("generate", str(ckpt), "--length", "5")
    assert code == 3 and out == "" and "weights do not fit the model in config.json" in err and err.count("\n") == 1


def test_requests_the_full_path_would_refuse_are_refused_not_run(run):
    code, out, err = _cli("generate", str(run), "--length", str(10**12), "--seed", "1")
    assert code == 2 and out == "" and err.startswith("charloom: --length:") and err.count("\n") == 1
    code, out, err = _cli("generate", str(run), "--length", "5", "--seed", str(2**70))
    assert code == 2 and err.startswith("charloom: --seed:")
