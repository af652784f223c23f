"""The error of int8 weights: greedy codes and waveforms of the quantized engine against float32.

    python bench/quant_error.py [--checkpoint DIR] [--tiny] [--frames N] [--quantize int8[,int8-dynamic]]

Same voice (computed once, by the float engine), same fixed texts, greedy decoding in both
stages, N frames each (random weights never say EOS). For each text it reports:
- first_divergence: the first frame whose 16 codes are not all identical (N when none is),
- prefix_frac: first_divergence / N (the fraction of frames identical before the first divergence),
- frames_identical: the fraction of frames identical at the same index (overall),
- codes_identical / code0_identical: the same over single codes / codebook 0 only,
- snr_db: the decoded waveform of the quantized codes against the float one (same codec, float32),
- tf_code0 / tf_codes_1_15 / tf_all: teacher-forced agreement: the quantized model is fed the float
  model's codes and each of its greedy decisions is compared with the float one, so one flip does
  not derail the rest (the per-decision flip rate). A float engine scores 1.0 here by construction.
Free-running greedy decoding: once one code differs the two continuations are different
utterances, so everything after the first divergence mostly differs. With random weights the
logits are nearly flat, so small perturbations flip argmaxes far more often than with trained
weights: these figures are pessimistic. Prints a table, then one JSON object last.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np

from makima_tts.testing import REF_TEXT, reference_clip

ROOT = Path(__file__).resolve().parents[1]
if not __package__:    # run as a file (python bench/X.py): import bench.* as `python -m bench.X` does
    sys.path.insert(0, str(ROOT))

from bench.common import add_checkpoint_flags, checkpoint  # noqa: E402
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Streaming speech synthesis sends each piece of audio as soon as it is ready.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "In nineteen eighty-four, the city council voted seven to two for the new bridge.",
    "Would you like a cup of tea, or shall we go for a walk before it gets dark?",
]


def snr_db(ref: np.ndarray, test: np.ndarray) -> float:
    noise = float(np.sum((ref - test) ** 2))
    return float("inf") if noise == 0 else round(10 * np.log10(float(np.sum(ref ** 2)) / noise), 2)


def run(engine, voice, frames: int) -> list[tuple]:
    import torch

    from makima_tts.engine.types import GenerationSettings

    out = []
    for text in TEXTS:
        settings = GenerationSettings.greedy_settings(max_frames=frames)
        t0 = time.perf_counter()
        codes = torch.stack(list(engine.frames(text, voice, "english", settings)))
        gen_s = time.perf_counter() - t0
        out.append((codes, engine.codec.decode(codes), gen_s))
    return out


def teacher_forced(engine, voice, codes) -> list[dict]:
    """Feed the float model's codes to `engine` and count how often its greedy choice equals them:
    every decision (codebook 0 and 1..15 of each frame) on the same history, so one flip does not
    derail the rest. Returns, per text, the agreement of codebook 0, of codebooks 1..15, and of all."""
    import torch

    from makima_tts.engine.generate import FrameGenerator
    from makima_tts.engine.types import GenerationSettings

    g = GenerationSettings.greedy_settings()
    rows = []
    with torch.inference_mode():
        for text, (ref, _, _) in zip(TEXTS, codes):
            row = engine.plan(text, voice, "english", g)
            gen = FrameGenerator(engine.talker, engine.ids)
            gen.join([row])
            cp = engine.talker.code_predictor
            hits0 = hits = 0
            for n in range(ref.shape[0]):
                frame = ref[n]
                hits0 += int(row.code0) == int(frame[0])
                embeds = torch.cat([row.hidden, engine.talker.embed_codec(frame[None, :1])], dim=1)
                positions = torch.arange(2)[None]
                for group in range(1, engine.talker.num_groups):
                    logits = cp.logits(embeds, positions, group, gen.predictor_cache)
                    hits += int(logits.argmax(-1)) == int(frame[group])
                    positions = positions[:, -1:] + 1
                    embeds = cp.model.codec_embedding[group - 1](frame[None, group:group + 1])
                # the reference's frame goes back in, on the reference's history
                row.history = [int(c) for c in ref[:n + 1, 0]]
                row.code0, row.last, row.pending = frame[:1], frame[None], True
                row.frames += 1
                gen.advance()
            n = ref.shape[0]
            rows.append(dict(tf_code0=round(hits0 / n, 3), tf_codes_1_15=round(hits / (15 * n), 3),
                             tf_all=round((hits0 + hits) / (16 * n), 3)))
    return rows


def compare(ref: list[tuple], test: list[tuple]) -> list[dict]:
    rows = []
    for text, (c_ref, w_ref, _), (c_q, w_q, gen_s) in zip(TEXTS, ref, test):
        n = c_ref.shape[0]
        same_frame = (c_ref == c_q).all(dim=1)
        first = int((~same_frame).nonzero()[0, 0]) if not bool(same_frame.all()) else n
        rows.append(dict(text=text[:32], frames=n, first_divergence=first, prefix_frac=round(first / n, 3),
                         frames_identical=round(float(same_frame.float().mean()), 3),
                         codes_identical=round(float((c_ref == c_q).float().mean()), 3),
                         code0_identical=round(float((c_ref[:, 0] == c_q[:, 0]).float().mean()), 3),
                         snr_db=snr_db(w_ref, w_q), gen_s=round(gen_s, 2)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_flags(ap)
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--quantize", default="auto",
                    help="comma list: auto (the default path), none (a sanity check), int8, int8-dynamic")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-rows", type=int, default=None,
                    help="quantized linears take the prefill path (dequantized weights, a float or, on AMX, "
                         "bfloat16 matrix product) above this many rows (default quant.PREFILL_ROWS); "
                         "a small value puts every prompt on it, to measure its agreement")
    args = ap.parse_args()

    import torch

    from makima_tts.engine import quant
    from makima_tts.engine.qwen3 import Qwen3Engine

    torch.set_num_threads(args.threads)
    if args.prefill_rows is not None:
        quant.PREFILL_ROWS = args.prefill_rows
    args.checkpoint = checkpoint(args)
    engine = Qwen3Engine.load(args.checkpoint, quantize="none")          # the float32 reference
    voice = engine.create_voice_prompt(reference_clip(3.0), 24000, transcript=REF_TEXT)
    ref = run(engine, voice, args.frames)
    del engine
    gc.collect()
    results: dict = {"settings": dict(checkpoint=args.checkpoint, frames=args.frames, threads=args.threads,
                                      texts=len(TEXTS), prefill_rows=quant.PREFILL_ROWS,
                                      prefill_bf16=quant.PREFILL_BF16)}
    for q in [x.strip() for x in args.quantize.split(",") if x.strip()]:
        engine = Qwen3Engine.load(args.checkpoint, quantize=q)
        rows = compare(ref, run(engine, voice, args.frames))
        for r, tf in zip(rows, teacher_forced(engine, voice, ref)):
            r.update(tf)
        method = engine.quantize
        del engine
        gc.collect()
        summary = {k: round(float(np.mean([r[k] for r in rows])), 3)
                   for k in ("prefix_frac", "frames_identical", "codes_identical", "code0_identical", "tf_code0",
                             "tf_codes_1_15", "tf_all")}
        summary["snr_db_median"] = float(np.median([r["snr_db"] for r in rows]))
        results[q] = dict(method=method, summary=summary, texts=rows)
        print(f"== {q} ({method})")
        keys = ["first_divergence", "prefix_frac", "frames_identical", "codes_identical", "code0_identical",
                "snr_db", "tf_code0", "tf_codes_1_15", "tf_all"]
        print(f"{'text':<34}" + "".join(f"{k:>17}" for k in keys))
        for r in rows:
            print(f"{r['text']:<34}" + "".join(f"{str(r[k]):>17}" for k in keys))
        print(f"{'mean (snr: median)':<34}{'':>17}" + "".join(f"{str(summary[k]):>17}" for k in keys[1:5])
              + f"{summary['snr_db_median']:>17}" + "".join(f"{str(summary[k]):>17}" for k in keys[6:]))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
