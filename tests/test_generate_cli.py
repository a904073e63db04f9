"""`charloom generate`: every option reaches the model, JSON lines, interactive mode, any console."""

import io
import json
import math
import os
import shutil
from pathlib import Path

import pytest

from charloom.cli.commands import main
from tests.conftest import run_cli


def cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def test_jsonl_with_logprobs(tiny_run):
    code, out, err = cli("generate", str(tiny_run), "--prompt", "the ", "--length", "25", "--seed", "1",
                         "--temperature", "0.5,1.0", "--format", "jsonl", "--logprobs", "3", "--top-k", "10")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["temperature"] for r in records] == [0.5, 1.0]
    for r in records:
        assert r["prompt"] == "the " and r["finish_reason"] == "length" and len(r["text"]) == 25
        assert len(r["token_logprobs"]) == 25 and len(r["top_logprobs"]) == 25
        assert math.isclose(r["logprob"], sum(r["token_logprobs"]), abs_tol=1e-6)
        assert all(len(top) == 3 and max(top.values()) <= 0 for top in r["top_logprobs"])


def test_stop_string_is_never_printed_and_options_are_checked_first(tiny_run):
    code, out, _ = cli("generate", str(tiny_run), "--prompt", "the ", "--length", "300", "--seed", "2", "--stop", "o",
                       "--no-echo", "--repetition-penalty", "1.2", "--min-p", "0.05")
    assert code == 0 and "o" not in out
    for bad, flag in [(["--min-p", "2"], "--min-p"), (["--samplers", "top_k,nope"], "--samplers"),
                      (["--logprobs", "2"], "--logprobs"), (["--num-beams", "0"], "--num-beams"),
                      (["--temperature-schedule", "1,x"], "--temperature-schedule"), (["--logit-bias", "the=1"], "--logit-bias")]:
        code, out, err = cli("generate", str(tiny_run), *bad)
        assert code == 2 and err.startswith(f"charloom: {flag}") and err.count("\n") == 1 and not out, (bad, err)


def test_beams_print_their_log_probabilities(tiny_run):
    code, out, err = cli("generate", str(tiny_run), "--prompt", "the ", "--length", "8", "--num-beams", "3")
    assert code == 0, err
    scores = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("--- beam")]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)


def test_interactive_loop_over_stdin(tiny_run):
    script = "the \n\n/temp 0.2\n/length 7\nquick\n/temp nope\n/reset\n/quit\n"
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "charloom", "generate", str(tiny_run), "--interactive", "--length", "12",
                           "--seed", "3"], input=script, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("> ")
    assert "(temperature 0.2)" in proc.stdout and "(length 7)" in proc.stdout and "(reset)" in proc.stdout
    assert "cannot read 'nope'" in proc.stdout
    generated = [chunk.rstrip("\n") for chunk in lines[1:3]]
    assert [len(g) for g in generated] == [12, 12]
    assert len(lines[5].rstrip("\n")) == 7  # after /temp and /length: the 'quick' turn


def test_a_console_that_cannot_print_a_character_does_not_crash(tiny_run):
    proc = run_cli("generate", str(tiny_run), "--prompt", "café ", "--unknown", "replace", "--length", "5",
                   env={"PYTHONIOENCODING": "ascii"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("caf\\xe9 ")


def test_help_lists_every_sampling_option():
    code, out, _ = cli("generate", "--help")
    assert code == 0
    for flag in ("--min-p", "--typical-p", "--repetition-penalty", "--frequency-penalty", "--presence-penalty",
                 "--penalty-last-n", "--no-repeat-ngram-size", "--ban", "--logit-bias", "--samplers",
                 "--temperature-schedule", "--stop", "--max-time", "--num-beams", "--format", "--logprobs", "--interactive"):
        assert flag in out, flag


@pytest.mark.parametrize("argv", [["--max-time", "0.5"], ["--ban", "e", "--ban", "th"], ["--temperature-schedule", "1.5:0.2"]])
def test_more_options_run(tiny_run, argv):
    code, out, err = cli("generate", str(tiny_run), "--prompt", "the ", "--length", "40", "--seed", "4", "--no-echo", *argv)
    assert code == 0, err
    if "--ban" in argv:
        assert "e" not in out and "th" not in out


class Terminal(io.StringIO):
    """A captured stream that says it is a terminal."""

    def isatty(self):
        return True


def test_the_kernel_line_goes_to_a_terminal_s_stderr_once_before_the_text(tiny_run):
    from charloom.kernels import native

    kernel = f"charloom: recurrent models run on {native.describe()}\n"
    for fmt in ("text", "jsonl"):
        out, err = io.StringIO(), Terminal()
        code = main(["generate", str(tiny_run), "--length", "10", "--seed", "1", "--format", fmt], out, err)
        assert code == 0 and err.getvalue() == kernel, err.getvalue()
        if fmt == "jsonl":
            assert [len(json.loads(line)["text"]) for line in out.getvalue().splitlines()] == [10]
    # a bad prompt still gets a one-line error: the line comes only once the text does
    out, err = io.StringIO(), Terminal()
    assert main(["generate", str(tiny_run), "--prompt", "zebra€"], out, err) == 2
    assert err.getvalue().count("\n") == 1 and "never saw" in err.getvalue() and not out.getvalue()
    # piped or captured, stderr stays empty
    code, out, err = cli("generate", str(tiny_run), "--length", "10", "--seed", "1")
    assert code == 0 and err == ""


def _copy_run(src, dst, mtime, broken=False):
    from charloom.checkpoint import INDEX_FILE, RunDir

    shutil.copytree(src, dst)
    index = RunDir(dst).checkpoints / INDEX_FILE
    if broken:
        index.write_text("{broken")  # picked by mistake, generate would exit 3
    os.utime(index, (mtime, mtime))


def test_without_a_run_dir_the_newest_run_under_runs_is_used(tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _copy_run(tiny_run, tmp_path / "runs" / "zzz-older", 1_000_000, broken=True)  # last by name: the pick is by time
    _copy_run(tiny_run, tmp_path / "runs" / "aaa-newer", 2_000_000)
    (tmp_path / "runs" / "unfinished").mkdir()  # the newest directory, but no checkpoint yet
    (tmp_path / "runs" / "notes.txt").write_text("not a run")
    args = ["--prompt", "the ", "--length", "20", "--seed", "1"]
    code, out, err = cli("generate", *args)
    assert code == 0, err
    assert err == f"charloom: using {Path('runs') / 'aaa-newer'} (the newest run)\n"
    assert out == cli("generate", str(tiny_run), *args)[1]


@pytest.mark.parametrize("runs", [None, [], ["unfinished"]])
def test_without_any_run_a_one_line_error_says_to_train_first(tmp_path, monkeypatch, runs):
    monkeypatch.chdir(tmp_path)
    for name in runs if runs is not None else []:
        (tmp_path / "runs" / name).mkdir(parents=True)
    if runs == []:
        (tmp_path / "runs").mkdir()
    code, out, err = cli("generate", "--prompt", "the ")
    assert code == 2 and not out and err.count("\n") == 1, err
    assert err.startswith("charloom: RUN_DIR: ") and "no trained run under ./runs" in err and "charloom train" in err
