"""`charloom generate`: every option reaches the model, JSON lines, interactive mode, any console."""

import io
import json
import math

import pytest

from charloom.cli import main
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


def test_help_lists_every_sampling_option(capsys):
    with pytest.raises(SystemExit):
        cli("generate", "--help")
    out = capsys.readouterr().out
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
