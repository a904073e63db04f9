"""The HTTP server: a real uvicorn on 127.0.0.1 and an ephemeral port, driven by the official openai
client (what users run) and by raw HTTP for the error cases.

Every generated text is checked against ``Model.generate`` called directly, and log-probabilities
against a numpy log-softmax of the network's logits.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import charloom  # noqa: E402
from charloom.api import Model  # noqa: E402
from charloom.generation.engine import StopText  # noqa: E402
from charloom.models import build_model  # noqa: E402
from charloom.server.app import ServeSettings, create_app, listen  # noqa: E402

PROMPT = "the quick "


@contextmanager
def running_server(app, config: "uvicorn.Config | None" = None) -> Iterator[str]:
    """Serve ``app`` with uvicorn (``config``: as given, else a quiet one) in a background thread on
    127.0.0.1:<free port>; yields the base URL."""
    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(config or uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def tiny_model(tiny_run: Path) -> Model:
    return charloom.load(tiny_run)


@pytest.fixture(scope="module")
def other_model(tiny_model: Model) -> Model:
    """An untrained network over the same alphabet: different weights, so different text."""
    torch.manual_seed(123)
    net = build_model(tiny_model.net.config, tiny_model.tokenizer.vocab_size).eval()
    return Model(net, tiny_model.tokenizer, tiny_model.config)


@pytest.fixture(scope="module")
def base_url(tiny_model: Model, other_model: Model) -> Iterator[str]:
    app = create_app({"tiny": tiny_model, "other": other_model}, ServeSettings(max_tokens=500, max_prompt_chars=200))
    with running_server(app) as url:
        yield url


@pytest.fixture()
def client(base_url: str) -> "openai.OpenAI":
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=30)


def sse_events(text: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    return [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]


# -- the stop-string matcher, against str.find ----------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(text=st.text("abc", max_size=30), stops=st.lists(st.text("abc", min_size=1, max_size=4), max_size=3),
       cuts=st.lists(st.integers(0, 30), max_size=10))
def test_stop_matcher_cuts_at_the_first_stop_string_whatever_the_pieces(text, stops, cuts):
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    matcher, out, stopped = StopText(stops), [], False
    for piece in pieces:
        sent, stopped = matcher.feed(piece)
        out.append(sent)
        if stopped:
            break
    if not stopped:
        out.append(matcher.flush())
    # Reference: text is cut where a stop string first becomes complete, reading one char at a time.
    expected = text
    for end in range(1, len(text) + 1):
        found = [text[:end].find(s) for s in stops if s in text[:end]]
        if found:
            expected = text[:min(found)]
            break
    hits = [s for s in stops if s in text]
    assert "".join(out) == expected
    assert stopped == bool(hits)


# -- the OpenAI client ----------------------------------------------------------------------------

def test_models_health_and_page(client, base_url):
    assert [m.id for m in client.models.list().data] == ["tiny", "other"]
    health = httpx.get(base_url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    page = httpx.get(base_url + "/")
    assert page.status_code == 200 and "Compare temperatures" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(base_url + "/static/app.js").status_code == 200


def test_completion_is_the_library_text_with_usage(client, tiny_model):
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0.7, seed=5)
    expected = tiny_model.generate(PROMPT, length=40, temperature=0.7, seed=5)
    assert out.choices[0].text == expected.text
    assert out.choices[0].finish_reason == "length"
    assert out.model == "tiny" and out.object == "text_completion"
    assert out.usage.prompt_tokens == len(PROMPT) and out.usage.completion_tokens == 40
    assert out.usage.total_tokens == len(PROMPT) + 40


def test_the_model_field_picks_the_model(client, tiny_model, other_model):
    a = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, seed=2).choices[0].text
    b = client.completions.create(model="other", prompt=PROMPT, max_tokens=30, seed=2).choices[0].text
    assert a == tiny_model.generate(PROMPT, length=30, seed=2).text
    assert b == other_model.generate(PROMPT, length=30, seed=2).text
    assert a != b


def test_streaming_yields_the_same_text_piece_by_piece(client, tiny_model):
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=200, temperature=1.0, seed=9, stream=True,
                                       stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        for choice in chunk.choices:
            pieces.append(choice.text)
            finish = choice.finish_reason or finish
        usage = chunk.usage or usage
    assert "".join(pieces) == tiny_model.generate(PROMPT, length=200, temperature=1.0, seed=9).text
    assert len([p for p in pieces if p]) > 1  # it streams (a reader that falls behind gets several characters per chunk)
    assert finish == "length" and usage.completion_tokens == 200


def test_raw_stream_is_server_sent_events_ending_in_done(base_url):
    r = httpx.post(base_url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "stream": True, "seed": 1})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len("".join(c["choices"][0]["text"] for c in chunks)) == 5
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]


def test_n_samples_are_the_library_batch(client, tiny_model):
    expected = [c.text for c in tiny_model.generate(PROMPT, length=25, num_samples=3, seed=11)]
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=25, n=3, seed=11)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == expected
    assert out.usage.completion_tokens == 75
    streamed = ["", "", ""]
    for chunk in client.completions.create(model="tiny", prompt=PROMPT, max_tokens=25, n=3, seed=11, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == expected


def test_stop_strings_end_the_text_before_them(client, tiny_model):
    full = tiny_model.generate(PROMPT, length=200, temperature=1.0, seed=4).text
    stop = full[60:62]  # a two-character string that surely occurs
    cut = full[:full.find(stop)]
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=200, seed=4, stop=[stop, "\x00never"])
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    streamed, finish = "", None
    for chunk in client.completions.create(model="tiny", prompt=PROMPT, max_tokens=200, seed=4, stop=stop, stream=True):
        streamed += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason or finish
    assert streamed == cut and finish == "stop"


def test_seed_reproduces_and_differs(client):
    def text(seed):
        return client.completions.create(model="tiny", prompt=PROMPT, max_tokens=60, seed=seed).choices[0].text

    assert text(21) == text(21)
    assert text(21) != text(22)


def test_echo_prepends_the_prompt(client, tiny_model):
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, seed=3, echo=True)
    assert out.choices[0].text == PROMPT + tiny_model.generate(PROMPT, length=10, seed=3).text


def test_min_p_and_penalties_are_the_librarys(client, tiny_model):
    options = {"min_p": 0.2, "presence_penalty": 0.7, "frequency_penalty": 0.4, "repetition_penalty": 1.3, "penalty_last_n": 0}
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=60, seed=8, n=2, extra_body=options)
    expected = [c.text for c in tiny_model.generate(PROMPT, length=60, seed=8, num_samples=2, **options)]
    assert [c.text for c in out.choices] == expected
    assert expected != [c.text for c in tiny_model.generate(PROMPT, length=60, seed=8, num_samples=2)]


def _reference_logprobs(model: Model, text: str) -> list[np.ndarray]:
    """log softmax of the model's logits after every prefix of ``PROMPT + text`` (one forward, numpy)."""
    ids = [model.tokenizer.chars.index(c) for c in PROMPT + text]
    with torch.no_grad():
        logits = model.net(torch.tensor([ids]))[0][0].double().numpy()  # (T, V)
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return [logp[len(PROMPT) - 1 + i] for i in range(len(text))]


def test_logprobs_are_openais_shape_and_the_models(client, tiny_model):
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, seed=6, logprobs=3, echo=True)
    choice = out.choices[0]
    text = choice.text[len(PROMPT):]
    lp = choice.logprobs
    assert "".join(lp.tokens) == text and lp.text_offset == list(range(len(PROMPT), len(PROMPT) + 30))
    reference = _reference_logprobs(tiny_model, text)
    chars = tiny_model.tokenizer.chars
    for token, got, top, ref in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, reference):
        assert got == pytest.approx(ref[chars.index(token)], abs=1e-4)
        best = np.argsort(-ref)[:3]
        assert set(top) == {chars[i] for i in best}
        assert [top[chars[i]] for i in best] == pytest.approx(ref[best], abs=1e-4)
    library = tiny_model.generate(PROMPT, length=30, seed=6, logprobs=3)
    assert lp.token_logprobs == pytest.approx(library.token_logprobs)


def test_streaming_with_logprobs_matches_the_plain_answer(client, tiny_model):
    full = tiny_model.generate(PROMPT, length=40, seed=13, num_samples=2)[0].text
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=40, seed=13, n=2, logprobs=2, stop=[full[20:22]])
    plain = client.completions.create(**kwargs)
    texts, logprobs, finish = ["", ""], [None, None], [None, None]
    for chunk in client.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            texts[c.index] += c.text
            logprobs[c.index] = c.logprobs or logprobs[c.index]
            finish[c.index] = c.finish_reason or finish[c.index]
    assert texts == [c.text for c in plain.choices] and finish == [c.finish_reason for c in plain.choices]
    assert finish[0] == "stop"  # the case where tokens run past the text
    assert [lp.model_dump() for lp in logprobs] == [c.logprobs.model_dump() for c in plain.choices]
    for text, lp, reason in zip(texts, logprobs, finish):
        # Every drawn token is listed: with a stop, the stop string's tokens follow the text.
        assert "".join(lp.tokens).startswith(text) and (reason == "stop") == ("".join(lp.tokens) != text)


# -- /v1/next, against an independent numpy computation ------------------------------------------

def _reference(model: Model, text: str, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    ids = [model.tokenizer.chars.index(c) for c in text]
    with torch.no_grad():
        logits = model.net(torch.tensor([ids]))[0][0, -1].double().numpy()
    p = np.exp(logits - logits.max())
    p /= p.sum()
    q = np.exp(np.log(p) / temperature)  # the book's reweight_distribution
    return p, q / q.sum()


@pytest.mark.parametrize("temperature", [0.2, 1.0, 1.7])
def test_next_distribution_is_the_books_reweighting(base_url, tiny_model, temperature):
    r = httpx.post(base_url + "/v1/next", json={"model": "tiny", "prompt": PROMPT, "temperature": temperature})
    assert r.status_code == 200
    rows = r.json()["tokens"]
    p, q = _reference(tiny_model, PROMPT, temperature)
    index = {c: i for i, c in enumerate(tiny_model.tokenizer.chars)}
    assert len(rows) == len(p)
    assert [row["prob"] for row in rows] == sorted((row["prob"] for row in rows), reverse=True)
    for row in rows:
        assert row["prob"] == pytest.approx(p[index[row["token"]]], abs=1e-5)
        assert row["reweighted"] == pytest.approx(q[index[row["token"]]], abs=1e-5)


def test_next_distribution_greedy_and_top_k(tiny_model):
    p, _ = _reference(tiny_model, PROMPT, 1.0)
    greedy = tiny_model.next_token_distribution(PROMPT, temperature=0)
    assert greedy.reweighted[int(p.argmax())] == 1.0 and sum(greedy.reweighted) == 1.0
    top3 = tiny_model.next_token_distribution(PROMPT, top_k=3)
    kept = np.argsort(-p)[:3]
    expected = np.zeros_like(p)
    expected[kept] = p[kept] / p[kept].sum()
    assert np.allclose(top3.reweighted, expected, atol=1e-6)
    assert np.allclose(top3.probs, p, atol=1e-6)


# -- bad requests: 422 naming the field -----------------------------------------------------------

@pytest.mark.parametrize("body, param", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 1.5}, "top_k"),
    ({"n": 0}, "n"),
    ({"n": 1000}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 501}, "max_tokens"),  # above this server's --max-tokens
    ({"max_tokens": True}, "max_tokens"),
    ({"seed": -1}, "seed"),
    ({"prompt": "x" * 201}, "prompt"),  # above this server's --max-prompt-chars
    ({"prompt": "ÜBER"}, "prompt"),  # characters the model never saw
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"model": "nope"}, "model"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"logprobs": 6}, "logprobs"),  # OpenAI's limit is 5
    ({"logprobs": -1}, "logprobs"),
    ({"min_p": 1.5}, "min_p"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),  # OpenAI's range is -2..2
    ({"presence_penalty": -3}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"penalty_last_n": -1}, "penalty_last_n"),
    ({"unknown": "guess"}, "unknown"),
])
def test_invalid_parameters_get_422_naming_the_field(base_url, body, param):
    r = httpx.post(base_url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, **body})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"].startswith(param + ":")


@pytest.mark.parametrize("raw, param", [(b'{"temperature": NaN}', "temperature"), (b'{"prompt": ', "body"), (b"[1, 2]", "body")])
def test_malformed_json_gets_422(base_url, raw, param):
    r = httpx.post(base_url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["param"] == param


def test_the_openai_client_sees_a_clear_error(client):
    with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
        client.completions.create(model="tiny", prompt=PROMPT, temperature=9)


def test_next_rejects_bad_values(base_url):
    r = httpx.post(base_url + "/v1/next", json={"prompt": PROMPT, "temperature": -1})
    assert r.status_code == 422 and r.json()["error"]["param"] == "temperature"


def test_oversized_body_and_foreign_host_are_refused(base_url):
    big = httpx.post(base_url + "/v1/completions", content=b"x" * 100_000, headers={"content-type": "application/json"})
    assert big.status_code == 413
    # DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends its own Host header.
    rebound = httpx.get(base_url + "/v1/models", headers={"host": "evil.example"})
    assert rebound.status_code == 400


def test_no_cross_origin_access_by_default(base_url):
    preflight = httpx.options(base_url + "/v1/completions", headers={
        "origin": "http://evil.example", "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    simple = httpx.get(base_url + "/v1/models", headers={"origin": "http://evil.example"})
    assert "access-control-allow-origin" not in simple.headers


# -- access control, limits and cancellation (their own servers) -----------------------------------

def test_api_key_protects_every_route_but_health(tiny_model):
    app = create_app({"tiny": tiny_model}, ServeSettings(api_key="s3cret", cors=("http://ok.example",)))
    with running_server(app) as url:
        assert httpx.get(url + "/health").status_code == 200
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/next"), ("GET", "/"),
                             ("GET", "/static/app.js")]:
            r = httpx.request(method, url + path, json={"prompt": "a"} if method == "POST" else None)
            assert r.status_code == 401, path
            assert "www-authenticate" in r.headers
        wrong = httpx.get(url + "/v1/models", headers={"authorization": "Bearer s3cres"})
        assert wrong.status_code == 401
        assert httpx.get(url + "/v1/models", headers={"authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(url + "/", auth=("anyone", "s3cret")).status_code == 200  # the browser's Basic prompt
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="a", max_tokens=3).choices[0].finish_reason == "length"
        bad = openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        # --cors: that origin may call, preflight included (it carries no key); others may not.
        ok = httpx.options(url + "/v1/completions", headers={"origin": "http://ok.example", "access-control-request-method": "POST",
                                                             "access-control-request-headers": "authorization,content-type"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://ok.example"
        other = httpx.get(url + "/health", headers={"origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def _wait_idle(url: str, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        health = httpx.get(url + "/health").json()
        if health["running"] == 0 and health["waiting"] == 0:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"generation still running after {timeout}s: {health}")


def _generation_threads() -> int:
    return sum(t.name == "charloom-generation" for t in threading.enumerate())


def test_disconnect_mid_stream_cancels_the_generation(tiny_model):
    # A million characters would take minutes: only cancellation can end it within a second.
    app = create_app({"tiny": tiny_model}, ServeSettings(max_tokens=1_000_000))
    with running_server(app) as url:
        with httpx.Client(timeout=10) as http:
            with http.stream("POST", url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 1_000_000, "stream": True}) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                for _ in range(20):
                    next(lines)
                assert httpx.get(url + "/health").json()["running"] == 1
        _wait_idle(url, timeout=3.0)
        assert _generation_threads() == 0


def test_time_limit_ends_the_stream_with_finish_reason_time(tiny_model):
    app = create_app({"tiny": tiny_model}, ServeSettings(max_tokens=1_000_000, time_limit=0.3))
    with running_server(app) as url:
        start = time.monotonic()
        r = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 1_000_000, "stream": True}, timeout=30)
        elapsed = time.monotonic() - start
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "time"
        assert elapsed < 5
        plain = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 1_000_000}, timeout=30).json()
        assert plain["choices"][0]["finish_reason"] == "time" and 0 < plain["usage"]["completion_tokens"] < 1_000_000
        too_many = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 1_000_000, "n": 16})
        assert too_many.status_code == 422 and too_many.json()["error"]["param"] == "max_tokens"  # the library's cap


def test_full_server_answers_503_with_retry_after(tiny_model):
    app = create_app({"tiny": tiny_model}, ServeSettings(max_tokens=1_000_000, max_concurrency=1, max_queue=1))
    body = {"prompt": PROMPT, "max_tokens": 1_000_000, "stream": True}
    queued: list[int] = []
    with running_server(app) as url:
        with httpx.Client(timeout=10) as http:
            with http.stream("POST", url + "/v1/completions", json=body) as first:
                lines = first.iter_lines()  # keep a reference: a collected iterator closes the connection
                next(lines)
                # The next request waits in the queue (one place) until the first one ends.
                waiter = threading.Thread(target=lambda: queued.append(
                    httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 5}, timeout=20).status_code))
                waiter.start()
                deadline = time.monotonic() + 5
                while httpx.get(url + "/health").json()["waiting"] < 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                refused = httpx.post(url + "/v1/completions", json=body)
                assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
                assert refused.json()["error"]["type"] == "server_busy"
                assert httpx.post(url + "/v1/next", json={"prompt": PROMPT}).status_code == 503
        waiter.join(20)
        assert queued == [200]
        _wait_idle(url, timeout=3.0)


# -- the CLI ---------------------------------------------------------------------------------------

def test_cli_serve_prints_its_address_and_serves(tiny_run):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "charloom", "serve", str(tiny_run), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("charloom: serving run on http://127.0.0.1:"), line + proc.stderr.read() if not line else line
        url = line.split(" on ", 1)[1].split("/ ", 1)[0]
        assert httpx.get(url + "/health").json()["status"] == "ok"
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["run"]
    finally:
        proc.terminate()
        proc.wait(10)


def _main(*args: str) -> tuple[int, str]:
    from charloom.cli.commands import main

    out, err = io.StringIO(), io.StringIO()
    return main(list(args), out, err), err.getvalue()


@pytest.mark.parametrize("args, what", [
    (["--max-concurrency", "0"], "--max-concurrency"),
    (["--max-queue", "-1"], "--max-queue"),
    (["--time-limit", "0"], "--time-limit"),
    (["--api-key", " "], "--api-key"),
])
def test_cli_serve_refuses_bad_limits(tiny_run, args, what):
    code, err = _main("serve", str(tiny_run), "--port", "0", *args)
    assert code == 2 and err.startswith(f"charloom: {what}:") and err.count("\n") == 1


def test_cli_serve_reports_a_busy_port(tiny_run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        code, err = _main("serve", str(tiny_run), "--port", str(taken.getsockname()[1]))
    assert code == 2 and "cannot listen there" in err and err.count("\n") == 1


def test_cli_serve_reports_a_missing_run(tmp_path):
    code, err = _main("serve", str(tmp_path / "nothing"), "--port", "0")
    assert code in (2, 3) and err.startswith("charloom: ") and err.count("\n") == 1


def test_serve_freezes_what_it_loaded_before_serving(tiny_run, monkeypatch):
    # A full collection would rescan torch's and the models' objects (~100 ms); serve() freezes them.
    import gc

    import uvicorn

    from charloom.server.app import serve

    seen = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: seen.append((gc.get_freeze_count(), sockets)))
    try:
        serve([tiny_run], ServeSettings(port=0), stdout=io.StringIO())
        assert len(seen) == 1 and seen[0][0] > 10_000
    finally:
        gc.unfreeze()
        for _, sockets in seen:
            for sock in sockets:
                sock.close()
