#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <vector>

// out (M, N) = x (M, K) . dequant(w, s)^T with w (N, K) int8 and s (N, K / 32) float32, one scale per
// block of 32 consecutive weights of a row.
//
// Fast path (AVX-512 VNNI, K % 512 == 0, any number of activation rows: batched streams, prompts): within each group of 512 weights
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
    if (K % 512 == 0) {
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
        // per weight row and group of 512: the 16 chunks of 32 weights are widened to int16 once, then
        // used for every activation row (batched streams, chunks of a prompt)
        at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
            std::vector<__m512> acc(M);
            for (int64_t n = n0; n < n1; ++n) {
                const int8_t* wr = wp + n * K;
                const float* sr = sp + n * nb;
                for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
                for (int64_t g = 0; g < K; g += 512) {
                    __m512i wv[16];
                    for (int c = 0; c < 16; ++c)
                        wv[c] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(wr + g + 32 * c)));
                    const __m512 sc = _mm512_loadu_ps(sr + g / 32);
                    for (int64_t m = 0; m < M; ++m) {
                        const int16_t* xr = xqp + m * K + g;
                        __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
                        for (int c = 0; c < 16; c += 2) {
                            a0 = _mm512_dpwssd_epi32(a0, wv[c], _mm512_loadu_si512((const void*)(xr + 32 * c)));
                            a1 = _mm512_dpwssd_epi32(a1, wv[c + 1], _mm512_loadu_si512((const void*)(xr + 32 * c + 32)));
                        }
                        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a0, a1)), sc, acc[m]);
                    }
                }
                for (int64_t m = 0; m < M; ++m) op[m * N + n] = _mm512_reduce_add_ps(acc[m]) * xs[m];
            }
        });
        return out;
    }
#endif
    general(xp, wp, sp, op, M, N, K, P);
    return out;
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
    // x (..., D) float32, w (D) float32 -> x * rsqrt(mean(x^2) + eps) * w, one row at a time: one call in
    // place of torch's seven small ops for the norms of a decode step (a row of 128 or 1024 values)
    TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32 && w.dim() == 1);
    const int64_t D = w.size(0);
    TORCH_CHECK(x.size(-1) == D);
    auto xc = x.contiguous();
    auto out = torch::empty_like(xc);
    const int64_t R = xc.numel() / D;
    const float* xp = xc.data_ptr<float>();
    const float* wp = w.contiguous().data_ptr<float>();
    float* op = out.data_ptr<float>();
    const float e = float(eps);
    at::parallel_for(0, R, std::max<int64_t>(1, 65536 / D), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const float* xr = xp + r * D;
            float* orow = op + r * D;
            float acc[16] = {0};
            int64_t k = 0;
            for (; k + 16 <= D; k += 16)
                for (int l = 0; l < 16; ++l) acc[l] += xr[k + l] * xr[k + l];
            float ss = 0.f;
            for (int l = 0; l < 16; ++l) ss += acc[l];
            for (; k < D; ++k) ss += xr[k] * xr[k];
            const float inv = 1.f / std::sqrt(ss / float(D) + e);
            for (int64_t j = 0; j < D; ++j) orow[j] = xr[j] * inv * wp[j];
        }
    });
    return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("rms_norm", &rms_norm, "x (..., D) float32 -> RMS-normed times w (one pass per row)");
    m.def("int8_linear", &int8_linear, "x (M, K) float32 . int8 blocks-of-32 weights^T");
    m.def("permute_k", &permute_k, "int8 weights in natural order -> the kernel's stored order");
    m.def("dequantize", &dequantize, "stored int8 weights + scales -> float32 (N, K), natural order");
}
