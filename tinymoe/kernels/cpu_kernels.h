// The native library's C entry points (cpu_linear.cpp, cpu_ops.cpp), declared once so that
// cpu_decode.cpp can chain them and the compiler checks each definition against its use.
#pragma once
#include <cstdint>

extern "C" {
void linear_bf16(const void* x, int x_bf16, int64_t M, int64_t K, const uint16_t* w, int64_t N, void* y,
                 int out_bf16, int threads);
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
}
