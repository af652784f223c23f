"""Weight-only int8 for the talker and the code predictor (opt-in: `Qwen3Engine.load(..., quantize="int8")`).

Decoding one frame at batch 1 reads every weight of the talker once and of the code
predictor 15 times, so it is bound by memory bandwidth: int8 weights read a quarter of
the bytes of float32.

Two backends, both measured by bench/engine.py:

- "int8" (default when it builds): int8 weights in blocks of 32 along the input dimension,
  one float32 scale per block (symmetric, absmax / 127), times float32 activations. The
  activations are never quantized, so the only error is the weights' rounding. The kernel
  is a small C++ extension (AVX-512 / AVX2 intrinsics, compiled for this CPU the first time
  it is used, cached in ~/.cache/makima-tts/kernels). When no compiler is at hand it
  falls back to "int8-dynamic" with a warning.
- "int8-dynamic": torch's dynamic quantization of nn.Linear (fbgemm / x86 backend): int8
  per-channel weights, and activations quantized to 8 bits per tensor on the fly (more error).
"""
from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .model import Cache, Step

log = logging.getLogger(__name__)

BLOCK = 32          # weights per scale
GROUP = 512         # the kernel's fast path: in_features a multiple of 512 (else a plain C++ loop)
PREFILL_ROWS = 64   # more activation rows than this (prefill): dequantize and use torch's float matrix product
QUANTIZE_CHOICES = ("auto", "none", "int8", "int4", "int8-dynamic")

_SOURCE = Path(__file__).parent / "csrc" / "int8_linear.cpp"
# the build (and the stored weight layout) is named by the source's hash: an edit rebuilds it and
# invalidates quantized weights cached with an older layout
KERNEL_VERSION = hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:12]

_ext = None
_ext_error: Optional[str] = None
_ext_lock = threading.Lock()


def kernel():
    """The compiled int8 extension, or None (with the reason in `kernel_error()`) when it cannot be built."""
    global _ext, _ext_error
    with _ext_lock:
        if _ext is None and _ext_error is None:
            try:
                import os
                import shutil
                import sys

                cflags = ["-O3", "-march=native", "-fopenmp"]  # -fopenmp: else at::parallel_for runs on one thread
                # named by the source, the torch it builds against and the CPU it is built for (-march=native):
                # two installs (a venv and a CI clone's) sharing the cache folder must not rebuild each other's
                # copy at every start, and a home folder shared by machines must not hand one's build to another
                build = hashlib.sha256(f"{torch.__file__}|{torch.__version__}|{cflags}|{_cpu_flags()}".encode()
                                       ).hexdigest()[:8]
                name = f"makima_int8_linear_{KERNEL_VERSION}_{build}"
                folder = _build_folder(name)
                _ext = _built(folder, name)
                if _ext is None:
                    from torch.utils.cpp_extension import load

                    # the `ninja` wheel installs its binary beside this interpreter, which may not be on PATH
                    here = os.path.dirname(sys.executable)
                    if shutil.which("ninja") is None and os.path.exists(os.path.join(here, "ninja")):
                        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")
                    folder.mkdir(parents=True, exist_ok=True)
                    _ext = load(name=name, sources=[str(_SOURCE)], extra_cflags=cflags,
                                extra_ldflags=["-fopenmp"], build_directory=str(folder), verbose=False)
            except Exception as exc:          # no compiler, no headers, ...
                _ext_error = f"{type(exc).__name__}: {exc}"
                log.warning("int8 kernel unavailable (%s); using torch dynamic quantization", _ext_error)
        return _ext


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), which -march=native compiles for."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor()


def _build_folder(name: str) -> Path:
    """Where the extension is built: TORCH_EXTENSIONS_DIR/name, else the user's cache folder
    (~/.cache/makima-tts/kernels/name on Linux)."""
    import os

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        import platformdirs

        root = str(Path(platformdirs.user_cache_dir("makima-tts")) / "kernels")
    return Path(root).expanduser() / name


def _built(folder: Path, name: str):
    """The extension already built in `folder` (named by its source, torch and the CPU: nothing to check), imported
    without torch's build machinery (importing it and asking ninja cost ~0.3 s of every start); None when
    it is not there or its link did not finish (ninja logs an output once its command has succeeded; a
    half-written .so would crash the import, not fail it): `load` then builds it again."""
    import importlib.util

    path = folder / f"{name}.so"
    try:
        finished = any(line.split("\t")[3:4] == [path.name]
                       for line in (folder / ".ninja_log").read_text().splitlines())
    except OSError:
        return None
    if not finished or not path.is_file():
        return None
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            return None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except ImportError:
        return None


def kernel_error() -> Optional[str]:
    return _ext_error


_local = threading.local()


def _scratch(numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A buffer of `numel` elements, reused per thread and dtype (for dequantized weights in prefill)."""
    key = f"buf_{str(dtype).replace('torch.', '')}"
    buf = getattr(_local, key, None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype)
        setattr(_local, key, buf)
    return buf[:numel]


def _amx_bf16() -> bool:
    """Whether torch's bfloat16 matrix product runs on AMX tiles here (Sapphire Rapids and later)."""
    cpu = getattr(torch, "cpu", None)
    try:
        return bool(cpu._is_amx_tile_supported() and cpu._is_avx512_bf16_supported())
    except AttributeError:
        return False


# A prompt's matrix products (more than PREFILL_ROWS rows, in_features a multiple of GROUP: the real
# models' shapes) in bfloat16 where AMX runs them: ~2x faster than float32 over the whole linear,
# dequantizing included, for a relative error ~4e-3 on those rows only (the decode steps keep the
# kernel's int16 path). Elsewhere (AVX2, AVX-512 without AMX) float32, as bfloat16 would be slower.
# (In the tile order, 8 to PREFILL_ROWS rows run exactly on the tile unit: a lone prompt's rows.)
PREFILL_BF16 = _amx_bf16()


# Where AMX runs (and the kernel was built for it), the int8 layers (the talker's and the code predictor's)
# are stored in the kernel's tile order (out_features % 16 == 0, in_features % GROUP == 0: the real
# models' shapes): 8 to PREFILL_ROWS activation rows (a prompt, 8+ streams) then run on the tile unit,
# ~2x the VNNI loop for a prompt's 25 rows and ~20 % faster for 8 streams' code-predictor rows
# (bench/RESULTS.md); fewer rows on a VNNI loop over the same order (as fast as the group order's since
# both prefetch the weights ahead). The same bits either way. Off (False): the group order everywhere,
# as on CPUs without AMX.
TILES_ON_AMX = True


def use_tiles(out_features: int, in_features: int, bits: int = 8) -> bool:
    """Whether an int8 layer of this shape is stored in the tile order here (see TILES_ON_AMX)."""
    ext = kernel()
    return (TILES_ON_AMX and bits == 8 and ext is not None and out_features % 16 == 0
            and in_features % GROUP == 0 and bool(ext.amx_int8()))


def layout() -> str:
    """The order an int8 layer of the real models' shapes is stored in here: "tiles" or "groups"
    (part of the quantized weights cache's key)."""
    return "tiles" if use_tiles(16, GROUP) else "groups"


def quantize_blocks(w: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> (int8 (N, K), float32 scales (N, K / 32)): symmetric absmax per block of 32,
    to -127..127 (bits=8) or -7..7 (bits=4)."""
    n, k = w.shape
    top = 127 if bits == 8 else 7
    blocks = w.detach().float().reshape(n, k // BLOCK, BLOCK)
    scale = blocks.abs().amax(-1) / float(top)
    q = torch.round(blocks / scale.clamp(min=1e-30)[..., None]).clamp(-top, top).to(torch.int8)
    return q.reshape(n, k).contiguous(), scale.contiguous()


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights in blocks of 32 (float32 scales); float32 in and out.

    The kernel rounds the activations to int16 (one scale per row), so the error is the weights'
    rounding alone. `qweight` is stored in one of the kernel's orders: the tile order where AMX runs
    (`tiles`, see TILES_ON_AMX), else the group order (permuted within groups of 512 inputs);
    `dequantized()` gives the float weight in natural order. The module owns how rows are fed to the
    kernel: all in one call up to PREFILL_ROWS, and above (a prompt, or prompts joining together) the
    weights dequantized once for a float matrix product (bfloat16 on AMX, see PREFILL_BF16; in the tile
    order, dequantized block by block into AMX bfloat16 tiles instead)."""

    bits = 8

    def __init__(self, in_features: int, out_features: int, qweight: torch.Tensor, scales: torch.Tensor,
                 bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        ext = kernel()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.tiles = use_tiles(out_features, in_features, self.bits)     # else the group order
        self._op = ext.int8_linear_tiles if self.tiles else ext.int8_linear
        self._dequantize = (ext.dequantize_tiles if self.tiles else
                            lambda q, sc, out: ext.dequantize(q, sc, 2, out))          # 2: weights a pair

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        q, s = quantize_blocks(linear.weight, cls.bits)
        bias = None if linear.bias is None else linear.bias.detach().float()
        if use_tiles(linear.out_features, linear.in_features, cls.bits):
            stored, s = kernel().to_tiles(q, s)
        else:
            stored = kernel().permute_k(q, 2)
            if cls.bits == 4:
                stored = kernel().pack4(stored)
        return cls(linear.in_features, linear.out_features, stored, s, bias)

    def dequantized(self, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The float32 weight (out_features, in_features) these int8 values and scales stand for (into
        `out`, float32 or bfloat16: then rounded to nearest even)."""
        out = torch.empty(self.out_features, self.in_features) if out is None else out
        return self._dequantize(self.qweight, self.scales, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float().contiguous()
        rows = x2.shape[0]
        if rows > PREFILL_ROWS and self.tiles and PREFILL_BF16 and kernel().amx_bf16():
            # many rows in the tile order: each block dequantized to bfloat16 into an AMX tile, float32 sums
            # (F.linear's bfloat16 product below, 2.4x faster at 200 rows and without its bfloat16 output rounding)
            out = kernel().int8_linear_tiles_bf16(x2, self.qweight, self.scales)
            if self.bias is not None:
                out = out + self.bias
        elif rows > PREFILL_ROWS:
            # many rows (a prompt): compute-bound, so dequantize once and use the float matrix product
            dtype = torch.bfloat16 if PREFILL_BF16 and self.in_features % GROUP == 0 else torch.float32
            w = _scratch(self.out_features * self.in_features, dtype).view(self.out_features, self.in_features)
            out = F.linear(x2.to(dtype), self.dequantized(w)).float()
            if self.bias is not None:
                out = out + self.bias
        else:
            out = self._op(x2, self.qweight, self.scales)
            if self.bias is not None:
                out = out + self.bias
        return out.view(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits} blocks of {BLOCK}"


class Int4Linear(Int8Linear):
    """Int8Linear's format with 4-bit weights (-7..7 per block of 32, two a byte: `qweight` is uint8
    (N, K / 2)); the same kernel loop (the nibbles are widened as they are loaded). For the code predictor
    ("int4"): its weights are read 15 times a frame, so half the bytes matter most there."""

    bits = 4


def _dynamic(linear: nn.Linear) -> nn.Module:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    with torch.no_grad():
        linear.qconfig = per_channel_dynamic_qconfig
        return DynamicLinear.from_float(linear.float())


def quantize_linear(linear: nn.Module, method: str = "int8") -> nn.Module:
    """An nn.Linear's quantized replacement ("int8", "int4" or "int8-dynamic"); other modules come back
    unchanged."""
    if not isinstance(linear, nn.Linear) or linear.in_features % BLOCK:
        return linear
    if method in ("int8", "int4") and kernel() is not None:
        return (Int4Linear if method == "int4" else Int8Linear).from_linear(linear)
    if method in ("int8", "int8-dynamic"):
        _quiet_ao_warnings()
        return _dynamic(linear)
    raise ValueError(f"unknown quantization {method!r}; use one of: {', '.join(QUANTIZE_CHOICES)}")


def _quiet_ao_warnings() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
    warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*")


def quantize_module(module: nn.Module, method: str = "int8") -> dict:
    """Replace every nn.Linear under `module` (in place) by its int8 counterpart (in the order for this CPU).

    Returns {"linears": how many, "method": the one used} ("int8" falls back to "int8-dynamic"
    when the kernel cannot be built)."""
    if method not in ("int8", "int8-dynamic"):
        raise ValueError(f"unknown quantization {method!r}; use one of: {', '.join(QUANTIZE_CHOICES)}")
    if method == "int8" and kernel() is None:
        method = "int8-dynamic"
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            new = quantize_linear(child, method)
            if new is not child:
                setattr(parent, name, new)
                replaced += 1
    return {"linears": replaced, "method": method}


def use_kernel_ops(module: nn.Module) -> None:
    """Give every RMSNorm, Attention and MLP under `module` the extension's fused float32 ops (when it
    built): the norm in one call; the q/k norms + RoPE + cache write in one call, and a decode step's
    attention in one more; silu(gate) * up in one call. Every Decoder whose linear layers are all int8
    (or int4) runs its decode steps' layers in one call (DecodeLayers). Nothing for a module off the CPU
    (the extension is CPU code)."""
    from .model import MLP, Attention, Decoder, RMSNorm

    if any(t.device.type != "cpu" for t in list(module.parameters()) + list(module.buffers())):
        return
    ext = kernel()
    if ext is None:
        return
    for m in module.modules():
        if isinstance(m, RMSNorm):
            m.kernel = ext.rms_norm
        elif isinstance(m, Attention):
            m.kernel, m.attend = ext.qk_rope_cache, ext.decode_attention
        elif isinstance(m, MLP):
            m.kernel = ext.silu_mul
        elif isinstance(m, Decoder) and all(isinstance(lin, Int8Linear) and lin.bias is None
                                            for layer in m.layers for lin in _layer_linears(layer)):
            m.fused_step = DecodeLayers(m)


def _layer_linears(layer: nn.Module) -> list[nn.Module]:
    a, f = layer.self_attn, layer.mlp
    return [a.qkv_proj, a.o_proj, f.gate_up_proj, f.down_proj]


class DecodeLayers:
    """A decode step (one new position per row, at most PREFILL_ROWS rows: the kernel's one-call path)
    through every layer of an int8 Decoder in one C++ call: the kernels the modules would call, in their
    order, so the same bits (tested), without ~13 Python-level ops a layer in between (the code
    predictor runs 75 layers a frame)."""

    max_rows = PREFILL_ROWS

    def __init__(self, decoder: nn.Module):
        self.cfg = decoder.cfg
        self.layers, self.tiles = [], []
        for layer in decoder.layers:
            a = layer.self_attn
            qkv, o, gate_up, down = _layer_linears(layer)
            self.layers.append([layer.input_layernorm.weight, qkv.qweight, qkv.scales, o.qweight, o.scales,
                                a.q_norm.weight, a.k_norm.weight, layer.post_attention_layernorm.weight,
                                gate_up.qweight, gate_up.scales, down.qweight, down.scales])
            self.tiles.append(sum(1 << i for i, lin in enumerate((qkv, o, gate_up, down)) if lin.tiles))

    def __call__(self, x: torch.Tensor, step: "Step", cache: "Cache") -> torch.Tensor:
        cfg = self.cfg
        return kernel().decode_layers(x, self.layers, self.tiles, [kv.k for kv in cache.layers],
                                      [kv.v for kv in cache.layers], step.cos, step.sin, step.positions,
                                      step.lengths, step.rows.start, cfg.num_heads, cfg.num_kv_heads,
                                      cfg.rms_norm_eps)
