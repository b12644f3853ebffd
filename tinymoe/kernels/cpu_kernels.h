// The native library's ABI in one place: every C entry point (defined in cpu_linear.cpp,
// cpu_ops.cpp, cpu_decode.cpp) and the structs and enums of the one-call decode step.
// native.py generates the ctypes bindings from the extern "C" block below at load, so a
// prototype there may use only int, int64_t, float, void (as a result) and pointers. Each source
// includes this header, so the compiler checks every definition against its prototype, and the
// build's -Werror=missing-declarations refuses an entry point (or any non-static function) that
// is not declared here. The structs' layout and the enums' values are exported by
// decode_step_abi and checked at load against native.py's ctypes mirror.
#pragma once
#include <cstdint>

// One decoder layer's weights and cache. A MoE layer routes here (ROUTE_TOPK: the family's gate
// `gate` [E, D], with its top-k) or in Python (ROUTE_CALLBACK: DecodeModel::route picks the
// copies), and has its expert copies' pointers; a dense layer has neither. `mlp_*` is the dense
// MLP of a dense layer or the shared experts of a MoE layer (null: none).
enum Routing : int64_t { DENSE = 0, ROUTE_TOPK = 1, ROUTE_CALLBACK = 2 };
struct DecodeLayer {
    const uint16_t* attn_norm;   // [D]
    const uint16_t* qkv;         // [(H + 2 KV) hd, D]: q rows, then k, then v
    const uint16_t* q_norm;      // [hd] per-head RMSNorm of q before RoPE (Qwen3), or null
    const uint16_t* k_norm;      // [hd], with q_norm
    const uint16_t* o;           // [D, H hd]
    const uint16_t* mlp_norm;    // [D]
    uint16_t* k_cache;           // [blocks, block_size, KV, hd]
    uint16_t* v_cache;
    int64_t routing;             // Routing
    const uint16_t* gate;        // [E, D] (ROUTE_TOPK)
    const uint16_t* const* w13;  // per expert copy, [2I, D] (gate rows, then up rows)
    const uint16_t* const* w2;   // per expert copy, [D, I]
    int64_t copies;
    const uint16_t* mlp_gate;    // [Im, D] or null
    const uint16_t* mlp_up;      // [Im, D]
    const uint16_t* mlp_down;    // [D, Im]
    int64_t mlp_I;
};

// A ROUTE_CALLBACK layer's routing: the step copies the layer's normalised hidden states [N, D]
// to RouteBuffers::hidden, calls route(layer), which writes the chosen copies [N, k] and their
// weights (bf16 values) to ids and weights; nonzero: it failed (the step stops).
typedef int (*RouteFn)(int64_t layer);
struct RouteBuffers {
    uint16_t* hidden;
    int64_t* ids;
    float* weights;
};

struct DecodeModel {
    int64_t num_layers, D, H, KV, hd, E, top_k, I, renormalize, block_size;
    float eps, scale;
    const DecodeLayer* layers;
    const uint16_t* final_norm;  // [D]
    RouteFn route;               // for ROUTE_CALLBACK layers
};

// What decode_step_bf16 returns.
enum Status : int { OK = 0, ROUTE_FAILED = 1, COPY_OUT_OF_RANGE = 2 };

extern "C" {
// x [M, K] contiguous, fp32 or (x_bf16) bf16; w [N, K] contiguous; y [M, N] fp32 or bf16.
void linear_bf16(const void* x, int x_bf16, int64_t M, int64_t K, const uint16_t* w, int64_t N, void* y,
                 int out_bf16, int threads);
// As linear_bf16 with int8 weights times their bf16 per-row scale [N].
void linear_int8(const void* x, int x_bf16, int64_t M, int64_t K, const int8_t* w, const uint16_t* scale,
                 int64_t N, void* y, int out_bf16, int threads);
// x bf16 [T, D]; ids int64 [T, k] in [0, C); weights fp32 [T, k] (bf16 values); w13, w2: C
// pointers; out bf16 [T, D].
void moe_tokens_bf16(const uint16_t* x, int64_t T, int64_t D, int64_t I, int64_t k, const int64_t* ids,
                     const float* weights, int64_t C, const uint16_t* const* w13, const uint16_t* const* w2,
                     uint16_t* out, int threads);
void rms_norm_bf16(const uint16_t* x, const uint16_t* residual, const uint16_t* w, uint16_t* y,
                   uint16_t* res_out, int64_t rows, int64_t D, float eps);
void rotary_bf16(const uint16_t* x, int64_t stride, uint16_t* out, int64_t rows, int64_t heads, int64_t hd,
                 const float* cos, const float* sin, int64_t T);
void swiglu_bf16(const uint16_t* h, uint16_t* out, int64_t rows, int64_t I);
void store_kv_bf16(const uint16_t* k, int64_t k_stride, const uint16_t* v, int64_t v_stride, uint16_t* k_cache,
                   uint16_t* v_cache, const int64_t* slots, int64_t N, int64_t row);
void paged_decode_bf16(const uint16_t* q, int64_t q_stride, const uint16_t* k_cache, const uint16_t* v_cache,
                       const int32_t* block_tables, int64_t table_width, const int32_t* context_lens, int64_t B,
                       int64_t H, int64_t KV, int64_t hd, int64_t block_size, float scale, uint16_t* out,
                       int threads);
// A whole decode step (cpu_decode.cpp); returns a Status.
int decode_step_bf16(const DecodeModel* model, uint16_t* x, int64_t N, const float* cos, const float* sin,
                     const int64_t* slots, const int32_t* tables, int64_t W, const int32_t* lens, uint16_t* out,
                     const RouteBuffers* buffers, int threads);
// The layout of the structs and the values of the enums above, as the compiler sees them: entry
// i is names[i] ("DecodeLayer", "DecodeLayer.qkv", "Routing.DENSE", ...) with values[2i],
// values[2i + 1] = 0 and the struct's size, a field's offset and size, or an enum's value and 0.
// Fills the first n entries; returns how many there are.
int64_t decode_step_abi(const char** names, int64_t* values, int64_t n);
}
