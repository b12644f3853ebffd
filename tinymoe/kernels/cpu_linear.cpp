// y[M, N] = x[M, K] . w[N, K]^T with bf16 weights and fp32 or bf16 activations, accumulated in fp32:
// the CPU matmul (of every row count when Settings.batch_invariant, else of decode-sized
// batches), and the units of work (cpu_kernels.h: prepare, compute_unit) that every consumer
// schedules; INT8/INT4 matrices are cpu_quant.cpp's. Built on first use by native.py with the
// host compiler (-O3 -march=native -fopenmp).
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
// Into L2 (T1), as cpu_quant.cpp: into L1 (T0), 4 rows x 8 KB in flight hold the core's L1 miss
// buffers, and bf16 decode on a Zen 4 VM (32 KB L1D) ran at 37-39 t/s against T1's 49-55
// (mixtral-mini, batch 1; batch 8 102 against 133-152; bench/decode.py, session 10).
#ifndef PREFETCH_HINT
#define PREFETCH_HINT _MM_HINT_T1
#endif

static inline float scalar(uint16_t h) { return bf(h); }

// Where activation k goes in the permuted copy, so that split()'s lanes meet their activations.
static inline int64_t permuted(uint16_t*, int64_t k, int64_t K) {
    const int64_t c = k / CH * CH;
    if (c + CH > K) return k;  // the scalar tail keeps natural order
    const int64_t i = k - c;
    return c + (i % 2) * VW + i / 2;
}

// A tree of shuffles: a row's epilogue must not be a 30-cycle chain of scalar adds, which at
// one 2 KB weight row per ~400 cycles costs a quarter of a GEMV's bandwidth.
static inline float hsum(vf v) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps(v);
#else
    return hsum8(v);
#endif
}
// Every dot product is summed in one order, whichever tile computes it: one FMA chain over its
// chunks of CH values in k order, then the vector's lanes (hsum), then the last K % CH values in
// order. Tiles differ only in how many weight and activation rows share their loads, so a row's
// result depends on that row of x alone, never on M, the rows beside it or the threads (batch
// invariance, as vLLM's batch-invariant kernels give it on GPUs). The independent chains a
// core needs come from the tile's R x MB dot products, not from splitting one (which would tie
// the order to the tile).
template <int R, int MB, typename W>
static inline void tile(const float* x, int64_t ldx, const W* w, int64_t K, float* out) {
    vf acc[R][MB];
    for (int r = 0; r < R; r++) for (int m = 0; m < MB; m++) acc[r][m] = zero();
    int64_t k = 0;
    for (; k + CH <= K; k += CH) {
        for (int r = 0; r < R; r++) {
            const char* ahead = (const char*)(w + r * K + k) + PREFETCH;
            _mm_prefetch(ahead, PREFETCH_HINT);
            _mm_prefetch(ahead + 64, PREFETCH_HINT);
        }
        vf lo[R], hi[R];
        for (int r = 0; r < R; r++) split(w + r * K + k, lo[r], hi[r]);
        for (int m = 0; m < MB; m++) {
            const vf xl = load_f32(x + m * ldx + k), xh = load_f32(x + m * ldx + k + VW);
            for (int r = 0; r < R; r++) acc[r][m] = fma(hi[r], xh, fma(lo[r], xl, acc[r][m]));
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MB; m++) {
            float s = hsum(acc[r][m]);
            for (int64_t j = k; j < K; j++) s += scalar(w[r * K + j]) * x[m * ldx + j];
            out[r * MB + m] = s;
        }
}

// acc[r * M + m] for weight rows n0 .. n0 + R and all M activation rows
template <int R, int MB, typename W>
static void rows(const float* x, int64_t M, int64_t K, const W* w, int64_t n0, float* acc) {
    static_assert(MB <= 4, "the remainder below covers up to 3 rows");
    const W* wr = w + n0 * K;
    float part[R * MB];
    int64_t m = 0;
    for (; m + MB <= M; m += MB) {
        tile<R, MB>(x + m * K, K, wr, K, part);
        for (int r = 0; r < R; r++) for (int j = 0; j < MB; j++) acc[r * M + m + j] = part[r * MB + j];
    }
    const int rest = int(M - m);  // the last < MB rows in one pass too, not one by one
    if (rest == 1) tile<R, 1>(x + m * K, K, wr, K, part);
    else if (rest == 2) tile<R, 2>(x + m * K, K, wr, K, part);
    else if (rest == 3) tile<R, 3>(x + m * K, K, wr, K, part);
    for (int r = 0; r < R; r++) for (int j = 0; j < rest; j++) acc[r * M + m + j] = part[r * rest + j];
}

constexpr int MCHUNK = 64;  // activation rows per pass over a block of weight rows

// Weight rows [b R, b R + R) of y = x w^T for all M activation rows (x fp32, permuted): one unit
// of a linear()'s work.
template <int R, int MB, typename W>
static void block(const float* x, int64_t M, int64_t K, const W* w, int64_t N, void* y,
                  int out_bf16, int64_t b) {
    const int64_t n0 = b * R;
    float acc[R * MCHUNK];
    for (int64_t m0 = 0; m0 < M; m0 += MCHUNK) {
        const int64_t mc = M - m0 < MCHUNK ? M - m0 : MCHUNK;
        const float* xm = x + m0 * K;
        if (n0 + R <= N) {
            rows<R, MB>(xm, mc, K, w, n0, acc);
        } else {
            for (int64_t n = n0; n < N; n++) rows<1, MB>(xm, mc, K, w, n, acc + (n - n0) * mc);
        }
        for (int64_t n = n0; n < N && n < n0 + R; n++) {
            for (int64_t j = 0; j < mc; j++) {
                const float v = acc[(n - n0) * mc + j];
                const int64_t at = (m0 + j) * N + n;
                if (out_bf16) static_cast<uint16_t*>(y)[at] = to_bf(v);
                else static_cast<float*>(y)[at] = v;
            }
        }
    }
}

// The tile shape for M activation rows. 1-3 rows (bandwidth-bound): units of 4 weight rows,
// each prefetched 8 KB ahead, the FMA tiles taking the 4 against all activation rows at once;
// 4 weight rows' chains keep up with memory as well as one row's split into two chains did
// (bench: 7168 x 1024 and 1024 x 3584 bf16 from DRAM, one thread, AVX-512 and AVX2 builds
// alike), without tying the order to the tile. (The vdpbf16ps tiles take one activation row's
// weight rows one by one: dot_block_for.) More rows (compute-bound): tiles of 3 weight rows x 4
// activation rows.
static inline int64_t rows_per_block(int64_t M) { return M >= 4 ? 3 : 4; }

template <typename W>
static void block_for(const float* x, int64_t M, int64_t K, const W* w, int64_t N, void* y,
                      int out_bf16, int64_t b) {
    if (M == 1) block<4, 1>(x, M, K, w, N, y, out_bf16, b);
    else if (M == 2) block<4, 2>(x, M, K, w, N, y, out_bf16, b);
    else if (M == 3) block<4, 3>(x, M, K, w, N, y, out_bf16, b);
    else block<3, 4>(x, M, K, w, N, y, out_bf16, b);
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

#if defined(__AVX512BF16__)
// bf16 activations on a CPU with AVX512-BF16: vdpbf16ps multiplies 32 bf16 pairs and adds them to
// 16 fp32 lanes in one instruction, twice split()'s fp32 FMAs per instruction and no widening, so
// prefill's many-row tiles reach ~2x the FMA kernel's multiply-adds (bench/linear.py). Lane l of a
// chunk sums its values 2l and 2l + 1, as split()'s lanes do; the order of every dot product is
// again one chain over the chunks, then hsum, then the tail in order, whatever the tile.
constexpr bool DOT_BF16 = true;
template <int R, int MB>
static inline void dot_tile(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K, float* out) {
    __m512 acc[R][MB];
    for (int r = 0; r < R; r++) for (int m = 0; m < MB; m++) acc[r][m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512bh wv[R];
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char*)(w + r * K + k) + PREFETCH, PREFETCH_HINT);
            wv[r] = (__m512bh)_mm512_loadu_si512(w + r * K + k);
        }
        for (int m = 0; m < MB; m++) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * ldx + k);
            for (int r = 0; r < R; r++) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv[r], xv);
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MB; m++) {
            float s = _mm512_reduce_add_ps(acc[r][m]);
            for (int64_t j = k; j < K; j++) s += bf(w[r * K + j]) * bf(x[m * ldx + j]);
            out[r * MB + m] = s;
        }
}

// As rows() for bf16 activations: tiles of MB = 8 activation rows (R x 8 accumulators, R + 1
// loads: 28 of the 32 registers at R = 3), the last < 8 rows in one tile.
template <int R>
static void dot_rows(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t n0, float* acc) {
    constexpr int MB = R == 3 ? 8 : 4;
    const uint16_t* wr = w + n0 * K;
    float part[R * 8];
    for (int64_t m = 0; m < M;) {
        const int mb = int(std::min<int64_t>(MB, M - m));
        switch (mb) {
            case 1: dot_tile<R, 1>(x + m * K, K, wr, K, part); break;
            case 2: dot_tile<R, 2>(x + m * K, K, wr, K, part); break;
            case 3: dot_tile<R, 3>(x + m * K, K, wr, K, part); break;
            case 4: dot_tile<R, 4>(x + m * K, K, wr, K, part); break;
            case 5: dot_tile<R, 5>(x + m * K, K, wr, K, part); break;
            case 6: dot_tile<R, 6>(x + m * K, K, wr, K, part); break;
            case 7: dot_tile<R, 7>(x + m * K, K, wr, K, part); break;
            default: dot_tile<R, 8>(x + m * K, K, wr, K, part); break;
        }
        for (int r = 0; r < R; r++) for (int j = 0; j < mb; j++) acc[r * M + m + j] = part[r * mb + j];
        m += mb;
    }
}

// Weight rows [b R, b R + R): in one tile, or (ROWWISE) one after another.
template <int R, bool ROWWISE = false>
static void dot_block(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, void* y,
                      int out_bf16, int64_t b) {
    const int64_t n0 = b * R;
    float acc[R * MCHUNK];
    for (int64_t m0 = 0; m0 < M; m0 += MCHUNK) {
        const int64_t mc = std::min<int64_t>(MCHUNK, M - m0);
        const uint16_t* xm = x + m0 * K;
        if (!ROWWISE && n0 + R <= N) dot_rows<R>(xm, mc, K, w, n0, acc);
        else for (int64_t n = n0; n < N && n < n0 + R; n++) dot_rows<1>(xm, mc, K, w, n, acc + (n - n0) * mc);
        for (int64_t n = n0; n < N && n < n0 + R; n++)
            for (int64_t j = 0; j < mc; j++) {
                const float v = acc[(n - n0) * mc + j];
                const int64_t at = (m0 + j) * N + n;
                if (out_bf16) static_cast<uint16_t*>(y)[at] = to_bf(v);
                else static_cast<float*>(y)[at] = v;
            }
    }
}

// One activation row: the weight rows one after another, so each thread reads one stream. Four
// rows side by side (four streams 2-7 KB apart) read up to 16% slower on a Zen 4 VM, and batch-1
// decode of mixtral-mini was 8-26% slower in four A/B runs within one process (session 13). With
// 2-3 activation rows the shared activation loads win: batch-8 decode 158 against 146 t/s.
static void dot_block_for(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, void* y,
                          int out_bf16, int64_t b) {
    if (M == 1) dot_block<4, true>(x, M, K, w, N, y, out_bf16, b);
    else if (rows_per_block(M) == 4) dot_block<4>(x, M, K, w, N, y, out_bf16, b);
    else dot_block<3>(x, M, K, w, N, y, out_bf16, b);
}
#else
constexpr bool DOT_BF16 = false;
static void dot_block_for(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, void*, int, int64_t) {}
#endif

// The interface of cpu_kernels.h: BF16 here, INT8 and INT4 in cpu_quant.cpp. bf16 activations
// go to the vdpbf16ps tiles where the CPU has them (kept as they are, in out.h); fp32 ones (and
// every activation elsewhere) to the FMA tiles, widened and permuted (out.f).
void prepare(const void* x, int x_bf16, int64_t M, int64_t K, const Matrix& w, Prepared& out) {
    if (w.precision != BF16) return prepare_quant(x, x_bf16, M, K, w, out);
    out.precision = w.precision;
    out.M = M;
    out.K = K;
    if (DOT_BF16 && x_bf16) {
        const uint16_t* xs = static_cast<const uint16_t*>(x);
        out.h.assign(xs, xs + M * K);
        out.f.clear();
        return;
    }
    out.h.clear();
    out.f.resize(M * K);
    permute_rows<uint16_t>(x, x_bf16, M, K, out.f.data());
}

int64_t unit_rows(const Matrix& w, int64_t M) { return w.precision == BF16 ? rows_per_block(M) : quant_unit_rows(M); }

int64_t units_per_chunk(const Matrix& w, int64_t M, int64_t K) {
    return w.precision == BF16 ? blocks_per_chunk<uint16_t>(M, K) : quant_units_per_chunk(w, M, K);
}

void compute_unit(const Prepared& x, const Matrix& w, int64_t N, void* y, int out_bf16, int64_t u) {
    const uint16_t* wb = static_cast<const uint16_t*>(w.data);
    if (w.precision != BF16) quant_unit(x, w, N, y, out_bf16, u);
    else if (!x.h.empty()) dot_block_for(x.h.data(), x.M, x.K, wb, N, y, out_bf16, u);
    else block_for(x.f.data(), x.M, x.K, wb, N, y, out_bf16, u);
}

extern "C" {
const char* bf16_dot_isa(void) { return DOT_BF16 ? "avx512-bf16" : "fma"; }

// Small weights run on the calling thread: waking torch's OpenMP workers costs more than they save.
void linear_matrix(const void* x, int x_bf16, int64_t M, int64_t K, const Matrix* w, int64_t N, void* y,
                   int out_bf16, int threads) {
    Prepared xp;
    prepare(x, x_bf16, M, K, *w, xp);
    if (M * N * K < SERIAL_BELOW) threads = 1;
    const int64_t R = unit_rows(*w, M), units = (N + R - 1) / R;
#pragma omp parallel for schedule(dynamic, units_per_chunk(*w, M, K)) num_threads(threads)
    for (int64_t u = 0; u < units; u++) compute_unit(xp, *w, N, y, out_bf16, u);
}
// x [M, K] contiguous, fp32 or (x_bf16) bf16; w [N, K] contiguous; y [M, N] fp32 or bf16.
void linear_bf16(const void* x, int x_bf16, int64_t M, int64_t K, const uint16_t* w, int64_t N, void* y,
                 int out_bf16, int threads) {
    const Matrix m{BF16, w, nullptr, 0};
    linear_matrix(x, x_bf16, M, K, &m, N, y, out_bf16, threads);
}
}
