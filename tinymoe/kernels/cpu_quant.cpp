// INT8 and INT4 matrices (cpu_kernels.h's Matrix, kernels/quant.py's formats) times activations
// quantised on the fly: each row of x, per block of 32 inputs, to int8 with an fp32 scale
// d = max|x| / 127 (q = x / d rounded to nearest even), so a row's codes depend on that row
// alone. Products are integer dot products of 4 byte pairs per 32-bit lane (AVX512-VNNI or
// AVX-VNNI vpdpbusd; on AVX2 maddubs + madd), converted to fp32 and multiplied by the block's
// d once per block; INT8's channel scale multiplies the row's sum, INT4's per-group scale the
// block's, and INT4's zero term is the group's activation sum (the blocks' d * sum(q)) times
// zero - 8 scale, added once per row. So y = x_q . w exactly up to fp32 rounding, x_q the
// dequantised activations.
//
// Which 32 inputs form a block follows the lanes. INT4: 32 consecutive inputs (its weight scales
// change every group of 32-128 inputs, so a lane's integer sum cannot run further). INT8, whose
// scale is one a weight row: lane l's 4 inputs in each of GV = 8 consecutive weight vectors, so a
// lane adds its integer products over 8 vectors before one conversion and one fma (GV * QB inputs,
// VF blocks, a group). A block's inputs thus depend on the vector width: the AVX-512 and AVX2
// builds round the activations differently (both tested against their own float64 reference).
//
// vpdpbusd and maddubs multiply unsigned by signed bytes. INT4 codes (0..15) are the unsigned
// side as they are. INT8 weights are signed. With VNNI and 1-3 activation rows, w + 128 (one xor)
// is the unsigned side and each lane starts from -128 times the sum of its block's activation
// codes, which prepare_quant stores beside the codes once per call. With 4 or more (tiles: the
// weights' side is shared by 4 activation rows), the activations are stored + 128 and 128 times
// the sum of the lane's weights is taken off at the block's end. Both give the same int32.
// On AVX2, where maddubs saturates its 16-bit pair sums, |w| times x with w's sign keeps every
// pair within 2 * 127 * 127.
//
// INT4 bytes hold inputs 2j (low nibble) and 2j + 1 (high): a vector of packed bytes splits into
// its low and high nibbles with two ands and a shift, so the activations are stored permuted to
// match (per chunk of 2 QB inputs: the even ones, then the odd ones) instead of the weights
// being interleaved back. Lane l of a dot product then covers inputs of one block, and the block
// scales are stored spread to the lanes (4 a block), and once more, one a block, for the 1-row
// GEMV (int4_one_row).
//
// The tiles and the streaming follow the bf16 kernel's (cpu_linear.cpp): 1-3 activation rows
// take FR weight rows at a time (sharing the activations' loads), prefetched PREFETCH bytes
// ahead, FEW weight rows a unit (a unit's set-up cost about two thirds of streaming a 1 KB int8
// row); four or more take tiles of RT weight rows x 4 activation rows, the unit's weight rows
// staying in L1 for the further rows.
// Every (weight row, activation row) pair accumulates in the same order in every tile shape, so
// a row's result does not depend on M.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"
#include "cpu_simd.h"

#ifndef PREFETCH
#define PREFETCH 8192
#endif
// Into L2 (T1), not L1: an L1 prefetch holds one of the core's few L1 miss buffers until its line
// arrives, which capped one thread's 1-row INT8 stream at ~10 GB/s here; T1 reached ~18 (7168 x
// 1024, AMD EPYC Zen 4 VM).
#ifndef PREFETCH_HINT
#define PREFETCH_HINT _MM_HINT_T1
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define QUANT_ISA "avx512-vnni"
constexpr int QB = 64;  // bytes per integer vector
constexpr int RT = 3;   // weight rows per tile of 4 activation rows (32 registers)
constexpr int FR = 4;   // weight rows per tile of 1-3 activation rows
typedef __m512i vi;
typedef __m512 vq;
static inline vi load_i(const void* p) { return _mm512_loadu_si512(p); }
static inline vi zero_i() { return _mm512_setzero_si512(); }
static inline vi low_nibbles(vi v) { return _mm512_and_si512(v, _mm512_set1_epi8(15)); }
static inline vi high_nibbles(vi v) { return low_nibbles(_mm512_srli_epi16(v, 4)); }
static inline vi dpbusd(vi acc, vi u, vi s) { return _mm512_dpbusd_epi32(acc, u, s); }
// dpbusd into an accumulator that lives across chunks, in asm: with the intrinsic GCC 12 moved each
// of a 3 x 4 INT8 tile's accumulators to another register and back every chunk (24 moves beside 15
// vpdpbusd), which made the 16-row tile 1.2-1.3x slower than with acc kept in place (Zen 4 VM,
// session 15). INT4's dot products start from zero every chunk and keep the intrinsic.
static inline vi dpbusd_into(vi acc, vi u, vi s) {
    asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "vm"(s));
    return acc;
}
static inline vi plus_128(vi w) { return _mm512_xor_si512(w, _mm512_set1_epi8(char(0x80))); }
static inline vi add_128_sum(vi acc, vi w) { return dpbusd_into(acc, _mm512_set1_epi8(char(0x80)), w); }
static inline vi sub_i(vi a, vi b) { return _mm512_sub_epi32(a, b); }
static inline vq to_f(vi v) { return _mm512_cvtepi32_ps(v); }
static inline vq load_q(const float* p) { return _mm512_loadu_ps(p); }
static inline vq zero_q() { return _mm512_setzero_ps(); }
static inline vq mul_q(vq a, vq b) { return _mm512_mul_ps(a, b); }
static inline vq div_q(vq a, vq b) { return _mm512_div_ps(a, b); }
static inline vq fma_q(vq a, vq b, vq c) { return _mm512_fmadd_ps(a, b, c); }
static inline vq fnma_q(vq a, vq b, vq c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a b
static inline vq set1_q(float f) { return _mm512_set1_ps(f); }
static inline float sum_q(vq v) { return _mm512_reduce_add_ps(v); }
// sum_q of a[0..3] into out[0..3], adding in sum_q's order (so the same bits) four vectors at a time
static inline void sum4_q(const vq* a, float* out) {
    const vq s01 = _mm512_add_ps(_mm512_shuffle_f32x4(a[0], a[1], 0xEE), _mm512_shuffle_f32x4(a[0], a[1], 0x44));
    const vq s23 = _mm512_add_ps(_mm512_shuffle_f32x4(a[2], a[3], 0xEE), _mm512_shuffle_f32x4(a[2], a[3], 0x44));
    vq t = _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0xDD), _mm512_shuffle_f32x4(s01, s23, 0x88));
    t = _mm512_add_ps(t, _mm512_permute_ps(t, 0x4E));
    t = _mm512_add_ps(t, _mm512_permute_ps(t, 0xB1));
    _mm_storeu_ps(out, _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), t)));
}
typedef __mmask16 words_mask;
static inline words_mask mask_of(int64_t n) { return __mmask16(n >= 16 ? 0xffff : (1u << n) - 1); }
static inline vi load_masked(const void* p, words_mask m) { return _mm512_maskz_loadu_epi32(m, p); }
static inline vi load_words(const void* p, int64_t n) {  // 32-bit words [0, n), 0 beyond; never reads past n
    return load_masked(p, mask_of(n));
}
static inline vi spread(vi words, vi idx) { return _mm512_permutexvar_epi32(idx, words); }
static inline vq bf16_low(vi w) { return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)); }
static inline vq bf16_high(vi w) {
    return _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(int(0xffff0000u))));
}
static inline void store_q(float* p, vq v) { _mm512_storeu_ps(p, v); }
static inline vq abs_max(vq m, vq v) { return _mm512_max_ps(m, _mm512_abs_ps(v)); }
// each 4 consecutive lanes' max / sum, in all 4 of them
static inline vq quad_max(vq v) {
    v = _mm512_max_ps(v, _mm512_permute_ps(v, 0xB1));
    return _mm512_max_ps(v, _mm512_permute_ps(v, 0x4E));
}
static inline vi quad_sum(vi v) {
    v = _mm512_add_epi32(v, _mm512_shuffle_epi32(v, _MM_PERM_CDAB));
    return _mm512_add_epi32(v, _mm512_shuffle_epi32(v, _MM_PERM_BADC));
}
static inline vi add_i(vi a, vi b) { return _mm512_add_epi32(a, b); }
static inline void store_i(void* p, vi v) { _mm512_storeu_si512(p, v); }
// x / d rounded to nearest even (0 where d is 0), as VF bytes (+ 128 when `offset`)
static inline vi codes_of(vq x, vq d) {
    return _mm512_maskz_cvtps_epi32(_mm512_cmp_ps_mask(d, zero_q(), _CMP_GT_OQ), _mm512_div_ps(x, d));
}
static inline void store_codes(int8_t* p, vi codes, bool offset) {
    const __m128i b = _mm512_cvtepi32_epi8(codes);
    _mm_storeu_si128((__m128i*)p, offset ? _mm_xor_si128(b, _mm_set1_epi8(char(0x80))) : b);
}
static inline vi lane_index_shifted(int64_t n) {  // lane l -> l >> n
    return _mm512_srl_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm_cvtsi64_si128(n));
}
// a chunk's 4 block values (p[0..3]) to its 16 lanes, 4 a block
static inline vq blocks_to_lanes(const float* p, vi idx) {
    return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_loadu_ps(p)));
}
#elif defined(__AVX2__)
constexpr int QB = 32;
constexpr int RT = 2;  // 16 registers
constexpr int FR = 2;
typedef __m256i vi;
typedef __m256 vq;
static inline vi load_i(const void* p) { return _mm256_loadu_si256((const __m256i*)p); }
static inline vi zero_i() { return _mm256_setzero_si256(); }
static inline vi low_nibbles(vi v) { return _mm256_and_si256(v, _mm256_set1_epi8(15)); }
static inline vi high_nibbles(vi v) { return low_nibbles(_mm256_srli_epi16(v, 4)); }
static inline vi sub_i(vi a, vi b) { return _mm256_sub_epi32(a, b); }
static inline vq to_f(vi v) { return _mm256_cvtepi32_ps(v); }
static inline vq load_q(const float* p) { return _mm256_loadu_ps(p); }
static inline vq zero_q() { return _mm256_setzero_ps(); }
static inline vq mul_q(vq a, vq b) { return _mm256_mul_ps(a, b); }
static inline vq div_q(vq a, vq b) { return _mm256_div_ps(a, b); }
static inline vq fma_q(vq a, vq b, vq c) { return _mm256_fmadd_ps(a, b, c); }
static inline vq fnma_q(vq a, vq b, vq c) { return _mm256_fnmadd_ps(a, b, c); }
static inline vq set1_q(float f) { return _mm256_set1_ps(f); }
static inline float sum_q(vq v) { return hsum8(v); }
static inline void sum4_q(const vq* a, float* out) {  // as AVX-512's: hsum8's order, four at a time
    const vq s01 = _mm256_add_ps(_mm256_permute2f128_ps(a[0], a[1], 0x20), _mm256_permute2f128_ps(a[0], a[1], 0x31));
    const vq s23 = _mm256_add_ps(_mm256_permute2f128_ps(a[2], a[3], 0x20), _mm256_permute2f128_ps(a[2], a[3], 0x31));
    vq t01 = _mm256_add_ps(s01, _mm256_permute_ps(s01, 0x4E)), t23 = _mm256_add_ps(s23, _mm256_permute_ps(s23, 0x4E));
    t01 = _mm256_add_ps(t01, _mm256_permute_ps(t01, 0xB1));
    t23 = _mm256_add_ps(t23, _mm256_permute_ps(t23, 0xB1));
    const __m256 picked = _mm256_permutevar8x32_ps(_mm256_unpacklo_ps(t01, t23), _mm256_setr_epi32(0, 4, 1, 5, 0, 0, 0, 0));
    _mm_storeu_ps(out, _mm256_castps256_ps128(picked));
}
typedef __m256i words_mask;
static inline words_mask mask_of(int64_t n) {
    const vi lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(std::min<int64_t>(n, 8))), lane);
}
static inline vi load_masked(const void* p, words_mask m) { return _mm256_maskload_epi32((const int*)p, m); }
static inline vi load_words(const void* p, int64_t n) { return load_masked(p, mask_of(n)); }
static inline vi spread(vi words, vi idx) { return _mm256_permutevar8x32_epi32(words, idx); }
static inline vq bf16_low(vi w) { return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)); }
static inline vq bf16_high(vi w) {
    return _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(int(0xffff0000u))));
}
static inline void store_q(float* p, vq v) { _mm256_storeu_ps(p, v); }
static inline vq abs_max(vq m, vq v) { return _mm256_max_ps(m, _mm256_andnot_ps(_mm256_set1_ps(-0.f), v)); }
static inline vq quad_max(vq v) {
    v = _mm256_max_ps(v, _mm256_permute_ps(v, 0xB1));
    return _mm256_max_ps(v, _mm256_permute_ps(v, 0x4E));
}
static inline vi quad_sum(vi v) {
    v = _mm256_add_epi32(v, _mm256_shuffle_epi32(v, 0xB1));
    return _mm256_add_epi32(v, _mm256_shuffle_epi32(v, 0x4E));
}
static inline vi add_i(vi a, vi b) { return _mm256_add_epi32(a, b); }
static inline void store_i(void* p, vi v) { _mm256_storeu_si256((__m256i*)p, v); }
static inline vi codes_of(vq x, vq d) {
    const vi keep = _mm256_castps_si256(_mm256_cmp_ps(d, zero_q(), _CMP_GT_OQ));
    return _mm256_and_si256(_mm256_cvtps_epi32(_mm256_div_ps(x, d)), keep);
}
static inline void store_codes(int8_t* p, vi codes, bool offset) {  // |codes| <= 127: the packs never saturate
    const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(codes), _mm256_extracti128_si256(codes, 1));
    const __m128i b = _mm_packs_epi16(words, words);
    _mm_storel_epi64((__m128i*)p, offset ? _mm_xor_si128(b, _mm_set1_epi8(char(0x80))) : b);
}
static inline vi lane_index_shifted(int64_t n) {  // lane l -> l >> n
    return _mm256_srl_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm_cvtsi64_si128(n));
}
// a chunk's 2 block values (p[0..1]) to its 8 lanes, 4 a block
static inline vq blocks_to_lanes(const float* p, vi idx) {
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i*)p))), idx);
}
#if defined(__AVXVNNI__)
#define QUANT_ISA "avx-vnni"
static inline vi dpbusd(vi acc, vi u, vi s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
static inline vi dpbusd_into(vi acc, vi u, vi s) {  // as AVX-512's, VEX-encoded (no AVX-512 here)
    asm("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(u), "xm"(s));
    return acc;
}
static inline vi plus_128(vi w) { return _mm256_xor_si256(w, _mm256_set1_epi8(char(0x80))); }
static inline vi add_128_sum(vi acc, vi w) { return dpbusd_into(acc, _mm256_set1_epi8(char(0x80)), w); }
#else
#define QUANT_ISA "avx2"
#define NO_VNNI 1
#endif
#else
#error "the native CPU kernel needs AVX2 or AVX-512 (tinymoe then uses torch matmuls)"
#endif
constexpr int VF = QB / 4;  // 32-bit lanes of a dot product = fp32 lanes of its scales

#ifdef NO_VNNI
constexpr bool VNNI = false;
template <bool SUMS> static inline vi int8_aux(vi w) { return _mm256_abs_epi8(w); }
template <bool SUMS> static inline vi int8_add(vi acc, vi x, vi w, vi abs_w) {
    const vi dot = _mm256_madd_epi16(_mm256_maddubs_epi16(abs_w, _mm256_sign_epi8(x, w)), _mm256_set1_epi16(1));
    return _mm256_add_epi32(acc, dot);
}
// two halves' pair sums (at most 2 * 15 * 127 each) add in 16 bits without saturating
static inline vi int4_dot(vi lo, vi x_even, vi hi, vi x_odd) {
    const vi pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x_even), _mm256_maddubs_epi16(hi, x_odd));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}
#else
constexpr bool VNNI = true;
// SUMS (1-3 activation rows): the lane adds (w + 128) x, having started from -128 sum(x) of its
// block; else (the tiles, where a weight vector meets 4 activation rows) (x + 128) w, and 128 sum(w)
// is taken off at the block's end. Either way sum(w x) exactly.
template <bool SUMS> static inline vi int8_aux(vi w) { return SUMS ? plus_128(w) : w; }
template <bool SUMS> static inline vi int8_add(vi acc, vi x, vi w, vi aux) {
    return SUMS ? dpbusd_into(acc, aux, x) : dpbusd_into(acc, x, w);
}
static inline vi int4_dot(vi lo, vi x_even, vi hi, vi x_odd) { return dpbusd(dpbusd(zero_i(), lo, x_even), hi, x_odd); }
#endif

constexpr int MCHUNK = 64;  // activation rows per pass over a unit's weight rows
constexpr int GV = 8;       // INT8: weight vectors one activation block spans (4 inputs a lane each)

// Sizes of one matrix's rows and of their prepared activations.
struct Layout {
    bool int4;
    int64_t K, KP;   // inputs, and as the weights store them (INT4: padded to the group)
    int64_t chunk;   // inputs per weight vector: QB (INT8) or 2 QB (INT4)
    int64_t Q, S;    // prepared codes and scales (INT4: spread to the lanes) per activation row
    int64_t NG;      // INT8: groups of GV weight vectors, VF activation blocks each
    int64_t G, groups, GP;  // INT4: group, groups per row, group sums per activation row (whole vectors)
    int64_t DB;             // INT4: block scales per activation row as prepare stores them unspread (whole vectors)
    int64_t log_G, per;     // INT4: log2 G (no division in the inner loop), scale words a chunk
    int64_t row_bytes;      // of the weights' codes
};

static Layout layout(const Matrix& w, int64_t K) {
    Layout L;
    L.int4 = w.precision == INT4;
    L.K = K;
    L.G = L.int4 ? w.group : 0;
    L.KP = L.int4 ? (K + L.G - 1) / L.G * L.G : K;
    L.chunk = L.int4 ? 2 * QB : QB;
    L.Q = (L.KP + L.chunk - 1) / L.chunk * L.chunk;
    L.NG = (L.Q / QB + GV - 1) / GV;
    L.S = L.int4 ? L.Q / 32 * 4 : L.NG * VF;
    L.groups = L.int4 ? L.KP / L.G : 0;
    L.GP = (L.groups + VF - 1) / VF * VF;
    L.DB = L.int4 ? (L.Q / 32 + VF - 1) / VF * VF : 0;
    L.row_bytes = L.int4 ? L.KP / 2 : K;
    for (L.log_G = 0; L.int4 && (int64_t(1) << L.log_G) < L.G;) L.log_G++;
    L.per = L.int4 ? std::max<int64_t>(1, L.chunk / L.G) : 0;
    return L;
}

// INT4's activation block: 32 consecutive values v -> int8 codes round(v / d) (to nearest even), the
// even-numbered inputs' codes to even[0..15] and the odd ones' to odd[0..15] (int4_chunks' order),
// their sum, and d = max|v| / 127 (0, and codes 0, for an all-zero block). AVX2 instructions, for
// either build.
static inline float quantise_int4_block(const float* v, int8_t* even, int8_t* odd, int32_t& total) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(v));
    for (int i = 8; i < 32; i += 8) a = _mm256_max_ps(a, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + i)));
    a = _mm256_max_ps(a, _mm256_permute2f128_ps(a, a, 1));  // the max in every lane
    a = _mm256_max_ps(a, _mm256_permute_ps(a, 0x4E));
    a = _mm256_max_ps(a, _mm256_permute_ps(a, 0xB1));
    const __m256 d = _mm256_div_ps(a, _mm256_set1_ps(127.f));
    const __m256i keep = _mm256_castps_si256(_mm256_cmp_ps(d, _mm256_setzero_ps(), _CMP_GT_OQ));
    __m256i c[4], sum = _mm256_setzero_si256();
    for (int i = 0; i < 4; i++) {
        c[i] = _mm256_and_si256(_mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(v + 8 * i), d)), keep);
        sum = _mm256_add_epi32(sum, c[i]);
    }
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    total = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1)));
    // |codes| <= 127, so the packs never saturate; they interleave the 128-bit halves, the permute
    // puts the 32 codes back in order, the shuffle takes each half's even then odd bytes
    const __m256i bytes = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3])),
        _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    const __m256i split = _mm256_shuffle_epi8(
        bytes, _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
    const __m256i halves = _mm256_permute4x64_epi64(split, 0xD8);  // evens, then odds
    _mm_storeu_si128((__m128i*)even, _mm256_castsi256_si128(halves));
    _mm_storeu_si128((__m128i*)odd, _mm256_extracti128_si256(halves, 1));
    return _mm256_cvtss_f32(d);
}

// INT8's activation blocks follow the kernel's lanes: block (g, l) is the 4 inputs lane l of each of
// group g's GV weight vectors covers (inputs (g GV + v) QB + 4 l + i, v < GV, i < 4), so a lane adds
// its integer products over GV vectors and converts and scales them once. INT4's are 32 consecutive
// inputs (its weight scales change every group of 32-128 inputs).
static void prepare_int8_row(const float* x, const Layout& L, bool offset, int8_t* q, float* scale,
                             int32_t* lane_sums) {
    constexpr int P = QB / VF;  // float vectors of one weight vector's inputs; each holds VF / 4 lanes' 4 inputs
    alignas(64) float d_lanes[VF];
    alignas(64) int32_t sum_lanes[VF];
    for (int64_t g = 0; g < L.NG; g++) {
        const float* xg = x + g * GV * QB;  // x is zero-padded to whole groups
        vq d[P];
        vi total[P];
        for (int p = 0; p < P; p++) {
            vq m = zero_q();
            for (int v = 0; v < GV; v++) m = abs_max(m, load_q(xg + v * QB + p * VF));
            d[p] = div_q(quad_max(m), set1_q(127.f));  // fp32 division, as quantise_block
            total[p] = zero_i();
        }
        for (int v = 0; v < GV; v++)
            for (int p = 0; p < P; p++) {
                const vi codes = codes_of(load_q(xg + v * QB + p * VF), d[p]);
                total[p] = add_i(total[p], codes);
                if ((g * GV + v) * QB < L.Q) store_codes(q + (g * GV + v) * QB + p * VF, codes, offset);
            }
        for (int p = 0; p < P; p++) {
            store_q(d_lanes, d[p]);
            store_i(sum_lanes, quad_sum(total[p]));
            for (int i = 0; i < VF / 4; i++) {
                scale[g * VF + p * VF / 4 + i] = d_lanes[4 * i];
                if (lane_sums) lane_sums[g * VF + p * VF / 4 + i] = -128 * sum_lanes[4 * i];
            }
        }
    }
}

static inline float value_at(const void* x, int x_bf16, int64_t i) {  // x[i], fp32 or bf16
    return x_bf16 ? bf(static_cast<const uint16_t*>(x)[i]) : static_cast<const float*>(x)[i];
}

void prepare_quant(const void* x, int x_bf16, int64_t M, int64_t K, const Matrix& w, Prepared& out) {
    const Layout L = layout(w, K);
    const bool lane_sums = VNNI && !L.int4 && M < 4, offset = VNNI && !L.int4 && M >= 4;
    out.precision = w.precision;
    out.M = M;
    out.K = K;
    // INT4: the blocks' scales once more, one a block (int4_one_row)
    out.f.assign(L.int4 ? M * L.DB : 0, 0.f);
    // codes (offset: + 128, as unsigned bytes); then (lane_sums) per row its blocks' -128 sum(codes), int32
    out.q.assign(M * L.Q + (lane_sums ? M * L.S * 4 : 0), int8_t(offset ? 0x80 : 0));
    out.scale.assign(M * L.S, 0.f);
    out.sum.assign(L.int4 ? M * L.GP : 0, 0.f);
    std::vector<float> row(L.int4 ? 0 : L.NG * GV * QB, 0.f);  // INT8: a row zero-padded to whole groups
    float v[32];
    for (int64_t m = 0; m < M; m++) {
        int8_t* qm = &out.q[m * L.Q];
        if (!L.int4) {
            for (int64_t k = 0; k < K; k++) row[k] = value_at(x, x_bf16, m * K + k);
            int32_t* sums = lane_sums ? reinterpret_cast<int32_t*>(&out.q[M * L.Q]) + m * L.S : nullptr;
            prepare_int8_row(row.data(), L, offset, qm, &out.scale[m * L.S], sums);
            continue;
        }
        for (int64_t b = 0; b * 32 < L.KP; b++) {
            const int64_t k0 = b * 32, n = std::min<int64_t>(32, std::max<int64_t>(0, K - k0));
            for (int64_t i = 0; i < n; i++) v[i] = value_at(x, x_bf16, m * K + k0 + i);
            for (int64_t i = n; i < 32; i++) v[i] = 0.f;
            int32_t total;
            int8_t* chunk = qm + k0 / (2 * QB) * (2 * QB) + k0 % (2 * QB) / 2;  // its even inputs, then its odd ones
            const float d = quantise_int4_block(v, chunk, chunk + QB, total);
            for (int j = 0; j < 4; j++) out.scale[m * L.S + b * 4 + j] = d;
            out.f[m * L.DB + b] = d;
            out.sum[m * L.GP + k0 / L.G] += d * float(total);
        }
    }
}

constexpr int FEW = 16;  // weight rows a unit for 1-3 activation rows

int64_t quant_unit_rows(int64_t M) { return M >= 4 ? RT : FEW; }

int64_t quant_units_per_chunk(const Matrix& w, int64_t M, int64_t K) {
    const Layout L = layout(w, K);
    const int64_t bytes = L.row_bytes + (L.int4 ? L.groups * 4 : 2);
    return std::max<int64_t>(1, (256 << 10) / (quant_unit_rows(M) * bytes));
}

// INT4: chunks [c0, c1) of R weight rows into acc: weight row r's chunk c at w + r * stride + (c - c0)
// QB, its scale words at words + r * groups. `whole`: every chunk's groups lie in the row (all but a
// row's zero-padded tail). Always inlined: acc stays in registers.
template <int R, int MB>
__attribute__((always_inline)) static inline void int4_chunks(vq (&acc)[R][MB], const uint8_t* w, int64_t stride,
                                                              const uint32_t* words, int64_t c0, int64_t c1, bool whole,
                                                              const int8_t* xq, const float* xd, const Layout& L) {
    constexpr int64_t CH = 2 * QB;  // L.chunk, known to the compiler
    const int64_t Q = L.Q, S = L.S;
    const vi idx = lane_index_shifted(L.log_G - 3);  // lane (4 a block of 32) -> scale word of its group
    // a whole chunk's scale-word mask, made once: GCC rebuilt it every chunk (8 scalar instructions
    // in a 30-instruction loop), and hoisting it made the 1-row INT4 GEMV 3-18% faster (Zen 4 VM)
    const words_mask per_chunk = mask_of(L.per);
    vq a[R][MB];  // a local copy: GCC otherwise stores acc back every chunk
    for (int r = 0; r < R; r++) for (int j = 0; j < MB; j++) a[r][j] = acc[r][j];
    for (int64_t c = c0; c < c1; c++, w += QB) {
        if (whole)
            for (int r = 0; r < R; r++) _mm_prefetch((const char*)w + r * stride + PREFETCH, PREFETCH_HINT);
        vi lo[R], hi[R];
        vq s[R];
        const int64_t g0 = (c * CH) >> L.log_G;
        const words_mask mask = whole ? per_chunk : mask_of(std::min(L.per, L.groups - g0));
        for (int r = 0; r < R; r++) {
            const vi packed = load_i(w + r * stride);
            lo[r] = low_nibbles(packed);
            hi[r] = high_nibbles(packed);
            s[r] = bf16_low(spread(load_masked(words + r * L.groups + g0, mask), idx));
        }
        for (int j = 0; j < MB; j++) {
            const vi xe = load_i(xq + j * Q + c * CH), xo = load_i(xq + j * Q + c * CH + QB);
            const vq d = load_q(xd + j * S + c * VF);
            for (int r = 0; r < R; r++)
                a[r][j] = fma_q(to_f(int4_dot(lo[r], xe, hi[r], xo)), mul_q(d, s[r]), a[r][j]);
        }
    }
    for (int r = 0; r < R; r++) for (int j = 0; j < MB; j++) acc[r][j] = a[r][j];
}

// INT8: chunks [c0, c1) of R weight rows (w + r * stride + (c - c0) QB) into the lanes' integer
// sums s; on VNNI tiles also into sum_w, 128 times each weight row's lane sums. `whole` as
// int4_chunks. Always inlined, with local copies: the sums stay in registers.
template <int R, int MB, bool SUMS>
__attribute__((always_inline)) static inline void int8_chunks(vi (&s)[R][MB], vi (&sum_w)[R], const uint8_t* w,
                                                              int64_t stride, int64_t c0, int64_t c1, bool whole,
                                                              const int8_t* xq, int64_t Q) {
    vi t[R][MB], u[R];
    for (int r = 0; r < R; r++) {
        u[r] = sum_w[r];
        for (int j = 0; j < MB; j++) t[r][j] = s[r][j];
    }
    for (int64_t c = c0; c < c1; c++, w += QB) {
        if (whole)
            for (int r = 0; r < R; r++) _mm_prefetch((const char*)w + r * stride + PREFETCH, PREFETCH_HINT);
        vi wv[R], aux[R];
        for (int r = 0; r < R; r++) {
            wv[r] = load_i(w + r * stride);
            aux[r] = int8_aux<SUMS>(wv[r]);
            if constexpr (VNNI && !SUMS) u[r] = add_128_sum(u[r], wv[r]);
        }
        for (int j = 0; j < MB; j++) {
            const vi xv = load_i(xq + j * Q + c * QB);
            for (int r = 0; r < R; r++) t[r][j] = int8_add<SUMS>(t[r][j], xv, wv[r], aux[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        sum_w[r] = u[r];
        for (int j = 0; j < MB; j++) s[r][j] = t[r][j];
    }
}

// INT8: R weight rows (row_bytes apart) times MB activation rows into acc. A lane adds its integer
// products over a group's GV weight vectors (one activation block), then converts them and scales
// them by the block's d once: per weight vector and activation row one integer dot product instead
// of a dot product, a conversion and an fma. The row's last bytes are zero-padded to a whole vector
// (the activations are too).
template <int R, int MB, bool SUMS>
static void int8_rows(vq (&acc)[R][MB], const uint8_t* w, int64_t row_bytes, const int8_t* xq, const int32_t* xs,
                      const float* xd, const Layout& L) {
    const int64_t full = row_bytes / QB, rest = row_bytes % QB, n = full + (rest != 0);
    alignas(64) uint8_t tail[R][QB];
    if (rest)
        for (int r = 0; r < R; r++) {
            std::memset(tail[r], 0, QB);
            std::memcpy(tail[r], w + r * row_bytes + full * QB, rest);
        }
    for (int64_t c0 = 0, g = 0; c0 < n; c0 += GV, g++) {
        vi s[R][MB], sum_w[R];
        for (int r = 0; r < R; r++) {
            sum_w[r] = zero_i();
            for (int j = 0; j < MB; j++) s[r][j] = SUMS ? load_i(xs + j * L.S + g * VF) : zero_i();
        }
        const int64_t c1 = std::min(n, c0 + GV), f1 = std::min(full, c1);
        int8_chunks<R, MB, SUMS>(s, sum_w, w + c0 * QB, row_bytes, c0, f1, true, xq, L.Q);
        if (f1 < c1) int8_chunks<R, MB, SUMS>(s, sum_w, tail[0], QB, full, full + 1, false, xq, L.Q);
        for (int j = 0; j < MB; j++) {
            const vq d = load_q(xd + j * L.S + g * VF);
            for (int r = 0; r < R; r++)
                acc[r][j] = fma_q(to_f(VNNI && !SUMS ? sub_i(s[r][j], sum_w[r]) : s[r][j]), d, acc[r][j]);
        }
    }
}

constexpr int64_t SEG = 32;  // chunks a batch of int4_one_row's block products (4 KB of AVX-512 weights)

// INT4, one weight row against one activation row (the batch-1 GEMV), chunks [0, c1) as chunks()
// takes them. Each block's product d * s (its activation scale times its group's weight scale) is
// made once a block, SEG chunks at a time, instead of once a lane in every chunk, and a chunk
// spreads its blocks' products to the lanes with one permute: 9 vector instructions a chunk
// instead of 13, the same products and sums in the same order, so the same bits. The loop is
// bound by the vector units, not by memory. Zen 4 VM, session 14, one thread, weights in L1/L2: 1.15x
// (K 1024) to 1.24x (K 3584) a chunk; mixtral-mini int4 batch-1 decode 1.06x / 1.09x (A/B in one
// process); the AVX2 build neutral (0.98x).
static inline void int4_one_row(vq& acc, const uint8_t* w, const uint32_t* words, int64_t c1, const int8_t* xq,
                                const float* xd, const Layout& L) {
    constexpr int BPC = 2 * QB / 32;  // blocks a chunk
    const int64_t sh = L.log_G - 5;   // block -> group: b >> sh (G is 32, 64 or 128)
    const vi s_idx = lane_index_shifted(sh), lane_idx = lane_index_shifted(2);  // block -> group, lane -> block
    alignas(64) float ds[SEG * BPC];
    vq a = acc;
    for (int64_t c0 = 0; c0 < c1; c0 += SEG) {
        const int64_t n = std::min(SEG, c1 - c0);
        for (int64_t i = 0; i < n * BPC; i += VF) {  // b: a multiple of VF, and G / 32 divides VF
            const int64_t b = c0 * BPC + i, g = b >> sh;
            const vi sw = load_words(words + g, std::min<int64_t>(VF >> sh, L.groups - g));
            store_q(ds + i, mul_q(load_q(xd + b), bf16_low(spread(sw, s_idx))));
        }
        for (int64_t c = 0; c < n; c++, w += QB) {
            _mm_prefetch((const char*)w + PREFETCH, PREFETCH_HINT);
            const vi packed = load_i(w);
            const int8_t* xc = xq + (c0 + c) * 2 * QB;
            const vi dot = int4_dot(low_nibbles(packed), load_i(xc), high_nibbles(packed), load_i(xc + QB));
            a = fma_q(to_f(dot), blocks_to_lanes(ds + c * BPC, lane_idx), a);
        }
    }
    acc = a;
}

// R weight rows from n0 against activation rows [m, m + MB): out[r * MB + j] = their dot products
// (INT8 before the channel scale). SUMS: INT8 activations with their lanes' sums (VNNI, M < 4).
template <bool INT4_W, int R, int MB, bool SUMS = false>
static void tile(const Prepared& x, const Matrix& w, const Layout& L, int64_t n0, int64_t m, float* out) {
    vq acc[R][MB];
    for (int r = 0; r < R; r++) for (int j = 0; j < MB; j++) acc[r][j] = zero_q();
    const uint8_t* rows = static_cast<const uint8_t*>(w.data) + n0 * L.row_bytes;
    const uint32_t* words = INT4_W ? reinterpret_cast<const uint32_t*>(w.scales) + n0 * L.groups : nullptr;
    const int8_t* xq = &x.q[m * L.Q];
    const float* xd = &x.scale[m * L.S];
    if constexpr (!INT4_W) {
        const int32_t* xs = SUMS ? reinterpret_cast<const int32_t*>(&x.q[x.M * L.Q]) + m * L.S : nullptr;  // -128 sums
        int8_rows<R, MB, SUMS>(acc, rows, L.row_bytes, xq, xs, xd, L);
    } else {
        const int64_t full = L.row_bytes / QB, rest = L.row_bytes % QB;
        if constexpr (R == 1 && MB == 1) int4_one_row(acc[0][0], rows, words, full, xq, &x.f[m * L.DB], L);
        else int4_chunks<R, MB>(acc, rows, L.row_bytes, words, 0, full, true, xq, xd, L);
        if (rest) {  // the row's last bytes, zero-padded to a whole vector (the activations are too)
            alignas(64) uint8_t tail[R][QB] = {};
            for (int r = 0; r < R; r++) std::memcpy(tail[r], rows + r * L.row_bytes + full * QB, rest);
            int4_chunks<R, MB>(acc, tail[0], QB, words, full, full + 1, false, xq, xd, L);
        }
    }
    float sums[R][MB];
    for (int r = 0; r < R; r++)
        if constexpr (MB == 4) sum4_q(acc[r], sums[r]);
        else for (int j = 0; j < MB; j++) sums[r][j] = sum_q(acc[r][j]);
    for (int r = 0; r < R; r++)
        for (int j = 0; j < MB; j++) {
            float total = sums[r][j];
            if constexpr (INT4_W) {  // + sum over groups of (zero - 8 scale) * the group's activation sum
                vq z = zero_q();
                const vq eight = set1_q(8.f);
                for (int64_t g = 0; g < L.groups; g += VF) {
                    const vi sz = load_words(words + r * L.groups + g, L.groups - g);
                    const vq zz = fnma_q(bf16_low(sz), eight, bf16_high(sz));
                    z = fma_q(zz, load_q(&x.sum[(m + j) * L.GP + g]), z);
                }
                total += sum_q(z);
            }
            out[r * MB + j] = total;
        }
}

// acc[r * mc + j] for weight rows n0 .. n0 + R and activation rows m0 .. m0 + mc (tiles of 4, then the rest)
template <bool INT4_W, int R>
static void rows(const Prepared& x, const Matrix& w, const Layout& L, int64_t n0, int64_t m0, int64_t mc, float* acc) {
    float part[R * 4];
    int64_t j = 0;
    for (; j + 4 <= mc; j += 4) {
        tile<INT4_W, R, 4>(x, w, L, n0, m0 + j, part);
        for (int r = 0; r < R; r++) for (int i = 0; i < 4; i++) acc[r * mc + j + i] = part[r * 4 + i];
    }
    const int rest = int(mc - j);
    if (rest == 1) tile<INT4_W, R, 1>(x, w, L, n0, m0 + j, part);
    else if (rest == 2) tile<INT4_W, R, 2>(x, w, L, n0, m0 + j, part);
    else if (rest == 3) tile<INT4_W, R, 3>(x, w, L, n0, m0 + j, part);
    for (int r = 0; r < R; r++) for (int i = 0; i < rest; i++) acc[r * mc + j + i] = part[r * rest + i];
}

// y[m0 + j, n] for n in [n0, n1), j < mc from acc[(n - n0) mc + j] (INT8: times the channel
// scale), a row of y at a time: y's rows are often 4 KB apart, the same L1 set.
template <bool INT4_W>
static void put(const Matrix& w, int64_t N, void* y, int out_bf16, int64_t n0, int64_t n1, int64_t m0, int64_t mc,
                const float* acc) {
    for (int64_t j = 0; j < mc; j++)
        for (int64_t n = n0; n < n1; n++) {
            const float v = INT4_W ? acc[(n - n0) * mc + j] : acc[(n - n0) * mc + j] * bf(w.scales[n]);
            const int64_t at = (m0 + j) * N + n;
            if (out_bf16) static_cast<uint16_t*>(y)[at] = to_bf(v);
            else static_cast<float*>(y)[at] = v;
        }
}

// Weight rows [n0, n0 + FEW) against all 1-3 activation rows, FR weight rows at a time: the
// activations' loads (codes, scales, lane sums) are shared by FR weight vectors. One activation
// row takes the weight rows one after another instead, one stream a thread, as the bf16 GEMV
// does (cpu_linear.cpp): int8 batch-1 decode of mixtral-mini 82.7 against 94.0 t/s, int4 117.5
// against 125.1 (A/B in one process, Zen 4 VM, session 13).
template <bool INT4_W, int MB>
static void few(const Prepared& x, const Matrix& w, const Layout& L, int64_t N, void* y, int out_bf16, int64_t n0) {
    constexpr int F = MB == 1 ? 1 : FR;
    float acc[F * MB];
    const int64_t n1 = std::min(N, n0 + FEW);
    int64_t n = n0;
    for (; n + F <= n1; n += F) {
        tile<INT4_W, F, MB, VNNI>(x, w, L, n, 0, acc);
        put<INT4_W>(w, N, y, out_bf16, n, n + F, 0, MB, acc);
    }
    for (; n < n1; n++) {
        tile<INT4_W, 1, MB, VNNI>(x, w, L, n, 0, acc);
        put<INT4_W>(w, N, y, out_bf16, n, n + 1, 0, MB, acc);
    }
}

template <bool INT4_W>
static void unit(const Prepared& x, const Matrix& w, int64_t N, void* y, int out_bf16, int64_t u) {
    const Layout L = layout(w, x.K);
    const int64_t R = quant_unit_rows(x.M), n0 = u * R;
    if (x.M == 1) return few<INT4_W, 1>(x, w, L, N, y, out_bf16, n0);
    if (x.M == 2) return few<INT4_W, 2>(x, w, L, N, y, out_bf16, n0);
    if (x.M == 3) return few<INT4_W, 3>(x, w, L, N, y, out_bf16, n0);
    float acc[RT * MCHUNK];
    for (int64_t m0 = 0; m0 < x.M; m0 += MCHUNK) {
        const int64_t mc = std::min<int64_t>(x.M - m0, MCHUNK);
        if (n0 + RT <= N) rows<INT4_W, RT>(x, w, L, n0, m0, mc, acc);
        else for (int64_t n = n0; n < N; n++) rows<INT4_W, 1>(x, w, L, n, m0, mc, acc + (n - n0) * mc);
        put<INT4_W>(w, N, y, out_bf16, n0, std::min(N, n0 + R), m0, mc, acc);
    }
}

void quant_unit(const Prepared& x, const Matrix& w, int64_t N, void* y, int out_bf16, int64_t u) {
    if (w.precision == INT4) unit<true>(x, w, N, y, out_bf16, u);
    else unit<false>(x, w, N, y, out_bf16, u);
}

extern "C" {
const char* quant_isa(void) { return QUANT_ISA; }
}

// w [N, K] as bf16, rounded as kernels/quant.py's dequantize(w, torch.bfloat16) rounds: the
// value in fp32 (INT4: (q - 8) * scale, then + zero, two roundings), then to bf16.
static void dequantize_row(const Matrix& w, int64_t K, int64_t n, uint16_t* out) {
    int64_t k = 0;
    if (w.precision == INT8) {
        const int8_t* q = static_cast<const int8_t*>(w.data) + n * K;
        const float s = bf(w.scales[n]);
        for (; k + 8 <= K; k += 8) {
            const __m256i codes = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(q + k)));
            store8(out + k, _mm256_mul_ps(_mm256_cvtepi32_ps(codes), _mm256_set1_ps(s)));
        }
        for (; k < K; k++) out[k] = to_bf(float(q[k]) * s);
        return;
    }
    const int64_t G = w.group, KP = (K + G - 1) / G * G;
    const uint8_t* q = static_cast<const uint8_t*>(w.data) + n * KP / 2;
    const uint16_t* sz = w.scales + n * (KP / G) * 2;
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    for (; k + 8 <= K; k += 8) {  // 8 inputs = 4 bytes = nibbles 0..7 of one word, one group
        int32_t word;
        std::memcpy(&word, q + k / 2, 4);
        const __m256i codes =
            _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word), shifts), _mm256_set1_epi32(15));
        const __m256 c = _mm256_cvtepi32_ps(_mm256_sub_epi32(codes, _mm256_set1_epi32(8)));
        const __m256 scaled = _mm256_mul_ps(c, _mm256_set1_ps(bf(sz[k / G * 2])));
        store8(out + k, _mm256_add_ps(scaled, _mm256_set1_ps(bf(sz[k / G * 2 + 1]))));
    }
    for (; k < K; k++) {
        const int code = k % 2 ? q[k / 2] >> 4 : q[k / 2] & 15;
        const float scaled = float(code - 8) * bf(sz[k / G * 2]);
        out[k] = to_bf(scaled + bf(sz[k / G * 2 + 1]));
    }
}

extern "C" {
void dequantize_matrix(const Matrix* w, int64_t N, int64_t K, uint16_t* out, int threads) {
    if (N * K < SERIAL_BELOW) threads = 1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) dequantize_row(*w, K, n, out + n * K);
}
}
