// The SwiGLU experts of a MoE layer (moe_tokens): each copy's gate/up and down matrices in any
// Precision (a Matrix each: bf16, int8, int4, mixed as a plan places them), scheduling the units
// of matmul work of cpu_kernels.h (prepare, compute_unit) that cpu_linear.cpp and cpu_quant.cpp
// define, so every unit computes what linear_matrix computes for it.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"
#include "cpu_simd.h"

// x prepared for each of n matrices, once per format: what prepare() makes depends on the
// precision (and an INT4 group), not on the matrix itself.
struct PreparedFor {
    std::vector<Prepared> kinds;
    std::vector<int64_t> group, of;  // per kind its group; per matrix its kind
    PreparedFor(const uint16_t* x, int64_t M, int64_t K, const Matrix* const* w, int64_t n) : of(n, -1) {
        for (int64_t i = 0; i < n; i++) {
            for (size_t j = 0; j < kinds.size() && of[i] < 0; j++)
                if (kinds[j].precision == w[i]->precision && (w[i]->precision != INT4 || group[j] == w[i]->group))
                    of[i] = j;
            if (of[i] < 0) {
                of[i] = kinds.size();
                kinds.emplace_back();
                group.push_back(w[i]->group);
                prepare(x, 1, M, K, *w[i], kinds.back());
            }
        }
    }
    const Prepared& operator[](int64_t i) const { return kinds[of[i]]; }
};

// Work items of ~256 KB of one matrix's rows each: units [u0, u1) of matrix `a`.
struct Item { int64_t a, u0, u1; };
static void add_items(std::vector<Item>& items, int64_t a, const Matrix& w, int64_t M, int64_t N, int64_t K) {
    const int64_t R = unit_rows(w, M), units = (N + R - 1) / R, chunk = units_per_chunk(w, M, K);
    for (int64_t u = 0; u < units; u += chunk) items.push_back({a, u, std::min(units, u + chunk)});
}

// One token through k SwiGLU experts: out = sum over e, in order, of
// round(round(w2_e . swiglu(round(w13_e . x))) * weights[e]), rounded after each add: what
// `Experts` computes with one matmul per expert, in one parallel region instead of 2k calls.
// w13[e] is [2I, D] (gate rows, then up rows), w2[e] is [D, I]; weights are bf16 values.
static void moe_token(const uint16_t* x, int64_t D, int64_t I, int64_t k, const Matrix* const* w13,
                      const Matrix* const* w2, const float* weights, uint16_t* out, int threads) {
    const PreparedFor xp(x, 1, D, w13, k);
    std::vector<uint16_t> h(k * 2 * I), y(k * D);
    std::vector<Prepared> act(k);
    std::vector<Item> up, down;
    for (int64_t e = 0; e < k; e++) {
        add_items(up, e, *w13[e], 1, 2 * I, D);
        add_items(down, e, *w2[e], 1, D, I);
    }
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(dynamic)
        for (size_t i = 0; i < up.size(); i++)
            for (int64_t u = up[i].u0; u < up[i].u1; u++)
                compute_unit(xp[up[i].a], *w13[up[i].a], 2 * I, &h[up[i].a * 2 * I], 1, u);
#pragma omp for
        for (int64_t e = 0; e < k; e++) {
            std::vector<uint16_t> a(I);
            swiglu_row(&h[e * 2 * I], &h[e * 2 * I + I], a.data(), I);
            prepare(a.data(), 1, 1, I, *w2[e], act[e]);
        }
#pragma omp for schedule(dynamic)
        for (size_t i = 0; i < down.size(); i++)
            for (int64_t u = down[i].u0; u < down[i].u1; u++)
                compute_unit(act[down[i].a], *w2[down[i].a], D, &y[down[i].a * D], 1, u);
    }
    for (int64_t d = 0; d < D; d++) {
        float acc = 0.f;
        for (int64_t e = 0; e < k; e++) acc = round_bf(acc + round_bf(bf(y[e * D + d]) * weights[e]));
        out[d] = to_bf(acc);
    }
}

// The copies' SwiGLU MLPs over their gathered rows in one parallel region (three work-shared
// loops: gate/up units of every copy, SwiGLU, down units), each unit computed as linear_matrix
// computes it: for decode batches, where one region per matmul costs more than the matmuls'
// imbalance. xs[a]: active copy a's n[a] rows (bf16, [n, D]), its matrices w13[a] and w2[a];
// y[a] gets its [n, D] outputs (bf16).
static void copies_one_region(const std::vector<const uint16_t*>& xs, const std::vector<int64_t>& n, int64_t D,
                              int64_t I, const std::vector<const Matrix*>& w13, const std::vector<const Matrix*>& w2,
                              std::vector<std::vector<uint16_t>>& y, int threads) {
    const int64_t A = xs.size();
    std::vector<Prepared> xp(A), ap(A);
    std::vector<std::vector<uint16_t>> h(A);
    std::vector<Item> up, down;
    int64_t work = 0;
    for (int64_t a = 0; a < A; a++) {
        prepare(xs[a], 1, n[a], D, *w13[a], xp[a]);
        h[a].resize(n[a] * 2 * I);
        y[a].resize(n[a] * D);
        add_items(up, a, *w13[a], n[a], 2 * I, D);
        add_items(down, a, *w2[a], n[a], D, I);
        work += n[a] * 3 * I * D;
    }
    if (work < SERIAL_BELOW) threads = 1;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(dynamic)
        for (size_t i = 0; i < up.size(); i++)
            for (int64_t u = up[i].u0; u < up[i].u1; u++)
                compute_unit(xp[up[i].a], *w13[up[i].a], 2 * I, h[up[i].a].data(), 1, u);
#pragma omp for schedule(dynamic)
        for (int64_t a = 0; a < A; a++) {
            std::vector<uint16_t> act(n[a] * I);
            for (int64_t j = 0; j < n[a]; j++) swiglu_row(&h[a][j * 2 * I], &h[a][j * 2 * I + I], &act[j * I], I);
            prepare(act.data(), 1, n[a], I, *w2[a], ap[a]);
        }
#pragma omp for schedule(dynamic)
        for (size_t i = 0; i < down.size(); i++)
            for (int64_t u = down[i].u0; u < down[i].u1; u++)
                compute_unit(ap[down[i].a], *w2[down[i].a], D, y[down[i].a].data(), 1, u);
    }
}

constexpr int64_t ONE_REGION_TOKENS = 64;  // up to this many tokens (decode batches)

extern "C" {
// T tokens through their k experts each (ids [T, k] index the copies' matrices w13[c], w2[c]):
// per copy, its tokens' rows gathered in order, the two matmuls with SwiGLU between, each
// result times its weight; then each token's contributions added in (copy, slot) order,
// rounded after each add. The same arithmetic as `Experts`' per-copy path (index_add_ of the
// weighted rows), without its ~15 torch ops a copy. One token takes moe_token; decode batches
// run all copies in one parallel region; larger ones (prefill: compute-bound, and all copies'
// buffers at once would be large) one copy after another.
void moe_tokens(const uint16_t* x, int64_t T, int64_t D, int64_t I, int64_t k, const int64_t* ids,
                const float* weights, int64_t C, const Matrix* w13, const Matrix* w2, uint16_t* out, int threads) {
    if (T == 1) {  // its (copy, weight) pairs in ascending order: the order the per-copy path adds them
        std::vector<int64_t> order(k);
        for (int64_t j = 0; j < k; j++) order[j] = j;
        std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
            return ids[a] != ids[b] ? ids[a] < ids[b] : weights[a] < weights[b];
        });
        std::vector<const Matrix*> m13(k), m2(k);
        std::vector<float> w(k);
        for (int64_t j = 0; j < k; j++) {
            m13[j] = &w13[ids[order[j]]];
            m2[j] = &w2[ids[order[j]]];
            w[j] = weights[order[j]];
        }
        return moe_token(x, D, I, k, m13.data(), m2.data(), w.data(), out, threads);
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
        std::vector<const Matrix*> m13, m2;
        for (int64_t c = 0; c < C; c++)
            if (!rows[c].empty()) {
                xs.push_back(gathered[c].data());
                n.push_back(rows[c].size());
                copy.push_back(c);
                m13.push_back(&w13[c]);
                m2.push_back(&w2[c]);
            }
        std::vector<std::vector<uint16_t>> y(copy.size());
        copies_one_region(xs, n, D, I, m13, m2, y, threads);
        for (size_t a = 0; a < copy.size(); a++) weigh(copy[a], y[a].data());
    } else {
        for (int64_t c = 0; c < C; c++) {
            const int64_t n = rows[c].size();
            if (!n) continue;
            std::vector<uint16_t> h(n * 2 * I), act(n * I), y(n * D);
            linear_matrix(gathered[c].data(), 1, n, D, &w13[c], 2 * I, h.data(), 1, threads);
            for (int64_t j = 0; j < n; j++) swiglu_row(&h[j * 2 * I], &h[j * 2 * I + I], &act[j * I], I);
            linear_matrix(act.data(), 1, n, I, &w2[c], D, y.data(), 1, threads);
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
}
