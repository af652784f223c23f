"""Issue 18: `makima-tts serve --ray` on a local Ray cluster on loopback, tiny checkpoint, 2 engine replicas.

The protocol and OpenAI tests of the single-process server (tests/test_server.py) run here unchanged
against it (imported below, with this module's `server`), then what only a cluster has: concurrent
sessions spread over both replicas, a voice uploaded through the ingress loaded once per replica, and a
replica killed mid-stream costing only its own utterances. Needs the `ray` extra (scripts/setup.sh
--dev installs it; under CI=1 its absence fails, it is not skipped silently).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from makima_tts.testing import REF_TEXT
from makima_tts.testing.server import ServerProcess, metric, wait_for
from tests.wsclient import Client

pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'makima-tts[ray]')")
pytestmark = pytest.mark.ray

# the single-process server's protocol and OpenAI tests, run unchanged against --ray (token mode too: the text's
# pieces reach the replica speaking it through the text relay, ray_serve/relay.py)
from tests.test_server import (MAX_TEXT, test_bad_messages_get_recoverable_errors,  # noqa: E402,F401
                               test_body_streams_before_generation_ends, test_cancel_stops_before_next_frame,
                               test_health_ready_metrics_docs, test_interrupt_cancels_current_and_queue,
                               test_more_sessions_than_streams_all_complete, test_openai_alias_voice_means_default,
                               test_openai_errors_in_openai_shape, test_openai_sdk_every_format,
                               test_ready_then_frames_of_pcm, test_speed_keeps_pitch_and_changes_duration,
                               test_sse_stream_format, test_start_sets_format_and_rate,
                               test_stop_finishes_queue_then_closes, test_streamed_text_is_fed_token_by_token_by_default,
                               test_streamed_text_speaks_each_sentence_when_complete,
                               test_utterances_play_in_order)
from tests.servers import voices_folder  # noqa: E402
from tests.test_voices_server import wav_bytes  # noqa: E402

REPLICAS = 2
MEDIUM = "Hello world, this sentence goes on. " * 4     # long enough to be killed mid-stream
SHUTDOWN_WAIT_S = 90.0       # the ingress removes the application and stops its local cluster


@pytest.fixture(scope="module")
def voices_dir(tmp_path_factory, ref_clip):
    return voices_folder(tmp_path_factory, ref_clip)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, voices_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "ray-server.log"
    s = ServerProcess("--ray", "--replicas", str(REPLICAS), "--replica-cpus", "0.5", "--threads", "1",
                      "--checkpoint", str(tiny_checkpoint), "--voices-dir", str(voices_dir),
                      "--max-streams", "2", "--max-queue", "16", "--max-text-chars", str(MAX_TEXT),
                      "--default-voice", "tester", log_path=log)
    try:
        s.wait_ready(timeout=300)               # 200 once one replica has reported; both are up by then
        assert wait_for(lambda: len(replicas(s)) == REPLICAS, 60), replicas(s)
        yield s
    finally:
        if s.proc.poll() is None:           # a clean exit takes the local Ray cluster down with it
            s.proc.send_signal(signal.SIGINT)
            try:
                s.proc.wait(SHUTDOWN_WAIT_S)
            except subprocess.TimeoutExpired:
                pass
        s.stop()


@pytest.fixture
def client(server):
    with Client(server.ws_url) as c:
        assert c.recv_json()["type"] == "ready"
        yield c


def replicas(server) -> list[dict]:
    return httpx.get(server.url + "/ready", timeout=10).json()["ray"]["replica"]


def served(server) -> dict:
    return {r["replica_id"]: r["served"] for r in replicas(server)}


def sessions(server, n: int, text: str, voice: str = "tester", rounds: int = 1) -> tuple[list, list]:
    """n WebSocket sessions at once, each speaking `text` `rounds` times: (audio_end messages, errors)."""
    ends, errors = [], []

    def one(i):
        try:
            with Client(server.ws_url) as c:
                c.recv_json()
                for k in range(rounds):
                    end, audio = c.utterance(text, id=f"s{i}-{k}", voice=voice)
                    assert len(audio) > 0
                    ends.append(end)
        except Exception as e:        # noqa: BLE001 - reported by the caller
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return ends, errors


# --------------------------------------------------------------------------- what only --ray has


def test_ready_and_metrics_report_the_replicas(server):
    ready = httpx.get(server.url + "/ready").json()
    assert ready["ready"] is True and ready["ray"]["replicas"] == REPLICAS
    for r in ready["ray"]["replica"]:
        assert r["pid"] > 0 and r["max_streams"] == 2 and r["streams"] >= 0 and "prompts_cached" in r
    assert metric(server, "makima_ray_replicas") == REPLICAS
    rid = ready["ray"]["replica"][0]["replica_id"]
    assert metric(server, "makima_ray_replica_streams", f'{{replica="{rid}"}}') >= 0
    assert metric(server, "makima_ray_replica_prompts_cached", f'{{replica="{rid}"}}') >= 0


def test_eight_concurrent_sessions_complete_on_both_replicas(server):
    before = served(server)
    ends, errors = sessions(server, 8, "Eight sessions at once.")
    assert not errors and len(ends) == 8
    assert wait_for(lambda: sum(served(server).values()) - sum(before.values()) >= 8, 10)
    after = served(server)
    assert all(after[rid] > before.get(rid, 0) for rid in after), (before, after)   # both replicas served


def test_uploaded_voice_speaks_on_both_replicas_and_is_loaded_once_each(server, ref_clip):
    time.sleep(1.5)                                  # the replicas' reports are up to date
    computed_before = sum(x["prompts_computed"] for x in replicas(server))
    r = httpx.post(server.url + "/api/v1/voices", timeout=120,
                   files={"file": ("up.wav", wav_bytes(ref_clip), "audio/wav")},
                   data={"voice_id": "uploaded", "name": "Uploaded", "transcript": REF_TEXT, "language": "english"})
    assert r.status_code == 201, r.text
    ends, errors = sessions(server, 4, "The uploaded voice.", voice="uploaded", rounds=2)
    assert not errors and len(ends) == 8
    time.sleep(1.5)                                  # the replicas' next reports
    reps = replicas(server)
    assert all(x["voice_loads"].get("uploaded") == 1 for x in reps), reps   # on both, loaded once each
    # its prompt was computed once (at the upload, on a replica) and saved to the shared library, where both
    # replicas loaded it from
    assert sum(x["prompts_computed"] for x in reps) == computed_before + 1, reps
    assert metric(server, "makima_voice_prompt_computations_total") >= 1


def test_a_killed_replica_costs_only_its_own_utterances(server):
    """SIGKILL one replica mid-stream: its utterances get a recoverable TTS_UNAVAILABLE with a retry hint,
    the other replica's finish, every session's next utterance succeeds, and Serve replaces the replica."""
    results: dict = {}
    started = threading.Barrier(5)

    def one(i):
        with Client(server.ws_url) as c:
            c.recv_json()
            c.send(type="speak", text=MEDIUM, id="long")
            started.wait(60)
            seen, _ = c.until_one_of(("audio_end", "error"), "long", timeout=240)
            first = seen[-1]
            end, audio = c.utterance("The next one.", id="next")
            results[i] = (first, end, len(audio))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    started.wait(60)
    assert wait_for(lambda: len(replicas(server)) == REPLICAS and all(r["streams"] > 0 for r in replicas(server)),
                    60), replicas(server)
    victim = replicas(server)[0]
    os.kill(victim["pid"], signal.SIGKILL)
    for t in threads:
        t.join(300)
    assert len(results) == 4, results
    firsts = [first for first, _, _ in results.values()]
    lost = [m for m in firsts if m["type"] == "error"]
    assert lost and len(lost) < len(firsts), firsts
    for m in lost:
        assert m["code"] == "TTS_UNAVAILABLE" and m["recoverable"] is True and m["retry_after_ms"] > 0, m
    assert any(m["type"] == "audio_end" for m in firsts), firsts      # the other replica's streams finished
    assert all(end["type"] == "audio_end" and n > 0 for _, end, n in results.values())   # the next ones speak
    # Serve replaces the dead replica
    assert wait_for(lambda: len(replicas(server)) == REPLICAS and victim["pid"] not in
                    [r["pid"] for r in replicas(server)], 120), replicas(server)
    assert metric(server, "makima_ray_lost_mid_stream_total") == len(lost)


def test_token_mode_utterance_waiting_for_text_is_cancelled_on_its_replica(client, server):
    """Token mode over --ray: an utterance whose text is still arriving holds a stream on a replica (it waits
    there for the pieces the relay brings); `cancel` ends it there too, and the session goes on."""
    assert wait_for(lambda: sum(r["streams"] for r in replicas(server)) == 0, 30), replicas(server)
    client.send(type="start")
    assert client.recv_json()["text_mode"] == "token"
    client.send(type="text", text="so ")                  # fewer tokens than the voice needs: it waits for more
    assert wait_for(lambda: sum(r["streams"] for r in replicas(server)) == 1, 30), replicas(server)
    client.send(type="cancel")
    seen, _ = client.until("cancelled")
    assert not any(m["type"] == "audio_end" for m in seen)
    assert wait_for(lambda: sum(r["streams"] for r in replicas(server)) == 0, 30), replicas(server)
    end, audio = client.utterance("After.", id="after")
    assert len(audio) > 0


# --------------------------------------------------------------------------- Ray stays optional


def test_plain_serve_does_not_import_ray():
    code = ("import sys, makima_tts.cli, makima_tts.cli.serve, makima_tts.server.app; "
            "makima_tts.cli.serve.register(__import__('argparse').ArgumentParser().add_subparsers()); "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


NO_RAY = """
import sys
class _NoRay:                     # as if the `ray` extra were not installed
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError("No module named 'ray'", name="ray")
sys.meta_path.insert(0, _NoRay())
"""


def test_without_the_extra_plain_serve_starts_and_ray_says_what_is_missing(tmp_path):
    """Without the `ray` extra: the plain server's app starts and answers (no ray imported), and `serve --ray`
    stops at once with MISSING_EXTRA."""
    plain = NO_RAY + (
        "from fastapi.testclient import TestClient\n"
        "from makima_tts.server.app import create_app\n"
        "from makima_tts.server.settings import Settings\n"
        f"app = create_app(Settings(engine='piper', lazy_load=True, voices_dir={str(tmp_path)!r}))\n"
        "with TestClient(app) as c:\n"
        "    assert c.get('/health').status_code == 200\n"
        "    assert c.get('/ready').json()['state'] == 'starting'\n"
        "assert 'ray' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", plain], check=True, timeout=120)
    serve = NO_RAY + "from makima_tts.cli import main\nsys.exit(main())\n"
    r = subprocess.run([sys.executable, "-c", serve, "serve", "--ray", "--engine", "piper", "--voices-dir",
                        str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "MISSING_EXTRA" in r.stderr and "makima-tts[ray]" in r.stderr, r.stderr


def test_autoscale_argument():
    from makima_tts.ray_serve.app import parse_autoscale

    assert parse_autoscale("1:4") == (1, 4) and parse_autoscale(None) is None
    for bad in ("4:1", "x", "1", "0:0"):
        with pytest.raises(ValueError):
            parse_autoscale(bad)


def test_voice_ref_names_library_voices_by_prompt_key():
    from makima_tts.engine.types import VoicePrompt
    from makima_tts.ray_serve.engine import voice_ref

    import torch

    library = VoicePrompt(speaker_embedding=torch.zeros(4), meta={"voice_id": "anna", "voice_key": "abc"})
    assert voice_ref(library) == (("library", "anna@abc"), "anna@abc")
    loose = VoicePrompt(speaker_embedding=torch.zeros(4))
    assert voice_ref(loose) == (("prompt", loose), "")
    assert voice_ref("joe") == (("builtin", "joe"), "") and voice_ref(None) == (None, "")


@pytest.mark.parametrize("manifest", ["rayservice-cpu.yaml", "rayservice-gpu.yaml"])
def test_kuberay_manifests_build_the_application(manifest):
    """deploy/kuberay: the RayService's application builds with its args: the Ingress deployment (the server's
    app, at route /) bound to the Engine deployment (autoscaling bounds, resources)."""
    yaml = pytest.importorskip("yaml")
    from makima_tts.ray_serve import APP_NAME, DEPLOYMENT, INGRESS
    from makima_tts.ray_serve.app import build
    from makima_tts.testing.server import SOURCE_ROOT

    assert SOURCE_ROOT is not None
    docs = list(yaml.safe_load_all((SOURCE_ROOT / "deploy" / "kuberay" / manifest).read_text()))
    service = next(d for d in docs if d["kind"] == "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    app = config["applications"][0]
    assert app["name"] == APP_NAME and app["import_path"] == "makima_tts.ray_serve.app:build"
    assert app["route_prefix"] == "/" and config["http_options"]["port"] == 8000
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema(**config)                                    # a valid Serve config
    assert [d["name"] for d in app["deployments"]] == [INGRESS, DEPLOYMENT]
    ingress = build(app["args"])._bound_deployment
    assert ingress.name == INGRESS and ingress.num_replicas == app["args"]["ingress_replicas"]
    engine_app, settings = ingress.init_args
    deployment = engine_app._bound_deployment
    assert deployment.name == DEPLOYMENT
    scaling = deployment._deployment_config.autoscaling_config
    lo, hi = (int(x) for x in app["args"]["autoscale"].split(":"))
    assert (scaling.min_replicas, scaling.max_replicas) == (lo, hi)
    assert scaling.target_ongoing_requests == app["args"]["max_streams"]
    assert settings["max_streams"] == hi * app["args"]["max_streams"]     # the ingress admits what MAX replicas take
    groups = {g["groupName"]: g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert groups["engine"]["maxReplicas"] >= hi                   # room for MAX replicas, one per pod
    ingress_cpus = float(groups["ingress"]["rayStartParams"]["num-cpus"])
    assert groups["ingress"]["replicas"] * ingress_cpus >= ingress.num_replicas * ingress.ray_actor_options["num_cpus"]
    assert ("num_gpus" in deployment.ray_actor_options) == ("gpu" in manifest)
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    assert "makima-voices" in claims
