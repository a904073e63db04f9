"""Records (issue 27): reading each format, the random split by record, boundaries in training, record
scoring, generation that ends at the end token, --novel and the copy rate, labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import charloom
from charloom.errors import CharloomError
from charloom.generation.completion import Completion, make_plan
from charloom.generation.records import RecordBatch, draw_records
from charloom.text.records import END, RecordIds, read_records, split_records
from charloom.training.batches import IGNORE, RecordBatcher

from .conftest import run_cli

SMALL = dict(hidden=32, layers=1, embedding_dim=16, seq_len=16, batch_size=8, max_steps=6, eval_every=3,
             warmup_steps=1, threads=1, sample_temperatures=())
NAMES = ["Anna", "Bert", "Clara", "Dora", "Emil", "Frida", "Gustav", "Hanna", "Ida", "Jonas"] * 6


def _read(tmp_path: Path, name: str, text: str, fmt: str, **kw) -> list[str]:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return read_records([path], fmt, **kw).texts


def test_each_plain_format(tmp_path):
    assert _read(tmp_path, "a.txt", "one\ntwo\n\nthree\n", "line") == ["one", "two", "three"]
    assert _read(tmp_path, "b.txt", "a b\nc\n\n\nd e\n\nf\n", "paragraph") == ["a b\nc", "d e", "f"]
    fortunes = "first quote\n  -- someone\n%\nsecond\n%\n%\nthird\n"
    assert _read(tmp_path, "c.txt", fortunes, "separator") == ["first quote\n  -- someone", "second", "third"]


def test_csv_quoting_and_columns(tmp_path):
    text = 'id,text\n1,"a, with comma"\n2,"two\nlines"\n3,"say ""hi"""\n4,\n'
    assert _read(tmp_path, "q.csv", text, "csv") == ["a, with comma", "two\nlines", 'say "hi"']
    with pytest.raises(CharloomError) as err:
        _read(tmp_path, "q.csv", text, "csv", column="body")
    assert "no column 'body'" in str(err.value) and "id, text" in str(err.value)
    two = "a,b\nx,y\n"
    with pytest.raises(CharloomError, match="--column"):
        _read(tmp_path, "two.csv", two, "csv")


def test_jsonl_fields_and_bad_lines(tmp_path):
    text = '{"text": "one", "tag": "a"}\n\n{"text": "two", "tag": "b"}\n{"text": null}\n'
    found = read_records([_write(tmp_path, "r.jsonl", text)], "jsonl", label_column="tag")
    assert found.texts == ["one", "two"] and found.labels == ["a", "b"]
    assert found.label_chars() == {"a": "\ue000", "b": "\ue001"}
    with pytest.raises(CharloomError, match=r"r2.jsonl:2"):
        read_records([_write(tmp_path, "r2.jsonl", '{"text": "x"}\n[1, 2]\n')], "jsonl")


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_end_character_in_a_record_is_removed_with_a_note(tmp_path):
    found = read_records([_write(tmp_path, "e.txt", f"a{END}b\nc\n")], "line")
    assert found.texts == ["ab", "c"] and any("U+0003" in n for n in found.notes)


def test_split_is_a_seeded_random_share_of_records():
    train, val = split_records(100, 0.1, seed=0)
    assert len(val) == 10 and len(train) == 90 and not set(train) & set(val)
    assert list(val) != list(range(90, 100))  # not the last ones
    assert (split_records(100, 0.1, seed=0)[1] == val).all()
    assert not (split_records(100, 0.1, seed=1)[1] == val).all()
    with pytest.raises(CharloomError, match="at least two"):
        split_records(1, 0.1, seed=0)


def test_batches_never_cross_a_record_end():
    # END=0; records of 3, 40 (longer than T=16) and 5 characters
    ids = np.array([0, *[1] * 3, 0, *[2] * 40, 0, *[3] * 5, 0], dtype=np.int64)
    records = RecordIds(end=0)
    batcher = RecordBatcher(ids, records.spans(ids), records.target_mask, batch_size=2, seq_len=16, seed=0)
    assert not batcher.carries_state
    scored: dict[int, int] = {}
    for step in range(1000):
        x, y, first = batcher.next()
        if first and step:
            break  # the next epoch began: every window of the first was seen once
        assert batcher.index <= batcher.steps_per_epoch
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            at = [j for j, t in enumerate(row_y) if t != IGNORE]
            kept = [row_y[j] for j in at]
            # A row reads one record: END only as its first input, and the record's own end as its last target.
            assert all(row_x[j] != 0 for j in at if j > 0) and 0 not in kept[:-1]
            assert all(t != IGNORE for t in row_y[at[0]:at[-1] + 1])
            for t in kept:
                scored[t] = scored.get(t, 0) + 1
    assert scored == {1: 3, 2: 40, 3: 5, 0: 3}  # every target once: each character and each record's end


def test_training_runs_each_row_from_a_fresh_state(tmp_path, monkeypatch):
    from charloom.models.rnn import RecurrentLM as RNNModel

    corpus = _write(tmp_path, "names.txt", "\n".join(NAMES) + "\n")
    seen = []
    forward = RNNModel.forward

    def spy(self, idx, state=None, **kw):
        if self.training:
            seen.append(state is None)
        return forward(self, idx, state, **kw)

    monkeypatch.setattr(RNNModel, "forward", spy)
    model = charloom.train(corpus, out=tmp_path / "run", records="line", **SMALL)
    assert seen and all(seen)
    info = model.config["corpus"]["records"]
    assert (info["format"], info["count"], info["train"], info["val"]) == ("line", 60, 54, 6)
    assert model.records is not None and model.history[-1]["val_bpc"] > 0


@pytest.fixture(scope="module")
def names_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("names")
    corpus = root / "names.txt"
    corpus.write_text("\n".join(NAMES) + "\n", encoding="utf-8")
    charloom.train(corpus, out=root / "run", records="line", **{**SMALL, "max_steps": 40, "hidden": 64})
    return root / "run"


def test_validation_scores_each_record_with_its_end(names_run):
    model = charloom.load(names_run)
    result = model.evaluate()
    val_ids = model.run_data()[0][model.run_data()[1]:]
    records = int((np.asarray(val_ids) == model.records.end).sum()) - 1
    assert result.tokens == len(val_ids) - 1 == result.chars  # every character and end, none of the opening ENDs
    assert records == model.config["corpus"]["records"]["val"]
    # A record's score does not depend on the record before it (each starts from a fresh state).
    one = model.evaluate("Anna\n")
    two = model.evaluate("Bert\nAnna\n")
    alone = model.evaluate("Bert\n")
    assert two.total_nats == pytest.approx(one.total_nats + alone.total_nats, rel=1e-5)


def test_generated_records_end_at_the_end_token(names_run):
    model = charloom.load(names_run)
    # An empty prompt is the start of a record: END alone, not END and a newline.
    assert make_plan(model, "").ids == (model.records.end,)
    records = model.generate("", num_samples=8, length=50, seed=3, temperature=0.5)
    assert len(records) == 8
    for r in records:
        assert END not in r.text and "\n" not in r.text
        assert r.finish_reason in ("end", "length")
        if r.finish_reason == "end":
            assert r.tokens[-1] == model.records.end
    assert sum(r.finish_reason == "end" for r in records) >= 6


def test_cli_writes_n_records_and_the_copy_rate(names_run):
    done = run_cli("generate", str(names_run), "-n", "7", "--seed", "1", "--temperature", "0.5", "--length", "40")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 7
    assert "drawn records" in done.stderr and "copies of training records" in done.stderr
    lines = run_cli("generate", str(names_run), "-n", "3", "--seed", "1", "--format", "jsonl", "--length", "40").stdout
    rows = [json.loads(line) for line in lines.splitlines()]
    assert len(rows) == 3 and all(r["finish_reason"] in ("end", "length") for r in rows)


class _FakeRecordsModel:
    """generate() hands out texts from a script; training_records() knows two of them."""

    records = RecordIds(end=0)

    def __init__(self, script: list[str]) -> None:
        self.script = script

    def training_records(self) -> set[str]:
        return {"Anna", "Bert"}

    def generate(self, prompt, *, temperature, num_samples, seed, **options):
        out = [Completion(self.script.pop(0), [], temperature, seed + i, "end") for i in range(num_samples)]
        return out if num_samples > 1 else out[0]


def test_novel_keeps_new_records_and_counts_copies():
    batch = draw_records(_FakeRecordsModel(["Anna", "Zoe", "Bert", "Max", "Ida", "Anna"]), 3, novel=True, seed=0)
    assert [r.text for r in batch.records] == ["Zoe", "Max", "Ida"]
    assert (batch.drawn, batch.copies) == (6, 3) and batch.copy_rate == pytest.approx(0.5)
    plain = draw_records(_FakeRecordsModel(["Anna", "Zoe"]), 2, seed=0)
    assert [r.text for r in plain.records] == ["Anna", "Zoe"] and plain.copies == 1
    assert "1 of 2 drawn records (50%)" in plain.summary()
    assert RecordBatch([], checked=False).summary().startswith("copy rate not measured")


def test_novel_on_a_model_without_records_is_refused(tiny_run):
    done = run_cli("generate", str(tiny_run), "--novel", "--length", "5")
    assert done.returncode == 2 and "not trained on records" in done.stderr and "Traceback" not in done.stderr


def test_labels_condition_and_unknown_labels_are_listed(tmp_path):
    rows = [("cat", "meow meow"), ("dog", "woof"), ("cat", "purr"), ("dog", "bark bark")] * 8
    corpus = tmp_path / "pets.csv"
    corpus.write_text("animal,text\n" + "".join(f"{a},{t}\n" for a, t in rows), encoding="utf-8")
    model = charloom.train(corpus, out=tmp_path / "run", label_column="animal", **{**SMALL, "max_steps": 30})
    assert model.config["corpus"]["records"]["format"] == "csv"  # auto, from the extension
    assert set(model.record_labels) == {"cat", "dog"}
    drawn = model.generate("", label="dog", num_samples=2, length=20, seed=0)
    assert all(r.label == "dog" and "\ue000" not in r.text and "\ue001" not in r.text for r in drawn)
    with pytest.raises(CharloomError) as err:
        model.generate("", label="cow", length=5)
    assert "unknown label 'cow'" in str(err.value) and "'cat'" in str(err.value)
    done = run_cli("generate", str(tmp_path / "run"), "--label", "cow", "--length", "5")
    assert done.returncode == 2 and "use one of" in done.stderr
    # The label is given, never scored: a labelled record scores its characters and end only.
    ids, split, _ = model.run_data()
    assert model.evaluate().tokens == len(ids) - split - 1 - model.config["corpus"]["records"]["val"]


def test_unknown_column_from_the_cli_is_one_line(tmp_path):
    corpus = _write(tmp_path, "q.csv", "author,quote\nann,hello\nbob,bye\n")
    done = run_cli("train", str(corpus), "--column", "text", "--out", str(tmp_path / "run"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "author, quote" in done.stderr
    assert not (tmp_path / "run").exists()


def test_records_refuse_word_tokens_and_the_book_objective(tmp_path):
    corpus = _write(tmp_path, "n.txt", "\n".join(NAMES))
    with pytest.raises(CharloomError, match="read as characters"):
        charloom.train(corpus, out=tmp_path / "a", records="line", tokens="word", **SMALL)
    with pytest.raises(CharloomError, match="every position"):
        charloom.train(corpus, out=tmp_path / "b", records="line", recipe="book", **SMALL)


def test_plain_text_stays_one_stream(tiny_run):
    model = charloom.load(tiny_run)
    assert model.records is None and "records" not in model.config["corpus"]
    assert make_plan(model, "").ids == tuple(model.encode_prompt("\n"))  # an empty prompt: a new paragraph, no END


def test_records_longer_than_a_training_sequence_train_and_score_whole(tmp_path):
    paragraphs = [("the quick brown fox jumps over the lazy dog " * (2 + i % 3)).strip() for i in range(30)]
    corpus = _write(tmp_path, "p.txt", "\n\n".join(paragraphs) + "\n")
    model = charloom.train(corpus, out=tmp_path / "run", records="paragraph", **SMALL)  # seq_len 16, records 87-175
    result = model.evaluate()
    ids, split, _ = model.run_data()
    assert result.tokens == len(ids) - split - 1  # every character of every validation record, whole, and its end
    assert model.config["corpus"]["records"]["longest"] > 5 * SMALL["seq_len"]


def test_next_token_distribution_starts_a_record_and_dynamic_evaluation_is_refused(names_run):
    model = charloom.load(names_run)
    idx = torch.tensor([[model.records.end, *model.encode_prompt("Ann")]])
    with torch.no_grad():
        expected = model.net(idx)[0][0, -1].softmax(-1)
    assert torch.allclose(torch.tensor(model.next_token_distribution("Ann").probs), expected, atol=1e-6)
    with pytest.raises(CharloomError, match="trained on records"):
        model.evaluate(dynamic=True)
