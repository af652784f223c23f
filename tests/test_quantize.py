"""Opt-in int8 weights (Qwen3Engine.load(..., quantize=...)) on the tiny checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from makima_tts.engine import quant
from makima_tts.engine.qwen3 import Qwen3Engine
from makima_tts.engine.types import GenerationSettings

TEXT = "The quick brown fox jumps over the lazy dog."
FRAMES = 24
# Bounds measured on the tiny checkpoint (random weights, nearly flat logits, so argmaxes flip easily;
# once one code differs, free-running greedy continuations are different utterances):
# - logits of the talker / code predictor vs float32: relative L2 error 0.030 / 0.052 ("int8"),
#   0.101 / 0.110 ("int8-dynamic", which also rounds the activations to 8 bits);
# - greedy codes on TEXT: first divergence at frame 2 ("int8"), 0 ("int8-dynamic"; codebook 0 of
#   frame 0 still agrees).
MAX_LOGIT_REL_ERR = {"int8": 0.06, "int8-dynamic": 0.2}
MIN_IDENTICAL_FRAMES = {"int8": 1, "int8-dynamic": 0}


def greedy(frames: int = FRAMES) -> GenerationSettings:
    return GenerationSettings.greedy_settings(max_frames=frames)


@pytest.fixture(scope="module", params=["int8", "int8-dynamic"])
def qengine(request, tiny_checkpoint):
    return Qwen3Engine.load(tiny_checkpoint, quantize=request.param)


def linear_bytes(module: nn.Module) -> tuple[int, int]:
    """(bytes of float linear weights, bytes of int8 weights) under module."""
    f = q = 0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            f += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, quant.Int8Linear):
            q += m.qweight.numel() + m.scales.numel() * 4
        elif type(m).__name__ == "Linear" and hasattr(m, "_packed_params"):      # torch dynamic int8
            w, _ = m._packed_params._weight_bias()
            q += w.numel()
    return f, q


def test_weights_are_int8_and_smaller(engine, qengine):
    f_float, q_float = linear_bytes(engine.talker.model.layers)
    f_q, q_q = linear_bytes(qengine.talker.model.layers)
    assert q_float == 0 and f_q == 0 and q_q > 0
    assert q_q < 0.3 * f_float                       # int8 + a float32 scale per 32 weights vs float32
    f_cp, q_cp = linear_bytes(qengine.talker.code_predictor)
    assert f_cp == 0 and q_cp > 0
    if qengine.quantize == "int8":
        layer = qengine.talker.model.layers[0].mlp.down_proj
        assert isinstance(layer, quant.Int8Linear) and layer.qweight.dtype == torch.int8


def test_quantized_engine_streams_audio(qengine, voice):
    chunks = list(qengine.stream(TEXT, voice, "english", greedy(10)))
    pcm = np.concatenate([c.pcm for c in chunks])
    assert chunks[-1].is_last and len(pcm) == 10 * 1920
    assert np.isfinite(pcm).all() and np.abs(pcm).max() > 0.01


def test_logits_close_to_float(engine, qengine):
    torch.manual_seed(0)
    x = torch.randn(1, 20, engine.talker.hidden_size) * 0.05

    def run(e):
        t, cp = e.talker, e.talker.code_predictor
        with torch.inference_mode():
            logits, hidden = t(x, torch.arange(20)[None], t.model.new_cache(1, 32))
            first = torch.cat([hidden, t.embed_codec(logits.argmax(-1)[:, None])], dim=1)
            return logits, cp.logits(first, torch.arange(2)[None], 1, cp.model.new_cache(1, 17))

    for ref, ours in zip(run(engine), run(qengine)):
        assert float((ours - ref).norm() / ref.norm()) < MAX_LOGIT_REL_ERR[qengine.quantize]
        assert int(ours.argmax()) == int(ref.argmax())


def test_codes_agree_with_float(engine, qengine, voice):
    ref = torch.stack(list(engine.frames(TEXT, voice, "english", greedy())))
    ours = torch.stack(list(qengine.frames(TEXT, voice, "english", greedy())))
    assert ours.shape == ref.shape == (FRAMES, 16)
    same = (ref == ours).all(dim=1)
    prefix = FRAMES if bool(same.all()) else int((~same).nonzero()[0, 0])
    assert prefix >= MIN_IDENTICAL_FRAMES[qengine.quantize], f"first divergence at frame {prefix}"
    assert int(ours[0, 0]) == int(ref[0, 0])


@torch.no_grad()
@pytest.mark.parametrize("prefill_bf16", [False, True], ids=["prefill-float32", "prefill-bfloat16"])
def test_int8_kernel_matches_its_dequantized_weights(monkeypatch, prefill_bf16):
    if quant.kernel() is None:
        pytest.fail(f"int8 kernel not built here: {quant.kernel_error()}")
    monkeypatch.setattr(quant, "PREFILL_BF16", prefill_bf16)     # the AMX choice, either way on any CPU
    monkeypatch.setattr(quant, "TILES_ON_AMX", False)            # the group order (the tile order: below)
    torch.manual_seed(0)
    for k, m in [(k, m) for k in (64, 1024) for m in (1, 3, 7, 16, 20, 40, 70)]:
        # k=64: the plain C++ path; k=1024: the 512-group (VNNI) path up to PREFILL_ROWS;
        # m=70: prefill (dequantized weights, a float32 matrix product, or bfloat16 for k=1024 on AMX)
        lin = nn.Linear(k, 96, bias=True)
        q = quant.Int8Linear.from_linear(lin)
        x = torch.randn(m, k)
        exact = nn.functional.linear(x, q.dequantized(), lin.bias)
        if prefill_bf16 and k % quant.GROUP == 0 and m > quant.PREFILL_ROWS:
            w16 = q.dequantized(torch.empty(96, k, dtype=torch.bfloat16))
            assert torch.equal(w16, q.dequantized().bfloat16())          # rounded to nearest even, in C++
            assert torch.allclose(q(x), nn.functional.linear(x.bfloat16(), w16).float() + lin.bias, atol=1e-5)
            assert 1e-4 < float((q(x) - exact).norm() / exact.norm()) < 0.01   # bfloat16 inputs: ~3e-3
        else:
            assert float((q(x) - exact).norm() / exact.norm()) < 1e-4      # int16 activations: ~3e-5
        err = float((q(x) - lin(x)).norm() / lin(x).norm())
        assert err < 0.01                          # weight rounding: ~0.4 % for Gaussian weights


@torch.no_grad()
def test_the_tile_order_gives_the_group_orders_bits(monkeypatch):
    """Weights in the tile order (AMX: 8+ rows on the tile unit, fewer on a VNNI loop) give exactly the
    group order's outputs for any number of rows; the orders convert both ways; a layer that takes
    prompts is stored in the tile order exactly where AMX runs, and gives the same weights and outputs
    as in the group order."""
    ext = quant.kernel()
    if ext is None:
        pytest.fail(f"int8 kernel not built here: {quant.kernel_error()}")
    torch.manual_seed(0)
    lin = nn.Linear(1024, 96, bias=True)
    monkeypatch.setattr(quant, "TILES_ON_AMX", True)
    amx_here = "amx_int8" in quant._cpu_flags().split()
    if not ext.tiles_supported():                          # no AVX-512 VNNI: the group order only
        assert not amx_here and not quant.use_tiles(96, 1024) and quant.layout() == "groups"
        return
    q, s = quant.quantize_blocks(lin.weight)
    qt, st = ext.to_tiles(q, s)
    assert not torch.equal(qt, q)
    back_q, back_s = ext.from_tiles(qt, st)
    assert torch.equal(back_q, q) and torch.equal(back_s, s)
    groups = ext.permute_k(q, 2)
    for m in (1, 3, 7, 8, 15, 16, 17, 40, 70):             # the VNNI loop; tiles: 16s and the rest
        x = torch.randn(m, 1024) * 3
        assert torch.equal(ext.int8_linear_tiles(x, qt, st), ext.int8_linear(x, groups, s)), m
    tiled = quant.Int8Linear.from_linear(lin)
    assert tiled.tiles == bool(ext.amx_int8()) == amx_here == (quant.layout() == "tiles")
    assert not quant.use_tiles(100, 1024) and not quant.use_tiles(96, 1000)       # shapes it cannot take
    monkeypatch.setattr(quant, "TILES_ON_AMX", False)
    grouped = quant.Int8Linear.from_linear(lin)
    assert not grouped.tiles and quant.layout() == "groups"
    assert torch.equal(tiled.dequantized(), grouped.dequantized())
    assert torch.equal(tiled.dequantized(torch.empty(96, 1024, dtype=torch.bfloat16)),
                       grouped.dequantized(torch.empty(96, 1024, dtype=torch.bfloat16)))
    for m in (2, 20):
        x = torch.randn(m, 1024)
        assert torch.equal(tiled(x), grouped(x))
    x = torch.randn(70, 1024)                              # a prompt's many rows
    w16 = grouped.dequantized(torch.empty(96, 1024, dtype=torch.bfloat16))
    if tiled.tiles and quant.PREFILL_BF16 and ext.amx_bf16():
        # bfloat16 tiles: the bfloat16 operands' products summed in float32 (the group order's F.linear also
        # rounds its output to bfloat16)
        exact = nn.functional.linear(x.bfloat16().double(), w16.double()) + lin.bias.double()
        assert float((tiled(x).double() - exact).norm() / exact.norm()) < 1e-6
        assert float((grouped(x).double() - exact).norm() / exact.norm()) < 1e-2
        for n in (80, 144):                                 # an odd last output tile; a second panel
            q, s = quant.quantize_blocks(torch.randn(n, 1024))
            qt, st = ext.to_tiles(q, s)
            wn = ext.dequantize_tiles(qt, st, torch.empty(n, 1024, dtype=torch.bfloat16))
            exact = nn.functional.linear(x.bfloat16().double(), wn.double())
            assert float((ext.int8_linear_tiles_bf16(x, qt, st).double() - exact).norm() / exact.norm()) < 1e-6
    else:
        assert torch.equal(tiled(x), grouped(x))


def test_quantize_is_refused_off_float32(tiny_checkpoint):
    with pytest.raises(ValueError):
        Qwen3Engine.load(tiny_checkpoint, quantize="int3")
    with pytest.raises(ValueError):
        Qwen3Engine.load(tiny_checkpoint, dtype="bfloat16", quantize="int8")


def test_kernel_rms_norm_matches_torch(qengine):
    """The int8 path's norms run the extension's fused op (when it built): the same values as torch's."""
    from makima_tts.engine.model import RMSNorm

    norms = [m for m in qengine.talker.modules() if isinstance(m, RMSNorm)]
    assert norms and all((m.kernel is not None) == (qengine.quantize == "int8") for m in norms)
    if qengine.quantize != "int8":
        return
    op = norms[0].kernel
    torch.manual_seed(0)
    for shape, d in [((1, 1, 1024), 1024), ((2, 5, 16, 128), 128), ((3, 40), 40), ((700, 1024), 1024)]:
        x, w = torch.randn(*shape) * 3, torch.randn(d)
        ref = nn.functional.rms_norm(x, (d,), w, 1e-6)
        assert torch.allclose(op(x, w, 1e-6), ref, rtol=1e-5, atol=1e-6)
    qkv = torch.randn(2, 3, 4 * 128)
    q = qkv[..., :2 * 128].view(2, 3, 2, 128)                     # not contiguous, as a split of a projection
    assert torch.allclose(op(q, w[:128], 1e-6), nn.functional.rms_norm(q, (128,), w[:128], 1e-6), rtol=1e-5, atol=1e-6)


def test_int4_kernel_matches_its_dequantized_weights(monkeypatch):
    if quant.kernel() is None:
        pytest.fail(f"the int8 kernel does not build here: {quant.kernel_error()}")
    monkeypatch.setattr(quant, "PREFILL_BF16", False)     # m=70's bfloat16 prefill: tested above
    torch.manual_seed(0)
    for k, m in [(k, m) for k in (64, 1024) for m in (1, 3, 16, 40, 70)]:
        lin = nn.Linear(k, 96, bias=True).requires_grad_(False)
        q = quant.Int4Linear.from_linear(lin)
        assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (96, k // 2)     # two weights a byte
        w = q.dequantized()
        levels = (w / q.scales.repeat_interleave(32, dim=1)).round()
        assert levels.abs().max() <= 7 and torch.allclose(w / q.scales.repeat_interleave(32, dim=1), levels, atol=1e-4)
        x = torch.randn(m, k)
        exact = nn.functional.linear(x, w, lin.bias)
        assert float((q(x) - exact).norm() / exact.norm()) < 1e-4
        err = float((q(x) - lin(x)).norm() / lin(x).norm())
        assert 0.02 < err < 0.12                    # 15 levels per block of 32: ~7 % for Gaussian weights


def test_int4_engine_code_predictor_in_4_bits(tiny_checkpoint, tmp_path, voice):
    """quantize="int4": the code predictor's linears in 4 bits, the talker's in 8; cached like int8 (its own
    file), the cached weights giving the codes of fresh ones."""
    fresh = Qwen3Engine.load(tiny_checkpoint, quantize="int4", weights_cache=None)
    assert fresh.quantize == "int4"
    talker = fresh.talker
    cp = [m for m in talker.code_predictor.modules() if isinstance(m, quant.Int8Linear)]
    main = [m for m in talker.model.layers.modules() if isinstance(m, quant.Int8Linear)]
    assert cp and all(isinstance(m, quant.Int4Linear) for m in cp)
    assert main and not any(isinstance(m, quant.Int4Linear) for m in main)
    ref = torch.stack(list(fresh.frames(TEXT, voice, "english", greedy(8))))
    first = Qwen3Engine.load(tiny_checkpoint, quantize="int4", weights_cache=tmp_path)
    second = Qwen3Engine.load(tiny_checkpoint, quantize="int4", weights_cache=tmp_path)
    assert (first.load_info["weights"], second.load_info["weights"]) == ("checkpoint", "cache")
    assert isinstance(second.talker.code_predictor.lm_head[0], quant.Int4Linear)
    assert torch.equal(torch.stack(list(second.frames(TEXT, voice, "english", greedy(8)))), ref)
    int8 = Qwen3Engine.load(tiny_checkpoint, quantize="int8", weights_cache=tmp_path)    # its own cache file
    assert int8.load_info["weights"] == "checkpoint" and len(list(tmp_path.glob("talker-*.safetensors"))) == 2
    pcm = np.concatenate([c.pcm for c in fresh.stream(TEXT, voice, "english", greedy(8))])
    assert pcm.size == 8 * 1920 and np.isfinite(pcm).all()


def test_built_extension_is_imported_directly_an_unfinished_one_is_not(tmp_path):
    """The start-up fast path imports an already built extension without torch's build machinery; a .so
    whose link ninja has not logged as finished (a build killed midway) is not used (kernel() then
    builds it again)."""
    ext = quant.kernel()
    if ext is None:
        pytest.fail(f"the int8 kernel does not build here: {quant.kernel_error()}")
    name = ext.__name__
    folder = quant._build_folder(name)
    assert quant._built(folder, name) is not None and (folder / f"{name}.so").is_file()
    unfinished = tmp_path / name
    unfinished.mkdir()
    (unfinished / f"{name}.so").write_bytes((folder / f"{name}.so").read_bytes()[:4096])
    log = (folder / ".ninja_log").read_text().splitlines()
    (unfinished / ".ninja_log").write_text("\n".join(line for line in log if not line.endswith(f"{name}.so") and
                                                     f"\t{name}.so\t" not in line) + "\n")
    assert quant._built(unfinished, name) is None
    assert quant._built(tmp_path / "missing", name) is None


def test_kernel_attention_matches_torch(qengine):
    """The int8 path's attention does its q/k norms, RoPE and cache write in one C++ call, and a decode
    step's attention (one query per row over its own keys) in another; its MLP does silu(gate) * up in one:
    the same hidden states and cache contents as torch's ops (rows at different positions, a prefill then
    a step)."""
    from makima_tts.engine.model import MLP, Attention, RMSNorm

    mods = [m for m in qengine.talker.modules() if isinstance(m, (Attention, RMSNorm, MLP))]
    assert {type(m) for m in mods} == {Attention, RMSNorm, MLP}
    assert all((m.attend is not None) == (qengine.quantize == "int8") for m in mods if isinstance(m, Attention))
    assert mods and all((m.kernel is not None) == (qengine.quantize == "int8") for m in mods)
    if qengine.quantize != "int8":
        return
    model = qengine.talker.model
    torch.manual_seed(0)
    x, y = torch.randn(3, 5, model.cfg.hidden_size), torch.randn(3, 1, model.cfg.hidden_size)
    positions = torch.tensor([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7], [10, 11, 12, 13, 14]])

    def run():
        cache = model.new_cache(4, 32)
        with torch.inference_mode():
            first = model(x, positions, cache, slice(1, 4))
            second = model(y, positions[:, -1:] + 1, cache, slice(1, 4))
        return [first, second] + [kv.k.clone() for kv in cache.layers] + [kv.v.clone() for kv in cache.layers]

    fused = run()
    kernels = [m.kernel for m in mods]
    for m in mods:
        m.kernel = None
    try:
        plain = run()
    finally:
        for m, k in zip(mods, kernels):
            m.kernel = k
    for a, b in zip(fused, plain):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.equal(fused[2][1], torch.zeros_like(fused[2][1]))     # keys written in the rows used ...
    assert torch.equal(fused[2][0], torch.zeros_like(fused[2][0]))         # ... and only there


@pytest.mark.parametrize("which", ["talker", "code_predictor"])
def test_a_decode_step_through_every_layer_in_one_call_gives_the_same_bits(qengine, which):
    """On int8 models a decode step's layers run in one C++ call (DecodeLayers): exactly the hidden states
    and cache contents of the modules run one by one (rows at different positions, after a prefill)."""
    talker = qengine.talker
    model = talker.model if which == "talker" else talker.code_predictor.model
    assert (model.fused_step is not None) == (qengine.quantize == "int8")
    if qengine.quantize != "int8":
        return
    torch.manual_seed(1)
    x, y = torch.randn(3, 4, model.cfg.hidden_size), torch.randn(3, 1, model.cfg.hidden_size)
    positions = torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8], [1, 2, 3, 4]])

    def run():
        cache = model.new_cache(4, 16)
        with torch.inference_mode():
            model(x, positions, cache, slice(1, 4))
            out = [model(y, positions[:, -1:] + 1, cache, slice(1, 4)), model(y * 2, positions[:, -1:] + 2, cache,
                                                                               slice(1, 4))]
        return out + [t.clone() for kv in cache.layers for t in (kv.k, kv.v)]

    calls = []
    fused = model.fused_step

    class Counted:
        max_rows = fused.max_rows

        def __call__(self, *a):
            calls.append(1)
            return fused(*a)

    model.fused_step = Counted()
    try:
        one_call = run()
        assert len(calls) == 2                   # both decode steps took it (the prefill did not)
        model.fused_step = None
        by_module = run()
    finally:
        model.fused_step = fused
    for a, b in zip(one_call, by_module):
        assert torch.equal(a, b)
