"""Weight-only int8 for the talker and the code predictor (opt-in: `Qwen3Engine.load(..., quantize="int8")`).

Decoding one frame at batch 1 reads every weight of the talker once and of the code
predictor 15 times, so it is bound by memory bandwidth: int8 weights read a quarter of
the bytes of float32.

Two backends, both measured by bench/engine.py:

- "int8" (default when it builds): int8 weights in blocks of 32 along the input dimension,
  one float32 scale per block (symmetric, absmax / 127), times float32 activations. The
  activations are never quantized, so the only error is the weights' rounding. The kernel
  is a small C++ extension (AVX-512 / AVX2 intrinsics, compiled for this CPU the first time
  it is used, cached by torch in ~/.cache/torch_extensions). When no compiler is at hand it
  falls back to "int8-dynamic" with a warning.
- "int8-dynamic": torch's dynamic quantization of nn.Linear (fbgemm / x86 backend): int8
  per-channel weights, and activations quantized to 8 bits per tensor on the fly (more error).
"""
from __future__ import annotations

import logging
import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

BLOCK = 32          # weights per scale
GROUP = 512         # the kernel's fast path: in_features a multiple of 512 (else a plain C++ loop)
PREFILL_ROWS = 16   # more activation rows than this (prefill): dequantize and use torch's float matrix product
QUANTIZE_CHOICES = ("none", "int8", "int8-dynamic")

_CPP = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <vector>

// out (M, N) = x (M, K) . dequant(w, s)^T with w (N, K) int8 and s (N, K / 32) float32, one scale per
// block of 32 consecutive weights of a row.
//
// Fast path (AVX-512 VNNI, K % 512 == 0, up to 16 activation rows, e.g. batched streams): within each group of 512 weights
// (16 blocks) w is stored permuted so that lane i of a 16-lane int32 multiply-add accumulates block
// i: position (j * 16 + i) * P + p holds weight 32 * i + P * j + p of the group, P = 2: the
// activations are rounded to int16 with one scale per row (relative error ~1e-5, so the error is the
// weights' rounding alone) and one vpdpwssd adds two products of each of the 16 blocks; 16 of them
// complete a group. Then one convert and one fused multiply-add with the 16 block scales per group.
// Other shapes (prefill, small models, no VNNI): each weight row dequantized once into an L1 buffer and
// dotted with every float32 activation row (exact activations).

static inline int64_t perm(int64_t k, int64_t K, int64_t P) {   // natural index -> stored index
    if (K % 512) return k;
    int64_t g = k / 512, r = k % 512, i = r / 32, t = r % 32, j = t / P, p = t % P;
    return g * 512 + (j * 16 + i) * P + p;
}

static inline int64_t block_of_stored(int64_t k, int64_t K, int64_t P) {
    if (K % 512) return k / 32;
    return (k / 512) * 16 + (k % (16 * P)) / P;
}

torch::Tensor permute_k(torch::Tensor w, int64_t P) {          // (N, K) natural -> stored order
    const int64_t K = w.size(1);
    auto idx = torch::empty({K}, torch::kLong);
    auto ip = idx.data_ptr<int64_t>();
    for (int64_t k = 0; k < K; ++k) ip[perm(k, K, P)] = k;
    return w.index_select(1, idx).contiguous();
}

static void general(const float* xp, const int8_t* wp, const float* sp, float* op, int64_t M, int64_t N,
                    int64_t K, int64_t P) {
    const int64_t nb = K / 32;
    std::vector<float> xperm(M * K);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < K; ++k) xperm[m * K + perm(k, K, P)] = xp[m * K + k];
    std::vector<int64_t> blk(K);
    for (int64_t k = 0; k < K; ++k) blk[k] = block_of_stored(k, K, P);
    const float* xq = xperm.data();
    at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
        std::vector<float> buf(K);
        float* bp = buf.data();
        for (int64_t n = n0; n < n1; ++n) {
            const int8_t* wr = wp + n * K;
            const float* sr = sp + n * nb;
            for (int64_t k = 0; k < K; ++k) bp[k] = float(wr[k]) * sr[blk[k]];
            for (int64_t m = 0; m < M; ++m) {
                const float* xr = xq + m * K;
                float acc[16] = {0};
                for (int64_t k = 0; k < K; k += 16)
                    for (int l = 0; l < 16; ++l) acc[l] += bp[k + l] * xr[k + l];
                float t = 0.f;
                for (int l = 0; l < 16; ++l) t += acc[l];
                op[m * N + n] = t;
            }
        }
    });
}

torch::Tensor dequantize(torch::Tensor w, torch::Tensor s, int64_t P, torch::Tensor out) {
    // -> out: float32 (N, K), natural order (a caller-kept buffer: fresh pages fault slowly in a VM)
    TORCH_CHECK(P == 2);
    const int64_t N = w.size(0), K = w.size(1), nb = K / 32;
    TORCH_CHECK(out.dtype() == torch::kFloat32 && out.is_contiguous() && out.numel() == N * K);
    const int8_t* wp = w.data_ptr<int8_t>();
    const float* sp = s.data_ptr<float>();
    float* op = out.data_ptr<float>();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
        std::vector<int8_t> nat(K);
        for (int64_t n = n0; n < n1; ++n) {
            const int8_t* wr = wp + n * K;
            if (K % 512 == 0) {               // undo the permutation: a 16 x 16 transpose of 2-byte pairs
                const int16_t* src = (const int16_t*)wr;
                int16_t* dst = (int16_t*)nat.data();
                for (int64_t g = 0; g < K / 2; g += 256)
                    for (int i = 0; i < 16; ++i)
                        for (int j = 0; j < 16; ++j) dst[g + i * 16 + j] = src[g + j * 16 + i];
            } else {
                std::copy(wr, wr + K, nat.begin());
            }
            float* orow = op + n * K;
            const float* sr = sp + n * nb;
            for (int64_t b = 0; b < nb; ++b)
                for (int t = 0; t < 32; ++t) orow[b * 32 + t] = float(nat[b * 32 + t]) * sr[b];
        }
    });
    return out;
}

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor s) {
    TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kInt8 && s.dtype() == torch::kFloat32);
    TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.is_contiguous() && w.is_contiguous() && s.is_contiguous());
    const int64_t M = x.size(0), K = x.size(1), N = w.size(0), nb = K / 32, P = 2;
    TORCH_CHECK(w.size(1) == K && K % 32 == 0 && s.size(0) == N && s.size(1) == nb);
    auto out = torch::empty({M, N}, x.options());
    const float* xp = x.data_ptr<float>();
    const int8_t* wp = w.data_ptr<int8_t>();
    const float* sp = s.data_ptr<float>();
    float* op = out.data_ptr<float>();
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
    if (M <= 16 && K % 512 == 0) {
        // activations -> int16 (one scale per row), then pairs moved to the stored order: the 16 x 16
        // int32 transpose (block i, pair j) -> (pair j, block i) within each group of 512
        std::vector<int16_t> xn(K), xq(M * K);
        std::vector<float> xs(M);
        const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
        for (int64_t m = 0; m < M; ++m) {
            const float* xr = xp + m * K;
            __m512 mx = _mm512_setzero_ps();
            for (int64_t k = 0; k < K; k += 16) mx = _mm512_max_ps(mx, _mm512_and_ps(_mm512_loadu_ps(xr + k), absmask));
            const float amax = _mm512_reduce_max_ps(mx);
            const float scale = amax > 0.f ? amax / 32767.f : 1.f;
            const __m512 inv = _mm512_set1_ps(1.f / scale);
            xs[m] = scale;
            for (int64_t k = 0; k < K; k += 16)      // round to nearest even, as nearbyint
                _mm256_storeu_si256((__m256i*)(xn.data() + k),
                                    _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + k), inv))));
            const int32_t* src = (const int32_t*)xn.data();
            int32_t* dst = (int32_t*)(xq.data() + m * K);
            for (int64_t g = 0; g < K / 2; g += 256)
                for (int i = 0; i < 16; ++i)
                    for (int j = 0; j < 16; ++j) dst[g + j * 16 + i] = src[g + i * 16 + j];
        }
        const int16_t* xqp = xq.data();
        at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
            for (int64_t n = n0; n < n1; ++n) {
                const int8_t* wr = wp + n * K;
                const float* sr = sp + n * nb;
                for (int64_t m = 0; m < M; ++m) {
                    const int16_t* xr = xqp + m * K;
                    __m512 acc = _mm512_setzero_ps();
                    for (int64_t g = 0; g < K; g += 512) {
                        __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
                        for (int64_t j = 0; j < 512; j += 64) {
                            __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(wr + g + j)));
                            __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(wr + g + j + 32)));
                            a0 = _mm512_dpwssd_epi32(a0, w0, _mm512_loadu_si512((const void*)(xr + g + j)));
                            a1 = _mm512_dpwssd_epi32(a1, w1, _mm512_loadu_si512((const void*)(xr + g + j + 32)));
                        }
                        __m512 blocks = _mm512_cvtepi32_ps(_mm512_add_epi32(a0, a1));
                        acc = _mm512_fmadd_ps(blocks, _mm512_loadu_ps(sr + g / 32), acc);
                    }
                    op[m * N + n] = _mm512_reduce_add_ps(acc) * xs[m];
                }
            }
        });
        return out;
    }
#endif
    general(xp, wp, sp, op, M, N, K, P);
    return out;
}
"""

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

                from torch.utils.cpp_extension import load_inline

                # the `ninja` wheel installs its binary beside this interpreter, which may not be on PATH
                here = os.path.dirname(sys.executable)
                if shutil.which("ninja") is None and os.path.exists(os.path.join(here, "ninja")):
                    os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")

                _ext = load_inline(name="makima_int8_linear_v11", cpp_sources=_CPP, functions=["int8_linear", "permute_k", "dequantize"],
                                   extra_cflags=["-O3", "-march=native"], verbose=False)
            except Exception as exc:          # no compiler, no headers, ...
                _ext_error = f"{type(exc).__name__}: {exc}"
                log.warning("int8 kernel unavailable (%s); using torch dynamic quantization", _ext_error)
        return _ext


def kernel_error() -> Optional[str]:
    return _ext_error


_local = threading.local()


def _scratch(numel: int) -> torch.Tensor:
    """A float32 buffer of `numel` elements, reused per thread (for dequantized weights in prefill)."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _local.buf = torch.empty(numel)
    return buf[:numel]


def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> (int8 (N, K), float32 scales (N, K / 32)): symmetric absmax per block of 32."""
    n, k = w.shape
    blocks = w.detach().float().reshape(n, k // BLOCK, BLOCK)
    scale = blocks.abs().amax(-1) / 127.0
    q = torch.round(blocks / scale.clamp(min=1e-30)[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(n, k).contiguous(), scale.contiguous()


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights in blocks of 32 (float32 scales); float32 in and out.

    The kernel rounds the activations to int16 (one scale per row), so the error is the weights'
    rounding alone. `qweight` is stored in the kernel's order (permuted within groups of 512
    inputs); `dequantized()` gives the float weight in natural order."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, s = quantize_blocks(linear.weight)
        ext = kernel()
        pack = 2
        self.register_buffer("qweight", ext.permute_k(q, pack))
        self.register_buffer("scales", s)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self._op, self._dequantize, self._pack = ext.int8_linear, ext.dequantize, pack

    def dequantized(self, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The float32 weight (out_features, in_features) these int8 values and scales stand for."""
        out = torch.empty(self.out_features, self.in_features) if out is None else out
        return self._dequantize(self.qweight, self.scales, self._pack, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float().contiguous()
        if x2.shape[0] > PREFILL_ROWS:
            # many rows (prefill): compute-bound, so dequantize once and use the float matrix product
            w = _scratch(self.out_features * self.in_features).view(self.out_features, self.in_features)
            out = F.linear(x2, self.dequantized(w), self.bias)
        else:
            out = self._op(x2, self.qweight, self.scales)
            if self.bias is not None:
                out = out + self.bias
        return out.view(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 blocks of {BLOCK}"


def _dynamic(linear: nn.Linear) -> nn.Module:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    with torch.no_grad():
        linear.qconfig = per_channel_dynamic_qconfig
        return DynamicLinear.from_float(linear.float())


def quantize_linear(linear: nn.Module, method: str = "int8") -> nn.Module:
    """An nn.Linear's int8 replacement ("int8" or "int8-dynamic"); other modules come back unchanged."""
    if not isinstance(linear, nn.Linear) or linear.in_features % BLOCK:
        return linear
    if method == "int8" and kernel() is not None:
        return Int8Linear(linear)
    if method in ("int8", "int8-dynamic"):
        _quiet_ao_warnings()
        return _dynamic(linear)
    raise ValueError(f"unknown quantization {method!r}; use one of: {', '.join(QUANTIZE_CHOICES)}")


def _quiet_ao_warnings() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
    warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*")


def quantize_module(module: nn.Module, method: str = "int8") -> dict:
    """Replace every nn.Linear under `module` (in place) by its int8 counterpart.

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
