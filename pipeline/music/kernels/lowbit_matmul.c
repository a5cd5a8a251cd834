/* y = x @ W.T with W in 4- or 5-bit groups and x quantized to int8 on the fly (llama.cpp's Q4_1/Q5_1 x Q8).
 *
 * Layout (pipeline/music/native.py packs it): weights come in superblocks of 512 input columns = 16 groups of
 * 32, one group per 32-bit lane. Block b (0..7) of a superblock holds, for each lane g, the 4 weights
 * [32g + 4b, 32g + 4b + 4), so one VNNI dot-product instruction (vpdpbusd: 4 u8 x s8 products summed into each
 * 32-bit lane) advances all 16 groups at once, and after 8 blocks lane g holds group g's integer sum.
 * Two blocks share 64 bytes: low nibbles = block i, high nibbles = block i + 4. 5-bit weights add, per block,
 * a 64-bit plane of fifth bits (bit j set = byte j of the block gains 16), expanded with one masked move.
 * AVX2 has no masked byte moves, so its kernel reads the same bits sliced the other way (`fifth_bit_slices`, made
 * once at load): byte t of a superblock's 64 holds, in bit b, the fifth bit of byte t of block b, and block b's
 * fifth bits are one shift and one AND of that vector away.
 * Nibbles, fifth-bit planes, scales and offsets are four separate arrays, each read front to back (measured
 * faster here than one interleaved record per superblock).
 * Per group: weight = d * q + mn (q in 0..15 or 0..31, d and mn fp16); activation = xs * xq (xq int8), so
 * sum(x * w) = d * xs * sum(xq * q) + mn * xs * sum(xq).
 * Decoding reads every weight once per step, so the loop streams the weights with software prefetch.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <immintrin.h>
#include <omp.h>

#define GS 32
#define SB 512
#ifndef PREFETCH
#define PREFETCH 3072
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define ISA 2
#elif defined(__AVX2__) && defined(__FMA__)
#define ISA 1
#else
#define ISA 0
#endif

int i4_isa(void) { return ISA; }


#if ISA == 1
static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}

/* 32 int32 lanes in -128..127 -> 32 bytes in order (the packs interleave 128-bit lanes; one permutation undoes it) */
static inline void store_bytes32(void* out, const __m256i q[4]) {
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256((__m256i*)out, _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}
#endif

static void quantize(const float* x, int M, int K, int8_t* xq, float* xs, float* xsum) {
    const int ng = K / GS;
    for (int m = 0; m < M; m++) {
        const float* xr = x + (size_t)m * K;
        int8_t* qr = xq + (size_t)m * K;
        for (int g = 0; g < ng; g++) {
            const float* v = xr + g * GS;
            const int s = g / 16, lane = g % 16;
#if ISA == 2
            const __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
            const __m512 id = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
            const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, id));  /* round to nearest even, like lrintf */
            const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, id));
            const int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
            int8_t packed[32];
            _mm_storeu_si128((__m128i*)packed, _mm512_cvtsepi32_epi8(qa));
            _mm_storeu_si128((__m128i*)(packed + 16), _mm512_cvtsepi32_epi8(qb));
            for (int blk = 0; blk < 8; blk++) memcpy(qr + s * SB + blk * 64 + lane * 4, packed + blk * 4, 4);
#elif ISA == 1
            const __m256 sign = _mm256_set1_ps(-0.f);
            __m256 a[4];
            for (int j = 0; j < 4; j++) a[j] = _mm256_loadu_ps(v + 8 * j);
            const __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, a[0]), _mm256_andnot_ps(sign, a[1])),
                                           _mm256_max_ps(_mm256_andnot_ps(sign, a[2]), _mm256_andnot_ps(sign, a[3])));
            const float amax = hmax8(mx);
            const __m256 id = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
            __m256i q[4];
            for (int j = 0; j < 4; j++) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(a[j], id));  /* nearest even */
            const __m256i total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
            t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4E));
            t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xB1));
            const int sum = _mm_cvtsi128_si32(t4);
            int8_t packed[32];
            store_bytes32(packed, q);
            for (int blk = 0; blk < 8; blk++) memcpy(qr + s * SB + blk * 64 + lane * 4, packed + blk * 4, 4);
#else
            float amax = 0.f;
            for (int j = 0; j < GS; j++) { const float a = fabsf(v[j]); amax = a > amax ? a : amax; }
            const float id = amax > 0.f ? 127.f / amax : 0.f;
            int sum = 0;
            for (int j = 0; j < GS; j++) {
                const int q = (int)lrintf(v[j] * id);
                sum += q;
                qr[s * SB + (j / 4) * 64 + lane * 4 + (j % 4)] = (int8_t)q;
            }
#endif
            xs[m * ng + g] = amax / 127.f;
            xsum[m * ng + g] = amax / 127.f * (float)sum;
        }
    }
}

#if ISA == 1
/* vpdpbusd in two steps: u8 x s8 products of adjacent bytes summed in 16-bit lanes (no saturation: 2 * 31 * 127
   < 32767), and, every few of those, the 16-bit lanes of each group of 4 bytes summed into its 32-bit lane. The
   sums are exact integers, the same as VNNI's. */
static inline __m256i pairs(__m256i acc16, __m256i u, __m256i s) {
    return _mm256_add_epi16(acc16, _mm256_maddubs_epi16(u, s));
}

static inline __m256i widen(__m256i acc32, __m256i acc16) {
    return _mm256_add_epi32(acc32, _mm256_madd_epi16(acc16, _mm256_set1_epi16(1)));
}

/* 16 in the bytes of block b whose fifth bit is set, from 32 bytes of slices (bit b of each byte): bit b moves to
   bit 4. A 16-bit shift also carries bits across the byte boundary, but only into bits the AND clears. */
static inline __m256i fifth_bits(__m256i slices, int b) {
    const __m256i moved = b <= 4 ? _mm256_slli_epi16(slices, 4 - b) : _mm256_srli_epi16(slices, b - 4);
    return _mm256_and_si256(moved, _mm256_set1_epi8(16));
}
#endif

/* The fifth-bit planes (superblocks of 8 blocks x 8 bytes, bit j of byte i = byte 8i + j of the block) turned into
   slices (superblocks of 64 bytes, bit b of byte t = byte t of block b), the layout the AVX2 kernel reads. */
void fifth_bit_slices(const uint8_t* planes, uint8_t* slices, long superblocks, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : omp_get_max_threads())
    for (long s = 0; s < superblocks; s++) {
        const uint8_t* p = planes + s * 64;
        for (int t = 0; t < 64; t++) {
            uint8_t v = 0;
            for (int b = 0; b < 8; b++) v |= (uint8_t)(((p[8 * b + t / 8] >> (t % 8)) & 1) << b);
            slices[s * 64 + t] = v;
        }
    }
}

#if ISA == 0
/* The portable path: one or two activation rows against one weight row, a byte at a time. */
static void row(const uint8_t* wr, const uint8_t* hr, const uint16_t* dr, const uint16_t* mr, int bits,
                const int8_t* x0, const int8_t* x1, const float* s0, const float* s1, const float* o0,
                const float* o1, int two, int K, float* y0, float* y1) {
    const int ns = K / SB;
    for (int r = 0; r <= two; r++) {
        const int8_t* xr = r ? x1 : x0;
        const float* sr = r ? s1 : s0;
        const float* orr = r ? o1 : o0;
        float acc = 0.f;
        for (int s = 0; s < ns; s++) {
            const uint8_t* wb = wr + s * (SB / 2);
            const uint8_t* hb = hr + s * 64;
            int32_t lane[16] = {0};
            for (int i = 0; i < 4; i++)
                for (int byte = 0; byte < 64; byte++) {
                    const uint8_t b = wb[64 * i + byte];
                    int lo = b & 15, hi = b >> 4;
                    if (bits == 5) {
                        lo |= ((hb[8 * i + byte / 8] >> (byte % 8)) & 1) << 4;
                        hi |= ((hb[8 * (i + 4) + byte / 8] >> (byte % 8)) & 1) << 4;
                    }
                    lane[byte / 4] += lo * xr[s * SB + 64 * i + byte] + hi * xr[s * SB + 64 * (i + 4) + byte];
                }
            for (int g = 0; g < 16; g++)
                acc += _cvtsh_ss(dr[s * 16 + g]) * sr[s * 16 + g] * (float)lane[g]
                     + _cvtsh_ss(mr[s * 16 + g]) * orr[s * 16 + g];
        }
        *(r ? y1 : y0) = acc;
    }
}
#endif

/* Activation rows a weight row is unpacked for at once: each row needs an integer and a float accumulator in
   registers, so AVX-512's 32 registers take eight rows (four listeners with guidance) and AVX2's 16 take four. */
#if ISA == 2
#define MAXR 8
#else
#define MAXR 4
#endif

#if ISA == 2
/* Up to MAXR activation rows against one weight row: the weights are unpacked once for all of them (a batch of
   four listeners with guidance costs one unpacking, not two). Each row keeps its own accumulators and order of
   operations, so its result does not depend on which rows share the call. */
static inline __attribute__((always_inline)) void row_block(
        const uint8_t* wr, const uint8_t* hr, const uint16_t* dr, const uint16_t* mr, int bits, int nr,
        const int8_t* const* x, const float* const* sc, const float* const* of, int K, float* y) {
    const int ns = K / SB;
    const __m512i low = _mm512_set1_epi8(0x0F);
    const __m512i sixteen = _mm512_set1_epi8(16);
    __m512 f[MAXR];
    for (int r = 0; r < nr; r++) f[r] = _mm512_setzero_ps();
    for (int s = 0; s < ns; s++) {
        const uint8_t* wb = wr + s * (SB / 2);
        const uint8_t* hb = hr + s * 64;
        for (int p = 0; p < 256; p += 64) _mm_prefetch((const char*)(wb + PREFETCH + p), _MM_HINT_T0);
        if (bits == 5) _mm_prefetch((const char*)(hb + PREFETCH / 4), _MM_HINT_T0);
        __m512i a[MAXR];
        for (int r = 0; r < nr; r++) a[r] = _mm512_setzero_si512();
        for (int i = 0; i < 4; i++) {
            const __m512i b = _mm512_loadu_si512((const void*)(wb + 64 * i));
            __m512i lo = _mm512_and_si512(b, low);
            __m512i hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
            if (bits == 5) {
                /* the plane loads straight into a mask register; one masked byte add sets the fifth bit */
                lo = _mm512_mask_add_epi8(lo, _load_mask64((__mmask64*)(hb + 8 * i)), lo, sixteen);
                hi = _mm512_mask_add_epi8(hi, _load_mask64((__mmask64*)(hb + 8 * (i + 4))), hi, sixteen);
            }
            for (int r = 0; r < nr; r++) {
                const int8_t* xb = x[r] + s * SB;
                a[r] = _mm512_dpbusd_epi32(a[r], lo, _mm512_loadu_si512((const void*)(xb + 64 * i)));
                a[r] = _mm512_dpbusd_epi32(a[r], hi, _mm512_loadu_si512((const void*)(xb + 64 * (i + 4))));
            }
        }
        const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(dr + s * 16)));
        const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(mr + s * 16)));
        for (int r = 0; r < nr; r++) {
            f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[r]), _mm512_mul_ps(dv, _mm512_loadu_ps(sc[r] + s * 16)), f[r]);
            f[r] = _mm512_fmadd_ps(mv, _mm512_loadu_ps(of[r] + s * 16), f[r]);
        }
    }
    for (int r = 0; r < nr; r++) y[r] = _mm512_reduce_add_ps(f[r]);
}
#elif ISA == 1
/* The same on AVX2: 32 bytes at a time, so each superblock is two halves of 8 groups; vpdpbusd is vpmaddubsw
   (pairs into 16 bits) and, every four of those, vpmaddwd (into each group's 32-bit lane). */
static inline __attribute__((always_inline)) void row_block(
        const uint8_t* wr, const uint8_t* hr, const uint16_t* dr, const uint16_t* mr, int bits, int nr,
        const int8_t* const* x, const float* const* sc, const float* const* of, int K, float* y) {
    const int ns = K / SB;
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256 f[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int s = 0; s < ns; s++) {
        const uint8_t* wb = wr + s * (SB / 2);
        const uint8_t* hb = hr + s * 64;
        for (int p = 0; p < 256; p += 64) _mm_prefetch((const char*)(wb + PREFETCH + p), _MM_HINT_T0);
        if (bits == 5) _mm_prefetch((const char*)(hb + PREFETCH / 4), _MM_HINT_T0);
        for (int half = 0; half < 2; half++) { /* lanes 0-7, then 8-15 */
            __m256i a[4], p16[4];
            for (int r = 0; r < nr; r++) a[r] = p16[r] = _mm256_setzero_si256();
            const __m256i slices = bits == 5 ? _mm256_loadu_si256((const __m256i*)(hb + 32 * half))
                                             : _mm256_setzero_si256();
            for (int i = 0; i < 4; i++) {
                const __m256i b = _mm256_loadu_si256((const __m256i*)(wb + 64 * i + 32 * half));
                __m256i lo = _mm256_and_si256(b, low);
                __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
                if (bits == 5) {
                    lo = _mm256_or_si256(lo, fifth_bits(slices, i));
                    hi = _mm256_or_si256(hi, fifth_bits(slices, i + 4));
                }
                for (int r = 0; r < nr; r++) {
                    const int8_t* xb = x[r] + s * SB + 32 * half;
                    p16[r] = pairs(p16[r], lo, _mm256_loadu_si256((const __m256i*)(xb + 64 * i)));
                    p16[r] = pairs(p16[r], hi, _mm256_loadu_si256((const __m256i*)(xb + 64 * (i + 4))));
                    if (i & 1) {  /* four products per 16-bit lane: 4 * 2 * 31 * 127 = 31,496 still fits */
                        a[r] = widen(a[r], p16[r]);
                        p16[r] = _mm256_setzero_si256();
                    }
                }
            }
            const int off = s * 16 + 8 * half;
            const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(dr + off)));
            const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(mr + off)));
            for (int r = 0; r < nr; r++) {
                f[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r]), _mm256_mul_ps(dv, _mm256_loadu_ps(sc[r] + off)), f[r]);
                f[r] = _mm256_fmadd_ps(mv, _mm256_loadu_ps(of[r] + off), f[r]);
            }
        }
    }
    for (int r = 0; r < nr; r++) {
        float t[8];
        _mm256_storeu_ps(t, f[r]);
        y[r] = t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
    }
}
#endif

typedef struct {
    const uint8_t* w;    /* nibbles (N, K/2) */
    const uint8_t* hb;   /* fifth-bit planes (N, K/8), sliced on AVX2; NULL for 4 bits */
    const uint16_t* d;   /* fp16 scales (N, K/32) */
    const uint16_t* mn;  /* fp16 offsets (N, K/32) */
} packed_t;

enum { ACT_NONE = 0, ACT_GELU = 1 };

static inline float gelu(float v) { return 0.5f * v * (1.f + erff(v * 0.70710678118654752f)); }

#if ISA == 2
static inline __m512 exp_nonpositive(__m512 x);

/* GELU on 16 lanes: erf from Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7, below fp32 rounding of the
   result). The scalar erff cost ~18 ns an element: 1.8 ms per row and step over MusicGen-small's feed-forward
   blocks, a fifth of a whole step. */
static inline __m512 gelu16(__m512 v) {
    const __m512 x = _mm512_mul_ps(_mm512_abs_ps(v), _mm512_set1_ps(0.70710678118654752f));
    const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), x,
                                                                      _mm512_set1_ps(1.f)));
    __m512 poly = _mm512_set1_ps(1.061405429f);
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-1.453152027f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
    poly = _mm512_mul_ps(poly, t);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(x, x)));
    __m512 erf = _mm512_fnmadd_ps(poly, e, _mm512_set1_ps(1.f));  /* erf(|v| / sqrt 2) */
    const __mmask16 negative = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ);
    erf = _mm512_mask_sub_ps(erf, negative, _mm512_setzero_ps(), erf);
    return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v), _mm512_add_ps(_mm512_set1_ps(1.f), erf));
}
#endif

#if ISA == 1
/* e^x for x <= 0, 8 lanes: the same reduction and polynomial as the AVX-512 one; 2^n built in the exponent bits */
static inline __m256 exp8_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.f / 720.f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* GELU on 8 lanes, as gelu16 (the scalar erff was a fifth of a step on AVX-512 machines, more here) */
static inline __m256 gelu8(__m256 v) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    const __m256 x = _mm256_mul_ps(_mm256_andnot_ps(sign, v), _mm256_set1_ps(0.70710678118654752f));
    const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), x,
                                                                      _mm256_set1_ps(1.f)));
    __m256 poly = _mm256_set1_ps(1.061405429f);
    poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(-1.453152027f));
    poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(1.421413741f));
    poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(-0.284496736f));
    poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(0.254829592f));
    poly = _mm256_mul_ps(poly, t);
    const __m256 e = exp8_nonpositive(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(x, x)));
    __m256 erf = _mm256_fnmadd_ps(poly, e, _mm256_set1_ps(1.f));  /* erf(|v| / sqrt 2) */
    erf = _mm256_xor_ps(erf, _mm256_and_ps(v, sign));             /* odd: the sign of v */
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), v), _mm256_add_ps(_mm256_set1_ps(1.f), erf));
}
#endif

/* y[0 .. n) = gelu(y) */
static void gelu_inplace(float* y, size_t n, int threads) {
    const long blocks = (long)((n + 255) / 256);
    #pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : omp_get_max_threads())
    for (long b = 0; b < blocks; b++) {
        const size_t start = (size_t)b * 256, end = start + 256 < n ? start + 256 : n;
        size_t i = start;
#if ISA == 2
        for (; i + 16 <= end; i += 16) _mm512_storeu_ps(y + i, gelu16(_mm512_loadu_ps(y + i)));
#elif ISA == 1
        for (; i + 8 <= end; i += 8) _mm256_storeu_ps(y + i, gelu8(_mm256_loadu_ps(y + i)));
#endif
        for (; i < end; i++) y[i] = gelu(y[i]);
    }
}

/* y (M, N) = act(x (M, K) @ W.T) [+ add (M, N)]; `add` may alias y. Returns 0 or -1 (out of memory). */
static int matmul(const float* x, int M, int K, const packed_t* W, float* y, int N, const float* add, int act,
                  int threads) {
    if (act == ACT_GELU && !add) {  /* the activation in one vectorised pass afterwards */
        const int status = matmul(x, M, K, W, y, N, NULL, ACT_NONE, threads);
        if (status == 0) gelu_inplace(y, (size_t)M * N, threads);
        return status;
    }
    const int ng = K / GS;
    int8_t* xq = (int8_t*)aligned_alloc(64, ((size_t)M * K + 63) / 64 * 64);
    float* xs = (float*)malloc(sizeof(float) * (size_t)M * ng);
    float* xsum = (float*)malloc(sizeof(float) * (size_t)M * ng);
    if (!xq || !xs || !xsum) { free(xq); free(xs); free(xsum); return -1; }
    quantize(x, M, K, xq, xs, xsum);
    #pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : omp_get_max_threads())
    for (int n = 0; n < N; n++) {
        const uint8_t* wr = W->w + (size_t)n * (K / 2);
        const uint8_t* hr = W->hb ? W->hb + (size_t)n * (K / 8) : NULL;
        const uint16_t* dr = W->d + (size_t)n * ng;
        const uint16_t* mr = W->mn + (size_t)n * ng;
#if ISA >= 1
        for (int m0 = 0; m0 < M; m0 += MAXR) {
            const int nr = M - m0 < MAXR ? M - m0 : MAXR;
            const int8_t* xr[MAXR];
            const float* sr[MAXR];
            const float* orr[MAXR];
            for (int r = 0; r < nr; r++) {
                xr[r] = xq + (size_t)(m0 + r) * K;
                sr[r] = xs + (size_t)(m0 + r) * ng;
                orr[r] = xsum + (size_t)(m0 + r) * ng;
            }
            float v[MAXR];
            /* constant row counts and widths, so each combination gets its own unrolled loop */
#define ROWS_CASE(n) case n: if (hr) row_block(wr, hr, dr, mr, 5, n, xr, sr, orr, K, v); \
                             else row_block(wr, hr, dr, mr, 4, n, xr, sr, orr, K, v); break;
            switch (nr) {
                ROWS_CASE(1) ROWS_CASE(2) ROWS_CASE(3)
#if MAXR > 4
                ROWS_CASE(5) ROWS_CASE(6) ROWS_CASE(7) ROWS_CASE(8)
#endif
                default: ROWS_CASE(4)
            }
#undef ROWS_CASE
            for (int r = 0; r < nr; r++) {
                float value = v[r];
                if (act == ACT_GELU) value = gelu(value);
                const size_t at = (size_t)(m0 + r) * N + n;
                y[at] = add ? add[at] + value : value;
            }
        }
#else
        for (int m0 = 0; m0 < M; m0 += 2) {
            const int two = m0 + 1 < M;
            const int8_t* x0 = xq + (size_t)m0 * K;
            const float* s0 = xs + (size_t)m0 * ng;
            const float* o0 = xsum + (size_t)m0 * ng;
            float v0 = 0.f, v1 = 0.f;
            if (hr)
                row(wr, hr, dr, mr, 5, x0, two ? x0 + K : x0, s0, two ? s0 + ng : s0, o0, two ? o0 + ng : o0, two,
                    K, &v0, &v1);
            else
                row(wr, hr, dr, mr, 4, x0, two ? x0 + K : x0, s0, two ? s0 + ng : s0, o0, two ? o0 + ng : o0, two,
                    K, &v0, &v1);
            for (int r = 0; r <= two; r++) {
                float v = r ? v1 : v0;
                if (act == ACT_GELU) v = gelu(v);
                const size_t at = (size_t)(m0 + r) * N + n;
                y[at] = add ? add[at] + v : v;
            }
        }
#endif
    }
    free(xq); free(xs); free(xsum);
    return 0;
}

/* x (M, K) fp32; W: nibbles w (N, K/2), fifth-bit planes hb (N, K/8, sliced on AVX2, NULL for 4 bits), scales d
   and offsets mn (N, K/32, fp16) -> y (M, N) fp32, using `threads` threads (0: the OpenMP default). K is a
   multiple of 512.
   Returns 0, or -1 when scratch memory could not be allocated. */
int i4_linear(const float* x, int M, int K, const uint8_t* w, const uint8_t* hb, const uint16_t* d,
              const uint16_t* mn, float* y, int N, int threads) {
    const packed_t W = {w, hb, d, mn};
    return matmul(x, M, K, &W, y, N, NULL, ACT_NONE, threads);
}

/* ---- one MusicGen decoder layer for one position, in place on the residual stream ----------------------------
 * Pre-norm self-attention over the KV cache (int8, (B, H, T, Dh)), cross-attention of row 0 only over the text's
 * keys and values (fp32, (H, Tt, Dh)) — the unconditional row of classifier-free guidance attends to nothing and
 * gets exactly zero — and a GELU feed-forward block. Mirrors transformers' MusicgenDecoderLayer (eval mode).
 */
static void layer_norm(const float* x, float* y, int D, const float* w, const float* b, float eps) {
    double mean = 0.0, var = 0.0;
    for (int i = 0; i < D; i++) mean += x[i];
    mean /= D;
    for (int i = 0; i < D; i++) { const double c = x[i] - mean; var += c * c; }
    const float inv = (float)(1.0 / sqrt(var / D + eps));
    for (int i = 0; i < D; i++) y[i] = (float)(x[i] - mean) * inv * w[i] + b[i];
}

/* the KV cache holds int8 vectors with one fp32 scale per (row, head, position): half of bf16's bytes, which
   matters because attention reads the whole cache every step */
static inline float quantize_vector(const float* v, int8_t* q, int dh) {
    float amax = 0.f;
#if ISA == 2
    if (dh % 16 == 0) {  /* the same values as the scalar loop: cvtps rounds to nearest even, like lrintf */
        __m512 m = _mm512_setzero_ps();
        for (int i = 0; i < dh; i += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(v + i)));
        amax = _mm512_reduce_max_ps(m);
        const __m512 id = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        for (int i = 0; i < dh; i += 16)
            _mm_storeu_si128((__m128i*)(q + i), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(
                _mm512_mul_ps(_mm512_loadu_ps(v + i), id))));
        return amax / 127.f;
    }
#elif ISA == 1
    if (dh % 8 == 0) {
        const __m256 sign = _mm256_set1_ps(-0.f);
        __m256 m = _mm256_setzero_ps();
        for (int i = 0; i < dh; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + i)));
        amax = hmax8(m);
        const __m256 id = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        for (int i = 0; i < dh; i += 8) {
            const __m256i q32 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + i), id));
            const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q32), _mm256_extracti128_si256(q32, 1));
            _mm_storel_epi64((__m128i*)(q + i), _mm_packs_epi16(q16, q16));
        }
        return amax / 127.f;
    }
#endif
    for (int i = 0; i < dh; i++) { const float a = fabsf(v[i]); amax = a > amax ? a : amax; }
    const float id = amax > 0.f ? 127.f / amax : 0.f;
    for (int i = 0; i < dh; i++) q[i] = (int8_t)lrintf(v[i] * id);
    return amax / 127.f;
}

static inline void axpy_i8(float p, const int8_t* v, float* out, int dh) {
#if ISA == 2
    if (dh % 16 == 0) {
        const __m512 pv = _mm512_set1_ps(p);
        for (int i = 0; i < dh; i += 16) {
            const __m512 vv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(v + i))));
            _mm512_storeu_ps(out + i, _mm512_fmadd_ps(pv, vv, _mm512_loadu_ps(out + i)));
        }
        return;
    }
#elif ISA == 1
    if (dh % 8 == 0) {
        const __m256 pv = _mm256_set1_ps(p);
        for (int i = 0; i < dh; i += 8) {
            const __m256 vv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(v + i))));
            _mm256_storeu_ps(out + i, _mm256_fmadd_ps(pv, vv, _mm256_loadu_ps(out + i)));
        }
        return;
    }
#endif
    for (int i = 0; i < dh; i++) out[i] += p * (float)v[i];
}

#if ISA == 2
/* e^x for x <= 0, 16 lanes: Cody-Waite range reduction and a degree-6 polynomial (relative error ~1e-7) */
static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.f / 720.f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}
#endif

/* Keys live in blocks of 16 positions, (Dh/4, 16, 4) bytes each: for every 4 dimensions, 16 positions' 4 bytes side
   by side. One VNNI dot-product instruction then gives 16 positions' partial scores for 4 dimensions, reading 64
   contiguous bytes (the transposed (Dh, T) layout this replaces read 16 bytes from each of Dh rows Tmax apart, and
   a position's key was 64 single-byte writes as far apart). Keys are stored offset to unsigned (k + 128), the
   operand vpdpbusd multiplies unsigned; the query is quantized to int8 per head, so a score is an exact integer
   sum(q8 * (k + 128)) - 128 * sum(q8) times the two scales: exact integers, so every ISA path gets the same scores
   up to the float scaling. */
#define KB 16
static inline size_t key_block_bytes(int dh) { return (size_t)KB * dh; }
static inline int padded_length(int tmax) { return (tmax + KB - 1) / KB * KB; }

static inline void store_key(uint8_t* keys, int pos, const int8_t* key, int dh) {
    uint8_t* block = keys + (size_t)(pos / KB) * key_block_bytes(dh) + (pos % KB) * 4;
    for (int i = 0; i < dh; i++) block[(i / 4) * KB * 4 + (i % 4)] = (uint8_t)(key[i] + 128);
}

/* Self-attention of one head over its int8 cache: keys in blocks (above), values (Tmax, Dh); one fp32 scale per
   position for each. `scores` holds at least T rounded up to 16 floats. */
static void attend_cache(const float* q, const uint8_t* keys, const int8_t* values, const float* k_scale,
                         const float* v_scale, int T, int dh, float* scores, float* out) {
    int8_t q8[256];
    const float qs = quantize_vector(q, q8, dh);
    int qsum = 0;
    for (int i = 0; i < dh; i++) qsum += q8[i];
    const float scale = qs / sqrtf((float)dh);
    const size_t bb = key_block_bytes(dh);
    float top = -INFINITY;
    int b0 = 0;
#if ISA == 2
    if (dh % 16 == 0) {
        int32_t q32[64];
        memcpy(q32, q8, (size_t)dh);
        const __m512i bias = _mm512_set1_epi32(128 * qsum);
        for (const int blocks = (T + KB - 1) / KB; b0 < blocks; b0++) {
            const uint8_t* kb = keys + (size_t)b0 * bb;
            __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
            for (int g = 0; g < dh / 4; g += 4) {  /* four independent chains: the instruction's latency hides */
                a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512((const void*)(kb + 64 * g)), _mm512_set1_epi32(q32[g]));
                a1 = _mm512_dpbusd_epi32(a1, _mm512_loadu_si512((const void*)(kb + 64 * (g + 1))),
                                         _mm512_set1_epi32(q32[g + 1]));
                a2 = _mm512_dpbusd_epi32(a2, _mm512_loadu_si512((const void*)(kb + 64 * (g + 2))),
                                         _mm512_set1_epi32(q32[g + 2]));
                a3 = _mm512_dpbusd_epi32(a3, _mm512_loadu_si512((const void*)(kb + 64 * (g + 3))),
                                         _mm512_set1_epi32(q32[g + 3]));
            }
            const __m512i dot = _mm512_sub_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)),
                                                 bias);
            __m512 s = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(scale)),
                                     _mm512_loadu_ps(k_scale + b0 * KB));
            const int valid = T - b0 * KB;
            if (valid < KB)  /* positions past T hold stale bytes: out of the softmax */
                s = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), (__mmask16)((1u << valid) - 1), s);
            _mm512_storeu_ps(scores + b0 * KB, s);
            const float m = _mm512_reduce_max_ps(s);
            top = m > top ? m : top;
        }
    }
#elif ISA == 1
    if (dh % 8 == 0) {
        /* No unsigned x signed instruction that cannot saturate here ((k + 128) * q pairs reach 64,770), so keys go
           back to signed (flip the top bit) and the sign moves onto them: |q| * (sign(q) k), pairs <= 2 * 127 * 127
           fit 16 bits. The sum is the same exact integer sum(q8 * k8) as on the other paths. */
        int32_t q32[64];
        memcpy(q32, q8, (size_t)dh);
        const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
        __m256 top8 = _mm256_set1_ps(-INFINITY);
        for (const int blocks = (T + KB - 1) / KB; b0 < blocks; b0++) {
            const uint8_t* kb = keys + (size_t)b0 * bb;
            __m256i a0 = _mm256_setzero_si256(), a1 = a0, c0 = a0, c1 = a0;  /* positions 0-7 and 8-15, two chains */
            for (int g = 0; g < dh / 4; g += 2) {
                const __m256i qa = _mm256_set1_epi32(q32[g]), qb = _mm256_set1_epi32(q32[g + 1]);
                const __m256i ua = _mm256_abs_epi8(qa), ub = _mm256_abs_epi8(qb);
                const __m256i* k = (const __m256i*)(kb + 64 * g);
                a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_maddubs_epi16(ua,
                         _mm256_sign_epi8(_mm256_xor_si256(_mm256_loadu_si256(k), flip), qa)), ones));
                c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(_mm256_maddubs_epi16(ua,
                         _mm256_sign_epi8(_mm256_xor_si256(_mm256_loadu_si256(k + 1), flip), qa)), ones));
                a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(_mm256_maddubs_epi16(ub,
                         _mm256_sign_epi8(_mm256_xor_si256(_mm256_loadu_si256(k + 2), flip), qb)), ones));
                c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(_mm256_maddubs_epi16(ub,
                         _mm256_sign_epi8(_mm256_xor_si256(_mm256_loadu_si256(k + 3), flip), qb)), ones));
            }
            const __m256 sc = _mm256_set1_ps(scale);
            __m256 s0 = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a0, a1)), sc),
                                      _mm256_loadu_ps(k_scale + b0 * KB));
            __m256 s1 = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(c0, c1)), sc),
                                      _mm256_loadu_ps(k_scale + b0 * KB + 8));
            const int valid = T - b0 * KB;
            if (valid < KB) {  /* positions past T hold stale bytes: out of the softmax */
                const __m256i at = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                const __m256 inf = _mm256_set1_ps(-INFINITY);
                s0 = _mm256_blendv_ps(inf, s0, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(valid), at)));
                s1 = _mm256_blendv_ps(inf, s1, _mm256_castsi256_ps(
                    _mm256_cmpgt_epi32(_mm256_set1_epi32(valid - 8), at)));
            }
            _mm256_storeu_ps(scores + b0 * KB, s0);
            _mm256_storeu_ps(scores + b0 * KB + 8, s1);
            top8 = _mm256_max_ps(top8, _mm256_max_ps(s0, s1));
        }
        top = hmax8(top8);
    }
#endif
    for (int t = b0 * KB; t < T; t++) {
        const uint8_t* kb = keys + (size_t)(t / KB) * bb + (t % KB) * 4;
        int dot = 0;
        for (int i = 0; i < dh; i++) dot += q8[i] * (int)kb[(i / 4) * KB * 4 + (i % 4)];
        scores[t] = (float)(dot - 128 * qsum) * scale * k_scale[t];
        top = scores[t] > top ? scores[t] : top;
    }
    float total = 0.f;
    int t0 = 0;
#if ISA == 2
    __m512 sum = _mm512_setzero_ps();
    for (; t0 + 16 <= T; t0 += 16) {
        const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(scores + t0), _mm512_set1_ps(top)));
        _mm512_storeu_ps(scores + t0, e);
        sum = _mm512_add_ps(sum, e);
    }
    total = _mm512_reduce_add_ps(sum);
#elif ISA == 1
    __m256 sum = _mm256_setzero_ps();
    for (; t0 + 8 <= T; t0 += 8) {
        const __m256 e = exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + t0), _mm256_set1_ps(top)));
        _mm256_storeu_ps(scores + t0, e);
        sum = _mm256_add_ps(sum, e);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, sum);
    for (int i = 0; i < 8; i++) total += lanes[i];
#endif
    for (int t = t0; t < T; t++) {
        scores[t] = expf(scores[t] - top);
        total += scores[t];
    }
    const float norm = 1.f / total;
#if ISA == 2
    if (dh % 64 == 0) {  /* 64 dimensions at a time in registers, two positions at a time so the chains overlap */
        for (int d0 = 0; d0 < dh; d0 += 64) {
            __m512 o[2][4];
            for (int j = 0; j < 2; j++)
                for (int c = 0; c < 4; c++) o[j][c] = _mm512_setzero_ps();
            int t = 0;
            for (; t + 2 <= T; t += 2)
                for (int j = 0; j < 2; j++) {
                    const __m512 p = _mm512_set1_ps(scores[t + j] * norm * v_scale[t + j]);
                    const __m512i v = _mm512_loadu_si512((const void*)(values + (size_t)(t + j) * dh + d0));
                    o[j][0] = _mm512_fmadd_ps(p, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_castsi512_si128(v))), o[j][0]);
                    o[j][1] = _mm512_fmadd_ps(p, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 1))), o[j][1]);
                    o[j][2] = _mm512_fmadd_ps(p, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 2))), o[j][2]);
                    o[j][3] = _mm512_fmadd_ps(p, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 3))), o[j][3]);
                }
            for (; t < T; t++) {
                const __m512 p = _mm512_set1_ps(scores[t] * norm * v_scale[t]);
                const __m512i v = _mm512_loadu_si512((const void*)(values + (size_t)t * dh + d0));
                o[0][0] = _mm512_fmadd_ps(p, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_castsi512_si128(v))), o[0][0]);
                o[0][1] = _mm512_fmadd_ps(p, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 1))), o[0][1]);
                o[0][2] = _mm512_fmadd_ps(p, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 2))), o[0][2]);
                o[0][3] = _mm512_fmadd_ps(p, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(v, 3))), o[0][3]);
            }
            for (int c = 0; c < 4; c++) _mm512_storeu_ps(out + d0 + 16 * c, _mm512_add_ps(o[0][c], o[1][c]));
        }
        return;
    }
#elif ISA == 1
    if (dh % 32 == 0) {  /* 32 dimensions at a time in registers */
        for (int d0 = 0; d0 < dh; d0 += 32) {
            __m256 o0 = _mm256_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
            for (int t = 0; t < T; t++) {
                const __m256 p = _mm256_set1_ps(scores[t] * norm * v_scale[t]);
                const __m256i v = _mm256_loadu_si256((const __m256i*)(values + (size_t)t * dh + d0));
                const __m128i v0 = _mm256_castsi256_si128(v), v1 = _mm256_extracti128_si256(v, 1);
                o0 = _mm256_fmadd_ps(p, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v0)), o0);
                o1 = _mm256_fmadd_ps(p, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v0, 8))), o1);
                o2 = _mm256_fmadd_ps(p, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v1)), o2);
                o3 = _mm256_fmadd_ps(p, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v1, 8))), o3);
            }
            _mm256_storeu_ps(out + d0, o0);
            _mm256_storeu_ps(out + d0 + 8, o1);
            _mm256_storeu_ps(out + d0 + 16, o2);
            _mm256_storeu_ps(out + d0 + 24, o3);
        }
        return;
    }
#endif
    for (int i = 0; i < dh; i++) out[i] = 0.f;
    for (int t = 0; t < T; t++) axpy_i8(scores[t] * norm * v_scale[t], values + (size_t)t * dh, out, dh);
}

/* softmax(q . k_t / sqrt(dh)) . v_t over t < T for one head, fp32 keys and values (the text's, for
   cross-attention); `valid` (optional) masks positions out. */
static void attend(const float* q, const float* keys, const float* values, int T, int dh, const uint8_t* valid,
                   float* scores, float* out) {
    const float scale = 1.f / sqrtf((float)dh);
    float top = -INFINITY;
    for (int t = 0; t < T; t++) {
        if (valid && !valid[t]) { scores[t] = -INFINITY; continue; }
        float dot = 0.f;
        const float* k = keys + (size_t)t * dh;
        for (int i = 0; i < dh; i++) dot += q[i] * k[i];
        scores[t] = dot * scale;
        top = scores[t] > top ? scores[t] : top;
    }
    for (int i = 0; i < dh; i++) out[i] = 0.f;
    if (top == -INFINITY) return;  /* nothing to attend to: zero, as a fully masked softmax over zero values */
    float total = 0.f;
    for (int t = 0; t < T; t++) {
        const float p = scores[t] == -INFINITY ? 0.f : expf(scores[t] - top);
        scores[t] = p;
        total += p;
    }
    const float norm = 1.f / total;
    for (int t = 0; t < T; t++) {
        const float p = scores[t] * norm;
        if (p == 0.f) continue;
        const float* v = values + (size_t)t * dh;
        for (int i = 0; i < dh; i++) out[i] += p * v[i];
    }
}

/* One row's KV cache for one layer: keys (H, Tpad / 16, Dh / 4, 16, 4) unsigned (see attend_cache), values
   (H, Tmax, Dh) int8, fp32 scales (H, Tpad) for keys and (H, Tmax) for values, Tpad = Tmax rounded up to 16. Every row of a step (a listener's conditional or unconditional stream, or a window being
   prefilled) has its own, with its own length and position, so no row's result depends on the others. */
typedef struct {
    uint8_t* k;
    int8_t* v;
    float* ks;
    float* vs;
} cache_t;

/* The text's keys and values for one layer's cross-attention: (H, Tt, Dh) fp32 each. */
typedef struct {
    const float* k;
    const float* v;
} cross_t;

typedef struct {
    packed_t weights[6];
    const float* norms[6];
} layer_t;

/* rows_t: per row b, its caches (one cache_t per layer), cache length, position, and text (one cross_t per layer,
   NULL for the unconditional row of classifier-free guidance, which attends to nothing and gets exactly zero),
   the text's length and valid-token mask. */
typedef struct {
    const cache_t* const* cache;
    const int* tmax;
    const int* pos;
    const cross_t* const* cross;
    const int* tt;
    const uint8_t* const* valid;
} rows_t;

/* weights[6]: qkv (3D x D), out (D x D), cross_q (D x D), cross_out (D x D), fc1 (F x D), fc2 (D x F).
   norms[6]: ln1 w, b, ln2 w, b, ln3 w, b. x: (B, D), updated; row b writes its key and value at its position and
   attends to positions <= it (dh <= 256). Returns 0 or -1 (out of memory). */
static int mg_layer(float* x, int B, int D, int H, int F, const layer_t* L, int l, const rows_t* R, float eps,
                    int threads) {
    const int dh = D / H;
    const int nthreads = threads > 0 ? threads : omp_get_max_threads();
    int span = 1, nc = 0;
    for (int b = 0; b < B; b++) {
        span = R->pos[b] + 1 > span ? R->pos[b] + 1 : span;
        if (R->cross[b]) { nc++; span = R->tt[b] > span ? R->tt[b] : span; }
    }
    float* y = (float*)malloc(sizeof(float) * (size_t)B * (F > 3 * D ? F : 3 * D));
    float* qkv = (float*)malloc(sizeof(float) * (size_t)B * 3 * D);
    float* attn = (float*)malloc(sizeof(float) * (size_t)B * D);
    span = padded_length(span);  /* attention scores whole blocks of 16 positions */
    float* scores = (float*)malloc(sizeof(float) * (size_t)nthreads * span);
    int* crow = (int*)malloc(sizeof(int) * (size_t)(B > 0 ? B : 1));
    if (!y || !qkv || !attn || !scores || !crow) {
        free(y); free(qkv); free(attn); free(scores); free(crow); return -1;
    }
    const packed_t* weights = L->weights;
    const float* const* norms = L->norms;
    int status = 0;

    /* self-attention */
    for (int b = 0; b < B; b++) layer_norm(x + (size_t)b * D, y + (size_t)b * D, D, norms[0], norms[1], eps);
    status |= matmul(y, B, D, &weights[0], qkv, 3 * D, NULL, ACT_NONE, threads);
    /* every row's key and value first, then attention: rows that share a cache (a window's prompt prefilled
       several positions at a time) see each other's positions below their own */
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int bh = 0; bh < B * H; bh++) {
        const int b = bh / H, h = bh % H;
        const cache_t* c = &R->cache[b][l];
        const int tmax = R->tmax[b], tpad = padded_length(tmax), pos = R->pos[b];
        const float* q = qkv + (size_t)b * 3 * D + h * dh;
        int8_t key[256];
        c->ks[(size_t)h * tpad + pos] = quantize_vector(q + D, key, dh);
        store_key(c->k + (size_t)h * tpad * dh, pos, key, dh);
        c->vs[(size_t)h * tmax + pos] = quantize_vector(q + 2 * D, c->v + ((size_t)h * tmax + pos) * dh, dh);
    }
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int bh = 0; bh < B * H; bh++) {
        const int b = bh / H, h = bh % H;
        const cache_t* c = &R->cache[b][l];
        const int tmax = R->tmax[b], tpad = padded_length(tmax), pos = R->pos[b];
        attend_cache(qkv + (size_t)b * 3 * D + h * dh, c->k + (size_t)h * tpad * dh, c->v + (size_t)h * tmax * dh,
                     c->ks + (size_t)h * tpad, c->vs + (size_t)h * tmax, pos + 1, dh,
                     scores + (size_t)omp_get_thread_num() * span, attn + (size_t)b * D + h * dh);
    }
    status |= matmul(attn, B, D, &weights[1], x, D, x, ACT_NONE, threads);

    /* cross-attention, for the rows that have a text (gathered, then added back to their rows) */
    if (nc) {
        for (int b = 0, j = 0; b < B; b++)
            if (R->cross[b]) {
                crow[j] = b;
                layer_norm(x + (size_t)b * D, y + (size_t)j * D, D, norms[2], norms[3], eps);
                j++;
            }
        status |= matmul(y, nc, D, &weights[2], qkv, D, NULL, ACT_NONE, threads);
        #pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int jh = 0; jh < nc * H; jh++) {
            const int j = jh / H, h = jh % H, b = crow[j];
            const cross_t* t = &R->cross[b][l];
            const int tt = R->tt[b];
            attend(qkv + (size_t)j * D + h * dh, t->k + (size_t)h * tt * dh, t->v + (size_t)h * tt * dh, tt, dh,
                   R->valid[b], scores + (size_t)omp_get_thread_num() * span, attn + (size_t)j * D + h * dh);
        }
        status |= matmul(attn, nc, D, &weights[3], y, D, NULL, ACT_NONE, threads);
        for (int j = 0; j < nc; j++) {
            float* xr = x + (size_t)crow[j] * D;
            const float* add = y + (size_t)j * D;
            for (int i = 0; i < D; i++) xr[i] = xr[i] + add[i];
        }
    }

    /* feed-forward */
    for (int b = 0; b < B; b++) layer_norm(x + (size_t)b * D, attn + (size_t)b * D, D, norms[4], norms[5], eps);
    status |= matmul(attn, B, D, &weights[4], y, F, NULL, ACT_GELU, threads);
    status |= matmul(y, B, F, &weights[5], x, D, x, ACT_NONE, threads);

    free(y); free(qkv); free(attn); free(scores); free(crow);
    return status ? -1 : 0;
}

/* All decoder layers for one step of B rows in one call (saves a foreign call per layer). */
int mg_layers(float* x, int B, int D, int H, int F, const layer_t* layers, int n_layers, float eps,
              const cache_t* const* cache, const int* tmax, const int* pos, const cross_t* const* cross, const int* tt,
              const uint8_t* const* valid, int threads) {
    const rows_t R = {cache, tmax, pos, cross, tt, valid};
    for (int l = 0; l < n_layers; l++)
        if (mg_layer(x, B, D, H, F, &layers[l], l, &R, eps, threads) != 0) return -1;
    return 0;
}

/* ---- packing: the clip-ratio search of native.quantize_groups, in C --------------------------------------------
 * Per group of 32 weights: for each clip ratio, the range [middle - half * ratio, middle + half * ratio] with fp16
 * scale and offset, the codes it gives and their squared error; the first ratio with the least error wins. The
 * PyTorch version makes several whole-matrix temporaries per ratio and took 26 of the 35 s a MusicGen-small load
 * spent; this one keeps a group in registers (two AVX-512 or four AVX2 ones). Same operations in the same order
 * (contraction into FMAs off), so the codes agree with the PyTorch version except where two ratios tie to the last
 * bit. Returns 0.
 */
__attribute__((optimize("fp-contract=off")))
static void quantize_group(const float* g, int levels, const float* ratios, int n_ratios, uint8_t* q_out,
                           uint16_t* scale_out, uint16_t* offset_out) {
    float low = g[0], high = g[0];
    for (int j = 1; j < GS; j++) { low = g[j] < low ? g[j] : low; high = g[j] > high ? g[j] : high; }
    const float middle = (low + high) / 2.f, half = (high - low) / 2.f;
    float best_error = INFINITY;
#if ISA == 2
    const __m512 g0 = _mm512_loadu_ps(g), g1 = _mm512_loadu_ps(g + 16);
    const __m512 top = _mm512_set1_ps((float)levels), zero = _mm512_setzero_ps();
    for (int r = 0; r < n_ratios; r++) {
        float span = 2.f * half * ratios[r];
        span = span < 1e-8f ? 1e-8f : span;
        const uint16_t sh = _cvtss_sh(span / (float)levels, _MM_FROUND_TO_NEAREST_INT);
        const uint16_t oh = _cvtss_sh(middle - half * ratios[r], _MM_FROUND_TO_NEAREST_INT);
        const __m512 s = _mm512_set1_ps(_cvtsh_ss(sh)), o = _mm512_set1_ps(_cvtsh_ss(oh));
        const int round = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        const __m512 v0 = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(
            _mm512_div_ps(_mm512_sub_ps(g0, o), s), round), zero), top);
        const __m512 v1 = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(
            _mm512_div_ps(_mm512_sub_ps(g1, o), s), round), zero), top);
        const __m512 d0 = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(v0, s), o), g0);
        const __m512 d1 = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(v1, s), o), g1);
        const float error = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_mul_ps(d0, d0), _mm512_mul_ps(d1, d1)));
        if (r == 0 || error < best_error) {
            best_error = error;
            _mm_storeu_si128((__m128i*)q_out, _mm512_cvtusepi32_epi8(_mm512_cvttps_epu32(v0)));
            _mm_storeu_si128((__m128i*)(q_out + 16), _mm512_cvtusepi32_epi8(_mm512_cvttps_epu32(v1)));
            *scale_out = sh;
            *offset_out = oh;
        }
    }
#elif ISA == 1
    __m256 gv[4];
    for (int j = 0; j < 4; j++) gv[j] = _mm256_loadu_ps(g + 8 * j);
    const __m256 top = _mm256_set1_ps((float)levels), zero = _mm256_setzero_ps();
    for (int r = 0; r < n_ratios; r++) {
        float span = 2.f * half * ratios[r];
        span = span < 1e-8f ? 1e-8f : span;
        const uint16_t sh = _cvtss_sh(span / (float)levels, _MM_FROUND_TO_NEAREST_INT);
        const uint16_t oh = _cvtss_sh(middle - half * ratios[r], _MM_FROUND_TO_NEAREST_INT);
        const __m256 s = _mm256_set1_ps(_cvtsh_ss(sh)), o = _mm256_set1_ps(_cvtsh_ss(oh));
        __m256 v[4], e = zero;
        for (int j = 0; j < 4; j++) {
            v[j] = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(_mm256_div_ps(_mm256_sub_ps(gv[j], o), s),
                                                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                                               zero), top);
            const __m256 d = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(v[j], s), o), gv[j]);
            e = _mm256_add_ps(e, _mm256_mul_ps(d, d));
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, e);
        const float error = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
                          + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
        if (r == 0 || error < best_error) {
            best_error = error;
            const __m256i codes[4] = {_mm256_cvttps_epi32(v[0]), _mm256_cvttps_epi32(v[1]), _mm256_cvttps_epi32(v[2]),
                                      _mm256_cvttps_epi32(v[3])};  /* 0..levels <= 31 */
            store_bytes32(q_out, codes);
            *scale_out = sh;
            *offset_out = oh;
        }
    }
#else
    for (int r = 0; r < n_ratios; r++) {
        float span = 2.f * half * ratios[r];
        span = span < 1e-8f ? 1e-8f : span;
        const uint16_t sh = _cvtss_sh(span / (float)levels, _MM_FROUND_TO_NEAREST_INT);
        const uint16_t oh = _cvtss_sh(middle - half * ratios[r], _MM_FROUND_TO_NEAREST_INT);
        const float s = _cvtsh_ss(sh), o = _cvtsh_ss(oh);
        uint8_t q[GS];
        float error = 0.f;
        for (int j = 0; j < GS; j++) {
            float v = rintf((g[j] - o) / s);  /* half to even, as torch.round */
            v = v < 0.f ? 0.f : v > (float)levels ? (float)levels : v;
            q[j] = (uint8_t)v;
            const float d = v * s + o - g[j];
            error += d * d;
        }
        if (r == 0 || error < best_error) {
            best_error = error;
            memcpy(q_out, q, GS);
            *scale_out = sh;
            *offset_out = oh;
        }
    }
#endif
}

int quantize_groups(const float* w, long n_groups, int levels, const float* ratios, int n_ratios, uint8_t* q,
                    uint16_t* scale, uint16_t* offset, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : omp_get_max_threads())
    for (long i = 0; i < n_groups; i++)
        quantize_group(w + i * GS, levels, ratios, n_ratios, q + i * GS, scale + i, offset + i);
    return 0;
}
