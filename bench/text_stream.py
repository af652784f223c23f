"""First audio when the text arrives at an LLM's pace: token mode (TextFeed) against sentence mode.

    python -m bench.text_stream [--checkpoint DIR] [--tiny] [--words 40] [--interval 0.1] [--frames 60]

A 40-word sentence without punctuation arrives one word every 100 ms (an LLM writing). Token mode
feeds the words into the model as they come (`engine.stream(feed, ...)`); sentence mode has to wait for the sentence to end (here: the last word) and then speaks
the whole text. First audio is measured from the first word, for an x-vector voice (needs one
token) and an ICL voice cloned from a 3 s clip (needs its reference frames covered). Default
engine path (quantize=auto). Prints a table, then one JSON object last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

if not __package__:    # run as a file: import bench.* as `python -m bench.text_stream` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_checkpoint_flags, checkpoint  # noqa: E402
from makima_tts.testing import REF_TEXT, reference_clip  # noqa: E402

WORDS = ("so here is a reply that a language model is writing one word at a time without any punctuation "
         "at all and a listener should hear it begin long before the model has finished writing the whole "
         "of this rather long sentence").split()


def first_audio(engine, voice, words, interval, frames, token_mode: bool) -> dict:
    from makima_tts.engine.types import GenerationSettings, GenerationStats, SamplingParams

    settings = GenerationSettings(talker=SamplingParams(repetition_penalty=1.05), predictor=SamplingParams(),
                                  seed=1, max_frames=frames)
    feed = engine.new_feed()
    t0 = time.perf_counter()

    def writer():
        for i, w in enumerate(words):
            target = t0 + i * interval
            time.sleep(max(0.0, target - time.perf_counter()))
            feed.push(w + " ")
        feed.close()

    threading.Thread(target=writer, daemon=True).start()
    if token_mode:
        text = feed
    else:                                   # sentence mode: the sentence ends with the last word
        feed.wait(lambda ids, closed: closed)
        text = feed.text
    t_text = time.perf_counter() - t0
    stats = GenerationStats()
    chunks = engine.stream(text, voice, "english", settings, stats=stats)      # a str or the TextFeed
    first = None
    for c in chunks:
        if first is None and len(c.pcm):
            first = time.perf_counter() - t0
    return {"first_audio_s": round(first, 3), "text_complete_s": None if token_mode else round(t_text, 3),
            "frames": stats.frames}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_flags(ap)
    ap.add_argument("--words", type=int, default=40)
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between words")
    ap.add_argument("--frames", type=int, default=30, help="frames generated per utterance")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from makima_tts.engine.qwen3 import Qwen3Engine

    torch.set_num_threads(args.threads)
    ckpt = checkpoint(args)
    engine = Qwen3Engine.load(ckpt)
    clip = reference_clip(3.0)
    voices = {"x-vector": engine.create_voice_prompt(clip, 24000, x_vector_only=True),
              "icl-3s": engine.create_voice_prompt(clip, 24000, transcript=REF_TEXT)}
    words = WORDS[:args.words]
    results = {"settings": {"checkpoint": ckpt, "words": len(words), "interval_s": args.interval,
                            "frames": args.frames, "quantize": engine.quantize, "threads": args.threads,
                            "loadavg_before": [round(x, 2) for x in os.getloadavg()]}, "runs": []}
    for name, voice in voices.items():
        engine.prepare_voice(voice)
        first_audio(engine, voice, words[:6], 0.0, 4, True)           # warm-up
        for mode in ("token", "sentence"):
            r = first_audio(engine, voice, words, args.interval, args.frames, mode == "token")
            r.update(voice=name, mode=mode, tokens_needed=engine.tokens_needed(voice))
            results["runs"].append(r)
    results["settings"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"{'voice':<10}{'mode':<10}{'tokens needed':>14}{'first audio s':>15}{'text done s':>13}")
    for r in results["runs"]:
        print(f"{r['voice']:<10}{r['mode']:<10}{r['tokens_needed']:>14}{r['first_audio_s']:>15}"
              f"{str(r['text_complete_s']):>13}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
