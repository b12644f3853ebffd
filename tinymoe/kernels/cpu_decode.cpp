// A whole decode step of a MoE transformer in one call (bf16 activations; every matrix but the
// gate in any Precision): the embedding rows, every layer's norms, fused q/k/v (with per-head
// q/k norms if the family has them), rotary, K/V store, paged attention, o projection, routing
// (the family's top-k here, or any router through a callback into Python) and experts, then the
// final norm and the LM head. It chains the library's own ops (cpu_kernels.h) in the order and
// with the roundings of `Transformer.hidden_states` and `logits`, so it computes what the per-op
// path computes; what it removes is the ~15 Python and torch calls per layer around them, ~10 ms
// of a ~37 ms batch-1 step that reads ~460 MB of weights (docs/DESIGN.md, "One-call decode").
// models/native_decode.py decides which models and batches take it; its structs and enums are
// declared in cpu_kernels.h.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"
#include "cpu_simd.h"

// The family's gate on one token, as GateRule computes it: fp32 softmax of the bf16 logits,
// the top k (the lower expert on a tie), their probabilities (renormalised if the family does),
// rounded to bf16 as `Experts` receives them. Returns the ids in selection order.
static void route_topk(const uint16_t* logits, int64_t E, int64_t k, bool renormalize, int64_t* ids, float* w) {
    std::vector<float> p(E);
    float m = bf(logits[0]), sum = 0.f;
    for (int64_t e = 1; e < E; e++) m = std::max(m, bf(logits[e]));
    for (int64_t e = 0; e < E; e++) sum += p[e] = std::exp(bf(logits[e]) - m);
    for (int64_t e = 0; e < E; e++) p[e] /= sum;
    float chosen = 0.f;
    for (int64_t j = 0; j < k; j++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++) {
            bool taken = false;
            for (int64_t i = 0; i < j; i++) taken |= ids[i] == e;
            if (!taken && (best < 0 || p[e] > p[best])) best = e;
        }
        ids[j] = best;
        chosen += w[j] = p[best];
    }
    for (int64_t j = 0; j < k; j++) w[j] = round_bf(renormalize ? w[j] / chosen : w[j]);
}

// y = down . swiglu(gate . x, up . x) for N rows, rounded as DenseMLP's torch ops round.
static void dense_mlp(const DecodeLayer& L, const uint16_t* x, int64_t N, int64_t D, uint16_t* y, int threads) {
    const int64_t I = L.mlp_I;
    std::vector<uint16_t> g(N * I), u(N * I), act(N * I);
    linear_matrix(x, 1, N, D, &L.mlp_gate, I, g.data(), 1, threads);
    linear_matrix(x, 1, N, D, &L.mlp_up, I, u.data(), 1, threads);
    for (int64_t n = 0; n < N; n++) swiglu_row(&g[n * I], &u[n * I], &act[n * I], I);
    linear_matrix(act.data(), 1, N, I, &L.mlp_down, D, y, 1, threads);
}

// The routed experts (+ shared experts) of N tokens h [N, D] of layer l into y [N, D].
static Status moe(const DecodeModel& M, int64_t l, const uint16_t* h, int64_t N, const RouteBuffers& buffers,
                  uint16_t* y, int threads) {
    const DecodeLayer& L = M.layers[l];
    const int64_t D = M.D, E = M.E, k = M.top_k;
    std::vector<int64_t> ids(N * k);
    std::vector<float> w(N * k);
    if (L.routing == ROUTE_TOPK) {
        std::vector<uint16_t> logits(N * E);
        linear_bf16(h, 1, N, D, L.gate, E, logits.data(), 1, threads);
        for (int64_t n = 0; n < N; n++) route_topk(&logits[n * E], E, k, M.renormalize, &ids[n * k], &w[n * k]);
    } else {
        std::memcpy(buffers.hidden, h, N * D * 2);
        if (M.route(l) != 0) return ROUTE_FAILED;
        std::memcpy(ids.data(), buffers.ids, N * k * 8);
        std::memcpy(w.data(), buffers.weights, N * k * 4);
        for (const int64_t c : ids)
            if (c < 0 || c >= L.copies) return COPY_OUT_OF_RANGE;  // the matrices below are indexed unchecked
    }
    moe_tokens(h, N, D, M.I, k, ids.data(), w.data(), L.copies, L.w13, L.w2, y, threads);
    if (L.mlp_gate.data) {
        std::vector<uint16_t> shared(N * D);
        dense_mlp(L, h, N, D, shared.data(), threads);
        for (int64_t i = 0; i < N * D; i++) y[i] = to_bf(bf(y[i]) + bf(shared[i]));
    }
    return OK;
}

extern "C" {
// N tokens, one per sequence, each at the end of its sequence: ids [N] (TOKEN_OUT_OF_RANGE unless
// in [0, V)), cos/sin [N, hd / 2] fp32 at their positions, slots [N] the flat cache slots their
// K/V go to, tables [N, W] and lens [N] (each sequence's length including the new token) for
// attention. out [N, D]: the final norm's output; logits [N, V] (bf16, as the per-op LM head
// rounds them): the head's, when the model has one and logits is not null. `buffers` serve
// ROUTE_CALLBACK layers (N rows).
int decode_step_bf16(const DecodeModel* model, const int64_t* ids, int64_t N, const float* cos, const float* sin,
                     const int64_t* slots, const int32_t* tables, int64_t W, const int32_t* lens, uint16_t* out,
                     uint16_t* logits, const RouteBuffers* buffers, int threads) {
    const DecodeModel& M = *model;
    const int64_t D = M.D, H = M.H, KV = M.KV, hd = M.hd, qkv_width = (H + 2 * KV) * hd, qk_width = (H + KV) * hd;
    std::vector<uint16_t> x_(N * D), h(N * D), residual(N * D), qkv(N * qkv_width), qk(N * qk_width),
        attn(N * H * hd);
    uint16_t* x = x_.data();
    for (int64_t n = 0; n < N; n++) {
        if (ids[n] < 0 || ids[n] >= M.V) return TOKEN_OUT_OF_RANGE;
        std::memcpy(x + n * D, M.embed + ids[n] * D, D * 2);
    }
    for (int64_t l = 0; l < M.num_layers; l++) {
        const DecodeLayer& L = M.layers[l];
        if (l == 0) {  // the embeddings are the first residual
            std::memcpy(residual.data(), x, N * D * 2);
            rms_norm_bf16(x, nullptr, L.attn_norm, h.data(), nullptr, N, D, M.eps);
        } else {
            rms_norm_bf16(x, residual.data(), L.attn_norm, h.data(), residual.data(), N, D, M.eps);
        }
        linear_matrix(h.data(), 1, N, D, &L.qkv, qkv_width, qkv.data(), 1, threads);
        if (L.q_norm) {  // each head normalised, then rotated in place: as the per-op path
            for (int64_t n = 0; n < N; n++) {
                rms_norm_bf16(&qkv[n * qkv_width], nullptr, L.q_norm, &qk[n * qk_width], nullptr, H, hd, M.eps);
                rms_norm_bf16(&qkv[n * qkv_width + H * hd], nullptr, L.k_norm, &qk[n * qk_width + H * hd], nullptr,
                              KV, hd, M.eps);
            }
            rotary_bf16(qk.data(), qk_width, qk.data(), N, H + KV, hd, cos, sin, N);
        } else {
            rotary_bf16(qkv.data(), qkv_width, qk.data(), N, H + KV, hd, cos, sin, N);
        }
        store_kv_bf16(qk.data() + H * hd, qk_width, qkv.data() + qk_width, qkv_width, L.k_cache, L.v_cache, slots,
                      N, KV * hd);
        paged_decode_bf16(qk.data(), qk_width, L.k_cache, L.v_cache, tables, W, lens, N, H, KV, hd, M.block_size,
                          M.scale, attn.data(), threads);
        linear_matrix(attn.data(), 1, N, H * hd, &L.o, D, x, 1, threads);
        rms_norm_bf16(x, residual.data(), L.mlp_norm, h.data(), residual.data(), N, D, M.eps);
        if (L.routing == DENSE) {
            dense_mlp(L, h.data(), N, D, x, threads);
        } else {
            const Status status = moe(M, l, h.data(), N, *buffers, x, threads);
            if (status != OK) return status;
        }
    }
    rms_norm_bf16(x, residual.data(), M.final_norm, out, residual.data(), N, D, M.eps);
    if (logits && M.head.data) linear_matrix(out, 1, N, D, &M.head, M.V, logits, 1, threads);
    return OK;
}
}

// What decode_step_abi reports (cpu_kernels.h): each struct's size, then its fields in order.
struct AbiEntry {
    const char* name;
    int64_t a, b;
};
#define ABI_STRUCT(S) {#S, 0, sizeof(S)}
#define ABI_FIELD(S, f) {#S "." #f, offsetof(S, f), sizeof(S::f)}
#define ABI_ENUM(E, v) {#E "." #v, v, 0}
static const AbiEntry ABI[] = {
    ABI_STRUCT(Matrix),
    ABI_FIELD(Matrix, precision), ABI_FIELD(Matrix, data), ABI_FIELD(Matrix, scales), ABI_FIELD(Matrix, group),
    ABI_STRUCT(DecodeLayer),
    ABI_FIELD(DecodeLayer, attn_norm), ABI_FIELD(DecodeLayer, qkv), ABI_FIELD(DecodeLayer, q_norm),
    ABI_FIELD(DecodeLayer, k_norm), ABI_FIELD(DecodeLayer, o), ABI_FIELD(DecodeLayer, mlp_norm),
    ABI_FIELD(DecodeLayer, k_cache), ABI_FIELD(DecodeLayer, v_cache), ABI_FIELD(DecodeLayer, routing),
    ABI_FIELD(DecodeLayer, gate), ABI_FIELD(DecodeLayer, w13), ABI_FIELD(DecodeLayer, w2),
    ABI_FIELD(DecodeLayer, copies), ABI_FIELD(DecodeLayer, mlp_gate), ABI_FIELD(DecodeLayer, mlp_up),
    ABI_FIELD(DecodeLayer, mlp_down), ABI_FIELD(DecodeLayer, mlp_I),
    ABI_STRUCT(DecodeModel),
    ABI_FIELD(DecodeModel, num_layers), ABI_FIELD(DecodeModel, D), ABI_FIELD(DecodeModel, H),
    ABI_FIELD(DecodeModel, KV), ABI_FIELD(DecodeModel, hd), ABI_FIELD(DecodeModel, E),
    ABI_FIELD(DecodeModel, top_k), ABI_FIELD(DecodeModel, I), ABI_FIELD(DecodeModel, renormalize),
    ABI_FIELD(DecodeModel, block_size), ABI_FIELD(DecodeModel, eps), ABI_FIELD(DecodeModel, scale),
    ABI_FIELD(DecodeModel, layers), ABI_FIELD(DecodeModel, embed), ABI_FIELD(DecodeModel, final_norm),
    ABI_FIELD(DecodeModel, route), ABI_FIELD(DecodeModel, head), ABI_FIELD(DecodeModel, V),
    ABI_STRUCT(RouteBuffers),
    ABI_FIELD(RouteBuffers, hidden), ABI_FIELD(RouteBuffers, ids), ABI_FIELD(RouteBuffers, weights),
    ABI_ENUM(Precision, BF16), ABI_ENUM(Precision, INT8), ABI_ENUM(Precision, INT4),
    ABI_ENUM(Routing, DENSE), ABI_ENUM(Routing, ROUTE_TOPK), ABI_ENUM(Routing, ROUTE_CALLBACK),
    ABI_ENUM(Status, OK), ABI_ENUM(Status, ROUTE_FAILED), ABI_ENUM(Status, COPY_OUT_OF_RANGE),
    ABI_ENUM(Status, TOKEN_OUT_OF_RANGE),
};

extern "C" int64_t decode_step_abi(const char** names, int64_t* values, int64_t n) {
    const int64_t count = sizeof(ABI) / sizeof(ABI[0]);
    for (int64_t i = 0; i < std::min(n, count); i++) {
        names[i] = ABI[i].name;
        values[2 * i] = ABI[i].a;
        values[2 * i + 1] = ABI[i].b;
    }
    return count;
}
