"""Issue 14 items 5 and 7: the shared test helpers (makima_tts.testing) and the suite's hygiene."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from makima_tts.testing.server import parse_metric

ROOT = Path(__file__).resolve().parents[1]

EXPOSITION = """\
# HELP makima_active_streams Utterances generating now
# TYPE makima_active_streams gauge
makima_active_streams 0.0
# TYPE makima_active_streams_peak gauge
makima_active_streams_peak 3.0
# TYPE makima_utterances_total counter
makima_utterances_total{engine="qwen3",outcome="ok"} 2.0
makima_utterances_created{engine="qwen3",outcome="ok"} 1.7e+09
makima_errors_total{code="SYNTHESIS_ERROR"} 1.0
"""


def test_a_missing_metric_series_raises_instead_of_reading_zero():
    assert parse_metric(EXPOSITION, "makima_active_streams") == 0.0
    assert parse_metric(EXPOSITION, "makima_active_streams_peak") == 3.0
    assert parse_metric(EXPOSITION, "makima_utterances_total", '{engine="qwen3",outcome="ok"}') == 2.0
    with pytest.raises(KeyError, match="makima_active_stream"):
        parse_metric(EXPOSITION, "makima_active_stream")           # a renamed metric
    with pytest.raises(KeyError, match="there is"):
        parse_metric(EXPOSITION, "makima_utterances_total", '{engine="qwen3",outcome="error"}')
    with pytest.raises(KeyError):
        parse_metric(EXPOSITION, "makima_utterances_total")        # labelled only: no unlabelled series
    with pytest.raises(KeyError):
        parse_metric(EXPOSITION, "makima_errors_total", '{kind="SYNTHESIS_ERROR"}')   # a renamed label


SKIPPING = """
import pytest

def test_passes():
    pass

def test_skips():
    pytest.skip("no browser here")

@pytest.mark.xfail(reason="known")
def test_xfails():
    assert False
"""


@pytest.mark.parametrize("ci", ["", "1"])
def test_under_ci_a_skip_is_a_failure(pytester, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    pytester.makepyfile(test_some=SKIPPING,
                        test_module_skip="import pytest\npytest.importorskip('no_such_module_anywhere')\n\n"
                                         "def test_never():\n    pass\n")
    result = pytester.runpytest("-p", "makima_tts.testing.pytest_ci", "-rs")
    if ci:
        result.assert_outcomes(passed=1, failed=1, skipped=1, xfailed=1)     # the module's skip fails the run
        result.stdout.fnmatch_lines(["*skipped under CI=1*no browser here*",
                                     "*skipped under CI=1*test_module_skip.py*no_such_module_anywhere*"])
        assert result.ret == pytest.ExitCode.TESTS_FAILED
    else:
        result.assert_outcomes(passed=1, skipped=2, xfailed=1)
        assert result.ret == pytest.ExitCode.OK


def _collect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_browser_tests_are_marked_and_markers_are_strict():
    pages = ["tests/test_page.py", "tests/test_page_firefox.py"]
    everything = _collect(*pages)
    browser = _collect("-m", "browser", *pages)
    assert everything.returncode == 0 and browser.returncode == 0, everything.stdout + browser.stdout
    count = [line for line in everything.stdout.splitlines() if "::" in line]
    assert count and [line for line in browser.stdout.splitlines() if "::" in line] == count
    assert _collect("-m", "not browser and not slow", *pages).returncode == pytest.ExitCode.NO_TESTS_COLLECTED


def _bench_sources():
    return sorted((ROOT / "bench").glob("*.py"))


def test_bench_uses_makima_tts_testing_not_tests():
    for path in _bench_sources():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.module is None or node.module.split(".")[0] != "tests", f"{path.name}:{node.lineno}"
            elif isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] != "tests" for a in node.names), f"{path.name}:{node.lineno}"
            elif isinstance(node, ast.Attribute):       # the engine's private methods (prepare_voice is public)
                assert node.attr != "_streaming_decoder", f"{path.name}:{node.lineno}"


def test_ref_text_is_defined_once():
    places = []
    for folder in ("bench", "tests", "makima_tts/testing"):
        for path in (ROOT / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "REF_TEXT" for t in node.targets):
                    places.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert places == ["makima_tts/testing/clips.py:6"], places


def test_bench_modules_import_without_editing_sys_path():
    names = [f"bench.{p.stem}" for p in _bench_sources() if p.stem not in ("__init__", "vox_peer")]
    code = ("import importlib, sys\nbefore = list(sys.path)\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "    assert sys.path == before, (name, [p for p in sys.path if p not in before])\n"
            "assert not [m for m in sys.modules if m == 'tests' or m.startswith('tests.')]\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("how", [["-m", "bench.batch"], ["-m", "bench.engine"], ["bench/engine.py"]])
def test_bench_scripts_run_from_the_source_tree(how):
    """`python -m bench.X` from the repository root (and `python bench/X.py`), the test extra not needed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, *how, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "usage" in r.stdout, r.stderr[-2000:]
