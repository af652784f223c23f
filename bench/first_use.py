"""A voice's first use against its next uses, through the server's voice path (VoiceLibrary +
PromptCache, which computes the prompt and prepares the voice once).

    python bench/first_use.py [--checkpoint DIR | --tiny] [--quantize none|int8|int8-dynamic] [--threads 2]

Prints the prompt time (computed + prepared) and the first audio of the voice's first, second and
third utterances; one JSON object last.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from makima_tts.testing import REF_TEXT, reference_clip

ROOT = Path(__file__).resolve().parents[1]
if not __package__:    # run as a file (python bench/X.py): import bench.* as `python -m bench.X` does
    sys.path.insert(0, str(ROOT))

from bench.common import add_checkpoint_flags, checkpoint  # noqa: E402

TEXT = "Streaming speech sends each piece of audio as soon as it is ready."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_flags(ap)
    ap.add_argument("--quantize", default="none")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from makima_tts.engine.qwen3 import Qwen3Engine
    from makima_tts.engine.types import GenerationSettings
    from makima_tts.voices import PromptCache, VoiceLibrary

    torch.set_num_threads(args.threads)
    engine = Qwen3Engine.load(checkpoint(args), quantize=None if args.quantize == "none" else args.quantize)
    warm = engine.create_voice_prompt(reference_clip(2.0), 24000, transcript="Warm up.")
    list(engine.stream("Warm up.", warm, "english", GenerationSettings(max_frames=12, seed=0)))
    with tempfile.TemporaryDirectory() as d:
        lib = VoiceLibrary(Path(d))
        lib.add("v", reference_clip(3.0), 24000, transcript=REF_TEXT)
        t0 = time.perf_counter()
        voice = PromptCache(lib, engine).get("v")
        prompt_s = time.perf_counter() - t0

        def first_audio() -> float:
            t0 = time.perf_counter()
            stream = engine.stream(TEXT, voice, "english", GenerationSettings(seed=1, max_frames=8))
            next(stream)
            t = time.perf_counter() - t0
            stream.close()
            return t

        uses = [first_audio() for _ in range(3)]
    result = {"quantize": engine.quantize, "prompt_s": round(prompt_s, 3),
              "first_audio_s": {"first_use": round(uses[0], 3), "second_use": round(uses[1], 3),
                                "third_use": round(uses[2], 3)}}
    print(f"prompt (computed + prepared) {prompt_s:.3f} s; first audio: first use {uses[0]:.3f} s, "
          f"second {uses[1]:.3f} s, third {uses[2]:.3f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
