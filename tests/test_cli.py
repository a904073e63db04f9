"""The CLI as users meet it: bad inputs, --help, both recipes end to end, Ctrl-C and resume."""

import io
import json
import signal
import time
from dataclasses import fields

import pytest

from charloom.checkpoint import RunDir
from charloom.cli.commands import main
from charloom.config import ModelConfig, TrainConfig, field_flag
from tests.conftest import TINY_SETTINGS, run_cli

TINY_FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_SETTINGS.items()]


def cli(*args):
    out, err = io.StringIO(), io.StringIO()
    code = main(list(args), out, err)
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code, err, *needles, exit_code=2):
    assert code == exit_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("charloom"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*"))


@pytest.mark.parametrize("name, content, needle", [
    ("missing.txt", None, "no such file"),
    ("emptydir", "dir", "no .txt files"),
    ("e.txt", b"", "empty"),
    ("s.txt", b"too short", "too short"),
    ("b.txt", bytes(range(256)) * 4, "binary"),
    ("u.txt", b"abc \xc3\x28 def" * 100, "byte offset 4"),
])
def test_bad_corpus_one_line_exit_2_nothing_written(in_tmp, name, content, needle):
    path = in_tmp / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    before = _files(in_tmp)
    code, _, err = cli("train", str(path), *TINY_FLAGS)
    assert_one_line_error(code, err, needle, str(path.name))
    assert _files(in_tmp) == before


@pytest.mark.parametrize("args, needle", [
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--length", "0"], "--length"),
    (["--length", "-5"], "--length"),
    (["--top-p", "0"], "--top-p"),
    (["--prompt", "zebra€"], "never saw"),
    (["--unknown", "bogus"], "--unknown"),
])
def test_bad_generate_arguments(tiny_run, args, needle):
    code, out, err = cli("generate", str(tiny_run), *args)
    assert_one_line_error(code, err, needle)
    assert out == ""


def test_unknown_prompt_chars_are_listed_with_the_alphabet(tiny_run):
    code, _, err = cli("generate", str(tiny_run), "--prompt", "the €uro")
    assert_one_line_error(code, err, "'€'", "the model knows", "--unknown")
    code, out, _ = cli("generate", str(tiny_run), "--prompt", "the €uro", "--unknown", "skip", "--length", "5", "--seed", "1")
    assert code == 0 and out.startswith("the €uro")


def test_bad_train_settings(in_tmp, tiny_file):
    code, _, err = cli("train", str(tiny_file), "--hidden", "0")
    assert_one_line_error(code, err, "--hidden")
    code, _, err = cli("train", str(tiny_file), "--max-time", "soon")
    assert_one_line_error(code, err, "max-time")
    code, _, err = cli("train", str(tiny_file), "--recipe", "magic")
    assert_one_line_error(code, err, "recipe")
    code, _, err = cli("train", str(tiny_file), "--ema", "1")
    assert_one_line_error(code, err, "--ema")
    assert not (in_tmp / "runs").exists()


def test_train_names_the_kernel_once_in_its_log(in_tmp, tiny_file):
    from charloom.kernels import native

    code, out, err = cli("train", str(tiny_file), *TINY_FLAGS, "--out", "run")
    assert code == 0 and err == "", err  # stderr is for errors: one line each
    assert out.startswith(f"charloom: recurrent models run on {native.describe()}\n") and "step 12" in out
    assert out.count("recurrent models run on") == 1
    code, out, err = cli("train", str(tiny_file), *TINY_FLAGS, "--out", "quiet", "--quiet")
    assert code == 0 and err == "" and out == "quiet\n"


def test_the_announcing_stream_lets_the_progress_bar_clear_itself():
    from tqdm import tqdm

    from charloom.cli.commands import Announcing

    def written(through_proxy):
        buf, announced = io.StringIO(), []
        bar = tqdm(total=10, file=buf, disable=False, leave=False, bar_format="{n}/{total}")
        bar.update(3)
        target = Announcing(buf, lambda: announced.append(1)) if through_proxy else buf
        bar.write("step 3 | train 1.0", file=target)
        bar.write("step 6 | train 0.9", file=target)
        bar.close()
        return buf.getvalue(), announced

    via_proxy, announced = written(True)
    assert announced == [1] and via_proxy.count("step ") == 2
    assert via_proxy == written(False)[0]  # cleared and redrawn around each line exactly as without the proxy


def test_damaged_checkpoint_exits_3(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "index.json").write_text("{broken")
    code, _, err = cli("generate", str(tmp_path))
    assert_one_line_error(code, err, "index.json", exit_code=3)


def test_help_documents_every_option_with_its_default():
    from charloom.cli.commands import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for command in ("train", "generate", "evaluate"):
        actions = {opt: a for a in sub.choices[command]._actions for opt in a.option_strings}
        for opt, action in actions.items():
            if opt in ("-h", "--help") or action.nargs == 0 and action.const is True:
                continue  # flags without a value (--quiet, --json...) need no default
            # a setting the size preset decides shows its rule ("auto: ...") instead of a default
            assert action.help and ("default" in action.help or "(auto: " in action.help), (command, opt)
    train_opts = {opt for a in sub.choices["train"]._actions for opt in a.option_strings}
    for f in fields(ModelConfig) + fields(TrainConfig):
        assert field_flag(f) in train_opts, f.name
    code, out, err = cli("train", "--help")  # printed to main's stdout, exit 0
    assert code == 0 and "--max-time DURATION" in out and not err


def test_same_seed_same_text(tiny_run):
    runs = [cli("generate", str(tiny_run), "--prompt", "the ", "--temperature", "0.5", "--length", "80", "--seed", "1")
            for _ in range(2)]
    assert runs[0][0] == 0 and runs[0][1] == runs[1][1] and runs[0][1].startswith("the ")
    other = cli("generate", str(tiny_run), "--prompt", "the ", "--temperature", "0.5", "--length", "80", "--seed", "2")
    assert other[1] != runs[0][1]


def test_several_temperatures_are_labelled(tiny_run):
    code, out, _ = cli("generate", str(tiny_run), "--prompt", "a ", "--temperature", "0.2,0.5,1.0,1.2", "--length", "30", "--seed", "4")
    assert code == 0
    assert [line.split("|")[0].strip() for line in out.splitlines() if line.startswith("---")] == [
        "--- temperature 0.2", "--- temperature 0.5", "--- temperature 1.0", "--- temperature 1.2"]
    # each labelled sample is the text that temperature gives alone with the same seed
    solo = cli("generate", str(tiny_run), "--prompt", "a ", "--temperature", "1.0", "--length", "30", "--seed", "4")[1]
    assert solo.rstrip("\n") in out


def test_evaluate_validation_and_file(tiny_run, tiny_file):
    code, out, _ = cli("evaluate", str(tiny_run), "--json")
    data = json.loads(out)
    assert code == 0 and data["split"] == "validation" and data["bits_per_char"] > 0
    assert abs(data["bits_per_char"] - data["loss"] / 0.6931471805599453) < 1e-9  # chars == tokens here
    code, out, _ = cli("evaluate", str(tiny_run), str(tiny_file), "--json")
    assert code == 0 and json.loads(out)["tokens"] == len(tiny_file.read_text()) - 1


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["default", "book"])
def test_end_to_end_subprocess(tmp_path, tiny_file, recipe):
    out = tmp_path / "run"
    flags = TINY_FLAGS if recipe == "default" else ["--max-steps=8", "--eval-every=4", "--sample-length=30", "--threads=1"]
    proc = run_cli("train", str(tiny_file), "--recipe", recipe, "--out", str(out), *flags, "--epochs", "1", "--sample-length=30")
    assert proc.returncode == 0, proc.stderr
    assert "val" in proc.stdout and "bpc" in proc.stdout and "--- temperature 1.2" in proc.stdout
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["temperature"] for s in samples[:4]] == [0.2, 0.5, 1.0, 1.2]
    assert len({s["seed_text"] for s in samples[:4]}) == 1 and all(len(s["text"]) == 30 for s in samples)
    gen = run_cli("generate", str(out), "--prompt", "the quick ", "--temperature", "0.5", "--length", "40", "--seed", "1")
    assert gen.returncode == 0 and gen.stdout.startswith("the quick ") and len(gen.stdout) == len("the quick ") + 41
    config = json.loads((RunDir(out).checkpoints / RunDir(out).index()["last"] / "config.json").read_text())
    if recipe == "book":
        assert config["model"]["input"] == "onehot" and config["model"]["hidden"] == 128
        assert config["train"]["optimizer"] == "rmsprop" and config["train"]["generation_window"] == 60
        assert config["corpus"]["lowercase"] is True


@pytest.mark.slow
def test_ctrl_c_saves_then_resume_continues(tmp_path, tiny_file):
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    args = [sys.executable, "-m", "charloom", "train", str(tiny_file), "--out", str(out), "--hidden=32", "--layers=1",
            "--seq-len=32", "--batch-size=8", "--max-steps=100000", "--eval-every=5", "--sample-temperatures=", "--threads=1"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "metrics.csv").exists():
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "resume with: charloom train --resume" in stderr and "Traceback" not in stderr
    index = RunDir(out).index()
    stopped_at = int(index["last"].split("-")[1])
    assert stopped_at >= 5
    resumed = run_cli("train", "--resume", str(out), "--max-steps", str(stopped_at + 10), "--threads=1")
    assert resumed.returncode == 0, resumed.stderr
    steps = [int(line.split(",")[0]) for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == sorted(steps) and steps[-1] == stopped_at + 10  # the step counter continued, not restarted
    config = json.loads((RunDir(out).checkpoints / RunDir(out).index()["last"] / "config.json").read_text())
    assert config["step"] == stopped_at + 10


def test_resume_refuses_changing_the_model(tiny_run):
    code, _, err = cli("train", "--resume", str(tiny_run), "--hidden", "64")
    assert_one_line_error(code, err, "--hidden", "cannot change")
