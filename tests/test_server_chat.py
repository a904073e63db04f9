"""``/v1/chat/completions``, ``logit_bias`` and ``GET /v1/models/{id}``: a real uvicorn on 127.0.0.1 and an
ephemeral port, driven by the official openai client's chat API, streaming and not.

A reply is checked against ``Model.generate`` on the prompt the documented template gives, written out
by hand here (not rendered by the server's code), with the turn's end as a stop string; log-probabilities
against a numpy log-softmax of the network's logits.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import charloom
from charloom.api import Model
from charloom.errors import CharloomError
from charloom.server.app import ServeSettings, create_app
from charloom.server.template import ChatTemplate, templates_for
from tests.conftest import TINY_SETTINGS
from tests.test_server import running_server

PLAY = ("ROMEO:\nthe quick brown fox jumps over the lazy dog.\n\n"
        "JULIET:\na stitch in time saves nine; all that glitters is not gold.\n\n"
        "User:\nwhat say you?\n\nAssistant:\nall that glitters is not gold.\n\n") * 60
MESSAGES = [{"role": "system", "content": "A play in two voices."},
            {"role": "user", "content": " what say you? \n"},
            {"role": "assistant", "content": "the lazy dog.", "name": "ROMEO"},
            {"role": "user", "content": [{"type": "text", "text": "a stitch "}, {"type": "text", "text": "in time"}]}]
# The prompt the documented template makes of MESSAGES, written out by hand.
RENDERED = ("A play in two voices.\n\nUser:\nwhat say you?\n\nROMEO:\nthe lazy dog.\n\n"
            "User:\na stitch in time\n\nAssistant:\n")


@pytest.fixture(scope="module")
def play_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained for a few steps on a play whose turns are the default template's (speakers included)."""
    root = tmp_path_factory.mktemp("play-run")
    (root / "play.txt").write_text(PLAY, encoding="utf-8")
    charloom.train(root / "play.txt", out=root / "run", **TINY_SETTINGS)
    return root / "run"


@pytest.fixture(scope="module")
def play(play_run: Path) -> Model:
    return charloom.load(play_run)


@pytest.fixture(scope="module")
def tiny(tiny_run: Path) -> Model:
    """A model of text with no ':' and no capitals: the default template is beyond it."""
    return charloom.load(tiny_run)


@pytest.fixture(scope="module")
def base_url(play: Model, tiny: Model) -> Iterator[str]:
    templates = {"tiny": ChatTemplate(user="the fox", assistant="the dog", separator="; ", end="\n")}
    app = create_app({"play": play, "tiny": tiny}, ServeSettings(max_tokens=300, max_prompt_chars=400), templates)
    with running_server(app) as url:
        yield url


@pytest.fixture()
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=30)


def sse_events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]


# -- the reply is the library's continuation of the rendered play ----------------------------------

def test_the_reply_continues_the_documented_prompt_until_the_turn_ends(client, play):
    out = client.chat.completions.create(model="play", messages=MESSAGES, max_tokens=120, temperature=0.8, seed=3)
    expected = play.generate(RENDERED, length=120, temperature=0.8, seed=3, stop=["\n\n"])
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason and out.object == "chat.completion" and out.model == "play"
    assert out.usage.prompt_tokens == len(RENDERED) and out.usage.completion_tokens == len(expected.tokens)
    assert out.id.startswith("chatcmpl-")


def test_the_turns_end_is_an_implicit_stop(client, play):
    # A newline made likelier: the reply reaches a blank line within a few characters.
    bias = {"\n": 3.0}
    expected = play.generate(RENDERED, length=200, seed=5, stop=["\n\n"], logit_bias=bias)
    out = client.chat.completions.create(model="play", messages=MESSAGES, seed=5, logit_bias=bias)  # no max_tokens
    assert expected.finish_reason == "stop" and "\n\n" not in expected.text
    assert out.choices[0].message.content == expected.text and out.choices[0].finish_reason == "stop"
    # The stop string's tokens are drawn and counted, but they are no part of the reply nor of its logprobs.
    scored = client.chat.completions.create(model="play", messages=MESSAGES, seed=5, logit_bias=bias, logprobs=True)
    assert [e.token for e in scored.choices[0].logprobs.content] == list(expected.text)
    assert scored.usage.completion_tokens == len(expected.text) + 2
    # The request's own stop strings come on top of the implicit one.
    stop = expected.text[3:5]
    mine = client.chat.completions.create(model="play", messages=MESSAGES, seed=5, logit_bias=bias, stop=stop)
    assert mine.choices[0].message.content == expected.text[:expected.text.find(stop)]
    assert mine.choices[0].finish_reason == "stop"


def test_streamed_chunks_are_the_chat_shape_and_the_same_text(client, base_url):
    kwargs = {"model": "play", "messages": MESSAGES, "max_completion_tokens": 60, "seed": 9, "n": 2, "temperature": 1.2}
    plain = client.chat.completions.create(**kwargs)
    texts, roles, finish, usage = ["", ""], [None, None], [None, None], None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        assert chunk.object == "chat.completion.chunk" and chunk.id.startswith("chatcmpl-")
        usage = chunk.usage or usage
        for c in chunk.choices:
            if c.delta.role:
                assert roles[c.index] is None and texts[c.index] == ""  # the role comes first, once
                roles[c.index] = c.delta.role
            texts[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish[c.index]
    assert roles == ["assistant", "assistant"]
    assert texts == [c.message.content for c in plain.choices] and texts[0] != texts[1]
    assert finish == [c.finish_reason for c in plain.choices]
    assert usage.completion_tokens == plain.usage.completion_tokens and usage.prompt_tokens == len(RENDERED)
    raw = httpx.post(base_url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream") and sse_events(raw.text)[-1] == "[DONE]"


def _reference_logprobs(model: Model, prompt: str, text: str) -> list[np.ndarray]:
    """log softmax of the model's logits after every prefix of ``prompt + text`` (one forward, numpy)."""
    ids = [model.tokenizer.chars.index(c) for c in prompt + text]
    with torch.no_grad():
        logits = model.net(torch.tensor([ids]))[0][0].double().numpy()  # (T, V)
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return [logp[len(prompt) - 1 + i] for i in range(len(text))]


def test_logprobs_are_the_chat_shape_and_the_models(client, play):
    kwargs = {"model": "play", "messages": MESSAGES, "max_tokens": 30, "seed": 6, "logprobs": True, "top_logprobs": 3}
    out = client.chat.completions.create(**kwargs)
    content = out.choices[0].message.content
    entries = out.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == content and content
    chars = play.tokenizer.chars
    for e, ref in zip(entries, _reference_logprobs(play, RENDERED, content)):
        assert e.bytes == list(e.token.encode("utf-8"))
        assert e.logprob == pytest.approx(ref[chars.index(e.token)], abs=1e-4)
        best = np.argsort(-ref)[:3]
        assert [t.token for t in e.top_logprobs] == [chars[i] for i in best]
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(ref[best], abs=1e-4)
    streamed = None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        streamed = (chunk.choices[0].logprobs if chunk.choices and chunk.choices[0].logprobs else None) or streamed
    assert streamed.model_dump() == out.choices[0].logprobs.model_dump()
    bare = client.chat.completions.create(model="play", messages=MESSAGES, max_tokens=5, seed=6, logprobs=True)
    assert all(e.top_logprobs == [] for e in bare.choices[0].logprobs.content)
    assert client.chat.completions.create(model="play", messages=MESSAGES, max_tokens=5).choices[0].logprobs is None


# -- logit_bias, on both endpoints -----------------------------------------------------------------

def test_logit_bias_takes_token_ids_or_the_tokens_themselves(client, play):
    q = play.tokenizer.chars.index("q")
    out = client.chat.completions.create(model="play", messages=MESSAGES, max_tokens=20, seed=1, logit_bias={str(q): 100})
    assert out.choices[0].message.content == "q" * 20
    done = client.completions.create(model="play", prompt="the ", max_tokens=80, seed=2, logit_bias={"e": -100, "o": -100})
    expected = play.generate("the ", length=80, seed=2, logit_bias={"e": -100.0, "o": -100.0}).text
    assert done.choices[0].text == expected and not {"e", "o"} & set(expected)
    assert expected != play.generate("the ", length=80, seed=2).text


@pytest.mark.parametrize("bias, why", [
    ({"9999": 1}, "outside this model's vocabulary"),
    ({"Z": 1}, "not one token of this model"),
    ({"e": 100.5}, "less than or equal to 100"),
    ({"e": -101}, "greater than or equal to -100"),
])
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_a_bad_logit_bias_gets_422_naming_it(base_url, bias, why, route):
    body = {"model": "play", "max_tokens": 2, "logit_bias": bias, "prompt": "the ", "messages": MESSAGES}
    r = httpx.post(base_url + route, json=body)
    assert r.status_code == 422 and r.json()["error"]["param"].startswith("logit_bias") and why in r.json()["error"]["message"]


# -- GET /v1/models/{id} ----------------------------------------------------------------------------

def test_a_model_is_retrieved_with_its_vocabulary_and_template(client, play):
    model = client.models.retrieve("play")
    assert model.id == "play" and model.object == "model"
    info = model.model_extra["charloom"]
    assert info["tokens"] == list(play.tokenizer.chars) and info["vocab_size"] == len(play.tokenizer.chars)
    assert info["chat_template"] == {"user": "User", "assistant": "Assistant", "separator": ":\n", "end": "\n\n"}
    assert info["device"] == "cpu"
    assert client.models.retrieve("tiny").model_extra["charloom"]["chat_template"]["user"] == "the fox"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


# -- templates per model ----------------------------------------------------------------------------

def test_each_model_writes_the_chat_with_its_own_template(client, tiny):
    messages = [{"role": "user", "content": "the lazy dog"}, {"role": "assistant", "content": "all that glitters"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=50, seed=4)
    prompt = "the fox; the lazy dog\nthe dog; all that glitters\nthe dog; "
    assert out.choices[0].message.content == tiny.generate(prompt, length=50, seed=4, stop=["\n"]).text


def test_a_model_that_cannot_read_its_template_gets_a_422_that_says_what_to_do(tiny):
    app = create_app({"tiny": tiny})
    with running_server(app) as url:
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "the"}]})
    assert r.status_code == 422 and r.json()["error"]["param"] == "messages" and "--chat-template" in r.json()["error"]["message"]


def test_template_files_per_model_and_for_all(tmp_path):
    (tmp_path / "romeo.toml").write_text('user = "ROMEO"\nassistant = "JULIET"\n', encoding="utf-8")
    (tmp_path / "logs.json").write_text(json.dumps({"separator": ": ", "end": "\n"}), encoding="utf-8")
    got = templates_for(["a", "b", "c"], [str(tmp_path / "logs.json"), f"b={tmp_path / 'romeo.toml'}"])
    assert got["a"] == got["c"] == ChatTemplate(separator=": ", end="\n")
    assert got["b"] == ChatTemplate(user="ROMEO", assistant="JULIET")
    assert templates_for(["a"], []) == {"a": ChatTemplate()}
    assert got["b"].render([("system", None, " Verona. "), ("user", None, "hi"), ("assistant", "NURSE", "ho")]) == \
        "Verona.\n\nROMEO:\nhi\n\nNURSE:\nho\n\nJULIET:\n"


@pytest.mark.parametrize("text, why", [
    ('{"speaker": "ROMEO"}', "unknown key 'speaker'"),
    ('{"user": ""}', "user must be a non-empty string"),
    ('{"user": "A\\nB"}', "no speaker's name"),
    ("{nope", "not valid JSON"),
])
def test_a_bad_template_file_is_one_line_and_exit_2(tmp_path, tiny_run, text, why):
    from charloom.cli.commands import main

    (tmp_path / "t.json").write_text(text, encoding="utf-8")
    err = io.StringIO()
    assert main(["serve", str(tiny_run), "--port", "0", "--chat-template", str(tmp_path / "t.json")], io.StringIO(), err) == 2
    assert err.getvalue().startswith("charloom: --chat-template ") and why in err.getvalue() and err.getvalue().count("\n") == 1


def test_a_template_for_a_model_not_served_is_refused():
    with pytest.raises(CharloomError, match="no model named 'romeo'"):
        templates_for(["play"], ["romeo=chat.toml"])


def test_serve_notes_a_model_that_cannot_read_its_template(tiny_run, tmp_path, monkeypatch):
    import gc

    from charloom.server.app import serve

    seen = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: seen.extend(sockets))
    (tmp_path / "t.json").write_text('{"user": "the fox", "assistant": "the dog", "separator": " "}', encoding="utf-8")
    try:
        for specs, noted in (([], True), ([str(tmp_path / "t.json")], False)):
            out = io.StringIO()
            serve([tiny_run], ServeSettings(port=0), chat_templates=specs, stdout=out)
            assert ("cannot read its chat template" in out.getvalue()) is noted
    finally:
        gc.unfreeze()
        for sock in seen:
            sock.close()


# -- refusals ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "hi", "name": "A\nB"}]}, "messages.0.name"),
    ({"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": MESSAGES, "logprobs": True, "top_logprobs": 6}, "top_logprobs"),
    ({"messages": MESSAGES, "max_tokens": 301}, "max_tokens"),
    ({"messages": MESSAGES, "max_completion_tokens": 301}, "max_completion_tokens"),
    ({"messages": MESSAGES, "max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "a" * 400}]}, "messages"),
    ({"messages": [{"role": "user", "content": "\u00e9"}]}, "messages"),
    ({"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": MESSAGES, "n": 17}, "n"),
    ({"messages": MESSAGES, "temperature": 2.5}, "temperature"),
])
def test_invalid_chat_requests_get_422_naming_the_field(base_url, body, param):
    r = httpx.post(base_url + "/v1/chat/completions", json={"model": "play", **body})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param


def test_the_openai_client_sees_unknown_fields_named_and_a_clear_error(base_url, client):
    r = httpx.post(base_url + "/v1/chat/completions",
                   json={"messages": [{**MESSAGES[1], "tool_calls": []}], "max_tokens": 2, "tools": []})
    assert r.status_code == 200 and "tools" in r.headers["warning"] and "messages.0.tool_calls" in r.headers["warning"]
    with pytest.raises(openai.UnprocessableEntityError, match="model"):
        client.chat.completions.create(model="nope", messages=MESSAGES)


@pytest.mark.parametrize("raw, param", [
    (r'{"messages": [{"role": "user", "content": "the \ud800"}]}', "messages.0.content"),
    (r'{"messages": [{"role": "user", "content": "the", "name": "\udfff"}]}', "messages.0.name"),
    (r'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}', "messages.0.content"),
    (r'{"messages": [{"role": "user", "content": "the"}], "logit_bias": {"\ud800": 1}}', "logit_bias"),
])
def test_a_lone_surrogate_anywhere_gets_a_json_422(base_url, raw, param):
    r = httpx.post(base_url + "/v1/chat/completions", content=raw.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["param"] == param


def test_chat_passes_the_same_guards_and_limits(play):
    app = create_app({"play": play}, ServeSettings(max_tokens=10_000_000, time_limit=0.5, api_key="k"))
    body = {"messages": MESSAGES, "max_tokens": 10_000_000, "logit_bias": {"\n": -100}}  # never ends on its own
    with running_server(app) as url:
        assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 401
        auth = {"authorization": "Bearer k"}
        typed = httpx.post(url + "/v1/chat/completions", content=json.dumps(body), headers={**auth, "content-type": "text/plain"})
        assert typed.status_code == 415
        start = time.monotonic()
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=auth, timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "time" and time.monotonic() - start < 10
