"""The server on a model trained on records (issue 27): each of ``n`` choices is one whole record, ended by the
model (OpenAI's ``stop``), ``label`` asks for records of a label, ``novel`` keeps new ones with the copy rate,
``/v1/models`` tells records models apart, and ``/v1/next`` reads a prompt as the start of a record.

A real uvicorn on 127.0.0.1 and an ephemeral port, driven by the official openai client and raw HTTP; every
text is checked against the library (``Model.generate``, ``Model.generate_records``) called directly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import charloom  # noqa: E402
from charloom.api import Model  # noqa: E402
from charloom.server.app import ServeSettings, create_app  # noqa: E402
from charloom.server.template import ChatTemplate  # noqa: E402
from charloom.text.records import END  # noqa: E402
from tests.test_server import running_server, sse_events  # noqa: E402

ROWS = [("cat", "meow meow"), ("dog", "woof"), ("cat", "purr"), ("dog", "bark bark")] * 8
SMALL = dict(hidden=32, layers=1, embedding_dim=16, seq_len=16, batch_size=8, max_steps=150, eval_every=50, lr=1e-2,
             warmup_steps=1, threads=1, sample_temperatures=())
SEED = 3


def train_pets(root: Path) -> Path:
    """A tiny model of labelled CSV records (cat and dog sounds) trained in ``root``: its run directory."""
    corpus = root / "pets.csv"
    corpus.write_text("animal,text\n" + "".join(f"{a},{t}\n" for a, t in ROWS), encoding="utf-8")
    charloom.train(corpus, out=root / "run", label_column="animal", **SMALL)
    return root / "run"


@pytest.fixture(scope="module")
def pets_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_pets(tmp_path_factory.mktemp("pets"))


@pytest.fixture(scope="module")
def pets(pets_run: Path) -> Model:
    return charloom.load(pets_run)


@pytest.fixture(scope="module")
def base_url(pets: Model, tiny_run: Path) -> Iterator[str]:
    bare = Model(pets.net, pets.tokenizer, pets.config)  # no run directory: its training records are not at hand
    app = create_app({"pets": pets, "tiny": charloom.load(tiny_run), "bare": bare}, ServeSettings(max_tokens=200),
                     templates={"pets": ChatTemplate(user="bark", assistant="purr", separator=" ", end="  ")})
    with running_server(app) as url:
        yield url


@pytest.fixture()
def client(base_url: str) -> "openai.OpenAI":
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=30)


def _openai_reason(library: str) -> str:
    return "stop" if library == "end" else library


def _post(base_url: str, route: str, **body) -> httpx.Response:
    return httpx.post(base_url + route, json=body, timeout=30)


def test_each_choice_is_one_record_ended_by_the_model(client, pets):
    expected = pets.generate("", num_samples=6, length=40, seed=SEED, temperature=0.8)
    reply = client.completions.create(model="pets", prompt="", n=6, max_tokens=40, seed=SEED, temperature=0.8)
    choices = sorted(reply.choices, key=lambda c: c.index)
    assert [c.text for c in choices] == [e.text for e in expected]
    assert [c.finish_reason for c in choices] == [_openai_reason(e.finish_reason) for e in expected]
    assert sum(e.finish_reason == "end" for e in expected) >= 4  # the model ends its records...
    assert all(END not in c.text for c in choices)  # ...and the end token is never shown
    # Cut by max_tokens, a record ends with "length", as any text.
    short = client.completions.create(model="pets", prompt="", n=4, max_tokens=2, seed=SEED)
    cut = pets.generate("", num_samples=4, length=2, seed=SEED)
    assert [c.finish_reason for c in sorted(short.choices, key=lambda c: c.index)] == [_openai_reason(e.finish_reason) for e in cut]
    assert "length" in {c.finish_reason for c in short.choices}


def test_streamed_records_are_the_same_with_openai_finish_reasons(base_url, pets):
    expected = pets.generate("w", num_samples=5, length=40, seed=SEED, temperature=0.8)
    response = _post(base_url, "/v1/completions", model="pets", prompt="w", n=5, max_tokens=40, seed=SEED,
                     temperature=0.8, stream=True)
    assert response.status_code == 200
    texts, reasons = [""] * 5, [None] * 5
    for data in sse_events(response.text)[:-1]:
        for choice in json.loads(data)["choices"]:
            texts[choice["index"]] += choice["text"]
            reasons[choice["index"]] = choice["finish_reason"] or reasons[choice["index"]]
    assert texts == [e.text for e in expected]
    assert reasons == [_openai_reason(e.finish_reason) for e in expected] and "stop" in reasons


def test_a_label_asks_for_its_records_and_an_unknown_one_is_refused_with_the_list(client, base_url, pets):
    expected = pets.generate("", num_samples=3, length=40, seed=SEED, label="dog")
    reply = client.completions.create(model="pets", prompt="", n=3, max_tokens=40, seed=SEED, extra_body={"label": "dog"})
    choices = sorted(reply.choices, key=lambda c: c.index)
    assert [c.text for c in choices] == [e.text for e in expected]
    assert [c.model_dump()["label"] for c in choices] == ["dog"] * 3
    assert [c.text for c in choices] != [e.text for e in pets.generate("", num_samples=3, length=40, seed=SEED, label="cat")]
    streamed = _post(base_url, "/v1/completions", model="pets", n=2, max_tokens=40, seed=SEED, label="cat", stream=True)
    finishes = [c for d in sse_events(streamed.text)[:-1] for c in json.loads(d)["choices"] if c["finish_reason"]]
    assert [c["label"] for c in finishes] == ["cat", "cat"]

    for route in ("/v1/completions", "/v1/next"):
        refused = _post(base_url, route, model="pets", label="cow")
        error = refused.json()["error"]
        assert refused.status_code == 422 and error["param"] == "label"
        assert "'cow'" in error["message"] and "'cat'" in error["message"] and "'dog'" in error["message"]
    plain = _post(base_url, "/v1/completions", model="tiny", label="dog")
    assert plain.status_code == 422 and plain.json()["error"]["param"] == "label"
    assert "not trained on labelled records" in plain.json()["error"]["message"]
    wrong = _post(base_url, "/v1/completions", model="pets", label=7)
    assert wrong.status_code == 422 and wrong.json()["error"]["param"] == "label"


def test_models_say_which_are_trained_on_records(client, base_url):
    listed = {m.id: m.model_dump()["charloom"]["records"] for m in client.models.list().data}
    assert listed["pets"] == {"format": "csv", "separator": None, "labels": ["cat", "dog"]}
    assert listed["tiny"] is None
    one = httpx.get(base_url + "/v1/models/pets", timeout=30).json()["charloom"]
    assert one["records"]["labels"] == ["cat", "dog"] and END in one["tokens"]


def test_novel_keeps_new_records_and_reports_the_copy_rate(client, base_url, pets):
    batch = pets.generate_records(4, novel=True, seed=SEED, temperature=0.5, length=30)
    assert batch.copies > 0  # at this temperature the tiny model writes training records, so rounds matter
    reply = client.completions.create(model="pets", prompt="", n=4, max_tokens=30, seed=SEED, temperature=0.5,
                                      extra_body={"novel": True})
    texts = [c.text for c in sorted(reply.choices, key=lambda c: c.index)]
    assert texts == [r.text for r in batch.records]
    assert not set(texts) & pets.training_records()
    assert reply.model_extra["charloom"] == {"drawn": batch.drawn, "copies": batch.copies, "copy_rate": pytest.approx(batch.copy_rate),
                                "notes": batch.notes}

    for body, why in [(dict(model="pets", novel=True, stream=True), "stream: false"),
                      (dict(model="tiny", novel=True), "not trained on records"),
                      (dict(model="bare", novel=True), "not at hand")]:
        refused = _post(base_url, "/v1/completions", **body)
        assert refused.status_code == 422 and refused.json()["error"]["param"] == "novel"
        assert why in refused.json()["error"]["message"]


def test_chat_on_a_records_model_ends_with_openai_stop(client, pets):
    template = ChatTemplate(user="bark", assistant="purr", separator=" ", end="  ")
    prompt = template.render([("user", None, "meow")])
    expected = pets.generate(prompt, num_samples=3, length=30, seed=SEED, stop=[template.end])
    reply = client.chat.completions.create(model="pets", messages=[{"role": "user", "content": "meow"}], n=3,
                                           max_tokens=30, seed=SEED)
    choices = sorted(reply.choices, key=lambda c: c.index)
    assert [c.message.content for c in choices] == [e.text for e in expected]
    assert [c.finish_reason for c in choices] == [_openai_reason(e.finish_reason) for e in expected]
    assert "end" not in {c.finish_reason for c in choices}


def test_next_reads_the_prompt_as_the_start_of_a_record(base_url, pets):
    dog = pets.tokenizer.index[pets.record_labels["dog"]]
    for label, start in (("", [pets.records.end]), ("dog", [pets.records.end, dog])):
        body = _post(base_url, "/v1/next", model="pets", prompt="wo", label=label).json()
        got = {t["token"]: t["prob"] for t in body["tokens"]}
        # What the network gives after END [label] "wo", as generation starts a record.
        idx = torch.tensor([start + pets.encode_prompt("wo")])
        probs = pets.net(idx)[0][0, -1].softmax(-1).tolist()
        assert got == pytest.approx(dict(zip(pets.next_token_distribution("wo", label=label).tokens, probs)), abs=1e-6)
