// The native library's ABI in one place: every C entry point (defined in cpu_linear.cpp,
// cpu_quant.cpp, cpu_moe.cpp, cpu_ops.cpp, cpu_decode.cpp), the structs and enums of the
// one-call decode step, and (outside extern "C") the C++ matmul interface the sources share.
// native.py generates the ctypes bindings from the extern "C" block below at load, so a
// prototype there may use only int, int64_t, float, void (as a result) and pointers. Each source
// includes this header, so the compiler checks every definition against its prototype, and the
// build's -Werror=missing-declarations refuses an entry point (or any non-static function) that
// is not declared here. The structs' layout and the enums' values are exported by
// decode_step_abi and checked at load against native.py's ctypes mirror.
#pragma once
#include <cstdint>
#include <vector>

// One weight matrix [N, K] for every native consumer, in a format of kernels/quant.py. BF16: data
// bf16 [N, K], no scales. INT8: data int8 [N, K], scales bf16 [N] (w = q * scale). INT4: data
// uint8 [N, KP / 2] (KP = K rounded up to `group`; input 2j in the low nibble of byte j), scales
// bf16 [N, KP / group, 2] = (scale, zero) (w = (q - 8) * scale + zero).
enum Precision : int64_t { BF16 = 0, INT8 = 1, INT4 = 2 };
struct Matrix {
    int64_t precision;  // Precision
    const void* data;
    const uint16_t* scales;
    int64_t group;      // INT4's group (32, 64 or 128); 0 otherwise
};

// The matmul y [M, N] = x [M, K] . w^T as units of work that a consumer schedules itself
// (linear_matrix, the experts, the decode step): prepare() makes the activations ready once for
// w's precision (BF16: fp32, permuted to the kernel's lanes; INT8/INT4: int8 per block of 32
// inputs with fp32 scales and, for INT4, the blocks' sums), then compute_unit(u) writes weight
// rows [u R, u R + R) of y for all M rows, R = unit_rows(w, M). A row's result depends only on
// that row of x, never on M.
struct Prepared {
    int64_t precision, M, K;
    std::vector<float> f;     // BF16: the fp32 activations; INT4: the block scales, one a block
    std::vector<uint16_t> h;  // BF16 with bf16 activations on an AVX512-BF16 CPU: x as given
    std::vector<int8_t> q;
    std::vector<float> scale, sum;
};
void prepare(const void* x, int x_bf16, int64_t M, int64_t K, const Matrix& w, Prepared& out);
int64_t unit_rows(const Matrix& w, int64_t M);                   // weight rows per unit of work
int64_t units_per_chunk(const Matrix& w, int64_t M, int64_t K);  // ~256 KB of weights per scheduling chunk
void compute_unit(const Prepared& x, const Matrix& w, int64_t N, void* y, int out_bf16, int64_t u);
constexpr int64_t SERIAL_BELOW = 1 << 20;  // multiply-adds: less runs on the calling thread
// cpu_quant.cpp's side of the four above, for INT8 and INT4 matrices.
void prepare_quant(const void* x, int x_bf16, int64_t M, int64_t K, const Matrix& w, Prepared& out);
int64_t quant_unit_rows(int64_t M);
int64_t quant_units_per_chunk(const Matrix& w, int64_t M, int64_t K);
void quant_unit(const Prepared& x, const Matrix& w, int64_t N, void* y, int out_bf16, int64_t u);

// One decoder layer's weights and cache. A MoE layer routes here (ROUTE_TOPK: the family's gate
// `gate` [E, D], with its top-k) or in Python (ROUTE_CALLBACK: DecodeModel::route picks the
// copies), and has its expert copies' matrices; a dense layer has neither. `mlp_*` is the dense
// MLP of a dense layer or the shared experts of a MoE layer (mlp_gate.data null: none). Every
// Matrix may be of any Precision; the gate stays bf16.
enum Routing : int64_t { DENSE = 0, ROUTE_TOPK = 1, ROUTE_CALLBACK = 2 };
struct DecodeLayer {
    const uint16_t* attn_norm;   // [D]
    Matrix qkv;                  // [(H + 2 KV) hd, D]: q rows, then k, then v
    const uint16_t* q_norm;      // [hd] per-head RMSNorm of q before RoPE (Qwen3), or null
    const uint16_t* k_norm;      // [hd], with q_norm
    Matrix o;                    // [D, H hd]
    const uint16_t* mlp_norm;    // [D]
    uint16_t* k_cache;           // [blocks, block_size, KV, hd]
    uint16_t* v_cache;
    int64_t routing;             // Routing
    const uint16_t* gate;        // [E, D] bf16 (ROUTE_TOPK)
    const Matrix* w13;           // per expert copy, [2I, D] (gate rows, then up rows)
    const Matrix* w2;            // per expert copy, [D, I]
    int64_t copies;
    Matrix mlp_gate;             // [Im, D]
    Matrix mlp_up;               // [Im, D]
    Matrix mlp_down;             // [D, Im]
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
    const uint16_t* embed;       // the token embeddings [V, D]
    const uint16_t* final_norm;  // [D]
    RouteFn route;               // for ROUTE_CALLBACK layers
    Matrix head;                 // the LM head [V, D], any Precision (data null: no logits)
    int64_t V;                   // the vocabulary
};

// What decode_step_bf16 returns.
enum Status : int { OK = 0, ROUTE_FAILED = 1, COPY_OUT_OF_RANGE = 2, TOKEN_OUT_OF_RANGE = 3 };

extern "C" {
// x [M, K] contiguous, fp32 or (x_bf16) bf16; w [N, K] contiguous; y [M, N] fp32 or bf16.
void linear_bf16(const void* x, int x_bf16, int64_t M, int64_t K, const uint16_t* w, int64_t N, void* y,
                 int out_bf16, int threads);
// As linear_bf16 with w in any Precision (a Matrix above); BF16 is bit-identical to linear_bf16.
void linear_matrix(const void* x, int x_bf16, int64_t M, int64_t K, const Matrix* w, int64_t N, void* y,
                   int out_bf16, int threads);
// Which integer dot products the INT8/INT4 kernels were built with: "avx512-vnni", "avx-vnni" or
// "avx2" (Settings.native_isa "avx2" forces the last).
const char* quant_isa(void);
// Which products the BF16 kernels take for bf16 activations: "avx512-bf16" (vdpbf16ps) or "fma"
// (widened to fp32; fp32 activations always take it). Settings.native_isa "avx512" or "avx2" forces "fma".
const char* bf16_dot_isa(void);
// out bf16 [N, K] = an INT8/INT4 w dequantised as kernels/quant.py's dequantize(w, torch.bfloat16).
void dequantize_matrix(const Matrix* w, int64_t N, int64_t K, uint16_t* out, int threads);
// The SwiGLU experts of a MoE layer (cpu_moe.cpp): x bf16 [T, D]; ids int64 [T, k] in [0, C);
// weights fp32 [T, k] (bf16 values); w13 [C] and w2 [C]: each copy's gate/up [2I, D] and down
// [D, I] matrices, any Precision; out bf16 [T, D].
void moe_tokens(const uint16_t* x, int64_t T, int64_t D, int64_t I, int64_t k, const int64_t* ids,
                const float* weights, int64_t C, const Matrix* w13, const Matrix* w2, uint16_t* out, int threads);
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
int decode_step_bf16(const DecodeModel* model, const int64_t* ids, int64_t N, const float* cos, const float* sin,
                     const int64_t* slots, const int32_t* tables, int64_t W, const int32_t* lens, uint16_t* out,
                     uint16_t* logits, const RouteBuffers* buffers, int threads);
// Shared-memory all-gather steps (cpu_shm.cpp, experts/exchange.py): copy `bytes` from src to dst,
// then store `value` to *counter (release); wait until counters[i * stride] >= value for every
// i < n (acquire): 1, or 0 after timeout_us microseconds.
void shm_publish(void* dst, const void* src, int64_t bytes, int64_t* counter, int64_t value);
int shm_wait(const int64_t* counters, int64_t n, int64_t stride, int64_t value, int64_t timeout_us);
// The layout of the structs and the values of the enums above, as the compiler sees them: entry
// i is names[i] ("DecodeLayer", "DecodeLayer.qkv", "Routing.DENSE", ...) with values[2i],
// values[2i + 1] = 0 and the struct's size, a field's offset and size, or an enum's value and 0.
// Fills the first n entries; returns how many there are.
int64_t decode_step_abi(const char** names, int64_t* values, int64_t n);
}
