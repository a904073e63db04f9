"""The web page in a real browser (Playwright driving Debian's Chromium): generate with the button,
move the temperature slider and watch the distribution change, compare temperatures; a model trained on
records gets a count, a label picker and its records as a list. Saves screenshots in ``test-output/``."""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

import charloom  # noqa: E402
from charloom.server.app import ServeSettings, create_app  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.test_server import _reference, running_server  # noqa: E402
from tests.test_server_records import train_pets  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
PROMPT = "the quick "
SEED = 7
LENGTH = 100

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium: apt-get install -y chromium")


@pytest.fixture(scope="module")
def model(tiny_run: Path):
    return charloom.load(tiny_run)


@pytest.fixture(scope="module")
def page_url(model):
    with running_server(create_app({"tiny": model}, ServeSettings())) as url:
        yield url


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    return charloom.load(train_pets(tmp_path_factory.mktemp("pets")))


@pytest.fixture(scope="module")
def records_url(model, pets):
    with running_server(create_app({"tiny": model, "pets": pets}, ServeSettings())) as url:
        yield url


@contextmanager
def opened_page(url: str) -> Iterator[tuple[Any, list[str]]]:
    """Chromium on ``url``'s page, with a list that collects the page's console errors and exceptions."""
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(url + "/")
            yield page, problems
        finally:
            browser.close()


def _top_row(page) -> tuple[str, float, float]:
    """The chart's first row: token, original and reweighted bar widths (percent)."""
    return page.evaluate("""() => {
        const row = document.querySelector('#chart .row');
        const width = (kind) => parseFloat(row.querySelector('.track.' + kind + ' .fill').style.width);
        return [row.querySelector('.token').textContent, width('original'), width('reweighted')];
    }""")


def _reweighted_texts(page) -> list[str]:
    return page.locator("#chart .row .value-reweighted").all_text_contents()


def _slide(page, selector: str, *keys: str) -> None:
    page.focus(selector)
    for key in keys:
        page.keyboard.press(key)


def test_the_page_generates_compares_and_shows_the_distribution(page_url, model):
    p_ref, _ = _reference(model, PROMPT, 1.0)
    chars = model.tokenizer.chars
    with opened_page(page_url) as (page, problems):
        page.wait_for_selector("#chart .row")
        assert page.locator("#model option").all_text_contents() == ["tiny"]

        # The prompt, the cursor at its end, a seed and a length of 100 (slider: Home = 10, then 9 steps of 10).
        page.fill("#prompt", PROMPT)
        page.eval_on_selector("#prompt", "el => { el.focus(); el.setSelectionRange(el.value.length, el.value.length); }")
        page.fill("#seed", str(SEED))
        _slide(page, "#length", "Home", *["ArrowRight"] * 9)
        assert page.input_value("#length") == str(LENGTH)
        page.wait_for_function("() => document.querySelector('#context').textContent.endsWith('quick ')")

        # Generate: text streams into the output (several DOM updates) and is the library's text.
        page.eval_on_selector("#output", """el => { window.pieces = 0;
            new MutationObserver(records => { for (const r of records) for (const n of r.addedNodes)
                if (n.nodeType === Node.TEXT_NODE) window.pieces += 1; }).observe(el, {childList: true}); }""")
        page.click("#generate")
        page.wait_for_selector("#status[data-state=done]", timeout=30_000)
        expected = model.generate(PROMPT, length=LENGTH, temperature=1.0, seed=SEED).text
        assert page.text_content("#output") == PROMPT + expected
        assert page.evaluate("window.pieces") >= 2  # appended piece by piece as the stream arrived

        # At T = 1 the reweighted bars are the model's own distribution.
        page.wait_for_function("() => document.querySelector('#chart').dataset.temperature === '1'")
        token, original, reweighted = _top_row(page)
        top = int(np.argmax(p_ref))
        assert token == {" ": "␣", "\n": "↵"}.get(chars[top], chars[top])
        assert original == pytest.approx(100 * p_ref[top], abs=0.01) and reweighted == pytest.approx(original, abs=0.01)
        at_one = _reweighted_texts(page)

        # Slide the temperature down to 0.2 (16 steps of 0.05): the distribution sharpens, as the book computes.
        _slide(page, "#temperature", *["ArrowLeft"] * 16)
        assert page.text_content("#temperature-value") == "0.20"
        page.wait_for_function("() => document.querySelector('#chart').dataset.temperature === '0.2'")
        _, q_ref = _reference(model, PROMPT, 0.2)
        token, original, reweighted = _top_row(page)
        assert reweighted == pytest.approx(100 * q_ref[top], abs=0.01) and reweighted > original
        assert _reweighted_texts(page) != at_one
        page.screenshot(path=str(_out("page-t0.2.png")))

        # ... and up to 2.0 (End): it flattens.
        _slide(page, "#temperature", "End")
        page.wait_for_function("() => document.querySelector('#chart').dataset.temperature === '2'")
        _, q_ref = _reference(model, PROMPT, 2.0)
        _, original, reweighted = _top_row(page)
        assert reweighted == pytest.approx(100 * q_ref[top], abs=0.01) and reweighted < original

        # Compare temperatures: four columns, same prompt and seed, each the text that temperature gives alone.
        page.click("#compare")
        page.wait_for_selector("#status[data-state=done]", timeout=60_000)
        assert page.text_content("#status") == "comparison done"
        columns = {pre.get_attribute("data-temperature"): pre.text_content() for pre in page.locator("#compare-grid pre").all()}
        assert list(columns) == ["0.2", "0.5", "1", "1.2"]
        for sample in model.generate(PROMPT, length=LENGTH, temperature=[0.2, 0.5, 1.0, 1.2], seed=SEED):
            assert columns[f"{sample.temperature:g}"] == PROMPT + sample.text
        assert re.search(rf"seed {SEED}\b", page.text_content("#compare-seed"))
        page.screenshot(path=str(_out("page.png")), full_page=True)

        # Text is inserted as text: markup in the prompt shows as characters and never becomes elements.
        page.fill("#prompt", "<b>bold</b><img src=x> the ")
        _slide(page, "#length", "Home")
        page.click("#generate")
        page.wait_for_selector("#status[data-state=done]", timeout=30_000)
        assert page.text_content("#output").startswith("<b>bold</b><img src=x> the ")
        assert page.locator("#output b, #output img, #chart img").count() == 0
        assert problems == []  # no script errors, no Content-Security-Policy violations


def _finish(library: str) -> str:
    return "stop" if library == "end" else library


def test_a_records_model_gets_a_count_a_label_picker_and_a_list(records_url, pets):
    with opened_page(records_url) as (page, problems):
        page.wait_for_selector("#chart .row")
        # A model of running text first: one stream of text, no count, no labels.
        assert page.is_visible("#output") and not page.is_visible("#records")
        assert not page.is_visible("#count") and not page.is_visible("#label")

        page.select_option("#model", "pets")
        assert page.is_visible("#count") and page.is_visible("#label") and page.is_visible("#records")
        assert not page.is_visible("#output") and page.input_value("#prompt") == ""
        assert "csv records" in page.text_content("#model-info")
        assert page.locator("#label option").all_text_contents() == ["any (the model picks)", "cat", "dog"]
        # The chart reads the empty prompt as the start of a record: the end token is one of its rows.
        page.wait_for_function("() => [...document.querySelectorAll('#chart .token')].some(t => t.textContent === 'end')")

        # Four records labelled dog, at most 40 characters each (slider: Home = 10, then 3 steps of 10).
        page.fill("#count", "4")
        page.select_option("#label", "dog")
        page.fill("#seed", "3")
        _slide(page, "#length", "Home", *["ArrowRight"] * 3)
        page.click("#generate")
        page.wait_for_selector("#status[data-state=done]", timeout=30_000)
        assert page.text_content("#status") == "done (4 records)"
        expected = pets.generate("", num_samples=4, length=40, seed=3, label="dog")
        items = page.locator("#records li").all()
        assert len(items) == 4
        for item, record in zip(items, expected):
            assert item.locator(".label").text_content() == "dog"
            assert item.text_content() == "dog" + record.text
            assert item.get_attribute("data-finish") == _finish(record.finish_reason)

        # Compare temperatures: each column is a list of four records.
        page.click("#compare")
        page.wait_for_selector("#status[data-state=done]", timeout=60_000)
        column = page.locator('#compare-grid ol[data-temperature="0.5"] li')
        drawn = pets.generate("", num_samples=4, length=40, seed=3, label="dog", temperature=0.5)
        assert column.all_text_contents() == ["dog" + r.text for r in drawn]
        page.screenshot(path=str(_out("page-records.png")), full_page=True)

        # Back to the model of running text: the ordinary view again.
        page.select_option("#model", "tiny")
        assert page.is_visible("#output") and not page.is_visible("#records")
        assert not page.is_visible("#count") and not page.is_visible("#label")
        assert problems == []


def _out(name: str) -> Path:
    folder = REPO / "test-output"
    folder.mkdir(exist_ok=True)
    return folder / name
