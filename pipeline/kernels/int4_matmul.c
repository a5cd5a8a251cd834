/* y = x @ W.T with W in 4-bit groups and x quantized to int8 on the fly (the llama.cpp Q4_1 x Q8 scheme).
 *
 * Layout (see pipeline/native_kernels.py, which packs it): weights come in superblocks of 512 input columns =
 * 16 groups of 32, one group per 32-bit lane. Block b (0..7) of a superblock holds, for each lane g, the 4
 * weights [32g + 4b, 32g + 4b + 4), so one VNNI dot-product instruction (vpdpbusd: 4 u8 x s8 products summed
 * into each 32-bit lane) advances all 16 groups at once, and after 8 blocks lane g holds group g's integer sum.
 * Two blocks share 64 bytes: low nibbles = block i, high nibbles = block i + 4.
 * Per group: weight = d * q + mn (q in 0..15, d and mn fp16); activation = xs * xq (xq int8, xs fp32), so
 * sum(x * w) = d * xs * sum(xq * q) + mn * xs * sum(xq).
 * Decoding reads every weight once per step, so the loop streams weights with software prefetch.
 */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <immintrin.h>

#define GS 32
#define SB 512
#define PREFETCH 3072

int i4_isa(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return 2;
#elif defined(__AVX2__) && defined(__FMA__)
    return 1;
#else
    return 0;
#endif
}

static void quantize(const float* x, int M, int K, int8_t* xq, float* xs, float* xsum) {
    const int ng = K / GS;
    for (int m = 0; m < M; m++) {
        const float* xr = x + (size_t)m * K;
        int8_t* qr = xq + (size_t)m * K;
        for (int g = 0; g < ng; g++) {
            const float* v = xr + g * GS;
            float amax = 0.f;
            for (int j = 0; j < GS; j++) { const float a = fabsf(v[j]); amax = a > amax ? a : amax; }
            const float id = amax > 0.f ? 127.f / amax : 0.f;
            const int s = g / 16, lane = g % 16;
            int sum = 0;
            for (int j = 0; j < GS; j++) {
                const int q = (int)lrintf(v[j] * id);
                sum += q;
                qr[s * SB + (j / 4) * 64 + lane * 4 + (j % 4)] = (int8_t)q;
            }
            xs[m * ng + g] = amax / 127.f;
            xsum[m * ng + g] = amax / 127.f * (float)sum;
        }
    }
}

#if defined(__AVX2__) && !(defined(__AVX512VNNI__) && defined(__AVX512BW__))
/* u8 x s8 dot products of 4 adjacent bytes into 32-bit lanes, as vpdpbusd does */
static inline __m256i dot4(__m256i acc, __m256i u, __m256i s) {
    const __m256i pairs = _mm256_maddubs_epi16(u, s); /* no saturation: 2 * 15 * 127 < 32767 */
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
#endif

static void row(const uint8_t* wr, const uint16_t* dr, const uint16_t* mr, const int8_t* x0, const int8_t* x1,
                const float* s0, const float* s1, const float* o0, const float* o1, int two, int K,
                float* y0, float* y1) {
    const int ns = K / SB;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 f0 = _mm512_setzero_ps(), f1 = _mm512_setzero_ps();
    for (int s = 0; s < ns; s++) {
        const uint8_t* wb = wr + s * (SB / 2);
        for (int p = 0; p < 256; p += 64) _mm_prefetch((const char*)(wb + PREFETCH + p), _MM_HINT_T0);
        __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
        const int8_t* xb0 = x0 + s * SB;
        const int8_t* xb1 = x1 + s * SB;
        for (int i = 0; i < 4; i++) {
            const __m512i b = _mm512_loadu_si512((const void*)(wb + 64 * i));
            const __m512i lo = _mm512_and_si512(b, low);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
            a0 = _mm512_dpbusd_epi32(a0, lo, _mm512_loadu_si512((const void*)(xb0 + 64 * i)));
            a0 = _mm512_dpbusd_epi32(a0, hi, _mm512_loadu_si512((const void*)(xb0 + 64 * (i + 4))));
            if (two) {
                a1 = _mm512_dpbusd_epi32(a1, lo, _mm512_loadu_si512((const void*)(xb1 + 64 * i)));
                a1 = _mm512_dpbusd_epi32(a1, hi, _mm512_loadu_si512((const void*)(xb1 + 64 * (i + 4))));
            }
        }
        const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(dr + s * 16)));
        const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(mr + s * 16)));
        f0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a0), _mm512_mul_ps(dv, _mm512_loadu_ps(s0 + s * 16)), f0);
        f0 = _mm512_fmadd_ps(mv, _mm512_loadu_ps(o0 + s * 16), f0);
        if (two) {
            f1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a1), _mm512_mul_ps(dv, _mm512_loadu_ps(s1 + s * 16)), f1);
            f1 = _mm512_fmadd_ps(mv, _mm512_loadu_ps(o1 + s * 16), f1);
        }
    }
    *y0 = _mm512_reduce_add_ps(f0);
    if (two) *y1 = _mm512_reduce_add_ps(f1);
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256 f0 = _mm256_setzero_ps(), f1 = _mm256_setzero_ps();
    for (int s = 0; s < ns; s++) {
        const uint8_t* wb = wr + s * (SB / 2);
        for (int p = 0; p < 256; p += 64) _mm_prefetch((const char*)(wb + PREFETCH + p), _MM_HINT_T0);
        for (int half = 0; half < 2; half++) { /* lanes 0-7, then 8-15 */
            __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
            const int8_t* xb0 = x0 + s * SB + 32 * half;
            const int8_t* xb1 = x1 + s * SB + 32 * half;
            for (int i = 0; i < 4; i++) {
                const __m256i b = _mm256_loadu_si256((const __m256i*)(wb + 64 * i + 32 * half));
                const __m256i lo = _mm256_and_si256(b, low);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
                a0 = dot4(a0, lo, _mm256_loadu_si256((const __m256i*)(xb0 + 64 * i)));
                a0 = dot4(a0, hi, _mm256_loadu_si256((const __m256i*)(xb0 + 64 * (i + 4))));
                if (two) {
                    a1 = dot4(a1, lo, _mm256_loadu_si256((const __m256i*)(xb1 + 64 * i)));
                    a1 = dot4(a1, hi, _mm256_loadu_si256((const __m256i*)(xb1 + 64 * (i + 4))));
                }
            }
            const int off = s * 16 + 8 * half;
            const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(dr + off)));
            const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(mr + off)));
            f0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a0), _mm256_mul_ps(dv, _mm256_loadu_ps(s0 + off)), f0);
            f0 = _mm256_fmadd_ps(mv, _mm256_loadu_ps(o0 + off), f0);
            if (two) {
                f1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a1), _mm256_mul_ps(dv, _mm256_loadu_ps(s1 + off)), f1);
                f1 = _mm256_fmadd_ps(mv, _mm256_loadu_ps(o1 + off), f1);
            }
        }
    }
    float t0[8], t1[8];
    _mm256_storeu_ps(t0, f0);
    _mm256_storeu_ps(t1, f1);
    *y0 = t0[0] + t0[1] + t0[2] + t0[3] + t0[4] + t0[5] + t0[6] + t0[7];
    if (two) *y1 = t1[0] + t1[1] + t1[2] + t1[3] + t1[4] + t1[5] + t1[6] + t1[7];
#else
    for (int r = 0; r <= two; r++) {
        const int8_t* xr = r ? x1 : x0;
        const float* sr = r ? s1 : s0;
        const float* orr = r ? o1 : o0;
        float acc = 0.f;
        for (int s = 0; s < ns; s++) {
            int32_t lane[16] = {0};
            for (int i = 0; i < 4; i++)
                for (int byte = 0; byte < 64; byte++) {
                    const uint8_t b = wr[s * (SB / 2) + 64 * i + byte];
                    lane[byte / 4] += (b & 15) * xr[s * SB + 64 * i + byte] + (b >> 4) * xr[s * SB + 64 * (i + 4) + byte];
                }
            for (int g = 0; g < 16; g++)
                acc += _cvtsh_ss(dr[s * 16 + g]) * sr[s * 16 + g] * (float)lane[g] + _cvtsh_ss(mr[s * 16 + g]) * orr[s * 16 + g];
        }
        *(r ? y1 : y0) = acc;
    }
#endif
}

/* x (M, K) fp32, W packed (N, K/2) with d, mn (N, K/32) fp16 -> y (M, N) fp32. K must be a multiple of 512.
   Returns 0, or -1 when scratch memory could not be allocated. */
int i4_linear(const float* x, int M, int K, const uint8_t* w, const uint16_t* d, const uint16_t* mn, float* y, int N) {
    const int ng = K / GS;
    int8_t* xq = (int8_t*)aligned_alloc(64, ((size_t)M * K + 63) / 64 * 64);
    float* xs = (float*)malloc(sizeof(float) * (size_t)M * ng);
    float* xsum = (float*)malloc(sizeof(float) * (size_t)M * ng);
    if (!xq || !xs || !xsum) { free(xq); free(xs); free(xsum); return -1; }
    quantize(x, M, K, xq, xs, xsum);
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t* wr = w + (size_t)n * (K / 2);
        for (int m0 = 0; m0 < M; m0 += 2) {
            const int two = m0 + 1 < M;
            const int8_t* x0 = xq + (size_t)m0 * K;
            const float* s0 = xs + (size_t)m0 * ng;
            const float* o0 = xsum + (size_t)m0 * ng;
            float y1 = 0.f;
            row(wr, d + (size_t)n * ng, mn + (size_t)n * ng, x0, two ? x0 + K : x0, s0, two ? s0 + ng : s0, o0,
                two ? o0 + ng : o0, two, K, &y[(size_t)m0 * N + n], &y1);
            if (two) y[(size_t)(m0 + 1) * N + n] = y1;
        }
    }
    free(xq); free(xs); free(xsum);
    return 0;
}
