"""The insight commands end to end: CLI -> HTML page -> rendered by Chromium, screenshot in test-output/."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from charloom.cli.commands import main

from .conftest import REPO, run_cli

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = REPO / "test-output"


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def pages(tiny_run: Path, tiny_text: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three pages of the tiny run, written by the CLI."""
    root = tmp_path_factory.mktemp("pages")
    text = root / "text.txt"
    text.write_text(tiny_text[:1500], encoding="utf-8")
    code, out, err = cli("report", str(tiny_run), "--sweep-length", "120", "--temperatures", "0.2,1.0,2.0")
    assert code == 0, err
    assert (tiny_run / "figures" / "loss.png").is_file() and (tiny_run / "figures" / "temperature_sweep.png").is_file()
    code, out, err = cli("score", str(tiny_run), str(text), "--out", str(root / "score.html"))
    assert code == 0, err
    assert "bits per char" in out
    code, out, err = cli("neurons", str(tiny_run), str(text), "--out", str(root / "neurons.html"))
    assert code == 0, err
    assert "position in line: cell" in out
    return {"report": tiny_run / "report.html", "score": root / "score.html", "neurons": root / "neurons.html"}


def test_pages_are_self_contained(pages):
    for path in pages.values():
        html = path.read_text(encoding="utf-8")
        assert html.startswith("<!DOCTYPE html>")
        assert "http://" not in html and "https://" not in html and " src=\"/" not in html
    report = pages["report"].read_text(encoding="utf-8")
    assert report.count('src="data:image/png;base64,') == 2
    assert "order-3 n-gram baseline" in report and "unigram baseline" in report


def test_cli_errors_are_one_line(tiny_run, tmp_path):
    result = run_cli("score", str(tiny_run), str(tmp_path / "missing.txt"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith("charloom: ")
    code, _, err = cli("report", str(tmp_path))
    assert code == 3 and "holds no checkpoint" in err
    code, _, err = cli("report", str(tiny_run), "--temperatures", "-1")
    assert code == 2 and "temperature" in err


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Chromium is not installed at /usr/bin/chromium (apt-get install chromium)")
def test_pages_render_in_chromium(pages):
    sync_api = pytest.importorskip("playwright.sync_api")
    SHOTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1250, "height": 900})
            errors: list[str] = []
            remote: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", lambda req: remote.append(req.url) if not req.url.startswith(("file:", "data:")) else None)
            for name, path in pages.items():
                page.goto(path.as_uri())
                if name == "report":
                    loaded = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete && i.naturalWidth > 0)")
                    assert loaded == [True, True]
                if name == "score":
                    page.hover("#text span:nth-child(12)")
                    assert "top guesses" in page.inner_text("#panel")
                if name == "neurons":
                    spans = page.eval_on_selector_all("#any span", "s => s.length")
                    assert spans > 100
                    page.select_option("#pick", index=1)
                    assert page.eval_on_selector_all("#any span", "s => s.length") == spans
                shot = SHOTS / f"insight-{name}.png"
                page.screenshot(path=str(shot))
                assert shot.stat().st_size > 10_000
            assert errors == [] and remote == []
        finally:
            browser.close()
