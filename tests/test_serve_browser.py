"""The ``tuwen serve`` page in a real browser: Debian's Chromium, headless, driven by Playwright for Python.

No browser is downloaded: the test uses the system Chromium (``apt-get install chromium``) and skips, saying
why, when it or Playwright is missing. Set ``TUWEN_SCREENSHOT=path.png`` to keep a screenshot of the page."""
from __future__ import annotations

import base64
import io
import os
import shutil

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
pytest.importorskip("python_multipart", reason="the serve extra (python-multipart) is not installed")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed "
                                                             "(pip install playwright; no browser download needed)")

CHROMIUM = next((p for p in (os.environ.get("TUWEN_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                             shutil.which("chromium-browser")) if p and os.path.exists(p)), None)
if CHROMIUM is None:
    pytest.skip("no Chromium found (apt-get install -y chromium, or set TUWEN_CHROMIUM)", allow_module_level=True)

from PIL import Image  # noqa: E402

from tuwen.serve.app import ServeOptions, Server, create_app, serve_in_thread  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
PROMPT = "右上角有一个黄色的圆形"


@pytest.fixture(scope="module")
def url():
    server = Server(ServeOptions(max_batch=4, max_queue=16, max_n=4))
    base, stop = serve_in_thread(create_app(server))
    yield base
    stop()


def _finals(page) -> list[str]:
    return page.eval_on_selector_all("#results img.final", "els => els.map(e => e.src)")


def _generate(page) -> list[str]:
    page.click("#generate")
    page.wait_for_selector("#results[data-state=done], #results[data-state=error]", state="attached", timeout=60_000)
    assert page.get_attribute("#results", "data-state") == "done", page.text_content("#status")
    return _finals(page)


def test_page_generates_streams_and_reproduces_with_the_seed(url, tmp_path):
    with sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        except Exception as e:  # noqa: BLE001 - a Chromium that cannot start here is an environment problem
            pytest.skip(f"Chromium at {CHROMIUM} did not start: {str(e).splitlines()[0]}")
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            page.goto(url + "/")
            page.wait_for_function("document.querySelector('#model-info').textContent.includes('ready')",
                                   timeout=60_000)
            assert "左上角" in page.get_attribute("#prompt", "placeholder")
            # partial images: record every src each card gets while it fills in
            page.evaluate("""() => { window.srcs = []; new MutationObserver(ms => ms.forEach(m => {
                if (m.attributeName === 'src') window.srcs.push(m.target.src); })).observe(
                document.querySelector('#results'), {subtree: true, attributes: true}); }""")
            page.fill("#prompt", PROMPT)
            page.fill("#n", "2")
            page.click("#random-seed")
            assert page.input_value("#seed").isdigit()
            page.fill("#seed", "123")
            first = _generate(page)
            assert len(first) == 2 and all(s.startswith("data:image/png;base64,") for s in first)
            for s in first:
                im = Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1])))
                assert im.size == (64, 64) and im.format == "PNG"
            assert first[0] != first[1]
            seen = page.evaluate("window.srcs")
            assert len(set(seen)) > len(first), "no partial image was shown before the final ones"
            assert "seed 123" in page.text_content("#status")
            # the same seed gives the same images; another seed other ones
            assert _generate(page) == first
            page.fill("#seed", "124")
            assert _generate(page) != first
            # history keeps the prompts; clicking one fills the form back in
            assert PROMPT in page.text_content("#history")
            page.fill("#prompt", "")
            page.click("#history li >> nth=1")
            assert page.input_value("#prompt") == PROMPT and page.input_value("#seed") == "123"
            # click to enlarge, with a download link
            page.click("#results img >> nth=0")
            assert page.is_visible("#overlay")
            assert page.get_attribute("#download", "href").startswith("data:image/png;base64,")
            shot = os.environ.get("TUWEN_SCREENSHOT")
            page.click("#overlay")
            assert not page.is_visible("#overlay")
            if shot:
                page.screenshot(path=shot, full_page=True)
            assert not errors, errors
            # a bad request shows the server's one-line reason
            page.fill("#n", "9")
            page.evaluate("document.querySelector('#n').removeAttribute('max')")
            page.click("#generate")
            page.wait_for_selector("#results[data-state=error]", state="attached", timeout=30_000)
            assert "n must be between 1 and 4" in page.text_content("#status")
        finally:
            browser.close()
