"""The /speak page in a real browser (Playwright + Debian's /usr/bin/chromium) against a real server.

`makima-tts serve` runs in a child process with the tiny checkpoint, a fresh voices folder and an
API key; the page is opened with `?api_key=`. The page exposes counters on `window.makima`; the
AudioWorklet reports back what it received and played, so audio is counted where it arrives.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from makima_tts.engine.types import LANGUAGES
from makima_tts.testing import REF_TEXT
from makima_tts.testing.server import ServerProcess

ROOT = Path(__file__).resolve().parents[1]

CHROMIUM = "/usr/bin/chromium"
API_KEY = "page-test-key"
MAX_TEXT = 4321               # not the default: the page must take the limit from the server
MODULES = ("page.js", "client.js", "player.js", "voices.js", "pcm-worklet.js")
LONG_TEXT = ("Hello there. This is a rather long piece of text, spoken by the page test so that the "
             "audio keeps playing for a while before somebody presses stop. ") * 3

pytestmark = [pytest.mark.timeout(300), pytest.mark.browser, pytest.mark.slow]


def _playwright():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed")
    return sync_playwright


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("page")
    with ServerProcess("--checkpoint", str(tiny_checkpoint), "--voices-dir", str(tmp / "voices"),
                       "--api-key", API_KEY, "--max-text-chars", str(MAX_TEXT), log_path=tmp / "server.log") as srv:
        srv.wait_ready(timeout=120)
        yield srv


@pytest.fixture(scope="module")
def browser():
    sync_playwright = _playwright()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--autoplay-policy=no-user-gesture-required"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def clip_wav(tmp_path, ref_clip) -> Path:
    import soundfile as sf

    path = tmp_path / "reference.wav"
    sf.write(path, ref_clip, 24000, subtype="PCM_16")
    return path


def _m(page, expr: str):
    return page.evaluate(f"() => window.makima.{expr}")


def _open(browser, url: str, width: int = 960, height: int = 1200):
    context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
    page = context.new_page()
    page.problems = []
    page.on("pageerror", lambda e: page.problems.append(str(e)))
    page.goto(url)
    return context, page


def test_page_and_static_files(server):
    import httpx

    r = httpx.get(server.url + "/speak")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert 'id="speak"' in r.text and '<script type="module" src="static/page.js">' in r.text
    for name in MODULES:      # ES modules and the worklet need a JavaScript MIME type
        js = httpx.get(server.url + "/static/" + name)
        assert js.status_code == 200 and js.headers["content-type"] == "text/javascript; charset=utf-8", name
        assert js.headers["x-content-type-options"] == "nosniff" and js.headers["cache-control"] == "no-cache"
        # revalidated, not refetched (StaticFiles' ETag)
        assert httpx.get(server.url + "/static/" + name, headers={"if-none-match": js.headers["etag"]}).status_code == 304
    assert "registerProcessor" in httpx.get(server.url + "/static/pcm-worklet.js").text
    css = httpx.get(server.url + "/static/speak.css")
    assert css.status_code == 200 and css.headers["content-type"] == "text/css; charset=utf-8"
    assert httpx.head(server.url + "/static/page.js").status_code == 200
    assert httpx.get(server.url + "/static/speak.js").status_code == 404        # the one script it replaced
    assert httpx.get(server.url + "/static/../routes_page.py").status_code == 404
    assert httpx.get(server.url + "/static/%2e%2e/routes_page.py").status_code == 404
    assert httpx.get(server.url + "/static/nope.js").status_code == 404


def test_speak_page_end_to_end(server, browser, clip_wav):
    import soundfile as sf

    context, page = _open(browser, f"{server.url}/speak?api_key={API_KEY}")
    try:
        # loads, connects, fills the picker
        page.wait_for_function("window.makima && window.makima.state === 'ready'", timeout=30000)
        assert _m(page, "ready.sample_rate") == 24000
        assert _m(page, "contextRate") == 24000
        # what the server accepts comes from its `ready`: the languages (in its order) and the text limit
        for select in ("#language", "#clone-language"):
            assert page.eval_on_selector_all(select + " option", "os => os.map(o => o.value)") == list(LANGUAGES)
        assert page.input_value("#language") == "auto"
        assert page.evaluate("document.getElementById('text').maxLength") == MAX_TEXT
        assert _m(page, "ready.sample_rates").count(24000) == 1
        page.wait_for_function("document.querySelectorAll('#voice option').length >= 1")
        assert page.eval_on_selector_all("#voice option", "os => os.map(o => o.value)")[0] == ""
        assert page.locator("#status").get_attribute("data-state") == "ready"
        assert page.locator("#status-text").inner_text().startswith("ready")

        # an error in words: speaking empty text
        page.fill("#text", "   ")
        page.click("#speak")
        page.wait_for_selector("#error:not([hidden])")
        assert _m(page, "lastError.code") == "EMPTY_TEXT"
        assert "text" in page.inner_text("#error-text").lower()

        # clone a voice through the upload form; it appears in the picker, selected
        page.set_input_files("#clip", str(clip_wav))
        page.fill("#transcript", REF_TEXT)
        page.fill("#clone-name", "Page Voice")
        page.click("#upload")
        page.wait_for_function("window.makima.lastUpload || window.makima.lastError.source === 'http'",
                               timeout=60000)
        assert _m(page, "lastUpload && makima.lastUpload.voice_id") == "page-voice", _m(page, "lastError")
        assert page.input_value("#voice") == "page-voice"
        assert "page-voice" in page.eval_on_selector_all("#voice option", "os => os.map(o => o.value)")
        assert page.locator("#error").is_hidden()
        assert "Added" in page.inner_text("#upload-status")

        # speak: audio frames reach the worklet and play
        page.fill("#text", LONG_TEXT)
        page.select_option("#language", "english")
        page.click("#speak")
        page.wait_for_function("window.makima.workletFramesReceived > 0", timeout=60000)
        page.wait_for_function("window.makima.workletFramesPlayed > 0", timeout=10000)
        assert _m(page, "state") == "speaking"
        assert _m(page, "framesToWorklet") > 0
        assert _m(page, "workletFramesReceived") <= _m(page, "framesToWorklet")
        assert _m(page, "bytesReceived") >= 4 * _m(page, "workletFramesReceived")
        assert page.locator("#stop").is_enabled()

        # Stop: silenced at once (worklet flushed), a `cancelled` arrives, state goes back to ready
        cancelled_before = _m(page, "cancelledMessages")
        flushes_before = _m(page, "flushes")
        page.click("#stop")
        assert _m(page, "state") == "ready"
        page.wait_for_function(f"window.makima.cancelledMessages > {cancelled_before}", timeout=10000)
        page.wait_for_function(f"window.makima.flushes > {flushes_before}", timeout=5000)
        assert _m(page, "workletBuffered") == 0
        played = _m(page, "workletFramesPlayed")
        page.wait_for_timeout(300)
        assert _m(page, "workletFramesPlayed") == played, "audio kept playing after Stop"
        assert page.locator("#stop").is_disabled()

        # Ctrl+Enter speaks; the utterance plays to the end; metrics are shown
        utterances = _m(page, "utterances")
        played_before = _m(page, "workletFramesPlayed")
        page.fill("#text", "Short one.")
        page.focus("#text")
        page.keyboard.press("Control+Enter")
        page.wait_for_function(f"window.makima.utterances > {utterances}", timeout=60000)
        page.wait_for_function("window.makima.state === 'ready'", timeout=60000)
        metrics = _m(page, "lastMetrics")
        assert metrics["ttfa_ms"] >= 0 and metrics["rtf"] > 0 and metrics["audio_ms"] > 0
        assert metrics["client_ttfa_ms"] is not None and metrics["client_ttfa_ms"] >= 0
        frames = _m(page, "lastUtteranceFrames")
        assert abs(frames / 24000 * 1000 - metrics["audio_ms"]) < 50
        assert _m(page, "workletFramesPlayed") - played_before == frames   # all of it, through the worklet
        for cell in ("#m-ttfa", "#m-cttfa", "#m-rtf", "#m-audio"):
            assert page.inner_text(cell) not in ("–", "…", "")

        # download the last utterance as WAV, built in the page
        with page.expect_download() as dl:
            page.click("#download")
        path = Path(dl.value.path())
        audio, sr = sf.read(path, dtype="float32")
        assert sr == 24000 and len(audio) == frames
        assert dl.value.suggested_filename.endswith(".wav")

        # a server error in words: an upload that is not audio
        page.set_input_files("#clip", {"name": "bad.wav", "mimeType": "audio/wav", "buffer": b"RIFF\0\0\0\0WAVEjunk"})
        page.fill("#clone-name", "Bad Voice")
        errors = _m(page, "errors")
        page.click("#upload")
        page.wait_for_function(f"window.makima.errors > {errors}", timeout=30000)
        assert _m(page, "lastError.code") == "INVALID_AUDIO"
        assert _m(page, "lastError.source") == "http"
        assert page.locator("#error").is_visible()
        assert "INVALID_AUDIO" in page.inner_text("#error-text")
        assert "bad-voice" not in page.eval_on_selector_all("#voice option", "os => os.map(o => o.value)")

        # the socket drops: the page reconnects by itself and can speak again
        connects = _m(page, "connects")
        page.evaluate("() => window.makima.dropConnection()")
        page.wait_for_function(f"window.makima.connects > {connects} && window.makima.state === 'ready'",
                               timeout=20000)

        out = ROOT / "artifacts"
        out.mkdir(exist_ok=True)
        page.screenshot(path=str(out / "speak.png"), full_page=True)

        # phone width: nothing sticks out sideways
        page.set_viewport_size({"width": 375, "height": 800})
        page.wait_for_timeout(100)
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        page.screenshot(path=str(out / "speak-phone.png"), full_page=True)
        assert not page.problems, page.problems
    finally:
        context.close()


def test_speak_page_without_api_key_says_so(server, browser):
    context, page = _open(browser, f"{server.url}/speak")
    try:
        page.wait_for_selector("#error:not([hidden])", timeout=20000)
        assert _m(page, "lastError.code") == "UNAUTHORIZED"
        page.wait_for_timeout(500)
        assert _m(page, "state") != "ready"
        assert page.locator("#speak").is_disabled()
    finally:
        context.close()


def test_keyboard_labels(server, browser):
    """Every form control has a label; Tab reaches the text box and the buttons."""
    context, page = _open(browser, f"{server.url}/speak?api_key={API_KEY}")
    try:
        unlabelled = page.evaluate("""() => [...document.querySelectorAll('textarea, select, input')]
            .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label'))
            .map(el => el.id)""")
        assert unlabelled == []
        page.wait_for_function("window.makima.state === 'ready'", timeout=30000)
        seen = set()
        for _ in range(12):
            page.keyboard.press("Tab")
            seen.add(page.evaluate("document.activeElement && document.activeElement.id"))
        assert {"text", "voice", "language", "speak"} <= seen
    finally:
        context.close()



def test_page_takes_its_languages_from_the_server(server, browser):
    """A server with another list of languages (its `ready` rewritten on the way) gets that list in
    both pickers, and its text limit: the page keeps no copy of either."""
    import json

    def rewrite(message):
        if isinstance(message, str):
            msg = json.loads(message)
            if msg.get("type") == "ready":
                msg["languages"] = ["auto", "english", "klingon"]
                msg["max_text_chars"] = 77
                return json.dumps(msg)
        return message

    def route(ws):
        upstream = ws.connect_to_server()
        upstream.on_message(lambda m: ws.send(rewrite(m)))
        ws.on_message(upstream.send)

    context = browser.new_context()
    page = context.new_page()
    problems = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.route_web_socket(lambda url: "/api/v1/speak" in url, route)
    try:
        page.goto(f"{server.url}/speak?api_key={API_KEY}")
        page.wait_for_function("window.makima && window.makima.state === 'ready'", timeout=30000)
        for select in ("#language", "#clone-language"):
            assert page.eval_on_selector_all(select + " option", "os => os.map(o => o.value)") == \
                ["auto", "english", "klingon"]
        assert page.eval_on_selector_all("#language option", "os => os.map(o => o.textContent)") == \
            ["auto-detect", "English", "Klingon"]
        assert page.evaluate("document.getElementById('text').maxLength") == 77
        assert not problems, problems
    finally:
        context.close()
