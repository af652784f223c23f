#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512F__) && defined(__AVX512BW__)
#define MAKIMA_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

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

// Stored int4 (two weights a byte): within each chunk of 32 stored weights, byte b holds weight b in its
// low nibble and weight 16 + b in its high nibble, as signed 4-bit values (-7..7 are used). The stored
// order is the int8 one (the same permutation), so the VNNI loop is shared: only the load differs.
static inline void unpack4_row(const uint8_t* wr, int8_t* dst, int64_t K) {
    for (int64_t c = 0; c < K; c += 32) {
        const uint8_t* src = wr + c / 2;
        for (int b = 0; b < 16; ++b) {
            dst[c + b] = int8_t(int8_t(src[b] << 4) >> 4);
            dst[c + 16 + b] = int8_t(int8_t(src[b]) >> 4);
        }
    }
}

// a stored weight row (int8, or int4 unpacked to int8) in stored order
static inline const int8_t* stored_row(const void* wp, int64_t n, int64_t K, int bits, int8_t* tmp) {
    if (bits == 8) return (const int8_t*)wp + n * K;
    unpack4_row((const uint8_t*)wp + n * (K / 2), tmp, K);
    return tmp;
}

static void general(const float* xp, const void* wp, const float* sp, float* op, int64_t M, int64_t N,
                    int64_t K, int64_t P, int bits) {
    const int64_t nb = K / 32;
    std::vector<float> xperm(M * K);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < K; ++k) xperm[m * K + perm(k, K, P)] = xp[m * K + k];
    std::vector<int64_t> blk(K);
    for (int64_t k = 0; k < K; ++k) blk[k] = block_of_stored(k, K, P);
    const float* xq = xperm.data();
    at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
        std::vector<float> buf(K);
        std::vector<int8_t> tmp(K);
        float* bp = buf.data();
        for (int64_t n = n0; n < n1; ++n) {
            const int8_t* wr = stored_row(wp, n, K, bits, tmp.data());
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

static inline void to_bf16(const float* src, at::BFloat16* dst, int64_t K) {   // round to nearest even
    int64_t k = 0;
#if defined(__AVX512BF16__)
    for (; k + 16 <= K; k += 16)
        _mm256_storeu_si256((__m256i*)(dst + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + k)));
#endif
    for (; k < K; ++k) dst[k] = at::BFloat16(src[k]);
}

torch::Tensor dequantize(torch::Tensor w, torch::Tensor s, int64_t P, torch::Tensor out) {
    // -> out: float32 or bfloat16 (N, K), natural order (a caller-kept buffer: fresh pages fault slowly in
    // a VM). bfloat16: each float32 weight rounded to nearest even, for a bfloat16 matrix product (AMX).
    // w: int8 (N, K) or packed int4 uint8 (N, K / 2)
    TORCH_CHECK(P == 2);
    const int bits = w.dtype() == torch::kUInt8 ? 4 : 8;
    const int64_t N = w.size(0), K = bits == 8 ? w.size(1) : 2 * w.size(1), nb = K / 32;
    const bool bf16 = out.dtype() == torch::kBFloat16;
    TORCH_CHECK((bf16 || out.dtype() == torch::kFloat32) && out.is_contiguous() && out.numel() == N * K);
    const void* wp = w.data_ptr();
    const float* sp = s.data_ptr<float>();
    float* op = bf16 ? nullptr : out.data_ptr<float>();
    at::BFloat16* bp = bf16 ? out.data_ptr<at::BFloat16>() : nullptr;
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
        std::vector<int8_t> nat(K), tmp(K);
        std::vector<float> row(bf16 ? K : 0);
        for (int64_t n = n0; n < n1; ++n) {
            const int8_t* wr = stored_row(wp, n, K, bits, tmp.data());
            if (K % 512 == 0) {               // undo the permutation: a 16 x 16 transpose of 2-byte pairs
                const int16_t* src = (const int16_t*)wr;
                int16_t* dst = (int16_t*)nat.data();
                for (int64_t g = 0; g < K / 2; g += 256)
                    for (int i = 0; i < 16; ++i)
                        for (int j = 0; j < 16; ++j) dst[g + i * 16 + j] = src[g + j * 16 + i];
            } else {
                std::copy(wr, wr + K, nat.begin());
            }
            float* orow = bf16 ? row.data() : op + n * K;
            const float* sr = sp + n * nb;
            for (int64_t b = 0; b < nb; ++b)
                for (int t = 0; t < 32; ++t) orow[b * 32 + t] = float(nat[b * 32 + t]) * sr[b];
            if (bf16) to_bf16(orow, bp + n * K, K);
        }
    });
    return out;
}

torch::Tensor pack4(torch::Tensor w) {
    // int8 (N, K) in stored order, values in -8..7 -> uint8 (N, K / 2), two weights a byte (see unpack4_row)
    TORCH_CHECK(w.dtype() == torch::kInt8 && w.dim() == 2 && w.size(1) % 32 == 0);
    auto wc = w.contiguous();
    const int64_t N = wc.size(0), K = wc.size(1);
    auto out = torch::empty({N, K / 2}, torch::kUInt8);
    const int8_t* wp = wc.data_ptr<int8_t>();
    uint8_t* op = out.data_ptr<uint8_t>();
    for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < K; c += 32)
            for (int b = 0; b < 16; ++b)
                op[n * (K / 2) + c / 2 + b] = uint8_t((wp[n * K + c + b] & 0xF) | ((wp[n * K + c + 16 + b] & 0xF) << 4));
    return out;
}

constexpr int64_t PREFETCH = 4096;      // bytes ahead of the weights being read that the int8 loops prefetch

// the `bytes` of weights PREFETCH bytes ahead of p (read in order): more reads in flight
static inline void prefetch_ahead(const void* p, int bytes) {
    for (int c = 0; c < bytes; c += 64) _mm_prefetch((const char*)p + PREFETCH + c, _MM_HINT_T0);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
// one activation row (K floats, K % 16 == 0) -> int16 in natural order, rounded to nearest even (as
// nearbyint) with one scale for the row (absmax / 32767); -> the scale
static inline float quantize_row16(const float* xr, int64_t K, int16_t* dst) {
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    __m512 mx = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) mx = _mm512_max_ps(mx, _mm512_and_ps(_mm512_loadu_ps(xr + k), absmask));
    const float amax = _mm512_reduce_max_ps(mx);
    const float scale = amax > 0.f ? amax / 32767.f : 1.f;
    const __m512 inv = _mm512_set1_ps(1.f / scale);
    for (int64_t k = 0; k < K; k += 16)
        _mm256_storeu_si256((__m256i*)(dst + k),
                            _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + k), inv))));
    return scale;
}
#endif

torch::Tensor int8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor s) {
    // w: int8 (N, K), or int4 packed two a byte (uint8 (N, K / 2)): the same stored order and scales
    TORCH_CHECK(x.dtype() == torch::kFloat32 && (w.dtype() == torch::kInt8 || w.dtype() == torch::kUInt8) &&
                s.dtype() == torch::kFloat32);
    TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.is_contiguous() && w.is_contiguous() && s.is_contiguous());
    const int bits = w.dtype() == torch::kUInt8 ? 4 : 8;
    const int64_t M = x.size(0), K = x.size(1), N = w.size(0), nb = K / 32, P = 2;
    TORCH_CHECK(w.size(1) * (8 / bits) == K && K % 32 == 0 && s.size(0) == N && s.size(1) == nb);
    auto out = torch::empty({M, N}, x.options());
    const float* xp = x.data_ptr<float>();
    const void* wp = w.data_ptr();
    const float* sp = s.data_ptr<float>();
    float* op = out.data_ptr<float>();
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
    if (K % 512 == 0) {
        // activations -> int16 (one scale per row), then pairs moved to the stored order: the 16 x 16
        // int32 transpose (block i, pair j) -> (pair j, block i) within each group of 512
        std::vector<int16_t> xn(K), xq(M * K);
        std::vector<float> xs(M);
        for (int64_t m = 0; m < M; ++m) {
            xs[m] = quantize_row16(xp + m * K, K, xn.data());
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
            const __m128i low4 = _mm_set1_epi8(0x0F);
            const __m256i eight = _mm256_set1_epi8(8);
            for (int64_t n = n0; n < n1; ++n) {
                const int8_t* wr = (const int8_t*)wp + n * K;                 // int8
                const uint8_t* w4 = (const uint8_t*)wp + n * (K / 2);         // int4
                const float* sr = sp + n * nb;
                for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
                for (int64_t g = 0; g < K; g += 512) {
                    __m512i wv[16];
                    if (bits == 8) {
                        prefetch_ahead(wr + g, 512);
                        for (int c = 0; c < 16; ++c)
                            wv[c] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(wr + g + 32 * c)));
                    } else {          // 16 bytes -> 32 nibbles (low: weights 0-15, high: 16-31), sign-extended
                        prefetch_ahead(w4 + g / 2, 256);
                        for (int c = 0; c < 16; ++c) {
                            const __m128i v = _mm_loadu_si128((const __m128i*)(w4 + (g + 32 * c) / 2));
                            const __m256i u = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low4),
                                                               _mm_and_si128(v, low4));
                            wv[c] = _mm512_cvtepi8_epi16(_mm256_sub_epi8(_mm256_xor_si256(u, eight), eight));
                        }
                    }
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
    general(xp, wp, sp, op, M, N, K, P, bits);
    return out;
}

// ---------------------------------------------------------------------------------------------------
// The "tile" order, for AMX (Sapphire Rapids and later): the same product and the same numbers, with
// many activation rows (a prompt, 16+ streams) on the tile unit, 2-3x faster than the VNNI loop above.
//
// Stored (N % 16 == 0, K % 512 == 0): weight (16 t + j, 32 b + 4 r + q), block b = 16 g + i, at
// (((t * 16 + i) * G + g) * 8 + r) * 64 + 4 j + q, G = K / 512: per 16 outputs and block, 8 rows of
// 16 x 4 bytes (one tile); its scale at ((t * 16 + i) * G + g) * 16 + j.
// The activations are rounded to int16 as above. On tiles they are split exactly into a signed high
// and an unsigned low byte, x = 256 hi + lo, so a block's sum w . x = 256 (w . hi) + (w . lo) is two
// int8 tile products (TDPBSSD, TDPBUSD) with exact int32 sums. Fewer than 16 rows (or no AMX) take an
// AVX-512 VNNI loop over the same order instead (on tiles a block costs the same for 1 row as for 16).
// Both give the VNNI path's integer per block and then sum the scaled blocks in its order (block 16 g + i
// into lane i, g rising; lanes reduced as _mm512_reduce_add_ps does): the three paths give the same bits.

bool amx_int8() {
#ifdef MAKIMA_AMX
    // Linux hands the tile state to a process that asks once (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
    static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    return ok;
#else
    return false;
#endif
}

bool tiles_supported() {          // int8_linear_tiles runs here (AVX-512 VNNI; AMX for many rows)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
    return true;
#else
    return false;
#endif
}

static inline int64_t tile_index(int64_t n, int64_t k, int64_t K) {      // natural (n, k) -> stored
    const int64_t G = K / 512, t = n / 16, j = n % 16, b = k / 32, r = (k % 32) / 4, q = k % 4;
    return (((t * 16 + b % 16) * G + b / 16) * 8 + r) * 64 + 4 * j + q;
}

static inline int64_t tile_scale_index(int64_t n, int64_t b, int64_t K) {
    return ((n / 16 * 16 + b % 16) * (K / 512) + b / 16) * 16 + n % 16;
}

static std::vector<torch::Tensor> reorder_tiles(torch::Tensor w, torch::Tensor s, bool to_tiles) {
    // int8 weights (N, K) and scales (N, K / 32): natural order -> the tile order (to_tiles), or back
    TORCH_CHECK(w.dtype() == torch::kInt8 && s.dtype() == torch::kFloat32 && w.dim() == 2);
    const int64_t N = w.size(0), K = w.size(1);
    TORCH_CHECK(N % 16 == 0 && K % 512 == 0 && s.size(0) == N && s.size(1) == K / 32);
    auto wc = w.contiguous(), sc = s.contiguous();
    auto wo = torch::empty_like(wc);
    auto so = torch::empty_like(sc);
    const int8_t* wi = wc.data_ptr<int8_t>();
    const float* si = sc.data_ptr<float>();
    int8_t* wp = wo.data_ptr<int8_t>();
    float* sp = so.data_ptr<float>();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) {
            for (int64_t k = 0; k < K; ++k) {
                const int64_t a = n * K + k, t = tile_index(n, k, K);
                wp[to_tiles ? t : a] = wi[to_tiles ? a : t];
            }
            for (int64_t b = 0; b < K / 32; ++b) {
                const int64_t a = n * (K / 32) + b, t = tile_scale_index(n, b, K);
                sp[to_tiles ? t : a] = si[to_tiles ? a : t];
            }
        }
    });
    return {wo, so};
}

std::vector<torch::Tensor> to_tiles(torch::Tensor w, torch::Tensor s) { return reorder_tiles(w, s, true); }

std::vector<torch::Tensor> from_tiles(torch::Tensor qt, torch::Tensor st) { return reorder_tiles(qt, st, false); }

torch::Tensor dequantize_tiles(torch::Tensor qt, torch::Tensor st, torch::Tensor out) {
    // dequantize for weights in the tile order -> out float32 or bfloat16 (N, K), natural order: the
    // same values as dequantize gives for the group order (a prompt's many rows: a bfloat16 matrix product)
    const int64_t N = qt.size(0), K = qt.size(1), G = K / 512;
    TORCH_CHECK(qt.dtype() == torch::kInt8 && st.dtype() == torch::kFloat32 && N % 16 == 0 && K % 512 == 0);
    const bool bf16 = out.dtype() == torch::kBFloat16;
    TORCH_CHECK((bf16 || out.dtype() == torch::kFloat32) && out.is_contiguous() && out.numel() == N * K);
    const int8_t* qp = qt.data_ptr<int8_t>();
    const float* tp = st.data_ptr<float>();
    float* op = bf16 ? nullptr : out.data_ptr<float>();
    at::BFloat16* bp = bf16 ? out.data_ptr<at::BFloat16>() : nullptr;
    at::parallel_for(0, N / 16, 1, [&](int64_t t0, int64_t t1) {
        std::vector<int32_t> nat(16 * (K / 4));           // 16 rows in natural order, 4 weights an int32
        std::vector<float> row(bf16 ? K : 0);
        for (int64_t t = t0; t < t1; ++t) {
            for (int64_t i = 0; i < 16; ++i)
                for (int64_t g = 0; g < G; ++g) {
                    const int32_t* src = (const int32_t*)(qp + ((t * 16 + i) * G + g) * 512);
                    const int64_t b = 16 * g + i;
                    for (int r = 0; r < 8; ++r)
                        for (int j = 0; j < 16; ++j) nat[j * (K / 4) + 8 * b + r] = src[16 * r + j];
                }
            for (int64_t j = 0; j < 16; ++j) {
                const int64_t n = 16 * t + j;
                const int8_t* wr = (const int8_t*)(nat.data() + j * (K / 4));
                float* orow = bf16 ? row.data() : op + n * K;
                for (int64_t b = 0; b < K / 32; ++b) {
                    const float sc = tp[tile_scale_index(n, b, K)];
                    for (int q = 0; q < 32; ++q) orow[32 * b + q] = float(wr[32 * b + q]) * sc;
                }
                if (bf16) to_bf16(orow, bp + n * K, K);
            }
        }
    });
    return out;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
static inline __m512 reduce_lanes(const __m512* L) {     // _mm512_reduce_add_ps's tree, 16 outputs at once
    __m512 t3[8], t6[4];
    for (int i = 0; i < 8; ++i) t3[i] = _mm512_add_ps(L[i + 8], L[i]);
    for (int i = 0; i < 4; ++i) t6[i] = _mm512_add_ps(t3[i + 4], t3[i]);
    return _mm512_add_ps(_mm512_add_ps(t6[0], t6[2]), _mm512_add_ps(t6[1], t6[3]));
}

// rows [m0, m1) of out for 16 outputs t, from int16 activations xq (natural order) on AVX-512 VNNI: per
// block, the tile's 8 rows widened to int16 (16 outputs x 4 each, as two halves of 8 outputs), times
// the row's 4 activations of that row broadcast; a lane pair per output, added
static void tiles_vnni(const int16_t* xq, const float* xs, const int8_t* qp, const float* sp, float* op,
                       int64_t m0, int64_t m1, int64_t t, int64_t N, int64_t K) {
    const int64_t G = K / 512;
    const __m512i evens = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odds = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    for (int64_t mb = m0; mb < m1; mb += 8) {
        const int mt = (int)std::min<int64_t>(8, m1 - mb);
        __m512 lanes[8][16];
        for (int i = 0; i < 16; ++i) {
            __m512 acc[8];
            for (int m = 0; m < mt; ++m) acc[m] = _mm512_setzero_ps();
            for (int64_t g = 0; g < G; ++g) {
                const int64_t b = 16 * g + i, tile = (t * 16 + i) * G + g;
                const int8_t* wt = qp + tile * 512;
                prefetch_ahead(wt, 512);
                __m512i w[16];
                for (int r = 0; r < 8; ++r) {
                    w[2 * r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(wt + 64 * r)));
                    w[2 * r + 1] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(wt + 64 * r + 32)));
                }
                const __m512 sc = _mm512_loadu_ps(sp + tile * 16);
                for (int m = 0; m < mt; ++m) {
                    const int16_t* xr = xq + (mb + m) * K + 32 * b;
                    __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
                    for (int r = 0; r < 8; ++r) {
                        const __m512i xb = _mm512_set1_epi64(*(const int64_t*)(xr + 4 * r));
                        lo = _mm512_dpwssd_epi32(lo, w[2 * r], xb);          // outputs 0-7, a lane pair each
                        hi = _mm512_dpwssd_epi32(hi, w[2 * r + 1], xb);      // outputs 8-15
                    }
                    const __m512i sum = _mm512_add_epi32(_mm512_permutex2var_epi32(lo, evens, hi),
                                                         _mm512_permutex2var_epi32(lo, odds, hi));
                    acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), sc, acc[m]);
                }
            }
            for (int m = 0; m < mt; ++m) lanes[m][i] = acc[m];
        }
        for (int m = 0; m < mt; ++m)
            _mm512_storeu_ps(op + (mb + m) * N + 16 * t, _mm512_mul_ps(reduce_lanes(lanes[m]), _mm512_set1_ps(xs[mb + m])));
    }
}
#endif

#ifdef MAKIMA_AMX
constexpr int64_t AMX_MIN_ROWS = 8;    // fewer rows: the VNNI loop (a tile product costs the same for 1 row as for 16)

struct TileConfig {
    uint8_t palette = 1, start = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

// rows [m0, m0 + 16) of out for 16 outputs t, on AMX tiles (the tile configuration loaded by the caller)
static void tiles_amx(const int8_t* ah, const uint8_t* al, const float* xs, const int8_t* qp, const float* sp,
                      float* op, int64_t m0, int mt, int64_t t, int64_t N, int64_t K) {
    const int64_t G = K / 512;
    alignas(64) int32_t chi[16 * 16], clo[16 * 16];
    __m512 lanes[16][16];
    for (int i = 0; i < 16; ++i) {
        __m512 acc[16];
        for (int m = 0; m < mt; ++m) acc[m] = _mm512_setzero_ps();
        for (int64_t g = 0; g < G; ++g) {
            const int64_t b = 16 * g + i, tile = (t * 16 + i) * G + g;
            prefetch_ahead(qp + tile * 512, 512);
            _tile_zero(0);
            _tile_zero(1);
            _tile_loadd(2, ah + m0 * K + 32 * b, K);
            _tile_loadd(3, al + m0 * K + 32 * b, K);
            _tile_loadd(4, qp + tile * 512, 64);
            _tile_dpbssd(0, 2, 4);
            _tile_dpbusd(1, 3, 4);
            _tile_stored(0, chi, 64);
            _tile_stored(1, clo, 64);
            const __m512 sc = _mm512_loadu_ps(sp + tile * 16);
            for (int m = 0; m < mt; ++m) {
                const __m512i v = _mm512_add_epi32(_mm512_slli_epi32(_mm512_load_si512(chi + 16 * m), 8),
                                                   _mm512_load_si512(clo + 16 * m));
                acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), sc, acc[m]);
            }
        }
        for (int m = 0; m < mt; ++m) lanes[m][i] = acc[m];
    }
    for (int m = 0; m < mt; ++m)
        _mm512_storeu_ps(op + (m0 + m) * N + 16 * t, _mm512_mul_ps(reduce_lanes(lanes[m]), _mm512_set1_ps(xs[m0 + m])));
}
#endif

static void check_tiles_args(const torch::Tensor& x, const torch::Tensor& qt, const torch::Tensor& st) {
    // x (M, K) float32 rows; qt (N, K) int8 and st (N, K / 32) float32 in the tile order
    TORCH_CHECK(x.dtype() == torch::kFloat32 && qt.dtype() == torch::kInt8 && st.dtype() == torch::kFloat32);
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && qt.is_contiguous() && st.is_contiguous());
    const int64_t K = x.size(1), N = qt.size(0);
    TORCH_CHECK(qt.size(1) == K && N % 16 == 0 && K % 512 == 0 && st.numel() == N * (K / 32));
}

torch::Tensor int8_linear_tiles(torch::Tensor x, torch::Tensor qt, torch::Tensor st) {
    // out (M, N) = x (M, K) float32 . weights in the tile order^T: int8_linear's result
    check_tiles_args(x, qt, st);
    const int64_t M = x.size(0), K = x.size(1), N = qt.size(0);
    TORCH_CHECK(tiles_supported(), "the tile order needs AVX-512 VNNI");
    auto out = torch::empty({M, N}, x.options());
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
    const float* xp = x.data_ptr<float>();
    std::vector<int16_t> xq(M * K);
    std::vector<float> xs(M);
    for (int64_t m = 0; m < M; ++m) xs[m] = quantize_row16(xp + m * K, K, xq.data() + m * K);   // as int8_linear
    const int8_t* qp = qt.data_ptr<int8_t>();
    const float* sp = st.data_ptr<float>();
    float* op = out.data_ptr<float>();
    int64_t done = 0;                                      // rows done on tiles
#ifdef MAKIMA_AMX
    if (M >= AMX_MIN_ROWS && amx_int8()) {
        done = M;
        std::vector<int8_t> hi(M * K);
        std::vector<uint8_t> lo(M * K);
        const __m256i lowbyte = _mm256_set1_epi16(0xff);
        for (int64_t e = 0; e < M * K; e += 16) {
            const __m256i v = _mm256_loadu_si256((const __m256i*)(xq.data() + e));
            _mm_storeu_si128((__m128i*)(hi.data() + e), _mm256_cvtepi16_epi8(_mm256_srai_epi16(v, 8)));
            _mm_storeu_si128((__m128i*)(lo.data() + e), _mm256_cvtepi16_epi8(_mm256_and_si256(v, lowbyte)));
        }
        at::parallel_for(0, N / 16, 1, [&](int64_t t0, int64_t t1) {
            // groups of 16 rows, then the rest (a second tile configuration: the rows are part of it)
            for (int64_t m0 = 0; m0 < M; m0 += 16) {
                const int mt = (int)std::min<int64_t>(16, M - m0);
                if (m0 == 0 || mt < 16) {
                    TileConfig cfg;
                    cfg.rows[0] = cfg.rows[1] = cfg.rows[2] = cfg.rows[3] = (uint8_t)mt;
                    cfg.colsb[0] = cfg.colsb[1] = 64;     // int32 sums of the high and the low bytes
                    cfg.colsb[2] = cfg.colsb[3] = 32;     // one block of activations: high, low bytes
                    cfg.rows[4] = 8;
                    cfg.colsb[4] = 64;                    // one block of weights
                    _tile_loadconfig(&cfg);
                }
                for (int64_t t = t0; t < t1; ++t) tiles_amx(hi.data(), lo.data(), xs.data(), qp, sp, op, m0, mt, t, N, K);
            }
            _tile_release();
        });
    }
#endif
    if (done < M)
        at::parallel_for(0, N / 16, 1, [&](int64_t t0, int64_t t1) {
            for (int64_t t = t0; t < t1; ++t) tiles_vnni(xq.data(), xs.data(), qp, sp, op, 0, M, t, N, K);
        });
#endif
    return out;
}

bool amx_bf16() {                 // int8_linear_tiles_bf16 runs here
#if defined(MAKIMA_AMX) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
    return amx_int8();
#else
    return false;
#endif
}

torch::Tensor int8_linear_tiles_bf16(torch::Tensor x, torch::Tensor qt, torch::Tensor st) {
    // Many rows (prompts joining together) for weights in the tile order, on AMX bfloat16 tiles: each
    // block's weights are dequantized (times their scale, rounded to bfloat16 as dequantize does) into
    // a tile once per call and multiplied with the rows in bfloat16, float32 sums over all of K: the
    // values of F.linear(x.bfloat16(), dequantized bfloat16 weights) (the group order's prompt path),
    // without writing the whole bfloat16 weight out and handing it to a matrix product that reorders it.
    check_tiles_args(x, qt, st);
    const int64_t M = x.size(0), K = x.size(1), N = qt.size(0);
    TORCH_CHECK(amx_bf16(), "AMX bfloat16 tiles are not available");
    auto out = torch::empty({M, N}, x.options());
#if defined(MAKIMA_AMX) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
    const int64_t G = K / 512, nb = K / 32;
    auto xb = x.to(torch::kBFloat16).contiguous();          // round to nearest even
    const uint16_t* ap = (const uint16_t*)xb.data_ptr<at::BFloat16>();
    const int8_t* qp = qt.data_ptr<int8_t>();
    const float* sp = st.data_ptr<float>();
    float* op = out.data_ptr<float>();
    // panels of PANEL outputs tiles: their blocks dequantized into bfloat16 tiles once (L2-resident), then
    // every 16 rows against them, two output tiles at a time (the rows' tile loaded once for both)
    constexpr int64_t PANEL = 8;
    const int64_t tiles_n = N / 16, panels = (tiles_n + PANEL - 1) / PANEL;
    at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
        // block b of output tile u: pair row R, output j, p at [u][b][R][j][p], k = 32 b + 2 R + p
        std::vector<uint16_t> wb(PANEL * nb * 512);
        const __m512i lo_idx = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
        const __m512i hi_idx = _mm512_set_epi32(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8);
        int configured = -1;
        for (int64_t panel = p0; panel < p1; ++panel) {
            const int64_t ta = panel * PANEL, tb = std::min(tiles_n, ta + PANEL);
            for (int64_t t = ta; t < tb; ++t)
                for (int64_t b = 0; b < nb; ++b) {
                    const int64_t tile = (t * 16 + b % 16) * G + b / 16;
                    const int8_t* src = qp + tile * 512;                     // [r][j][q], k = 32 b + 4 r + q
                    uint16_t* dst = wb.data() + ((t - ta) * nb + b) * 512;
                    const __m512 sc = _mm512_loadu_ps(sp + tile * 16);
                    const __m512 sc_lo = _mm512_permutexvar_ps(lo_idx, sc), sc_hi = _mm512_permutexvar_ps(hi_idx, sc);
                    for (int r = 0; r < 8; ++r) {
                        const __m512i row = _mm512_loadu_si512((const void*)(src + 64 * r));
                        const __m256i halves[2] = {_mm512_cvtepi32_epi16(row),                          // q = 0, 1
                                                   _mm512_cvtepi32_epi16(_mm512_srli_epi32(row, 16))};  // q = 2, 3
                        for (int h = 0; h < 2; ++h) {
                            const __m512 f0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                _mm256_castsi256_si128(halves[h]))), sc_lo);                       // j 0-7
                            const __m512 f1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                _mm256_extracti128_si256(halves[h], 1))), sc_hi);                  // j 8-15
                            _mm512_storeu_si512((void*)(dst + (2 * r + h) * 32), (__m512i)_mm512_cvtne2ps_pbh(f1, f0));
                        }
                    }
                }
            for (int64_t m0 = 0; m0 < M; m0 += 16) {
                const int mt = (int)std::min<int64_t>(16, M - m0);
                if (mt != configured) {
                    TileConfig cfg;
                    cfg.rows[0] = cfg.rows[1] = cfg.rows[2] = (uint8_t)mt;
                    cfg.colsb[0] = cfg.colsb[1] = 64;     // float32 sums of two output tiles
                    cfg.colsb[2] = 64;                    // one block of rows: 32 bfloat16
                    cfg.rows[3] = cfg.rows[4] = 16;
                    cfg.colsb[3] = cfg.colsb[4] = 64;     // a block of weights of each output tile
                    _tile_loadconfig(&cfg);
                    configured = mt;
                }
                const uint16_t* arow = ap + m0 * K;
                int64_t t = ta;
                for (; t + 2 <= tb; t += 2) {
                    const uint16_t* w0 = wb.data() + (t - ta) * nb * 512;
                    const uint16_t* w1 = w0 + nb * 512;
                    _tile_zero(0);
                    _tile_zero(1);
                    for (int64_t b = 0; b < nb; ++b) {
                        _tile_loadd(2, arow + 32 * b, K * 2);
                        _tile_loadd(3, w0 + b * 512, 64);
                        _tile_loadd(4, w1 + b * 512, 64);
                        _tile_dpbf16ps(0, 2, 3);
                        _tile_dpbf16ps(1, 2, 4);
                    }
                    _tile_stored(0, op + m0 * N + 16 * t, N * 4);
                    _tile_stored(1, op + m0 * N + 16 * (t + 1), N * 4);
                }
                if (t < tb) {                              // an odd panel's last output tile
                    const uint16_t* w0 = wb.data() + (t - ta) * nb * 512;
                    _tile_zero(0);
                    for (int64_t b = 0; b < nb; ++b) {
                        _tile_loadd(2, arow + 32 * b, K * 2);
                        _tile_loadd(3, w0 + b * 512, 64);
                        _tile_dpbf16ps(0, 2, 3);
                    }
                    _tile_stored(0, op + m0 * N + 16 * t, N * 4);
                }
            }
        }
        _tile_release();
    });
#endif
    return out;
}

// The codec's SnakeBeta activation, fused: y = x + inv_beta[c] * sin(x * alpha[c])^2 for x (..., C) in
// float32 or bfloat16, computed in float32 with one rounding at the end (torch's five ops round to
// bfloat16 after each and make four temporaries). sin^2 has period pi, so the argument is reduced to
// r in [-pi/2, pi/2] (two-constant Cody-Waite) and sin(r) is its Taylor polynomial to r^11 (error < 6e-8).
static inline float sin2(float v) {
    const float n = std::floor(v * 0.31830988618f + 0.5f);
    const float r = (v - n * 3.140625f) - n * 9.67653589793e-4f;
    const float r2 = r * r;
    const float p = r * (1.f + r2 * (-1.6666667e-1f + r2 * (8.3333333e-3f + r2 * (-1.9841270e-4f +
                    r2 * (2.7557319e-6f + r2 * -2.5052108e-8f)))));
    return p * p;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
static inline __m512 sin2_16(__m512 v) {               // sin2 on 16 lanes (the same reduction and polynomial)
    const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(v, _mm512_set1_ps(0.31830988618f), _mm512_set1_ps(0.5f)),
                                          _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_sub_ps(_mm512_sub_ps(v, _mm512_mul_ps(n, _mm512_set1_ps(3.140625f))),
                                   _mm512_mul_ps(n, _mm512_set1_ps(9.67653589793e-4f)));
    const __m512 r2 = _mm512_mul_ps(r, r);
    __m512 p = _mm512_fmadd_ps(r2, _mm512_set1_ps(-2.5052108e-8f), _mm512_set1_ps(2.7557319e-6f));
    p = _mm512_fmadd_ps(r2, p, _mm512_set1_ps(-1.9841270e-4f));
    p = _mm512_fmadd_ps(r2, p, _mm512_set1_ps(8.3333333e-3f));
    p = _mm512_fmadd_ps(r2, p, _mm512_set1_ps(-1.6666667e-1f));
    p = _mm512_fmadd_ps(r2, p, _mm512_set1_ps(1.f));
    p = _mm512_mul_ps(r, p);
    return _mm512_mul_ps(p, p);
}
#endif

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) {        // round to nearest even (as at::BFloat16; no NaNs here)
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

torch::Tensor snake(torch::Tensor x, torch::Tensor alpha, torch::Tensor inv_beta) {
    // x (..., C), channels last: rows of C channels, each channel with its own alpha and inv_beta
    TORCH_CHECK(x.dim() >= 1 && (x.dtype() == torch::kFloat32 || x.dtype() == torch::kBFloat16));
    const int64_t C = x.size(-1), R = C ? x.numel() / C : 0;
    auto xc = x.contiguous();
    auto a = alpha.reshape({-1}).to(torch::kFloat32).contiguous(), ib = inv_beta.reshape({-1}).to(torch::kFloat32).contiguous();
    TORCH_CHECK(a.numel() == C && ib.numel() == C);
    auto out = torch::empty_like(xc);
    const float* ap = a.data_ptr<float>();
    const float* bp = ib.data_ptr<float>();
    const bool bf16 = x.dtype() == torch::kBFloat16;
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
    at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
        for (int64_t row = r0; row < r1; ++row) {
            if (bf16) {
                const uint16_t* src = (const uint16_t*)xc.data_ptr<at::BFloat16>() + row * C;
                uint16_t* dst = (uint16_t*)out.data_ptr<at::BFloat16>() + row * C;
                int64_t c = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
                for (; c + 16 <= C; c += 16) {
                    const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(
                        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(src + c))), 16));
                    const __m512 y = _mm512_fmadd_ps(_mm512_loadu_ps(bp + c), sin2_16(_mm512_mul_ps(v, _mm512_loadu_ps(ap + c))), v);
                    const __m512i u = _mm512_castps_si512(y);         // round to nearest even
                    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)),
                        _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))), 16);
                    _mm256_storeu_si256((__m256i*)(dst + c), _mm512_cvtepi32_epi16(r));
                }
#endif
                for (; c < C; ++c) {
                    const float v = bf16_to_float(src[c]);
                    dst[c] = float_to_bf16(v + bp[c] * sin2(v * ap[c]));
                }
            } else {
                const float* src = xc.data_ptr<float>() + row * C;
                float* dst = out.data_ptr<float>() + row * C;
                int64_t c = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
                for (; c + 16 <= C; c += 16) {
                    const __m512 v = _mm512_loadu_ps(src + c);
                    _mm512_storeu_ps(dst + c, _mm512_fmadd_ps(_mm512_loadu_ps(bp + c),
                                                              sin2_16(_mm512_mul_ps(v, _mm512_loadu_ps(ap + c))), v));
                }
#endif
                for (; c < C; ++c) dst[c] = src[c] + bp[c] * sin2(src[c] * ap[c]);
            }
        }
    });
    return out;
}

static inline float inv_rms(const float* x, int64_t D, float eps) {      // 1 / sqrt(mean(x^2) + eps)
    float acc[16] = {0};
    int64_t k = 0;
    for (; k + 16 <= D; k += 16)
        for (int l = 0; l < 16; ++l) acc[l] += x[k + l] * x[k + l];
    float ss = 0.f;
    for (int l = 0; l < 16; ++l) ss += acc[l];
    for (; k < D; ++k) ss += x[k] * x[k];
    return 1.f / std::sqrt(ss / float(D) + eps);
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
    auto wc = w.contiguous();              // held: a temporary's pointer would dangle
    const float* wp = wc.data_ptr<float>();
    float* op = out.data_ptr<float>();
    const float e = float(eps);
    at::parallel_for(0, R, std::max<int64_t>(1, 65536 / D), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const float* xr = xp + r * D;
            float* orow = op + r * D;
            const float inv = inv_rms(xr, D, e);
            for (int64_t j = 0; j < D; ++j) orow[j] = xr[j] * inv * wp[j];
        }
    });
    return out;
}

torch::Tensor qk_rope_cache(torch::Tensor qkv, torch::Tensor qw, torch::Tensor kw, double eps, torch::Tensor cos,
                            torch::Tensor sin, torch::Tensor positions, torch::Tensor kc, torch::Tensor vc,
                            int64_t row0, int64_t heads, int64_t kv_heads) {
    // The attention's work between the qkv projection and the scaled dot product, in one call: qkv (b, t,
    // (heads + 2 kv_heads) d) float32 -> q (b, heads, t, d) RMS-normed (qw) and rotated (rotate-half RoPE,
    // cos/sin (b, t, d)); k normed (kw) and rotated, v as is, written to the caches kc/vc (rows, kv_heads,
    // length, d) at row row0 + i, position positions[i, j]. Replaces ~20 small torch ops per layer.
    TORCH_CHECK(qkv.dtype() == torch::kFloat32 && kc.dtype() == torch::kFloat32 && vc.dtype() == torch::kFloat32);
    TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous() && positions.dtype() == torch::kLong);
    auto x = qkv.contiguous();
    auto c = cos.contiguous(), s = sin.contiguous();
    auto pos = positions.contiguous();
    const int64_t B = x.size(0), T = x.size(1), D = kc.size(3), L = kc.size(2), R = kc.size(0);
    const int64_t half = D / 2, W = (heads + 2 * kv_heads) * D;
    TORCH_CHECK(x.size(2) == W && kc.size(1) == kv_heads && qw.numel() == D && kw.numel() == D);
    TORCH_CHECK(c.numel() == B * T * D && s.numel() == B * T * D && pos.numel() == B * T && row0 + B <= R);
    auto q = torch::empty({B, heads, T, D}, x.options());
    const float* xp = x.data_ptr<float>();
    const float* cp = c.data_ptr<float>();
    const float* sp = s.data_ptr<float>();
    const int64_t* pp = pos.data_ptr<int64_t>();
    auto qwc = qw.contiguous(), kwc = kw.contiguous();
    const float* qwp = qwc.data_ptr<float>();
    const float* kwp = kwc.data_ptr<float>();
    float* qp = q.data_ptr<float>();
    float* kp = kc.data_ptr<float>();
    float* vp = vc.data_ptr<float>();
    const float e = float(eps);
    for (int64_t bt = 0; bt < B * T; ++bt) TORCH_CHECK(pp[bt] >= 0 && pp[bt] < L, "position outside the cache");
    auto norm_rope = [&](const float* src, const float* w, const float* cr, const float* sr, float* dst) {
        const float inv = inv_rms(src, D, e);
        for (int64_t j = 0; j < half; ++j) {
            const float a = src[j] * inv * w[j], b = src[j + half] * inv * w[j + half];
            dst[j] = a * cr[j] - b * sr[j];
            dst[j + half] = b * cr[j + half] + a * sr[j + half];
        }
    };
    at::parallel_for(0, B * T, std::max<int64_t>(1, 4096 / (heads + kv_heads)), [&](int64_t i0, int64_t i1) {
        for (int64_t bt = i0; bt < i1; ++bt) {
            const int64_t b = bt / T, t = bt % T, p = pp[bt];
            const float* row = xp + bt * W;
            const float* cr = cp + bt * D;
            const float* sr = sp + bt * D;
            for (int64_t h = 0; h < heads; ++h)
                norm_rope(row + h * D, qwp, cr, sr, qp + ((b * heads + h) * T + t) * D);
            for (int64_t h = 0; h < kv_heads; ++h) {
                const int64_t at = (((row0 + b) * kv_heads + h) * L + p) * D;
                norm_rope(row + (heads + h) * D, kwp, cr, sr, kp + at);
                std::copy(row + (heads + kv_heads + h) * D, row + (heads + kv_heads + h + 1) * D, vp + at);
            }
        }
    });
    return q;
}

// ---------------------------------------------------------------------------------------------------
// Float32 pieces of a decode step (one new position per row) around the int8 products: the SwiGLU
// activation and the attention of one query per row over its cached keys. One call each, in place of
// torch's small ops (silu, mul, chunk; scaled_dot_product_attention with its per-call set-up, which
// for the code predictor's 2-17 keys cost far more than the arithmetic). Each row is computed alone,
// in a fixed order, so a row's result does not depend on the rows beside it.

#if defined(__AVX512F__)
static inline __m512 exp16(__m512 x) {                  // e^x, relative error < 4e-7 (|x| <= 87)
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-87.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x));
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.f / 5040), r, _mm512_set1_ps(1.f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}
#endif

torch::Tensor silu_mul(torch::Tensor x) {
    // x (..., 2 I) float32, gate then up (the fused projection's output) -> silu(gate) * up (..., I)
    TORCH_CHECK(x.dtype() == torch::kFloat32 && x.size(-1) % 2 == 0);
    auto xc = x.contiguous();
    const int64_t W = xc.size(-1), I = W / 2, R = xc.numel() / W;
    auto sizes = xc.sizes().vec();
    sizes.back() = I;
    auto out = torch::empty(sizes, xc.options());
    const float* xp = xc.data_ptr<float>();
    float* op = out.data_ptr<float>();
    at::parallel_for(0, R * I, 16384, [&](int64_t i0, int64_t i1) {
        int64_t i = i0;
        while (i < i1) {
            const int64_t r = i / I, c0 = i % I, c1 = std::min(I, c0 + (i1 - i));
            const float* g = xp + r * W;
            const float* u = g + I;
            float* o = op + r * I;
            int64_t c = c0;
#if defined(__AVX512F__)
            for (; c + 16 <= c1; c += 16) {
                const __m512 gv = _mm512_loadu_ps(g + c);
                const __m512 sig = _mm512_div_ps(_mm512_set1_ps(1.f),
                                                 _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
                _mm512_storeu_ps(o + c, _mm512_mul_ps(_mm512_mul_ps(gv, sig), _mm512_loadu_ps(u + c)));
            }
#endif
            for (; c < c1; ++c) o[c] = g[c] / (1.f + std::exp(-g[c])) * u[c];
            i += c1 - c0;
        }
    });
    return out;
}

static inline float dot_f32(const float* a, const float* b, int64_t D) {
    int64_t k = 0;
    float s = 0.f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; k + 16 <= D; k += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), acc);
    s = _mm512_reduce_add_ps(acc);
#endif
    for (; k < D; ++k) s += a[k] * b[k];
    return s;
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor kc, torch::Tensor vc, int64_t row0,
                               torch::Tensor lengths) {
    // q (b, heads, 1, d) float32: one query per row; kc/vc (rows, kv_heads, length, d), the cache; row i of
    // the batch is cache row row0 + i and sees its keys [0, lengths[i]) (scale 1 / sqrt(d), grouped heads:
    // head h reads kv head h / (heads / kv_heads)) -> (b, 1, heads * d), as o_proj takes it
    TORCH_CHECK(q.dtype() == torch::kFloat32 && kc.dtype() == torch::kFloat32 && vc.dtype() == torch::kFloat32);
    TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && kc.is_contiguous() && vc.is_contiguous());
    TORCH_CHECK(lengths.dtype() == torch::kLong && lengths.numel() == q.size(0));
    auto qc = q.contiguous();
    auto len = lengths.contiguous();
    const int64_t B = qc.size(0), H = qc.size(1), D = qc.size(3), KV = kc.size(1), L = kc.size(2);
    TORCH_CHECK(kc.size(3) == D && H % KV == 0 && row0 >= 0 && row0 + B <= kc.size(0));
    const int64_t* lp = len.data_ptr<int64_t>();
    int64_t longest = 1;
    for (int64_t b = 0; b < B; ++b) {
        TORCH_CHECK(lp[b] >= 1 && lp[b] <= L, "attention length outside the cache");
        longest = std::max(longest, lp[b]);
    }
    auto out = torch::empty({B, 1, H * D}, qc.options());
    const float* qp = qc.data_ptr<float>();
    const float* kp = kc.data_ptr<float>();
    const float* vp = vc.data_ptr<float>();
    float* op = out.data_ptr<float>();
    const float scale = 1.f / std::sqrt(float(D));
    at::parallel_for(0, B * H, std::max<int64_t>(1, 4096 / (longest * D / 16 + 1)), [&](int64_t i0, int64_t i1) {
        std::vector<float> w(longest);
        for (int64_t i = i0; i < i1; ++i) {
            const int64_t b = i / H, h = i % H, n = lp[b];
            const float* qr = qp + i * D;
            const int64_t base = ((row0 + b) * KV + h / (H / KV)) * L * D;
            float top = -INFINITY;
            for (int64_t j = 0; j < n; ++j) {
                w[j] = dot_f32(qr, kp + base + j * D, D) * scale;
                top = std::max(top, w[j]);
            }
            float sum = 0.f;
            for (int64_t j = 0; j < n; ++j) {
                w[j] = std::exp(w[j] - top);
                sum += w[j];
            }
            const float inv = 1.f / sum;
            float* o = op + i * D;
            std::fill(o, o + D, 0.f);
            for (int64_t j = 0; j < n; ++j) {
                const float pj = w[j] * inv;
                const float* v = vp + base + j * D;
                for (int64_t k = 0; k < D; ++k) o[k] += pj * v[k];
            }
        }
    });
    return out;
}

// ---------------------------------------------------------------------------------------------------
// Sampling rows that share their settings, in one call (the code predictor draws 15 times a frame per
// stream; torch's topk, softmax, top-p and multinomial ops cost ~0.4 ms a draw, mostly per-op set-up):
// per row, logits / temperature, the top_k largest (largest first; ties by the smaller id; 0: all,
// then sorted), their softmax, top-p (the smallest set of the largest whose probability reaches top_p,
// the largest always kept: the candidates whose probabilities, summed from the smallest, stay at or
// below 1 - top_p are dropped), and the draw: the first candidate, largest first, whose running sum of
// weights passes u * their total, u in [0, 1) given per row (each row's own generator). A row's id
// depends on its logits, the settings and its u only.
torch::Tensor sample_rows(torch::Tensor logits, double temperature, int64_t top_k, double top_p, torch::Tensor u) {
    TORCH_CHECK(logits.dim() == 2 && u.dim() == 1 && u.size(0) == logits.size(0) && temperature > 0);
    auto x = logits.to(torch::kFloat32).contiguous();
    auto uc = u.to(torch::kFloat32).contiguous();
    const int64_t B = x.size(0), V = x.size(1);
    TORCH_CHECK(V > 0);
    const int64_t k = (top_k > 0 && top_k < V) ? top_k : V;
    auto out = torch::empty({B}, torch::dtype(torch::kLong));
    const float* xp = x.data_ptr<float>();
    const float* up = uc.data_ptr<float>();
    int64_t* op = out.data_ptr<int64_t>();
    const float inv_t = float(1.0 / temperature);
    at::parallel_for(0, B, 4, [&](int64_t b0, int64_t b1) {
      std::vector<int64_t> idx(k < 256 ? k : V);
      std::vector<float> val(k), w(k);
      for (int64_t b = b0; b < b1; ++b) {
        const float* row = xp + b * V;
        if (k < 256) {
            // the k largest, kept sorted as the row is read (largest first; on ties the earlier id stays
            // ahead): most values fall below the k-th at once
            int64_t n = 0;
            for (int64_t i = 0; i < V; ++i) {
                const float v = row[i];
                if (n == k && !(v > val[k - 1])) continue;
                int64_t j = n < k ? n++ : k - 1;
                while (j > 0 && v > val[j - 1]) {
                    val[j] = val[j - 1];
                    idx[j] = idx[j - 1];
                    --j;
                }
                val[j] = v;
                idx[j] = i;
            }
        } else {
            for (int64_t i = 0; i < V; ++i) idx[i] = i;
            auto larger = [row](int64_t a, int64_t c) { return row[a] > row[c] || (row[a] == row[c] && a < c); };
            if (k < V) std::nth_element(idx.begin(), idx.begin() + k, idx.end(), larger);
            std::sort(idx.begin(), idx.begin() + k, larger);
        }
        const float top = row[idx[0]] * inv_t;
        float sum = 0.f;
        for (int64_t i = 0; i < k; ++i) {
            w[i] = std::exp(row[idx[i]] * inv_t - top);
            sum += w[i];
        }
        int64_t keep = k;
        if (top_p < 1.0) {
            const float limit = float(1.0 - top_p);
            float small = 0.f;
            while (keep > 1) {
                small += w[keep - 1] / sum;
                if (!(small <= limit)) break;
                --keep;
            }
        }
        float total = 0.f;
        for (int64_t i = 0; i < keep; ++i) total += w[i];
        const float target = up[b] * total;
        int64_t pick = 0;
        float run = 0.f;
        for (int64_t i = 0; i < keep; ++i) {
            if (w[i] > 0.f) pick = i;          // past every weight (rounding): the last with any
            run += w[i];
            if (run > target && w[i] > 0.f) break;
        }
        op[b] = idx[pick];
      }
    });
    return out;
}

// ---------------------------------------------------------------------------------------------------
// A decode step's decoder layers (one new position per row, int8 weights) in one call: the same kernels,
// in the same order, as the modules call them one by one (so the same bits), without ~13 Python-level
// ops a layer in between. A layer's tensors, in order: input norm, qkv (weights, scales), o (weights,
// scales), q norm, k norm, post-attention norm, gate_up (weights, scales), down (weights, scales);
// `tiles`: per layer, which of qkv, o, gate_up, down are in the tile order (bits 0-3).
torch::Tensor decode_layers(torch::Tensor x, std::vector<std::vector<torch::Tensor>> layers,
                            std::vector<int64_t> tiles, std::vector<torch::Tensor> kcs,
                            std::vector<torch::Tensor> vcs, torch::Tensor cos, torch::Tensor sin,
                            torch::Tensor positions, torch::Tensor lengths, int64_t row0, int64_t heads,
                            int64_t kv_heads, double eps) {
    TORCH_CHECK(x.dim() == 3 && x.size(1) == 1 && x.dtype() == torch::kFloat32);
    TORCH_CHECK(layers.size() == tiles.size() && layers.size() == kcs.size() && layers.size() == vcs.size());
    const int64_t B = x.size(0), D = x.size(2);
    auto lin = [](const torch::Tensor& h, const torch::Tensor& w, const torch::Tensor& sc, bool tiled) {
        auto h2 = h.reshape({-1, h.size(-1)}).contiguous();
        return tiled ? int8_linear_tiles(h2, w, sc) : int8_linear(h2, w, sc);
    };
    for (size_t i = 0; i < layers.size(); ++i) {
        const auto& L = layers[i];
        TORCH_CHECK(L.size() == 12, "a decode layer has 12 tensors");
        const int64_t t = tiles[i];
        auto h = rms_norm(x, L[0], eps);
        auto qkv = lin(h, L[1], L[2], t & 1).view({B, 1, -1});
        auto q = qk_rope_cache(qkv, L[5], L[6], eps, cos, sin, positions, kcs[i], vcs[i], row0, heads, kv_heads);
        auto a = decode_attention(q, kcs[i], vcs[i], row0, lengths);
        x = x + lin(a, L[3], L[4], t & 2).view({B, 1, D});
        h = rms_norm(x, L[7], eps);
        x = x + lin(silu_mul(lin(h, L[8], L[9], t & 4)), L[10], L[11], t & 8).view({B, 1, D});
    }
    return x;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("decode_layers", &decode_layers, "a decode step's int8 decoder layers in one call (the modules' kernels, in order)");
    m.def("sample_rows", &sample_rows, "rows with the same settings: temperature, top-k, top-p, a draw with u (b,) each");
    m.def("silu_mul", &silu_mul, "(..., 2 I) gate then up -> silu(gate) * up (..., I), float32");
    m.def("decode_attention", &decode_attention, "one query per row over its cached keys [0, length): (b, 1, heads * d)");
    m.def("qk_rope_cache", &qk_rope_cache, "qkv -> q normed and rotated; k normed, rotated and v written to the cache");
    m.def("snake", &snake, "the codec's SnakeBeta: x + inv_beta * sin(x * alpha)^2, fused (float32 or bfloat16)");
    m.def("rms_norm", &rms_norm, "x (..., D) float32 -> RMS-normed times w (one pass per row)");
    m.def("int8_linear", &int8_linear, "x (M, K) float32 . int8 (or packed int4) blocks-of-32 weights^T");
    m.def("pack4", &pack4, "int8 weights (stored order, -8..7) -> int4, two a byte");
    m.def("permute_k", &permute_k, "int8 weights in natural order -> the kernel's stored order");
    m.def("amx_int8", &amx_int8, "whether AMX tiles run here (compiled for them, and Linux granted the tile state)");
    m.def("tiles_supported", &tiles_supported, "whether int8_linear_tiles runs here (AVX-512 VNNI)");
    m.def("amx_bf16", &amx_bf16, "whether int8_linear_tiles_bf16 runs here (AMX bfloat16 tiles)");
    m.def("int8_linear_tiles_bf16", &int8_linear_tiles_bf16, "many rows, weights in the tile order: AMX bfloat16 tiles");
    m.def("dequantize_tiles", &dequantize_tiles, "dequantize for weights in the tile order");
    m.def("to_tiles", &to_tiles, "int8 weights and scales in natural order -> the tile order");
    m.def("from_tiles", &from_tiles, "the tile order -> natural order (weights, scales)");
    m.def("int8_linear_tiles", &int8_linear_tiles, "int8_linear for weights in the tile order (AMX for 16+ rows)");
    m.def("dequantize", &dequantize, "stored int8 weights + scales -> float32 (N, K), natural order");
}
