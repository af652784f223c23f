"""The codec decoder: cost per frame by precision, batch size and frames per call; the error of bfloat16.

    python -m bench.codec [--checkpoint DIR | --tiny] [--dtypes float32,bfloat16] [--batches 1,2,4,8]
                          [--frames-per-call 1,2,6] [--calls 3]

Speed: B streams, each with its own history (primed with 0, 5, 10, ... frames, so batched calls take
the per-row position and padded-key path the scheduler takes), step `StreamingDecoder.push_many` with
n frames per stream per call; reported as ms per frame of one stream (`ms_per_frame_row`, the cost of
80 ms of audio) and per call. One call over B rows is how the batched scheduler shares the codec.

Error: bfloat16 against float32 on the same codes (40 frames), as SNR and max abs of the waveform, with
torch's SnakeBeta ops (`bf16_error`) and with the extension's fused one (`bf16_fused_error`: what an
int8 engine runs). Speed is measured with the fused SnakeBeta (as an int8 engine runs it) unless
--torch-ops.
Random weights drive this decoder's output into the [-1, 1] clamp (most samples at +-1) with very
large activations inside, where any rounding is amplified chaotically: that figure is reported
(`as_built`) but says little. `tamed` rescales the random weights as a trained decoder's are
(residual branches at 0.1, SnakeBeta at alpha = beta = 1, ConvNeXt scale 0.1, output at RMS 0.2):
nothing clips and the SNR measures rounding. Prints a table, then one JSON object last.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from bench.common import add_checkpoint_flags, checkpoint


def snr_db(ref: np.ndarray, test: np.ndarray) -> float:
    noise = float(np.sum((ref - test) ** 2))
    return float("inf") if noise == 0 else round(10 * np.log10(float(np.sum(ref ** 2)) / noise), 2)


def tame(codec) -> None:
    """Rescale a random decoder's weights the way trained ones are, so that nothing clips (see above)."""
    import torch

    d = codec.decoder
    with torch.inference_mode():
        for act in d.activations():
            act.alpha.fill_(1.0)
            act.inv_beta.fill_(1.0)
        for b in d.blocks:
            for u in b.units:
                u.conv2.weight.mul_(0.1)
        for _, convnext in d.upsample:
            convnext.gamma.mul_(0.1)
        rms = float(np.sqrt(np.mean(codec.decode(_codes(codec, 40, 0)) ** 2)))
        d.conv_out.weight.mul_(0.2 / rms)
        if d.conv_out.bias is not None:
            d.conv_out.bias.mul_(0.2 / rms)


def _codes(codec, frames: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, codec.codebook_size, (frames, codec.num_codebooks), generator=g)


def error(folder: str, fused=None) -> dict:
    import copy

    import torch

    from makima_tts.engine.codec import Codec, _cast

    out = {}
    for name in ("as_built", "tamed"):
        ref = Codec.load(folder)
        if name == "tamed":
            tame(ref)
        low = copy.deepcopy(ref)
        _cast(low.decoder, torch.bfloat16)
        low.decoder.dtype = torch.bfloat16
        if fused:
            low.use_fused_ops(fused)
        codes = _codes(ref, 40, 1)
        x, y = ref.decode(codes), low.decode(codes)
        out[name] = dict(snr_db=snr_db(x, y), max_abs=round(float(np.abs(x - y).max()), 5),
                         rms=round(float(np.sqrt(np.mean(x ** 2))), 3),
                         clipped_frac=round(float(np.mean(np.abs(x) >= 0.999)), 3))
    return out


def fused_snake():
    """The int8 extension's fused SnakeBeta (what an int8 engine gives its codec), or None when it does not build."""
    from makima_tts.engine import quant

    ext = quant.kernel()
    return None if ext is None else ext.snake


def speed(folder: str, dtype: str, batches: list[int], per_call: list[int], calls: int, fused=None) -> list[dict]:
    import torch

    from makima_tts.engine.codec import Codec, StreamingDecoder

    codec = Codec.load(folder, decoder_dtype=getattr(torch, dtype))
    if fused:
        codec.use_fused_ops(fused)
    rows = []
    for b in batches:
        for n in per_call:
            streams = [codec.streaming_decoder(_codes(codec, 5 * i, i) if i else None) for i in range(b)]
            codes = [_codes(codec, n * (calls + 1), 100 + i) for i in range(b)]
            StreamingDecoder.push_many(streams, [c[:n] for c in codes])              # warm
            t0 = time.perf_counter()
            for k in range(1, calls + 1):
                StreamingDecoder.push_many(streams, [c[k * n:(k + 1) * n] for c in codes])
            dt = (time.perf_counter() - t0) / calls
            rows.append(dict(dtype=dtype, batch=b, frames_per_call=n, ms_per_call=round(1000 * dt, 1),
                             ms_per_frame_row=round(1000 * dt / (b * n), 1)))
            print(f"{dtype:9s} B={b:<2d} n={n}: {rows[-1]['ms_per_frame_row']:7.1f} ms per frame-row, "
                  f"{rows[-1]['ms_per_call']:7.1f} ms per call", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_checkpoint_flags(ap)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--frames-per-call", default="1,2,6")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-error", action="store_true")
    ap.add_argument("--torch-ops", action="store_true", help="time torch's SnakeBeta ops, not the fused one")
    args = ap.parse_args()

    import torch

    from makima_tts.engine.codec import cpu_has_native_bf16

    torch.set_num_threads(args.threads)
    folder = os.path.join(checkpoint(args), "speech_tokenizer")
    load_before = os.getloadavg()
    fused = fused_snake()
    rows = [r for dt in args.dtypes.split(",")
            for r in speed(folder, dt, [int(x) for x in args.batches.split(",")],
                           [int(x) for x in args.frames_per_call.split(",")], args.calls,
                           None if args.torch_ops else fused)]
    err = {} if args.skip_error else error(folder)
    err_fused = {} if args.skip_error or fused is None else error(folder, fused)
    for label, errs in (("torch ops", err), ("fused SnakeBeta", err_fused)):
        for name, e in errs.items():
            print(f"bfloat16 vs float32, {label} ({name}): SNR {e['snr_db']} dB, max abs {e['max_abs']} "
                  f"(output RMS {e['rms']}, clipped {e['clipped_frac']:.0%})")
    print(json.dumps(dict(checkpoint=folder, threads=args.threads, native_bf16=cpu_has_native_bf16(),
                          fused_snake=not args.torch_ops and fused is not None, loadavg_before=load_before,
                          loadavg_after=os.getloadavg(), speed=rows, bf16_error=err, bf16_fused_error=err_fused)))


if __name__ == "__main__":
    main()
