"""Help that tells the truth: train's option groups and 'auto' rules (checked against the presets), defaults
that still resolve as before, --version, the examples (each one parses), shell completion and --cache."""

import io
import itertools
import shlex
import shutil
import subprocess
import types
from dataclasses import fields

import pytest

import charloom
from charloom import api
from charloom.cli.commands import build_parser, main
from charloom.cli.parser import EXAMPLES, UsageError
from charloom.config import HELP_GROUPS, ModelConfig, TrainConfig, field_flag
from charloom.models import model_class
from charloom.presets import preset_for
from charloom.training.settings import resolve_configs

CONFIG_FIELDS = fields(ModelConfig) + fields(TrainConfig)
FIELD_NAMES = {f.name for f in CONFIG_FIELDS}


def cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def option_help(command: str) -> dict[str, str]:
    """Each option's help text, by its first flag."""
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {a.option_strings[0]: a.help for a in sub.choices[command]._actions if a.option_strings}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ------------------------------------------------------------------------------------------ train --help

def test_train_help_opens_with_the_common_options_and_groups_the_rest():
    code, out, _ = cli("train", "--help")
    assert code == 0
    sections = [line[:-1] for line in out.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert sections[0] == "common options"
    assert sections[1:-1] == [title for key, (title, _) in HELP_GROUPS.items() if key != "common"]
    assert sections[-1] == "examples"
    assert out.count("options:") == 1  # no argparse default group left over
    common = out.split("common options:")[1].split("advanced:")[0]
    for option in ("-h, --help", "CORPUS", "--max-time", "--epochs", "--model", "--tokens", "--resume", "--out"):
        assert f"  {option}" in common, option
    # the usage line stays one line instead of listing ~56 flags
    assert out.splitlines()[0] == "usage: charloom train [CORPUS ...] [options]"


def test_every_setting_has_a_known_group():
    for f in CONFIG_FIELDS:
        assert f.metadata.get("group") in HELP_GROUPS, f.name
    common = {f.name for f in CONFIG_FIELDS if f.metadata["group"] == "common"}
    assert common == {"model", "tokens", "epochs", "max_time", "records", "init_from"}


def _preset_settings() -> set[str]:
    """Every setting that some architecture's preset sets, over corpus sizes and time budgets."""
    names = set()
    for arch, n, t in itertools.product(("lstm", "gru", "mogrifier", "conv", "transformer"),
                                        (50_000, 300_000, 1_000_000, 10_000_000), (0, 60, 200, 600, 5_000, 20_000)):
        preset = model_class(arch).preset(n, t)
        names |= set(preset["model"]) | set(preset["train"])
    return names


def test_the_settings_marked_auto_are_exactly_those_a_preset_sets():
    marked = {f.name for f in CONFIG_FIELDS if "auto" in f.metadata}
    assert marked == _preset_settings()
    helps = option_help("train")
    for f in CONFIG_FIELDS:
        text = helps[field_flag(f)]
        if f.name in marked:
            assert "(auto: " in text and "default:" not in text, text  # no default the preset then overrides
        else:
            assert "(default: " in text and "auto:" not in text, text


# (setting, training chars, --max-time, the value the help's rule promises, words of the rule that say so)
RULES = [
    ("layers", 100_000, 0, (1, 256), "1x256 (layers x hidden) for a corpus under 200k chars"),
    ("layers", 1_000_000, 0, (1, 512), "1x512 up to 5M"),
    ("layers", 10_000_000, 0, (2, 512), "2x512 above"),
    ("layers", 1_000_000, 3.6 * 60, (1, 384), "1x512 needs 3.7m"),
    ("layers", 1_000_000, 3.7 * 60, (1, 512), "1x512 needs 3.7m"),
    ("layers", 10_000_000, 3.6 * 3600, (1, 512), "2x512 3.7h"),
    ("layers", 10_000_000, 3.7 * 3600, (2, 512), "2x512 3.7h"),
    ("dropout", 100_000, 0, 0.2, "0.2 under 200k chars"),
    ("dropout", 1_000_000, 0, 0.3, "0.3 at 1x512"),
    ("dropout", 1_000_000, 100, 0.25, "0.25 at 1x384"),
    ("dropout", 1_000_000, 30, 0.1, "0.1 at 1x256"),
    ("dropout", 10_000_000, 0, 0.0, "0 above"),
    ("epochs", 100_000, 0, 30, "30 for a corpus under 200k chars"),
    ("epochs", 1_000_000, 0, 20, "20 up to 5M"),
    ("epochs", 10_000_000, 0, 3, "3 above"),
    ("batch_size", 1_000_000, 0, 32, "32 for a corpus under 5M chars"),
    ("batch_size", 10_000_000, 0, TrainConfig.batch_size, "64 above"),
    ("seq_len", 1_000_000, 0, 64, "64 for a corpus under 5M chars"),
    ("seq_len", 10_000_000, 0, TrainConfig.seq_len, "128 above"),
    ("lr", 1_000_000, 0, 6e-3, "6e-3 for a corpus under 5M chars"),
    ("lr", 10_000_000, 0, TrainConfig.lr, "3e-3 above"),
    ("weight_decay", 1_000_000, 0, 0.1, "0.1 for a recurrent 1x512 on a corpus under 5M chars"),
    ("weight_decay", 1_000_000, 100, TrainConfig.weight_decay, "else 0.01"),
]


@pytest.mark.parametrize("name, chars, max_time, value, words", RULES)
def test_an_auto_rule_says_what_the_preset_does(name, chars, max_time, value, words):
    assert words in option_help("train")[flag(name)]
    preset = preset_for(chars, max_time)
    chosen = {**ModelConfig().__dict__, **TrainConfig().__dict__, **preset["model"], **preset["train"]}
    got = (chosen["layers"], chosen["hidden"]) if name == "layers" else chosen[name]
    assert got == value


def test_the_transformer_rules_say_what_its_preset_does():
    helps = option_help("train")
    preset = model_class("transformer").preset(1_000_000)
    assert preset["model"]["tie_weights"] is True and "on for a transformer" in helps["--tie-weights"]
    assert preset["train"]["batching"] == "windows" and "windows for a transformer" in helps["--batching"]
    assert preset["train"]["batch_size"] == 16 and "a transformer 16" in helps["--batch-size"]
    assert preset["train"]["window_step"] == 1 and "1 for a transformer" in helps["--window-step"]
    assert preset["model"]["layers"] == 2 * preset_for(1_000_000)["model"]["layers"] and "transformer 2" in helps["--layers"]


def test_book_recipe_values_are_shown():
    helps = option_help("train")
    assert "book recipe: 128" in helps["--hidden"] and "book recipe: rmsprop" in helps["--optimizer"]
    assert "book recipe: on" in helps["--lowercase"]


# -------------------------------------------------------------------------- defaults resolve as before

@pytest.fixture()
def captured_train(monkeypatch):
    """Replace the library's train with a recorder: what would the CLI pass?"""
    calls = []

    def fake_train(corpus=None, **kwargs):
        calls.append({"corpus": corpus, **kwargs})
        return types.SimpleNamespace(path=None, stop_reason="max steps")

    monkeypatch.setattr(api, "train", fake_train)
    return calls


def _settings(call):
    return {k: v for k, v in call.items() if k in FIELD_NAMES}


def test_no_flags_pass_no_settings_so_the_preset_decides(captured_train):
    assert cli("train")[0] == 0
    call = captured_train[-1]
    assert call["corpus"] is None and call["out"] is None and call["resume"] is None
    assert _settings(call) == {}  # no explicit value that would override the recipe or the size preset
    assert set(call) == {"corpus", "out", "resume", "encoding", "errors", "verbose", "progress", "stream"}


def test_only_the_flags_given_are_passed(captured_train):
    assert cli("train", "corpus.txt", "--max-time", "5m", "--hidden", "256", "--no-tie-weights",
               "--sample-temperatures", "0.5,1")[0] == 0
    assert _settings(captured_train[-1]) == {"max_time": 300.0, "hidden": 256, "tie_weights": False,
                                             "sample_temperatures": (0.5, 1.0)}


def test_defaults_resolve_to_the_preset():
    # The default recipe on 1M training chars, as its rule reads: 1x512, dropout 0.3, batches of 32 x 64,
    # lr 6e-3, weight decay 0.1, 20 epochs; everything else the dataclass default.
    mcfg, tcfg = resolve_configs({}, 1_000_000)
    assert (mcfg.layers, mcfg.hidden, mcfg.dropout) == (1, 512, 0.3)
    assert (tcfg.batch_size, tcfg.seq_len, tcfg.lr, tcfg.weight_decay, tcfg.epochs) == (32, 64, 6e-3, 0.1, 20)
    assert (mcfg.model, tcfg.recipe, tcfg.tokens, tcfg.max_time, mcfg.cache_size) == ("lstm", "default", "char", 0.0, 0)
    mcfg, tcfg = resolve_configs({"recipe": "book"}, 1_000_000)
    assert (mcfg.layers, mcfg.hidden, tcfg.batch_size, tcfg.epochs) == (1, 128, 128, 60)


# ------------------------------------------------------------------------------ --version and examples

def test_version():
    from importlib.metadata import version

    code, out, err = cli("--version")
    assert code == 0 and out == f"charloom {charloom.__version__}\n" and not err
    assert charloom.__version__ == version("charloom")


@pytest.mark.parametrize("command", ["train", "generate", "evaluate", "serve", "export", "report", "score", "neurons",
                                     "completion"])
def test_each_command_shows_examples_that_parse(command):
    code, out, _ = cli(command, "--help")
    assert code == 0
    shown = out.split("examples:\n")[1]
    rows = EXAMPLES[command]
    assert 2 <= len(rows) <= 3
    parser = build_parser()
    for line, _ in rows:
        assert line in shown
        words = shlex.split(line.replace('eval "$(', "").replace(')"', ""))
        words = words[:words.index(">")] if ">" in words else words
        assert words[:2] == ["charloom", command]
        try:
            args = parser.parse_args(words[1:])
        except UsageError as exc:  # pragma: no cover - the failure message
            pytest.fail(f"example {line!r} does not parse: {exc}")
        assert args.command == command


def test_top_level_help_has_examples_and_lists_completion():
    code, out, _ = cli("--help")
    assert code == 0 and "completion" in out and "examples:" in out and "--version" in out


# --------------------------------------------------------------------------------------- completion

def test_bash_completion_script_parses_and_completes(tmp_path):
    code, script, err = cli("completion", "bash")
    assert code == 0 and not err and "charloom" in script
    path = tmp_path / "charloom.bash"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    # Ask the completion function what bash would offer after a few partial command lines.
    driver = f"""source {shlex.quote(str(path))}
try() {{ COMP_WORDS=("$@"); COMP_CWORD=$((${{#COMP_WORDS[@]}}-1)); COMP_LINE="$*"; COMP_POINT=${{#COMP_LINE}}; COMPREPLY=()
  _shtab_charloom charloom "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"; echo "${{COMPREPLY[*]}}"; }}
try charloom gen
try charloom train --max-t
try charloom generate --checkpoint ''
try charloom completion ''
"""
    done = subprocess.run(["bash", "-c", driver], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["generate", "--max-time", "best last", "bash zsh"]


def test_zsh_completion_script():
    code, script, err = cli("completion", "zsh")
    assert code == 0 and not err
    assert script.startswith("#compdef charloom")
    for needle in ("--max-time", "--cache", "--no-cache", "--temperature", "completion"):
        assert needle in script, needle
    if shutil.which("zsh"):
        done = subprocess.run(["zsh", "-n"], input=script, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_completion_needs_a_known_shell():
    code, out, err = cli("completion", "fish")
    assert code == 2 and not out and err.count("\n") == 1 and "invalid choice" in err


# ----------------------------------------------------------------------------------- --cache/--no-cache

@pytest.fixture()
def captured_load(monkeypatch):
    """Stop at the library's load and record its cache argument (the model is never needed)."""
    seen = []

    class Stop(Exception):
        pass

    def fake_load(path, which="best", *, cache=None, device="cpu"):
        seen.append(cache)
        raise Stop

    monkeypatch.setattr(api, "load", fake_load)
    return seen, Stop


@pytest.mark.parametrize("command", ["generate", "evaluate", "export"])
@pytest.mark.parametrize("flags, cache", [([], None), (["--cache"], True), (["--no-cache"], False)])
def test_cache_flags_reach_the_library(captured_load, command, flags, cache):
    seen, stop = captured_load
    if command == "export" and flags == ["--cache"]:
        assert cli(command, "run", *flags)[0] == 2  # export has only --no-cache: it cannot hold a cache
        return
    # --top-k: a request that charloom.generation.light does not answer, so generate loads the model as the others do.
    extra = ["--top-k", "5"] if command == "generate" else []
    with pytest.raises(stop):
        main([command, "run", *flags, *extra], io.StringIO(), io.StringIO())
    assert seen == [cache]


@pytest.mark.parametrize("flags, cache", [([], None), (["--cache"], True), (["--no-cache"], False)])
def test_serve_passes_cache_by_keyword(monkeypatch, flags, cache):
    from charloom.server import app as server

    seen = []
    monkeypatch.setattr(server, "serve", lambda run_dirs, settings, **kw: seen.append(kw))
    assert cli("serve", "run", *flags)[0] == 0
    assert seen[0]["cache"] is cache


def test_cache_help_says_it_is_a_test_time_option():
    for command in ("generate", "evaluate", "serve"):
        helps = option_help(command)
        assert "--no-cache" not in helps  # one option, --cache/--no-cache
        assert "a test-time option; default: only if the run was trained with --cache-size" in helps["--cache"]
