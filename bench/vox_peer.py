"""The vox-tts side of `bench/engine.py --peer vox`: runs under the bench-only vox virtual environment's
python (numpy + vox-tts, no torch, nothing of makima_tts), with VOX_DEBUG_NO_EOS=1 set by the caller
so random weights give exactly --frames frames. Prints one JSON object last.

    <venv>/bin/python bench/vox_peer.py --tmod FILE.tmod --clip CLIP.npy --ref-text "..." --text "..."
                                        --frames 30 --threads 2 [--many 1,2,4,8]

Timed, in order: vox.Engine(FILE, device="cpu", threads=N) (load_s); engine.clone_voice(clip, ref_text,
language="english") (clone_s); a first stream with that voice (the voice's first use: first audio
clone_s + its first chunk); a second stream with the same voice (the figures reported: per-stage
seconds from the difference of engine.stats()["backend"]["seconds"] around it).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time

import numpy as np


def peak_rss_mb() -> float:
    """VmHWM: this process's own peak (ru_maxrss would carry over the parent's peak from before exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tmod", required=True)
    ap.add_argument("--clip", required=True, help=".npy, float32 mono at 24 kHz")
    ap.add_argument("--ref-text", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--many", default="", help="also: aggregate of N streams at once via synthesize_many, "
                                               "for each N of a comma list (e.g. 1,2,4,8)")
    args = ap.parse_args()
    assert os.environ.get("VOX_DEBUG_NO_EOS") == "1", "VOX_DEBUG_NO_EOS=1 must be set (exact frame count)"

    import vox

    t0 = time.perf_counter()
    engine = vox.Engine(args.tmod, device="cpu", threads=args.threads)
    load_s = time.perf_counter() - t0
    sr = engine.sample_rate
    clip = np.load(args.clip).astype(np.float32)
    t0 = time.perf_counter()
    voice = engine.clone_voice((clip, 24000), args.ref_text, language="english")
    clone_s = time.perf_counter() - t0

    def run():
        before = engine.stats()["backend"]
        samples, chunks, ttfa = 0, 0, None
        t0 = time.perf_counter()
        for chunk in engine.stream(args.text, voice, seed=1, max_frames=args.frames):
            if ttfa is None:
                ttfa = time.perf_counter() - t0
                first_chunk = len(chunk)
            samples += len(chunk)
            chunks += 1
        total = time.perf_counter() - t0
        after = engine.stats()["backend"]
        secs = {k: after["seconds"].get(k, 0.0) - before.get("seconds", {}).get(k, 0.0) for k in after["seconds"]}
        frames = after.get("frames", 0) - before.get("frames", 0) if "frames" in before else after.get("frames")
        return dict(total=total, ttfa=ttfa, samples=samples, chunks=chunks, first_chunk_samples=first_chunk,
                    seconds=secs, frames=frames)

    first = run()               # the voice's first use
    second = run()              # same voice again: the figures reported
    many = []
    for n in [int(x) for x in args.many.split(",") if x.strip()]:
        t0 = time.perf_counter()
        outs = engine.synthesize_many([args.text] * n, voice, workers=n, seed=1, max_frames=args.frames)
        wall = time.perf_counter() - t0
        audio = sum(len(o) for o in outs) / sr
        many.append(dict(streams=n, audio_s=round(audio, 2), wall_s=round(wall, 2),
                         aggregate_audio_s_per_s=round(audio / wall, 3)))
    audio_s = second["samples"] / sr
    frames = second["frames"] or round(second["samples"] / (sr * 0.08))
    s = second["seconds"]
    talker, predictor, codec = s.get("talker", 0.0), s.get("predictor", 0.0), s.get("codec", 0.0)
    stats = engine.stats()
    print(json.dumps(dict(
        system=f"vox-tts {vox.__version__}", precision=engine.info.get("manifest", {}).get("precision"),
        frames=frames, audio_s=round(audio_s, 3),
        frame_ms=round(1000 * (talker + predictor) / frames, 1),
        talker_ms=round(1000 * talker / frames, 1), predictor_ms=round(1000 * predictor / frames, 1),
        prefill_s=round(s["prefill"], 3) if "prefill" in s else None,
        decode_s_per_audio_s=round(codec / audio_s, 3),
        ttfa_s=round(second["ttfa"], 3), rtf=round(second["total"] / audio_s, 3), total_s=round(second["total"], 2),
        prompt_s=round(clone_s, 3), load_s=round(load_s, 2),
        peak_rss_mb=round(peak_rss_mb()),
        vox_peak_rss_mb=round(stats.get("memory", {}).get("peak_rss", 0) / 2**20),
        first_use=dict(clone_s=round(clone_s, 3), ttfa_s=round(first["ttfa"], 3),
                       first_audio_incl_clone_s=round(clone_s + first["ttfa"], 3),
                       rtf=round(first["total"] / (first["samples"] / sr), 3),
                       seconds={k: round(v, 3) for k, v in first["seconds"].items()}),
        second_use=dict(ttfa_s=round(second["ttfa"], 3), seconds={k: round(v, 3) for k, v in s.items()}),
        first_chunk_ms=round(1000 * second["first_chunk_samples"] / sr), chunks=second["chunks"],
        quantize="q8 (bf16)", many=many,
        not_available=["voice_prime_s (vox primes the codec inside the first stream: first_use.seconds.codec_warmup)"],
    )))


if __name__ == "__main__":
    main()
