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

BLOCK = 32
QUANTIZE_CHOICES = ("none", "int8", "int8-dynamic")

_CPP = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <vector>

// out (M, N) = x (M, K) . dequant(w (N, K) int8, s (N, K / 32) float)^T ; K % 32 == 0.

static inline float dot_row_int8(const int8_t* w, const float* s, const float* x, int64_t K) {
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        __m256i q = _mm256_loadu_si256((const __m256i*)(w + k));
        __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
        __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
        __m512 b = _mm512_mul_ps(w0, _mm512_loadu_ps(x + k));
        b = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + k + 16), b);
        acc = _mm512_fmadd_ps(b, _mm512_set1_ps(s[k / 32]), acc);
    }
    return _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        __m256 b = _mm256_setzero_ps();
        for (int j = 0; j < 32; j += 8) {
            __m128i q = _mm_loadl_epi64((const __m128i*)(w + k + j));
            __m256 wf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
            b = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x + k + j), b);
        }
        acc = _mm256_fmadd_ps(b, _mm256_set1_ps(s[k / 32]), acc);
    }
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    lo = _mm_hadd_ps(lo, lo);
    lo = _mm_hadd_ps(lo, lo);
    return _mm_cvtss_f32(lo);
#else
    float acc = 0.f;
    for (int64_t k = 0; k < K; k += 32) {
        float b = 0.f;
        for (int j = 0; j < 32; ++j) b += float(w[k + j]) * x[k + j];
        acc += b * s[k / 32];
    }
    return acc;
#endif
}

#if defined(__AVX512F__)
// Four rows at once: four independent accumulator chains and memory streams, x read once.
static inline void dot4_rows_int8(const int8_t* w, const float* s, const float* x, int64_t K, float* out) {
    const int64_t nb = K / 32;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t k = 0; k < K; k += 32) {
        __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
        for (int r = 0; r < 4; ++r) {
            const int8_t* wr = w + r * K + k;
            _mm_prefetch((const char*)(wr + 512), _MM_HINT_T0);
            __m256i q = _mm256_loadu_si256((const __m256i*)wr);
            __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
            __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
            __m512 b = _mm512_fmadd_ps(w1, x1, _mm512_mul_ps(w0, x0));
            acc[r] = _mm512_fmadd_ps(b, _mm512_set1_ps(s[r * nb + k / 32]), acc[r]);
        }
    }
    for (int r = 0; r < 4; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}
#endif

static inline float dot_f32(const float* a, const float* x, int64_t K) {
#if defined(__AVX512F__)
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(x + k), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k + 16), _mm512_loadu_ps(x + k + 16), acc1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#else
    float acc = 0.f;
    for (int64_t k = 0; k < K; ++k) acc += a[k] * x[k];
    return acc;
#endif
}

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor s) {
    TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kInt8 && s.dtype() == torch::kFloat32);
    TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.is_contiguous() && w.is_contiguous() && s.is_contiguous());
    const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
    TORCH_CHECK(w.size(1) == K && K % 32 == 0 && s.size(0) == N && s.size(1) == K / 32);
    auto out = torch::empty({M, N}, x.options());
    const float* xp = x.data_ptr<float>();
    const int8_t* wp = w.data_ptr<int8_t>();
    const float* sp = s.data_ptr<float>();
    float* op = out.data_ptr<float>();
    const int64_t nb = K / 32;
    if (M == 1) {
        at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
            int64_t n = n0;
#if defined(__AVX512F__)
            for (; n + 4 <= n1; n += 4) dot4_rows_int8(wp + n * K, sp + n * nb, xp, K, op + n);
#endif
            for (; n < n1; ++n) op[n] = dot_row_int8(wp + n * K, sp + n * nb, xp, K);
        });
    } else {
        // Several rows of activations (prefill): dequantize each weight row once into a buffer
        // that stays in L1, then take its dot product with every activation row.
        at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
            std::vector<float> buf(K);
            for (int64_t n = n0; n < n1; ++n) {
                const int8_t* wr = wp + n * K;
                const float* sr = sp + n * nb;
                for (int64_t k = 0; k < K; ++k) buf[k] = float(wr[k]) * sr[k / 32];
                for (int64_t m = 0; m < M; ++m) op[m * N + n] = dot_f32(buf.data(), xp + m * K, K);
            }
        });
    }
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
                from torch.utils.cpp_extension import load_inline

                _ext = load_inline(name="makima_int8_linear_v2", cpp_sources=_CPP, functions=["int8_linear"],
                                   extra_cflags=["-O3", "-march=native"], verbose=False)
            except Exception as exc:          # no compiler, no headers, ...
                _ext_error = f"{type(exc).__name__}: {exc}"
                log.warning("int8 kernel unavailable (%s); using torch dynamic quantization", _ext_error)
        return _ext


def kernel_error() -> Optional[str]:
    return _ext_error


def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> (int8 (N, K), float32 scales (N, K / 32)): symmetric absmax per block of 32."""
    n, k = w.shape
    blocks = w.detach().float().reshape(n, k // BLOCK, BLOCK)
    scale = blocks.abs().amax(-1) / 127.0
    q = torch.round(blocks / scale.clamp(min=1e-30)[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(n, k).contiguous(), scale.contiguous()


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights in blocks of 32 (float32 scales) and float32 activations."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, s = quantize_blocks(linear.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scales", s)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self._op = kernel().int8_linear

    def dequantized(self) -> torch.Tensor:
        n, k = self.qweight.shape
        return (self.qweight.float().reshape(n, -1, BLOCK) * self.scales[..., None]).reshape(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = self._op(x.reshape(-1, shape[-1]).float().contiguous(), self.qweight, self.scales)
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
