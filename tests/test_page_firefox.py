"""The /speak page in Firefox (Debian's firefox-esr, headless), driven over Marionette, Firefox's
own remote protocol (a few lines of JSON over TCP, so no driver download), against a real server:
the page connects, speaking streams audio to the AudioWorklet's port, Stop cancels, errors show.

Firefox plays through a sound server: the test starts PulseAudio with a null sink (Debian's
pulseaudio; the machine has no sound card) and checks that the worklet renders the audio. Without
PulseAudio the AudioContext stays suspended; the page must then still work (it must not hang
waiting for `resume()`) and the audio must still reach the worklet node."""
from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from makima_tts.testing import REF_TEXT
from makima_tts.testing.server import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[1]

FIREFOX = shutil.which("firefox-esr") or shutil.which("firefox")
PULSEAUDIO = shutil.which("pulseaudio")
LONG_TEXT = "Hello from Firefox. This text goes on for a while so that stop has something to stop. " * 3

pytestmark = [pytest.mark.timeout(300), pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(FIREFOX is None, reason="firefox is not installed (apt-get install firefox-esr)")]


class Marionette:
    """Just enough of the Marionette protocol: `length:json` frames, [0, id, command, params] requests."""

    def __init__(self, port: int, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.buf = b""
        self._read()                         # the server's hello
        self.next_id = 0

    def _read(self):
        while b":" not in self.buf:
            self.buf += self.sock.recv(65536)
        size, _, rest = self.buf.partition(b":")
        size = int(size)
        while len(rest) < size:
            rest += self.sock.recv(65536)
        self.buf = rest[size:]
        return json.loads(rest[:size])

    def call(self, command: str, **params):
        self.next_id += 1
        data = json.dumps([0, self.next_id, command, params]).encode()
        self.sock.sendall(str(len(data)).encode() + b":" + data)
        while True:
            msg = self._read()
            if msg[0] == 1 and msg[1] == self.next_id:
                if msg[2]:
                    raise RuntimeError(f"{command}: {msg[2]}")
                return msg[3]

    def click(self, css: str) -> None:
        """A real click (Marionette synthesises trusted input events, as a user's click)."""
        el = self.call("WebDriver:FindElement", using="css selector", value=css)["value"]
        ref = next(iter(el.values()))
        self.call("WebDriver:ElementClick", id=ref)

    def js(self, script: str):
        return self.call("WebDriver:ExecuteScript", script=script, args=[])["value"]

    def wait(self, condition: str, timeout: float = 90.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.js(f"return Boolean({condition});"):
                return
            time.sleep(0.1)
        raise TimeoutError(f"{condition}: {self.js('return JSON.stringify(window.makima)')}")


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory, ref_clip):
    from makima_tts.voices import VoiceLibrary

    tmp = tmp_path_factory.mktemp("ff")
    VoiceLibrary(tmp / "voices").add("tester", ref_clip, 24000, name="Tester", transcript=REF_TEXT)
    with ServerProcess("--checkpoint", str(tiny_checkpoint), "--voices-dir", str(tmp / "voices"),
                       "--default-voice", "tester") as srv:
        srv.wait_ready(timeout=120)
        yield srv


@pytest.fixture(scope="module")
def sound_server(tmp_path_factory):
    """A PulseAudio daemon with a null sink (no sound card here), or None."""
    if not PULSEAUDIO:
        yield None
        return
    runtime = tmp_path_factory.mktemp("pulse")
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "HOME": str(runtime)}
    proc = subprocess.Popen([PULSEAUDIO, "-n", "--daemonize=no", "--exit-idle-time=-1", "--log-target=stderr",
                             "--load=module-null-sink sink_name=null", "--load=module-native-protocol-unix"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    socket_path = runtime / "pulse" / "native"
    deadline = time.monotonic() + 20
    while not socket_path.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    try:
        yield f"unix:{socket_path}" if socket_path.exists() else None
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def firefox(tmp_path_factory, sound_server):
    profile = tmp_path_factory.mktemp("ffprofile")
    port = free_port()
    prefs = {"marionette.port": port, "media.autoplay.default": 0, "media.autoplay.blocking_policy": 0,
             "media.autoplay.block-webaudio": False, "browser.shell.checkDefaultBrowser": False,
             "datareporting.policy.dataSubmissionEnabled": False, "toolkit.telemetry.reporting.enabled": False,
             "browser.startup.homepage_override.mstone": "ignore", "app.update.enabled": False}
    (profile / "user.js").write_text("".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n"
                                             for k, v in prefs.items()))
    env = {**os.environ, **({"PULSE_SERVER": sound_server} if sound_server else {})}
    proc = m = None
    for attempt in range(2):           # a first start in a fresh profile can be slow: one retry
        proc = subprocess.Popen([FIREFOX, "--headless", "--marionette", "--no-remote", "--profile", str(profile),
                                 "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            m = Marionette(port, timeout=90)
            m.call("WebDriver:NewSession", capabilities={"alwaysMatch": {"acceptInsecureCerts": True}})
            break
        except (OSError, RuntimeError, ValueError):
            proc.kill()
            proc.wait()
            if attempt:
                raise
    try:
        m.call("WebDriver:SetWindowRect", width=960, height=1200)
        yield m
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_speak_page_in_firefox(server, firefox, sound_server):
    m = firefox
    m.call("WebDriver:Navigate", url=f"{server.url}/speak")
    m.wait("window.makima && window.makima.state === 'ready'")
    assert m.js("return window.makima.ready.engine") == "qwen3"
    m.wait("document.querySelectorAll('#voice option').length >= 2")      # server default + tester
    # speak: frames reach the AudioWorklet and play
    m.js(f"document.getElementById('text').value = {json.dumps(LONG_TEXT)};")
    m.click("#speak")
    m.wait("window.makima.framesToWorklet > 0 && window.makima.state === 'speaking'")
    assert m.js("return window.makima.bytesReceived") == 4 * m.js("return window.makima.framesToWorklet")
    if sound_server:         # a sound server to play into: the worklet renders what it got
        m.wait("window.makima.workletFramesReceived > 0")
        m.wait("window.makima.workletFramesPlayed > 0", timeout=10)
        assert m.js("return window.makima.contextState") == "running"
    # Stop cancels at once
    cancelled = m.js("return window.makima.cancelledMessages")
    m.click("#stop")
    m.wait(f"window.makima.cancelledMessages > {cancelled}", timeout=10)
    m.wait("window.makima.state === 'ready'", timeout=10)
    # an error is shown in words
    m.js("document.getElementById('text').value = '   ';")
    m.click("#speak")
    m.wait("!document.getElementById('error').hidden", timeout=10)
    assert m.js("return window.makima.lastError.code") == "EMPTY_TEXT"
    png = base64.b64decode(m.call("WebDriver:TakeScreenshot", full=True)["value"])
    out = ROOT / "artifacts"
    out.mkdir(exist_ok=True)
    (out / "speak-firefox.png").write_bytes(png)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
