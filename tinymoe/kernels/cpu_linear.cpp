// y[M, N] = x[M, K] . w[N, K]^T with bf16 (or int8 with per-row scales) weights and fp32
// activations, accumulated in fp32: the CPU matmul of decode-sized batches; and the SwiGLU
// experts of a MoE layer built from it (moe_tokens_bf16). Built on first use
// by native.py with the host compiler (-O3 -march=native -fopenmp).
//
// Weights are read in chunks of CH = 2 * VW values that split into two fp32 vectors with one
// instruction each. A bf16 is the top half of an fp32, so in a chunk read as 32-bit words the odd
// values are `word & 0xffff0000` and the even ones `word << 16`: two instructions for 2 * VW
// values, where widening in order costs twice that (with 2 vCPUs on one physical core, the
// instruction count per byte, not the memory, is what caps a GEMV). The activations are
// permuted once per call to match (even values, then odd, per chunk).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"
#include "cpu_simd.h"

#if defined(__AVX512F__)
constexpr int VW = 16;
typedef __m512 vf;
static inline vf load_f32(const float* p) { return _mm512_loadu_ps(p); }
static inline vf fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf zero() { return _mm512_setzero_ps(); }
static inline void split(const uint16_t* p, vf& lo, vf& hi) {
    __m512i v = _mm512_loadu_si512(p);
    lo = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    hi = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xffff0000u))));
}
static inline void split(const int8_t* p, vf& lo, vf& hi) {
    __m256i v = _mm256_loadu_si256((const __m256i*)p);
    lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v)));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1)));
}
#elif defined(__AVX2__)
constexpr int VW = 8;
typedef __m256 vf;
static inline vf load_f32(const float* p) { return _mm256_loadu_ps(p); }
static inline vf fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf zero() { return _mm256_setzero_ps(); }
static inline void split(const uint16_t* p, vf& lo, vf& hi) {
    __m256i v = _mm256_loadu_si256((const __m256i*)p);
    lo = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    hi = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xffff0000u))));
}
static inline void split(const int8_t* p, vf& lo, vf& hi) {
    __m128i v = _mm_loadu_si128((const __m128i*)p);
    lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
    hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(v, v)));
}
#else
#error "the native CPU kernel needs AVX2 or AVX-512 (tinymoe then uses torch matmuls)"
#endif
constexpr int CH = 2 * VW;
// Bytes ahead in the weight stream. Far (several 4 KB pages): the hardware prefetcher stops at
// page ends, and at ~15 GB/s DRAM latency covers kilobytes. 8 KB beat 512 B by ~30% on 1-row
// products here (AMD EPYC VM, AVX2).
#ifndef PREFETCH
#define PREFETCH 8192
#endif

static inline float scalar(uint16_t h) { return bf(h); }
static inline float scalar(int8_t q) { return float(q); }

// Where activation k goes in the permuted copy, so that split()'s lanes meet their activations.
static inline int64_t permuted(uint16_t*, int64_t k, int64_t K) {
    const int64_t c = k / CH * CH;
    if (c + CH > K) return k;  // the scalar tail keeps natural order
    const int64_t i = k - c;
    return c + (i % 2) * VW + i / 2;
}
static inline int64_t permuted(int8_t*, int64_t k, int64_t) { return k; }

// A tree of shuffles: a row's epilogue must not be a 30-cycle chain of scalar adds, which at
// one 2 KB weight row per ~400 cycles costs a quarter of a GEMV's bandwidth.
static inline float hsum(vf v) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps(v);
#else
    return hsum8(v);
#endif
}
static inline vf add(vf a, vf b) {
#if defined(__AVX512F__)
    return _mm512_add_ps(a, b);
#else
    return _mm256_add_ps(a, b);
#endif
}

// R weight rows against MB activation rows, U independent accumulators each along k (one FMA
// chain cannot keep up with memory); the R x MB x U accumulators stay in registers.
template <int R, int MB, int U, typename W>
static inline void tile(const float* x, int64_t ldx, const W* w, int64_t K, float* out) {
    vf acc[R][MB][U];
    for (int r = 0; r < R; r++) for (int m = 0; m < MB; m++) for (int u = 0; u < U; u++) acc[r][m][u] = zero();
    int64_t k = 0;
    for (; k + U * CH <= K; k += U * CH) {
        for (int r = 0; r < R; r++) {
            const char* ahead = (const char*)(w + r * K + k) + PREFETCH;
            _mm_prefetch(ahead, _MM_HINT_T0);
            _mm_prefetch(ahead + 64, _MM_HINT_T0);
        }
        for (int u = 0; u < U; u++) {
            vf lo[R], hi[R];
            for (int r = 0; r < R; r++) split(w + r * K + k + u * CH, lo[r], hi[r]);
            for (int m = 0; m < MB; m++) {
                const vf xl = load_f32(x + m * ldx + k + u * CH), xh = load_f32(x + m * ldx + k + u * CH + VW);
                for (int r = 0; r < R; r++) acc[r][m][u] = fma(hi[r], xh, fma(lo[r], xl, acc[r][m][u]));
            }
        }
    }
    for (; k + CH <= K; k += CH)
        for (int r = 0; r < R; r++) {
            vf lo, hi;
            split(w + r * K + k, lo, hi);
            for (int m = 0; m < MB; m++)
                acc[r][m][0] = fma(hi, load_f32(x + m * ldx + k + VW), fma(lo, load_f32(x + m * ldx + k), acc[r][m][0]));
        }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MB; m++) {
            vf total = acc[r][m][0];
            for (int u = 1; u < U; u++) total = add(total, acc[r][m][u]);
            float s = hsum(total);
            for (int64_t j = k; j < K; j++) s += scalar(w[r * K + j]) * x[m * ldx + j];
            out[r * MB + m] = s;
        }
}

// acc[r * M + m] for weight rows n0 .. n0 + R and all M activation rows
template <int R, int MB, int U, typename W>
static void rows(const float* x, int64_t M, int64_t K, const W* w, int64_t n0, float* acc) {
    static_assert(MB <= 4, "the remainder below covers up to 3 rows");
    const W* wr = w + n0 * K;
    float part[R * MB];
    int64_t m = 0;
    for (; m + MB <= M; m += MB) {
        tile<R, MB, U>(x + m * K, K, wr, K, part);
        for (int r = 0; r < R; r++) for (int j = 0; j < MB; j++) acc[r * M + m + j] = part[r * MB + j];
    }
    const int rest = int(M - m);  // the last < MB rows in one pass too, not one by one
    if (rest == 1) tile<R, 1, U>(x + m * K, K, wr, K, part);
    else if (rest == 2) tile<R, 2, U>(x + m * K, K, wr, K, part);
    else if (rest == 3) tile<R, 3, U>(x + m * K, K, wr, K, part);
    for (int r = 0; r < R; r++) for (int j = 0; j < rest; j++) acc[r * M + m + j] = part[r * rest + j];
}

constexpr int MCHUNK = 64;                  // activation rows per pass over a block of weight rows
constexpr int64_t SERIAL_BELOW = 1 << 20;  // multiply-adds: less runs on the calling thread

// Weight rows [b R, b R + R) of y = x w^T for all M activation rows (x fp32, permuted): one unit
// of a linear()'s work, also scheduled by moe_tokens.
template <int R, int MB, int U, typename W>
static void block(const float* x, int64_t M, int64_t K, const W* w, const uint16_t* scale, int64_t N, void* y,
                  int out_bf16, int64_t b) {
    const int64_t n0 = b * R;
    float acc[R * MCHUNK];
    for (int64_t m0 = 0; m0 < M; m0 += MCHUNK) {
        const int64_t mc = M - m0 < MCHUNK ? M - m0 : MCHUNK;
        const float* xm = x + m0 * K;
        if (n0 + R <= N) {
            rows<R, MB, U>(xm, mc, K, w, n0, acc);
        } else {
            for (int64_t n = n0; n < N; n++) rows<1, MB, U>(xm, mc, K, w, n, acc + (n - n0) * mc);
        }
        for (int64_t n = n0; n < N && n < n0 + R; n++) {
            const float s = scale ? scalar(scale[n]) : 1.f;
            for (int64_t j = 0; j < mc; j++) {
                const float v = acc[(n - n0) * mc + j] * s;
                const int64_t at = (m0 + j) * N + n;
                if (out_bf16) static_cast<uint16_t*>(y)[at] = to_bf(v);
                else static_cast<float*>(y)[at] = v;
            }
        }
    }
}

// The tile shape for M activation rows. Few rows: bandwidth-bound, so one weight row at a time
// (one stream for the prefetcher) feeding all of them, with several k chains. Many:
// compute-bound, so tiles of 3 weight rows x 4 activation rows.
static inline int64_t rows_per_block(int64_t M) { return M >= 4 ? 3 : 1; }

template <typename W>
static void block_for(const float* x, int64_t M, int64_t K, const W* w, const uint16_t* scale, int64_t N, void* y,
                      int out_bf16, int64_t b) {
    if (M == 1) block<1, 1, 2>(x, M, K, w, scale, N, y, out_bf16, b);
    else if (M == 2) block<1, 2, 2>(x, M, K, w, scale, N, y, out_bf16, b);
    else if (M == 3) block<1, 3, 2>(x, M, K, w, scale, N, y, out_bf16, b);
    else block<3, 4, 1>(x, M, K, w, scale, N, y, out_bf16, b);
}

// Blocks per ~256 KB of weights: work taken in turn, so a worker OpenMP wakes late takes fewer
// (static halves leave the other thread idle), and each is still one long stream.
template <typename W>
static int64_t blocks_per_chunk(int64_t M, int64_t K) {
    return std::max<int64_t>(1, (256 << 10) / (rows_per_block(M) * K * int64_t(sizeof(W))));
}

// fp32 copy of M rows of x (bf16 or fp32), permuted to meet split()'s lanes.
template <typename W>
static void permute_rows(const void* x, int x_bf16, int64_t M, int64_t K, float* xp) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++)
            xp[m * K + permuted((W*)nullptr, k, K)] =
                x_bf16 ? scalar(static_cast<const uint16_t*>(x)[m * K + k]) : static_cast<const float*>(x)[m * K + k];
}

// Small weights run on the calling thread: waking torch's OpenMP workers costs more than they save.
template <typename W>
static void run(const void* x, int x_bf16, int64_t M, int64_t K, const W* w, const uint16_t* scale, int64_t N,
                void* y, int out_bf16, int threads) {
    std::vector<float> xp(M * K);
    permute_rows<W>(x, x_bf16, M, K, xp.data());
    if (M * N * K < SERIAL_BELOW) threads = 1;
    const int64_t blocks = (N + rows_per_block(M) - 1) / rows_per_block(M);
#pragma omp parallel for schedule(dynamic, blocks_per_chunk<W>(M, K)) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) block_for(xp.data(), M, K, w, scale, N, y, out_bf16, b);
}

// One token through k SwiGLU experts (bf16 weights): out = sum over e, in order, of
// round(round(w2_e . swiglu(round(w13_e . x))) * weights[e]), rounded after each add: what
// `Experts` computes with one matmul per expert, in one parallel region instead of 2k calls.
// w13[e] is [2I, D] (gate rows, then up rows), w2[e] is [D, I]; weights are bf16 values.
static void moe_token(const float* x, int64_t D, int64_t I, int64_t k, const uint16_t* const* w13,
                      const uint16_t* const* w2, const float* weights, uint16_t* out, int threads) {
    std::vector<float> h(k * 2 * I), act(k * I), y(k * D);
    std::vector<uint16_t> hb(k * 2 * I), ab(k * I);
    const int64_t chunk13 = blocks_per_chunk<uint16_t>(1, D), chunk2 = blocks_per_chunk<uint16_t>(1, I);
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(dynamic, chunk13)
        for (int64_t b = 0; b < k * 2 * I; b++) tile<1, 1, 2>(x, D, w13[b / (2 * I)] + (b % (2 * I)) * D, D, &h[b]);
#pragma omp for
        for (int64_t e = 0; e < k; e++) {
            for (int64_t i = 0; i < 2 * I; i++) hb[e * 2 * I + i] = to_bf(h[e * 2 * I + i]);
            swiglu_row(&hb[e * 2 * I], &hb[e * 2 * I + I], &ab[e * I], I);
            for (int64_t i = 0; i < I; i++) act[e * I + permuted((uint16_t*)nullptr, i, I)] = bf(ab[e * I + i]);
        }
#pragma omp for schedule(dynamic, chunk2)
        for (int64_t b = 0; b < k * D; b++) tile<1, 1, 2>(&act[(b / D) * I], I, w2[b / D] + (b % D) * I, I, &y[b]);
    }
    for (int64_t d = 0; d < D; d++) {
        float acc = 0.f;
        for (int64_t e = 0; e < k; e++) acc = round_bf(acc + round_bf(round_bf(y[e * D + d]) * weights[e]));
        out[d] = to_bf(acc);
    }
}

// The copies' SwiGLU MLPs over their gathered rows in one parallel region (three work-shared
// loops: gate/up blocks of every copy, SwiGLU, down blocks), each block computed as run() would:
// for decode batches, where one region per matmul costs more than the matmuls' imbalance.
// xs[c]: copy c's n[c] rows (bf16, [n, D]); y[c] gets its [n, D] outputs (bf16).
static void copies_one_region(const std::vector<const uint16_t*>& xs, const std::vector<int64_t>& n, int64_t D,
                              int64_t I, const uint16_t* const* w13, const uint16_t* const* w2,
                              const std::vector<int64_t>& copy, std::vector<std::vector<uint16_t>>& y,
                              int threads) {
    const int64_t A = copy.size();  // active copies
    std::vector<std::vector<float>> xp(A), ap(A);
    std::vector<std::vector<uint16_t>> h(A);
    struct Item { int64_t a, b0, b1; };
    std::vector<Item> up, down;  // ~256 KB of one copy's weight rows each
    int64_t work = 0;
    for (int64_t a = 0; a < A; a++) {
        xp[a].resize(n[a] * D);
        permute_rows<uint16_t>(xs[a], 1, n[a], D, xp[a].data());
        h[a].resize(n[a] * 2 * I);
        ap[a].resize(n[a] * I);
        y[a].resize(n[a] * D);
        const int64_t R = rows_per_block(n[a]);
        for (int64_t b = 0, nb = (2 * I + R - 1) / R, ch = blocks_per_chunk<uint16_t>(n[a], D); b < nb; b += ch)
            up.push_back({a, b, std::min(nb, b + ch)});
        for (int64_t b = 0, nb = (D + R - 1) / R, ch = blocks_per_chunk<uint16_t>(n[a], I); b < nb; b += ch)
            down.push_back({a, b, std::min(nb, b + ch)});
        work += n[a] * 3 * I * D;
    }
    if (work < SERIAL_BELOW) threads = 1;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(dynamic)
        for (size_t i = 0; i < up.size(); i++) {
            const Item& it = up[i];
            for (int64_t b = it.b0; b < it.b1; b++)
                block_for(xp[it.a].data(), n[it.a], D, w13[copy[it.a]], (const uint16_t*)nullptr, 2 * I,
                          h[it.a].data(), 1, b);
        }
#pragma omp for schedule(dynamic)
        for (int64_t a = 0; a < A; a++) {
            std::vector<uint16_t> act(I);
            for (int64_t j = 0; j < n[a]; j++) {
                swiglu_row(&h[a][j * 2 * I], &h[a][j * 2 * I + I], act.data(), I);
                permute_rows<uint16_t>(act.data(), 1, 1, I, &ap[a][j * I]);
            }
        }
#pragma omp for schedule(dynamic)
        for (size_t i = 0; i < down.size(); i++) {
            const Item& it = down[i];
            for (int64_t b = it.b0; b < it.b1; b++)
                block_for(ap[it.a].data(), n[it.a], I, w2[copy[it.a]], (const uint16_t*)nullptr, D,
                          y[it.a].data(), 1, b);
        }
    }
}

constexpr int64_t ONE_REGION_TOKENS = 64;  // up to this many tokens (decode batches)

// T tokens through their k experts each (ids [T, k] index the copies' w13/w2 pointers):
// per copy, its tokens' rows gathered in order, the two matmuls with SwiGLU between, each
// result times its weight; then each token's contributions added in (copy, slot) order,
// rounded after each add. The same arithmetic as `Experts`' per-copy torch loop (index_add_
// of the weighted rows), without its ~15 torch ops a copy. One token takes moe_token; decode
// batches run all copies in one parallel region; larger ones (prefill: compute-bound, and all copies' buffers at once would
// be large) one copy after another.
static void moe_tokens(const uint16_t* x, int64_t T, int64_t D, int64_t I, int64_t k, const int64_t* ids,
                       const float* weights, int64_t C, const uint16_t* const* w13, const uint16_t* const* w2,
                       uint16_t* out, int threads) {
    if (T == 1) {  // its (copy, weight) pairs in ascending order: the order the per-copy path adds them
        std::vector<int64_t> order(k);
        for (int64_t j = 0; j < k; j++) order[j] = j;
        std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
            return ids[a] != ids[b] ? ids[a] < ids[b] : weights[a] < weights[b];
        });
        std::vector<const uint16_t*> p13(k), p2(k);
        std::vector<float> w(k), xp(D);
        for (int64_t j = 0; j < k; j++) {
            p13[j] = w13[ids[order[j]]];
            p2[j] = w2[ids[order[j]]];
            w[j] = weights[order[j]];
        }
        for (int64_t i = 0; i < D; i++) xp[permuted((uint16_t*)nullptr, i, D)] = bf(x[i]);
        return moe_token(xp.data(), D, I, k, p13.data(), p2.data(), w.data(), out, threads);
    }
    std::vector<std::vector<int64_t>> rows(C);  // flat (token, slot) indices per copy, ascending
    for (int64_t f = 0; f < T * k; f++) rows[ids[f]].push_back(f);
    std::vector<uint16_t> ys(T * k * D);
    auto weigh = [&](int64_t c, const uint16_t* y) {  // copy c's outputs times their weights
        for (size_t j = 0; j < rows[c].size(); j++) {
            const float w = weights[rows[c][j]];
            for (int64_t d = 0; d < D; d++) ys[rows[c][j] * D + d] = to_bf(bf(y[j * D + d]) * w);
        }
    };
    std::vector<std::vector<uint16_t>> gathered(C);
    for (int64_t c = 0; c < C; c++) {
        gathered[c].resize(rows[c].size() * D);
        for (size_t j = 0; j < rows[c].size(); j++) std::memcpy(&gathered[c][j * D], x + rows[c][j] / k * D, D * 2);
    }
    if (T <= ONE_REGION_TOKENS) {
        std::vector<const uint16_t*> xs;
        std::vector<int64_t> n, copy;
        for (int64_t c = 0; c < C; c++)
            if (!rows[c].empty()) {
                xs.push_back(gathered[c].data());
                n.push_back(rows[c].size());
                copy.push_back(c);
            }
        std::vector<std::vector<uint16_t>> y(copy.size());
        copies_one_region(xs, n, D, I, w13, w2, copy, y, threads);
        for (size_t a = 0; a < copy.size(); a++) weigh(copy[a], y[a].data());
    } else {
        for (int64_t c = 0; c < C; c++) {
            const int64_t n = rows[c].size();
            if (!n) continue;
            std::vector<uint16_t> h(n * 2 * I), act(n * I), y(n * D);
            run(gathered[c].data(), 1, n, D, w13[c], (const uint16_t*)nullptr, 2 * I, h.data(), 1, threads);
            for (int64_t j = 0; j < n; j++) swiglu_row(&h[j * 2 * I], &h[j * 2 * I + I], &act[j * I], I);
            run(act.data(), 1, n, I, w2[c], (const uint16_t*)nullptr, D, y.data(), 1, threads);
            weigh(c, y.data());
        }
    }
    std::vector<float> acc(T * D, 0.f);
    for (int64_t c = 0; c < C; c++)
        for (const int64_t f : rows[c]) {
            float* a = &acc[f / k * D];
            for (int64_t d = 0; d < D; d++) a[d] = round_bf(a[d] + bf(ys[f * D + d]));
        }
    for (int64_t i = 0; i < T * D; i++) out[i] = to_bf(acc[i]);
}

extern "C" {
// x [M, K] contiguous, fp32 or (x_bf16) bf16; w [N, K] contiguous; scale bf16 [N] or null;
// y [M, N] fp32 or bf16.
void linear_bf16(const void* x, int x_bf16, int64_t M, int64_t K, const uint16_t* w, int64_t N, void* y,
                 int out_bf16, int threads) {
    run(x, x_bf16, M, K, w, nullptr, N, y, out_bf16, threads);
}
void linear_int8(const void* x, int x_bf16, int64_t M, int64_t K, const int8_t* w, const uint16_t* scale,
                 int64_t N, void* y, int out_bf16, int threads) {
    run(x, x_bf16, M, K, w, scale, N, y, out_bf16, threads);
}
// x bf16 [T, D]; ids int64 [T, k] in [0, C); weights fp32 [T, k] (bf16 values); w13, w2: C
// pointers; out bf16 [T, D].
void moe_tokens_bf16(const uint16_t* x, int64_t T, int64_t D, int64_t I, int64_t k, const int64_t* ids,
                     const float* weights, int64_t C, const uint16_t* const* w13, const uint16_t* const* w2,
                     uint16_t* out, int threads) {
    moe_tokens(x, T, D, I, k, ids, weights, C, w13, w2, out, threads);
}
}
