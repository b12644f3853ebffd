// The small per-layer ops of a CPU decode step, on bf16 tensors: RMSNorm (+ residual add),
// rotary embedding, SwiGLU, writing K/V into the paged cache, and paged decode attention. At
// batch 1 each of these is a few microseconds of work that costs 5-10 us per torch op and
// several ops each; here each is one call. They round where their torch twins round (the twins
// in norm.py, rotary.py, activation.py and attention.py are the reference).
// Built together with cpu_linear.cpp by native.py.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"
#include "cpu_simd.h"

extern "C" {

// y = rms_norm(x (+ residual)) * w over rows of D. With a residual, res_out = round(x + residual)
// is what gets normalised; without, res_out is ignored. Rows of x, residual, y, res_out are
// contiguous.
void rms_norm_bf16(const uint16_t* x, const uint16_t* residual, const uint16_t* w, uint16_t* y,
                   uint16_t* res_out, int64_t rows, int64_t D, float eps) {
    std::vector<float> h(D);
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t* xr = x + r * D;
        double ss = 0.0;  // double: summation order then cannot matter at fp32 precision
        for (int64_t i = 0; i < D; i++) {
            float v = bf(xr[i]);
            if (residual) {
                const uint16_t s = to_bf(v + bf(residual[r * D + i]));
                res_out[r * D + i] = s;
                v = bf(s);
            }
            h[i] = v;
            ss += double(v) * v;
        }
        const float rstd = 1.0f / std::sqrt(float(ss / D) + eps);
        for (int64_t i = 0; i < D; i++) y[r * D + i] = to_bf(round_bf(h[i] * rstd) * bf(w[i]));
    }
}

// Rotate-half RoPE on `heads` heads of head_dim `hd` per row: row r of x is at x + r * stride,
// of out at out + r * heads * hd (out may be x when stride is heads * hd), and uses cos/sin
// row r % T ([T, hd / 2] fp32). a*b - c*d is
// not contracted to an FMA (-ffp-contract=off, native.py), so it rounds as the twin does.
void rotary_bf16(const uint16_t* x, int64_t stride, uint16_t* out, int64_t rows, int64_t heads, int64_t hd,
                 const float* cos, const float* sin, int64_t T) {
    const int64_t half = hd / 2;
    for (int64_t r = 0; r < rows; r++) {
        const float* c = cos + (r % T) * half;
        const float* s = sin + (r % T) * half;
        for (int64_t h = 0; h < heads; h++) {
            const uint16_t* p = x + r * stride + h * hd;
            uint16_t* o = out + (r * heads + h) * hd;
            for (int64_t i = 0; i < half; i++) {
                const float x1 = bf(p[i]), x2 = bf(p[i + half]);
                o[i] = to_bf(x1 * c[i] - x2 * s[i]);
                o[i + half] = to_bf(x2 * c[i] + x1 * s[i]);
            }
        }
    }
}

// out[r, i] = round(round(silu(gate)) * up) with gate = h[r, i], up = h[r, I + i]; h is [rows, 2I].
void swiglu_bf16(const uint16_t* h, uint16_t* out, int64_t rows, int64_t I) {
    for (int64_t r = 0; r < rows; r++) swiglu_row(h + r * 2 * I, h + r * 2 * I + I, out + r * I, I);
}

// Row n of k and v ([N, KV * hd] at row strides k_stride, v_stride) into flat cache slot slots[n].
void store_kv_bf16(const uint16_t* k, int64_t k_stride, const uint16_t* v, int64_t v_stride, uint16_t* k_cache,
                   uint16_t* v_cache, const int64_t* slots, int64_t N, int64_t row) {
    for (int64_t n = 0; n < N; n++) {
        std::memcpy(k_cache + slots[n] * row, k + n * k_stride, row * 2);
        std::memcpy(v_cache + slots[n] * row, v + n * v_stride, row * 2);
    }
}

}  // extern "C"

// acc[j][c0 * 8 + i] += p[j * L + t] * v_t[c0 * 8 + i] over the L tokens t, for G query heads and
// CW vectors of 8 values (i < 8 CW) of one KV head's rows (at v_cache + slot * row + off), with the
// G x CW sums in registers: the same fmas in token order as one at a time through memory, so the
// same sums, without a store and reload per fma: one sequence 1.3-1.6x faster at 128-2048 tokens
// (16 heads over 4 or 16 KV heads of 64, one thread, A/B in one process, Zen 4 VM, session 14).
template <int G, int CW>
static void weigh_values(const uint16_t* v_cache, const int32_t* table, int64_t L, int64_t block_size, int64_t row,
                         int64_t off, const float* p, float* acc, int64_t hd) {
    __m256 a[G][CW];
    for (int j = 0; j < G; j++) for (int c = 0; c < CW; c++) a[j][c] = _mm256_loadu_ps(acc + j * hd + c * 8);
    for (int64_t t0 = 0; t0 < L; t0 += block_size) {
        const uint16_t* base = v_cache + int64_t(table[t0 / block_size]) * block_size * row + off;
        const int64_t n = L - t0 < block_size ? L - t0 : block_size;
        if (t0 + block_size < L) {  // blocks are scattered: ask for the next one's rows now
            const uint16_t* next = v_cache + int64_t(table[t0 / block_size + 1]) * block_size * row + off;
            for (int64_t i = 0; i < block_size; i++) _mm_prefetch((const char*)(next + i * row), _MM_HINT_T0);
        }
        for (int64_t i = 0; i < n; i++) {
            __m256 v[CW];
            for (int c = 0; c < CW; c++) v[c] = load8(base + i * row + c * 8);
            for (int j = 0; j < G; j++) {
                const __m256 w = _mm256_set1_ps(p[j * L + t0 + i]);
                for (int c = 0; c < CW; c++) a[j][c] = _mm256_fmadd_ps(w, v[c], a[j][c]);
            }
        }
    }
    for (int j = 0; j < G; j++) for (int c = 0; c < CW; c++) _mm256_storeu_ps(acc + j * hd + c * 8, a[j][c]);
}

// weigh_values for the G query heads of KV head g (p, acc: the first of them), 8 / G vectors a
// pass when G is 1, 2, 4 or 8, else a head at a time.
template <int G>
static void weigh_group(const uint16_t* v_cache, const int32_t* table, int64_t L, int64_t block_size, int64_t row,
                        int64_t off, const float* p, float* acc, int64_t hd) {
    constexpr int CW = 8 / G;
    const int64_t V8 = hd / 8;
    int64_t c = 0;
    for (; c + CW <= V8; c += CW) weigh_values<G, CW>(v_cache, table, L, block_size, row, off + c * 8, p, acc + c * 8, hd);
    for (; c < V8; c++) weigh_values<G, 1>(v_cache, table, L, block_size, row, off + c * 8, p, acc + c * 8, hd);
}

extern "C" {
// One query token per sequence b (q row at q + b * q_stride, [H, hd]) attends to its
// context_lens[b] cached tokens through block_tables[b] (caches [blocks, block_size, KV, hd]).
// Scores, softmax and the weighted sum in fp32; out [B, H, hd] rounded once. A task is one
// sequence's KV heads (all of them when there are enough sequences to share out, else one): it
// reads each cached token's row once, in block order, which the prefetcher follows.
// hd must be a multiple of 8 and at most MAX_HD (the caller checks).
constexpr int64_t MAX_HD = 256;
void paged_decode_bf16(const uint16_t* q, int64_t q_stride, const uint16_t* k_cache, const uint16_t* v_cache,
                       const int32_t* block_tables, int64_t table_width, const int32_t* context_lens, int64_t B,
                       int64_t H, int64_t KV, int64_t hd, int64_t block_size, float scale, uint16_t* out,
                       int threads) {
    const int64_t G = H / KV, V8 = hd / 8, row = KV * hd;
    int64_t work = 0;
    for (int64_t b = 0; b < B; b++) work += context_lens[b];
    if (work * H * hd < (1 << 20)) threads = 1;  // waking OpenMP's workers costs more
    const int64_t groups = threads == 1 || B >= 2 * threads ? 1 : KV;  // KV-head ranges per sequence
    const int64_t per = KV / groups, heads = per * G;
#pragma omp parallel for schedule(dynamic) num_threads(threads)
    for (int64_t task = 0; task < B * groups; task++) {
        const int64_t b = task / groups, g0 = task % groups * per, L = context_lens[b];
        const int32_t* table = block_tables + b * table_width;
        uint16_t* o = out + (b * H + g0 * G) * hd;
        if (L <= 0) {  // nothing to attend to (the callers never ask): zeros, not garbage
            std::memset(o, 0, heads * hd * 2);
            continue;
        }
        // query head jj = (g - g0) * G + j of this task reads KV head g
        std::vector<float> qf(heads * hd), acc(heads * hd, 0.f), scores(heads * L), total(heads, 0.f);
        for (int64_t i = 0; i < heads * hd; i++) qf[i] = bf(q[b * q_stride + g0 * G * hd + i]);
        // token t's row: block table[t / block_size], slot t % block_size; this task's heads from g0
        auto each_row = [&](const uint16_t* cache, auto&& visit) {
            for (int64_t t0 = 0; t0 < L; t0 += block_size) {
                const uint16_t* base = cache + int64_t(table[t0 / block_size]) * block_size * row + g0 * hd;
                const int64_t n = L - t0 < block_size ? L - t0 : block_size;
                if (t0 + block_size < L) {  // blocks are scattered: ask for the next one now
                    const char* next = (const char*)(cache + int64_t(table[t0 / block_size + 1]) * block_size * row);
                    for (int64_t off = 0; off < block_size * row * 2; off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
                }
                for (int64_t i = 0; i < n; i++) visit(t0 + i, base + i * row);
            }
        };
        each_row(k_cache, [&](int64_t t, const uint16_t* kr) {
            for (int64_t g = 0; g < per; g++) {
                __m256 k[MAX_HD / 8];
                for (int64_t c = 0; c < V8; c++) k[c] = load8(kr + g * hd + c * 8);
                for (int64_t j = g * G; j < (g + 1) * G; j++) {
                    const float* qj = &qf[j * hd];
                    __m256 s = _mm256_mul_ps(_mm256_loadu_ps(qj), k[0]);
                    for (int64_t c = 1; c < V8; c++) s = _mm256_fmadd_ps(_mm256_loadu_ps(qj + c * 8), k[c], s);
                    scores[j * L + t] = hsum8(s) * scale;
                }
            }
        });
        for (int64_t j = 0; j < heads; j++) {
            float* sj = scores.data() + j * L;
            float m = sj[0];
            for (int64_t t = 1; t < L; t++) m = sj[t] > m ? sj[t] : m;
            int64_t t = 0;
            __m256 sum = _mm256_setzero_ps();
            for (; t + 8 <= L; t += 8) {
                const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sj + t), _mm256_set1_ps(m)));
                _mm256_storeu_ps(sj + t, e);
                sum = _mm256_add_ps(sum, e);
            }
            total[j] = hsum8(sum);
            for (; t < L; t++) {
                sj[t] = std::exp(sj[t] - m);
                total[j] += sj[t];
            }
        }
        for (int64_t g = 0; g < per; g++) {
            const int64_t off = (g0 + g) * hd;
            const float* p = &scores[g * G * L];
            float* a = &acc[g * G * hd];
            switch (G) {
                case 1: weigh_group<1>(v_cache, table, L, block_size, row, off, p, a, hd); break;
                case 2: weigh_group<2>(v_cache, table, L, block_size, row, off, p, a, hd); break;
                case 4: weigh_group<4>(v_cache, table, L, block_size, row, off, p, a, hd); break;
                case 8: weigh_group<8>(v_cache, table, L, block_size, row, off, p, a, hd); break;
                default:
                    for (int64_t j = 0; j < G; j++)
                        weigh_group<1>(v_cache, table, L, block_size, row, off, p + j * L, a + j * hd, hd);
            }
        }
        for (int64_t j = 0; j < heads; j++)
            for (int64_t c = 0; c < V8; c++)
                store8(o + j * hd + c * 8, _mm256_div_ps(_mm256_loadu_ps(&acc[j * hd + c * 8]), _mm256_set1_ps(total[j])));
    }
}

}  // extern "C"
