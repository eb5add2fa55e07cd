/* fused_ext.c: in-place fused optimizer kernels for lowmem, CPU (OpenMP) and CUDA.

   Build (lowmem.py does this on first use and caches the result):
     cc   -O3 -march=native -fopenmp -fno-math-errno -fPIC -shared -std=c99 fused_ext.c -o fused_ext.so
     nvcc -O3 --fmad=false -x cu -arch=native -shared -Xcompiler -fPIC fused_ext.c -o fused_ext_cuda.so
   (--fmad=false: no contraction into FMA, so the CUDA build rounds exactly as the CPU build;
    torch's own CUDA ops contract, so they can differ from either by an ulp or two)

   One exported C ABI for both builds. lowmem.py reads its cffi declarations from this file:
   keep each struct typedef on one line, and each CPU entry point as "int lm_name(...) {".
   Tensors are contiguous; lowmem checks shape, dtype and
   device before calling. dtype codes: 0 fp32, 1 bf16 (uint16_t), 2 fp16 (uint16_t). Math is
   fp32; optimizer state is fp32, except Adam-mini's first moment m, which can be bf16 or 8-bit
   (struct moment below). Every gradient element goes through the same preparation
   as lowmem's PyTorch path (DESIGN.md "The gradient a rule sees"): g = clamp(g * inv_scale, +-clip) * coef.
   Without -fno-math-errno the sqrt loops do not vectorize (measured 6.7x slower).
   CUDA launchers take the stream as void* and return cudaGetLastError(). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#ifdef __CUDACC__
#define HD static __host__ __device__ __forceinline__
#define GLOBAL_LOOP(i, n) for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); \
                               i += (int64_t)gridDim.x * blockDim.x)
#define EXPORT extern "C"
#else
#define HD static inline
#define EXPORT
#endif

typedef struct { float inv_scale, clip, coef; } prep_t;  /* gradient preparation */

/* ---- dtype conversion (bf16 round-to-nearest-even, NaN -> 0x7FC0; fp16 RNE) ---------- */
HD float bits2f(uint32_t u) { union { uint32_t u; float f; } x; x.u = u; return x.f; }
HD uint32_t f2bits(float f) { union { uint32_t u; float f; } x; x.f = f; return x.u; }

HD float half2f(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    if (exp == 0x1F) return bits2f(sign | 0x7F800000 | (man << 13));
    if (exp == 0) return (sign ? -1.0f : 1.0f) * (float)man * 5.9604644775390625e-8f; /* 2^-24 */
    return bits2f(sign | ((exp + 112) << 23) | (man << 13));
}
HD uint16_t f2half(float f) {
    uint32_t u = f2bits(f), sign = (u >> 16) & 0x8000;
    float a = fabsf(f);
    if (a != a) return (uint16_t)(sign | 0x7E00);
    if (a >= 65520.0f) return (uint16_t)(sign | 0x7C00);            /* rounds to inf */
    if (a < 6.103515625e-05f) {                                        /* subnormal: RNE via int */
        float q = a * 16777216.0f;                                     /* units of 2^-24 */
        uint32_t r = (uint32_t)q; float fr = q - (float)r;
        if (fr > 0.5f || (fr == 0.5f && (r & 1))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t au = f2bits(a);
    au += 0xFFF + ((au >> 13) & 1);                                    /* round to 10 mantissa bits */
    return (uint16_t)(sign | (((au >> 23) - 112) << 10) | ((au >> 13) & 0x3FF));
}
HD uint16_t f2bf16(float f) {
    uint32_t u = f2bits(f);
    if ((u & 0x7FFFFFFF) > 0x7F800000) return 0x7FC0;
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}
HD float load(const void *x, int dt, int64_t i) {
    if (dt == 0) return ((const float *)x)[i];
    if (dt == 1) return bits2f((uint32_t)((const uint16_t *)x)[i] << 16);
    return half2f(((const uint16_t *)x)[i]);
}
/* Stochastic rounding to bf16: add 16 random bits below the cut, then truncate. The random
   bits are a hash of (seed, index): reproducible and independent of the thread schedule. The
   seed is mixed before the index is added: with seed + i*golden alone, seed s + golden would
   draw seed s's bits shifted by one element, and lowmem's per-call seeds step by one. */
HD uint64_t mix64(uint64_t z) {  /* splitmix64's finalizer */
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
/* 32 random bits of (seed, i), given mix64(seed) (taken out of the loops): murmur3's 32-bit
   finalizer of the mixed seed plus i*golden, in 32-bit arithmetic, which vectorizes (indices
   wrap at 2^32 elements) */
HD uint32_t hash32(uint64_t mixed_seed, int64_t i) {
    uint32_t z = (uint32_t)mixed_seed + (uint32_t)i * 0x9E3779B9u;
    z = (z ^ (z >> 16)) * 0x85EBCA6Bu;
    z = (z ^ (z >> 13)) * 0xC2B2AE35u;
    return z ^ (z >> 16);
}
HD uint32_t hash_mixed(uint64_t mixed_seed, int64_t i) { return hash32(mixed_seed, i) & 0xFFFF; }  /* 16 bits */
/* 8 random bits of (seed, i): byte i % 4 of hash32(seed, i / 4), so one hash serves four codes */
HD uint32_t byte_noise(uint64_t mixed_seed, int64_t i) { return hash32(mixed_seed, i >> 2) >> (8 * (i & 3)) & 0xFF; }
/* v to bf16: to nearest even, or (sr, with mixed = mix64(seed)) stochastically; inf and NaN to nearest */
HD uint16_t to_bf16(float v, int sr, uint64_t mixed, int64_t i) {
    uint32_t u = f2bits(v);
    return sr && (u & 0x7F800000) != 0x7F800000 ? (uint16_t)(((u + hash_mixed(mixed, i)) & 0xFFFF0000u) >> 16) : f2bf16(v);
}
HD void store(void *x, int dt, int64_t i, float v, int sr, uint64_t seed) {
    if (dt == 0) { ((float *)x)[i] = v; return; }
    if (dt == 2) { ((uint16_t *)x)[i] = f2half(v); return; }
    ((uint16_t *)x)[i] = to_bf16(v, sr, sr ? mix64(seed) : 0, i);
}
/* Bounds as torch.clamp has them: NaN stays NaN (fminf/fmaxf would return the bound, so a NaN
   gradient would become a full clip-sized step and hide the divergence). */
HD float at_least(float x, float lo) { return x < lo ? lo : x; }
HD float clip_to(float x, float c) { return x < -c ? -c : (x > c ? c : x); }
HD float prep(const void *g, int dt, int64_t i, prep_t q) {
    float x = load(g, dt, i) * q.inv_scale;
    if (q.clip > 0.0f) x = clip_to(x, q.clip);
    return x * q.coef;
}
/* Adam-style element update shared by Adam-mini blocks and AdamW elements. Scalars come
   precomputed in double by the caller (decay = 1-lr*wd, step = lr/(1-b1^t), one_b1 = 1-b1,
   one_b2 = 1-b2) and the operations associate as in lowmem's PyTorch path, so both agree
   to the last bit or two. */
typedef struct { float decay, step, one_b1, b2, one_b2, bc2_sqrt, eps; } adam_t;
typedef struct { float beta2t, eps1, eps2, lr, weight_decay, clip_threshold; } adalomo_t;
HD float adam_v(float v, float gsq, adam_t h) { return v * h.b2 + h.one_b2 * gsq; }
HD float adam_m(float m, float g, adam_t h) {  /* torch.lerp_(m, g, 1-b1) */
    float d = g - m;
    return h.one_b1 < 0.5f ? m + h.one_b1 * d : g - d * (1.0f - h.one_b1);
}
HD float adam_denom(float v, adam_t h) { return sqrtf(v) / h.bc2_sqrt + h.eps; }
HD float adam_w(float w, float m, float denom, adam_t h) { return w * h.decay + (-h.step) * (m / denom); }
/* AdaLomo's step sizes from pass 2's sums over the whole tensor of n elements (all ranks'):
   lr_t = lr * max(eps2, RMS(p)), the update divided by max(1, RMS(update) / clip_threshold) */
HD void adalomo_steps(const float *sums, int64_t n, adalomo_t h, float *decay, float *step) {
    float lr_t = h.lr * at_least(sqrtf(sums[1] / (float)n), h.eps2);                  /* before decay */
    float clip_div = at_least(sqrtf(sums[0] / (float)n) / h.clip_threshold, 1.0f);  /* grouped normalization */
    *decay = 1.0f - lr_t * h.weight_decay, *step = lr_t / clip_div;
}
/* Adam-mini's first moment m (AdamMini's state_dtype), by its mdt: 0 fp32; 1 bf16, written back
   by stochastic rounding when sr; 3 8-bit: int8 codes, each run of QB elements of a row of cols
   elements sharing one fp32 scale (scale[row * runs per row + run]), m = code * scale
   (quantize_blocks / dequantize_blocks in lowmem.py), the codes rounded stochastically when sr.
   The 8-bit kernels take m a run at a time, never across a row: its scale needs all of it. */
#define M_INT8 3
#define QB 256
struct moment { void *m; int mdt; float *scale; int64_t cols; int sr; uint64_t seed; };
/* the code of x in a run whose max |x| is amax, given as inv = 127 / amax: round(x * inv), or
   stochastically from a random byte b: x * inv to the nearest 1/256 of a code, plus b/256 of a
   code, rounded down (in integers offset by 128 codes, so truncation is floor). The code is
   rounded up with probability the fraction, so its expectation is x * inv within 1/512 of a
   code. q8_coded(inv) is false for a run of zeros, with a NaN or an inf, or a max below
   127 / FLT_MAX: its codes are 0 (its scale keeps the NaN or inf), so the per-element loops
   need no NaN checks. */
HD int8_t q8_near(float x, float inv) { return (int8_t)rintf(x * inv); }
HD int8_t q8_sr(float x, float inv, uint32_t b) {
    int32_t c = (((int32_t)(x * inv * 256.0f + 32768.5f) + (int32_t)b) >> 8) - 128;
    return (int8_t)(c > 127 ? 127 : c);  /* x * inv may be 127 and a bit */
}
HD int q8_coded(float inv) { return inv > 0.0f && inv <= 3.402823466e38f; }
HD int64_t runs_per_row(int64_t cols) { return (cols + QB - 1) / QB; }

#ifndef __CUDACC__
/* ===================================== CPU ==========================================
   Work goes in chunks of CH elements: each chunk is converted into an L1-resident fp32
   buffer with the dtype switch outside the inner loops, so every inner loop is a plain
   vectorizable loop. Reductions keep 64 independent fp32 partial sums per chunk (vectorizable
   without -ffast-math, and no one long dependency chain), added pairwise, then in double. */
#define CH 2048
#define MIN(a, b) ((a) < (b) ? (a) : (b))
/* Below SMALL elements a kernel runs on the calling thread: starting and joining a parallel
   region costs more than updating the tensor (and many times more when cores are busy). */
#define SMALL 65536
/* The `loop` over a body in parallel, with OpenMP `clauses`, when `big`; else a plain loop. Not
   an if() clause: a region that if() makes serial still costs about 0.5 us (1 us nested inside
   lm_multi_*'s), more than a 64x64 tensor's whole update, and lm_adalomo enters five. */
#define PRAGMA(x) _Pragma(#x)
#define PARALLEL_FOR(big, clauses, loop, ...) do { \
    if (big) { PRAGMA(omp parallel for clauses) loop __VA_ARGS__ } else { loop __VA_ARGS__ } } while (0)

static void ld_chunk(float *d, const void *x, int dt, int64_t o, int64_t n) {
    if (dt == 0) { const float *s = (const float *)x + o; for (int64_t i = 0; i < n; i++) d[i] = s[i]; }
    else if (dt == 1) { const uint16_t *s = (const uint16_t *)x + o; for (int64_t i = 0; i < n; i++) d[i] = bits2f((uint32_t)s[i] << 16); }
    else { const uint16_t *s = (const uint16_t *)x + o; for (int64_t i = 0; i < n; i++) d[i] = half2f(s[i]); }
}
static void st_chunk(void *x, int dt, int64_t o, const float *s, int64_t n, int sr, uint64_t seed) {
    if (dt == 0) { float *d = (float *)x + o; for (int64_t i = 0; i < n; i++) d[i] = s[i]; }
    else if (dt == 2) { uint16_t *d = (uint16_t *)x + o; for (int64_t i = 0; i < n; i++) d[i] = f2half(s[i]); }
    else if (!sr) { uint16_t *d = (uint16_t *)x + o; for (int64_t i = 0; i < n; i++) d[i] = f2bf16(s[i]); }
    else {  /* stochastically, the seed mixed once for the chunk */
        uint16_t *d = (uint16_t *)x + o;
        uint64_t mixed = mix64(seed);
        for (int64_t i = 0; i < n; i++) d[i] = to_bf16(s[i], 1, mixed, o + i);
    }
}
/* fp32 data is used in place; bf16/fp16 are staged through buf (written back by put) */
static float *view(float *buf, const void *x, int dt, int64_t o, int64_t n) {
    if (dt == 0) return (float *)x + o;
    ld_chunk(buf, x, dt, o, n);
    return buf;
}
static void put(void *x, int dt, int64_t o, const float *s, int64_t n, int sr, uint64_t seed) {
    if (dt != 0) st_chunk(x, dt, o, s, n, sr, seed);
}
static int64_t m_chunk(struct moment M, int64_t o, int64_t e) {  /* the chunk at o of [o, e): an 8-bit m's ends with its row */
    int64_t len = MIN(CH, e - o);
    return M.mdt == M_INT8 ? MIN(len, M.cols - o % M.cols) : len;
}
/* the prepared gradient of a chunk: in place when there is nothing to prepare */
static const float *grad_view(float *buf, const void *g, int dt, int64_t o, int64_t n, prep_t q) {
    if (dt == 0 && q.clip <= 0.0f && q.inv_scale == 1.0f && q.coef == 1.0f) return (const float *)g + o;
    float *d = view(buf, g, dt, o, n);
    if (d != buf) { for (int64_t i = 0; i < n; i++) buf[i] = d[i]; d = buf; }
    if (q.clip > 0.0f) for (int64_t i = 0; i < n; i++) d[i] = clip_to(d[i] * q.inv_scale, q.clip) * q.coef;
    else for (int64_t i = 0; i < n; i++) d[i] = d[i] * q.inv_scale * q.coef;
    return d;
}
static double sumsq_chunk(const float *d, int64_t n) {  /* sum of d^2 */
    float part[64] = {0};  /* 64 partial sums: four independent vector chains, not one */
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) for (int j = 0; j < 64; j++) part[j] += d[i + j] * d[i + j];
    for (; i + 16 <= n; i += 16) for (int j = 0; j < 16; j++) part[j] += d[i + j] * d[i + j];
    /* pairwise, in loops of fixed length: they vectorize, so a short row costs a few cycles */
    for (int j = 0; j < 32; j++) part[j] += part[j + 32];
    for (int j = 0; j < 16; j++) part[j] += part[j + 16];
    for (int j = 0; j < 8; j++) part[j] += part[j + 8];
    for (int j = 0; j < 4; j++) part[j] += part[j + 4];
    part[0] += part[2], part[1] += part[3], part[0] += part[1];
    double s = part[0];
    for (; i < n; i++) s += (double)d[i] * d[i];
    return s;
}

/* sum of (x*scale)^2 over n elements, added to *out (the norm pass and parameter RMS) */
int lm_sumsq(const void *x, int dt, int64_t n, float scale, float *out, void *stream) {
    double acc = 0.0;
    prep_t q = {scale, 0.0f, 1.0f};
    PARALLEL_FOR(n >= SMALL, reduction(+:acc) schedule(static),
                 for (int64_t o = 0; o < n; o += CH), {
        float buf[CH]; int64_t len = MIN(CH, n - o);
        acc += sumsq_chunk(grad_view(buf, x, dt, o, len, q), len);
    });
    *out += (float)acc; (void)stream; return 0;
}

/* LOMO / SGD: p = p*decay - lr*g, decay = 1 - lr*wd */
int lm_sgd(void *p, int pdt, const void *g, int gdt, int64_t n, prep_t q, float lr, float decay,
           int sr, uint64_t seed, void *stream) {
    PARALLEL_FOR(n >= SMALL, schedule(static),
                 for (int64_t o = 0; o < n; o += CH), {
        float wbuf[CH], gbuf[CH]; int64_t len = MIN(CH, n - o);
        const float *d = grad_view(gbuf, g, gdt, o, len, q);
        float *w = view(wbuf, p, pdt, o, len);
        for (int64_t i = 0; i < len; i++) w[i] = w[i] * decay - lr * d[i];
        put(p, pdt, o, w, len, sr, seed);
    });
    (void)stream; return 0;
}

/* Adam-mini's update of one run of n <= QB elements of a row of an 8-bit m, at element index at,
   with the block's denominator: m from its codes, m and w updated and the max |m| taken in one
   loop (the bits of |m| order as |m| does, with every NaN above inf: an integer max, which
   vectorizes where a float one may not, is torch.amax's, NaN if any m is), then the run's
   scale and codes. Inlined with n = QB for full runs, so its loops have a fixed length. */
static inline void adam_run_q8(float *w, int8_t *code, float *scale, const float *d, int64_t n, int64_t at,
                               float denom, adam_t h, int sr, uint64_t mixed) {
    float m[QB], amax, inv;
    uint32_t most = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t bits;
        m[i] = adam_m((float)code[i] * *scale, d[i], h);
        w[i] = adam_w(w[i], m[i], denom, h);
        bits = f2bits(m[i]) & 0x7FFFFFFFu;
        most = bits > most ? bits : most;
    }
    amax = bits2f(most), inv = 127.0f / amax;
    *scale = amax / 127.0f;
    if (!q8_coded(inv)) for (int64_t i = 0; i < n; i++) code[i] = 0;
    else if (!sr) for (int64_t i = 0; i < n; i++) code[i] = q8_near(m[i], inv);
    else {  /* the hashes of the four-element groups the run touches, then a byte each (little-endian:
               byte i % 4 of a hash is its bits 8 * (i % 4) up, as byte_noise takes them) */
        uint32_t hashes[QB / 4 + 2];
        const uint8_t *b = (const uint8_t *)hashes + (at & 3);
        for (int64_t j = 0; j < (n + (at & 3) + 3) / 4; j++) hashes[j] = hash32(mixed, (at >> 2) + j);
        for (int64_t i = 0; i < n; i++) code[i] = q8_sr(m[i], inv, b[i]);
    }
}
static void adam_chunk_q8(float *w, struct moment M, const float *d, float v, int64_t o, int64_t len, adam_t h) {
    float denom = adam_denom(v, h), *scale = M.scale + o / M.cols * runs_per_row(M.cols) + o % M.cols / QB;
    int8_t *code = (int8_t *)M.m + o;
    uint64_t mixed = mix64(M.seed);
    for (int64_t k = 0; k < len; k += QB) {
        if (len - k >= QB) adam_run_q8(w + k, code + k, scale + k / QB, d + k, QB, o + k, denom, h, M.sr, mixed);
        else adam_run_q8(w + k, code + k, scale + k / QB, d + k, len - k, o + k, denom, h, M.sr, mixed);
    }
}
/* Adam update of elements [o, o+len) with prepared gradient d and second moment v[] (or the
   block's v when vstride == 0) */
static void adam_chunk(void *p, int pdt, struct moment M, const float *d, const float *v, int vstride,
                       int64_t o, int64_t len, adam_t h, int sr, uint64_t seed) {
    float wbuf[CH], mbuf[CH], *w = view(wbuf, p, pdt, o, len), *m;
    if (M.mdt == M_INT8) {  /* always with one v (blocks of rows) */
        adam_chunk_q8(w, M, d, v[0], o, len, h);
        put(p, pdt, o, w, len, sr, seed);
        return;
    }
    m = view(mbuf, M.m, M.mdt, o, len);
    if (vstride == 0) {  /* one v for the chunk (an Adam-mini block): its denominator once, not per element */
        float denom = adam_denom(v[0], h);
        for (int64_t i = 0; i < len; i++) {
            m[i] = adam_m(m[i], d[i], h);
            w[i] = adam_w(w[i], m[i], denom, h);
        }
    } else {
        for (int64_t i = 0; i < len; i++) {
            m[i] = adam_m(m[i], d[i], h);
            w[i] = adam_w(w[i], m[i], adam_denom(v[i], h), h);
        }
    }
    put(p, pdt, o, w, len, sr, seed);
    put(M.m, M.mdt, o, m, len, M.sr, M.seed);
}

/* AdamW, one v per element (Adam-mini's bias blocks) */
int lm_adam_elem(void *p, int pdt, const void *g, int gdt, void *m, float *v, int64_t n, int mdt,
                 prep_t q, adam_t h, int sr, uint64_t seed, int msr, uint64_t mseed, void *stream) {
    struct moment M = {m, mdt, NULL, 0, msr, mseed};
    if (mdt == M_INT8) return 2;  /* 8-bit m is for blocks of rows; lowmem keeps elements' m in fp32 or bf16 */
    PARALLEL_FOR(n >= SMALL, schedule(static),
                 for (int64_t o = 0; o < n; o += CH), {
        float gbuf[CH]; int64_t len = MIN(CH, n - o);
        const float *d = grad_view(gbuf, g, gdt, o, len, q);
        for (int64_t i = 0; i < len; i++) v[o + i] = adam_v(v[o + i], d[i] * d[i], h);
        adam_chunk(p, pdt, M, d, v + o, 1, o, len, h, sr, seed);
    });
    (void)stream; return 0;
}

/* Adam-mini, blocks that are contiguous runs of elements: block b is [start[b], start[b+1]).
   Per block: mean g^2 -> v[b], then update the block while it is still in cache, so g is
   read from memory once (rows, heads, whole tensor). */
int lm_adam_blocks(void *p, int pdt, const void *g, int gdt, void *m, float *mscale, float *v,
                   const int64_t *start, int64_t n_v, int64_t n, int mdt, int64_t cols, prep_t q, adam_t h, int sr,
                   uint64_t seed, int msr, uint64_t mseed, void *stream) {
    /* n: the elements of all blocks, start[n_v] - start[0]; the blocks are runs of whole rows of cols */
    struct moment M = {m, mdt, mscale, cols, msr, mseed};
    PARALLEL_FOR(n >= SMALL, schedule(static),
                 for (int64_t b = 0; b < n_v; b++), {
        float gbuf[CH]; int64_t a = start[b], e = start[b + 1];
        double acc = 0.0;
        for (int64_t o = a; o < e; o += CH) acc += sumsq_chunk(grad_view(gbuf, g, gdt, o, MIN(CH, e - o), q), MIN(CH, e - o));
        float vb = adam_v(v[b], (float)(acc / (double)(e - a)), h);
        v[b] = vb;
        for (int64_t o = a, len; o < e; o += len) {
            len = m_chunk(M, o, e);
            adam_chunk(p, pdt, M, grad_view(gbuf, g, gdt, o, len, q), &vb, 0, o, len, h, sr, seed);
        }
    });
    (void)stream; return 0;
}

/* Adam-mini under FSDP2, where a block can straddle two ranks: (1) lm_row_sumsq, each local
   row's sum of g^2, (2) block means summed over the ranks and v in lowmem.py (tiny vectors),
   (3) lm_adam_rows, the update with each row's v. */
int lm_row_sumsq(const void *g, int gdt, int64_t rows, int64_t cols, prep_t q, float add, float *rowsum,
                 void *stream) {
    PARALLEL_FOR(rows * cols >= SMALL, schedule(static), for (int64_t r = 0; r < rows; r++), {
        float gbuf[CH]; double acc = 0.0;
        for (int64_t o = 0; o < cols; o += CH) acc += sumsq_chunk(grad_view(gbuf, g, gdt, r * cols + o, MIN(CH, cols - o), q), MIN(CH, cols - o));
        rowsum[r] = (float)(acc + (double)add * cols);
    });
    (void)stream; return 0;
}

int lm_adam_rows(void *p, int pdt, const void *g, int gdt, void *m, float *mscale, const float *vrow, int64_t rows,
                 int64_t cols, int mdt, prep_t q, adam_t h, int sr, uint64_t seed, int msr, uint64_t mseed, void *stream) {
    struct moment M = {m, mdt, mscale, cols, msr, mseed};
    PARALLEL_FOR(rows * cols >= SMALL, schedule(static), for (int64_t r = 0; r < rows; r++), {
        float gbuf[CH];
        for (int64_t o = r * cols; o < (r + 1) * cols; o += CH) {
            int64_t len = MIN(CH, (r + 1) * cols - o);
            adam_chunk(p, pdt, M, grad_view(gbuf, g, gdt, o, len, q), vrow + r, 0, o, len, h, sr, seed);
        }
    });
    (void)stream; return 0;
}

/* AdaLomo pass 1 for batch x rows x cols: row sums and column sums of g^2 + add */
int lm_rowcol_sumsq(const void *g, int gdt, int64_t batch, int64_t rows, int64_t cols, prep_t q,
                    float add, float *rowsum, float *colsum, void *stream) {
    lm_row_sumsq(g, gdt, batch * rows, cols, q, add, rowsum, stream);
    int64_t tiles = (cols + 255) / 256;
    PARALLEL_FOR(batch * rows * cols >= SMALL, schedule(static) collapse(2),
                 for (int64_t b = 0; b < batch; b++) for (int64_t t = 0; t < tiles; t++), {
        double acc[256] = {0}; float gbuf[256];
        int64_t c0 = t * 256, w = MIN(256, cols - c0);
        for (int64_t r = 0; r < rows; r++) {
            const float *d = grad_view(gbuf, g, gdt, (b * rows + r) * cols + c0, w, q);
            for (int64_t j = 0; j < w; j++) acc[j] += d[j] * d[j];
        }
        for (int64_t j = 0; j < w; j++) colsum[b * cols + c0 + j] = (float)(acc[j] + (double)add * rows);
    });
    (void)stream; return 0;
}

/* AdaLomo's factors from the sums of pass 1, in place: rowsum -> r = rsqrt(R / mean(R)) and
   colsum -> c = rsqrt(C), with R, C (row, col) updated: R = b2t*R + (1-b2t)*rowsum/cols,
   C = b2t*C + (1-b2t)*colsum/rows (adalomo_factors in lowmem.py) */
int lm_adalomo_factors(float *row, float *col, int64_t batch, int64_t rows, int64_t cols, float beta2t,
                       float *rowsum, float *colsum, void *stream) {
    for (int64_t b = 0; b < batch; b++) {
        float *R = row + b * rows, *rb = rowsum + b * rows;
        double mean = 0.0;
        for (int64_t i = 0; i < rows; i++) { R[i] = beta2t * R[i] + (1.0f - beta2t) * (rb[i] / cols); mean += R[i]; }
        float m = (float)(mean / rows);
        for (int64_t i = 0; i < rows; i++) rb[i] = 1.0f / sqrtf(R[i] / m);
    }
    for (int64_t j = 0; j < batch * cols; j++) {
        col[j] = beta2t * col[j] + (1.0f - beta2t) * (colsum[j] / rows);
        colsum[j] = 1.0f / sqrtf(col[j]);
    }
    (void)stream; return 0;
}

/* AdaLomo pass 2: sums[0] = sum of (g * r[row] * c[col])^2, the update's squared norm, and
   sums[1] = sum of p^2 (for RMS(p)), in one pass; assigned */
int lm_factored_sumsq(const void *g, int gdt, const void *p, int pdt, int64_t batch, int64_t rows, int64_t cols,
                      prep_t q, const float *r, const float *c, float *sums, void *stream) {
    double acc = 0.0;
    PARALLEL_FOR(batch * rows * cols >= SMALL, reduction(+:acc) schedule(static),
                 for (int64_t i = 0; i < batch * rows; i++), {
        const float *ci = c + (i / rows) * cols;
        float gbuf[CH], u[CH]; double s = 0.0;
        for (int64_t o = 0; o < cols; o += CH) {
            int64_t len = MIN(CH, cols - o);
            const float *d = grad_view(gbuf, g, gdt, i * cols + o, len, q);
            for (int64_t j = 0; j < len; j++) u[j] = d[j] * ci[o + j];
            s += sumsq_chunk(u, len);
        }
        acc += s * r[i] * r[i];
    });
    sums[0] = (float)acc, sums[1] = 0.0f;
    lm_sumsq(p, pdt, batch * rows * cols, 1.0f, sums + 1, stream);
    return 0;
}

/* AdaLomo pass 3: p = p*decay - step * g * r[row] * c[col]; the sums live with the tensors
   (device memory on GPU), so no host sync is needed for the step sizes. */
int lm_factored_apply(void *p, int pdt, const void *g, int gdt, int64_t batch, int64_t rows,
                      int64_t cols, prep_t q, const float *r, const float *c, const float *sums,
                      int64_t n, adalomo_t h, int sr, uint64_t seed, void *stream) {
    float decay, step;
    adalomo_steps(sums, n, h, &decay, &step);
    PARALLEL_FOR(batch * rows * cols >= SMALL, schedule(static),
                 for (int64_t i = 0; i < batch * rows; i++), {
        const float *ci = c + (i / rows) * cols;
        float ri = step * r[i], gbuf[CH], wbuf[CH];
        for (int64_t o = 0; o < cols; o += CH) {
            int64_t len = MIN(CH, cols - o), e = i * cols + o;
            const float *d = grad_view(gbuf, g, gdt, e, len, q);
            float *w = view(wbuf, p, pdt, e, len);
            for (int64_t j = 0; j < len; j++) w[j] = w[j] * decay - ri * ci[o + j] * d[j];
            put(p, pdt, e, w, len, sr, seed);
        }
    });
    (void)stream; return 0;
}

/* AdaLomo, the whole update of one tensor in one call: the three passes above plus the small
   state math between them. On the CPU a call from Python costs more than the passes over a
   small tensor, so doing it all here is what makes AdaLomo cheap on models with many small
   tensors. (On the GPU lowmem.py launches the passes itself.) A batch x rows x cols tensor
   keeps row/col statistics; a 0-d / 1-D one (col == NULL, rows = n, cols = 1) keeps a full v
   in row. Returns 1, before anything is modified, if out of memory. */
int lm_adalomo(void *p, int pdt, const void *g, int gdt, float *row, float *col, int64_t batch, int64_t rows,
               int64_t cols, prep_t q, adalomo_t h, int sr, uint64_t seed, void *stream) {
    int64_t n = batch * rows * cols;
    float *r = (float *)malloc(sizeof(float) * batch * rows), *c = (float *)malloc(sizeof(float) * batch * cols);
    if (!r || !c) { free(r); free(c); return 1; }
    if (!col) {  /* V = b2t*V + (1-b2t)*(g^2 + eps1); r = rsqrt(V), c = 1 */
        for (int64_t o = 0; o < n; o += CH) {
            float gbuf[CH]; int64_t len = MIN(CH, n - o);
            const float *d = grad_view(gbuf, g, gdt, o, len, q);
            for (int64_t i = 0; i < len; i++) {
                row[o + i] = h.beta2t * row[o + i] + (1.0f - h.beta2t) * (d[i] * d[i] + h.eps1);
                r[o + i] = 1.0f / sqrtf(row[o + i]);
            }
        }
        c[0] = 1.0f;
    } else {
        lm_rowcol_sumsq(g, gdt, batch, rows, cols, q, h.eps1, r, c, stream);  /* sums of g^2 + eps1 */
        lm_adalomo_factors(row, col, batch, rows, cols, h.beta2t, r, c, stream);
    }
    float sums[2];
    lm_factored_sumsq(g, gdt, p, pdt, batch, rows, cols, q, r, c, sums, stream);
    lm_factored_apply(p, pdt, g, gdt, batch, rows, cols, q, r, c, sums, n, h, sr, seed, stream);
    free(r); free(c);
    return 0;
}

#else
/* ===================================== CUDA ========================================= */
#define THREADS 256
#define MAX_BLOCKS 4096  /* every kernel strides past its grid: no launch depends on the size's range */
static int capped(int64_t blocks) { return (int)(blocks < MAX_BLOCKS ? (blocks > 0 ? blocks : 1) : MAX_BLOCKS); }
static int grid_for(int64_t n) { return capped((n + THREADS - 1) / THREADS); }

__device__ float reduce_op(float a, float b, int max) { return max ? ((b > a || b != b) ? b : a) : a + b; }  /* max: NaN wins, as torch.amax */
__device__ float block_reduce(float x, int max) {  /* sum (or max, with 0 for absent lanes) over the block; valid in thread 0 */
    __shared__ float warp[THREADS / 32];
    for (int o = 16; o > 0; o >>= 1) x = reduce_op(x, __shfl_down_sync(0xffffffff, x, o), max);
    if ((threadIdx.x & 31) == 0) warp[threadIdx.x >> 5] = x;
    __syncthreads();
    x = threadIdx.x < THREADS / 32 ? warp[threadIdx.x] : 0.0f;
    if (threadIdx.x < 32) for (int o = 16; o > 0; o >>= 1) x = reduce_op(x, __shfl_down_sync(0xffffffff, x, o), max);
    __syncthreads();
    return x;
}
__device__ float block_sum(float x) { return block_reduce(x, 0); }

/* Sums over many blocks are run-to-run deterministic: each block writes its partial sum to
   stream-ordered scratch, then one block adds the partials in index order (a float atomicAdd
   per block would add them in the order the blocks happen to finish). */
__global__ void k_add_partials(const float *partial, int64_t n, int count, int assign, float *out) {
    for (int k = 0; k < count; k++) {  /* out[k] (+)= the sum of the k-th n partials */
        float acc = 0.0f;
        for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += partial[k * n + i];
        acc = block_sum(acc);
        if (threadIdx.x == 0) out[k] = assign ? acc : out[k] + acc;
    }
}
__global__ void k_sumsq(const void *x, int dt, int64_t n, float scale, float *partial) {
    float acc = 0.0f;
    GLOBAL_LOOP(i, n) { float v = load(x, dt, i) * scale; acc += v * v; }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}
__device__ void sgd_at(void *p, int pdt, const void *g, int gdt, int64_t i, prep_t q, float lr, float decay, int sr, uint64_t seed) {
    store(p, pdt, i, load(p, pdt, i) * decay - lr * prep(g, gdt, i, q), sr, seed);
}
__global__ void k_sgd(void *p, int pdt, const void *g, int gdt, int64_t n, prep_t q, float lr, float decay, int sr, uint64_t seed) {
    GLOBAL_LOOP(i, n) sgd_at(p, pdt, g, gdt, i, q, lr, decay, sr, seed);
}
__device__ void adam_elem(void *p, int pdt, struct moment M, float g, float v, int64_t i, adam_t h, int sr, uint64_t seed) {  /* m fp32 or bf16 */
    float m = adam_m(load(M.m, M.mdt, i), g, h);
    store(M.m, M.mdt, i, m, M.sr, M.seed);
    store(p, pdt, i, adam_w(load(p, pdt, i), m, adam_denom(v, h), h), sr, seed);
}
__device__ void adam_elem_at(void *p, int pdt, const void *g, int gdt, struct moment M, float *v, int64_t i, prep_t q, adam_t h, int sr, uint64_t seed) {
    float gi = prep(g, gdt, i, q);
    v[i] = adam_v(v[i], gi * gi, h);
    adam_elem(p, pdt, M, gi, v[i], i, h, sr, seed);
}
__global__ void k_adam_elem(void *p, int pdt, const void *g, int gdt, struct moment M, float *v, int64_t n, prep_t q, adam_t h, int sr, uint64_t seed) {
    GLOBAL_LOOP(i, n) adam_elem_at(p, pdt, g, gdt, M, v, i, q, h, sr, seed);
}
__global__ void k_adam_blocks(void *p, int pdt, const void *g, int gdt, struct moment M, float *v, const int64_t *start, int64_t n_v, prep_t q, adam_t h, int sr, uint64_t seed) {
    __shared__ float vb;  /* one CUDA block per Adam-mini block at a time */
    for (int64_t b = blockIdx.x; b < n_v; b += gridDim.x) {
        int64_t a = start[b], e = start[b + 1];
        float acc = 0.0f;
        for (int64_t i = a + threadIdx.x; i < e; i += blockDim.x) { float gi = prep(g, gdt, i, q); acc += gi * gi; }
        acc = block_sum(acc);  /* its barriers also keep vb until every thread is done with it */
        if (threadIdx.x == 0) { vb = adam_v(v[b], acc / (float)(e - a), h); v[b] = vb; }
        __syncthreads();
        for (int64_t i = a + threadIdx.x; i < e; i += blockDim.x) adam_elem(p, pdt, M, prep(g, gdt, i, q), vb, i, h, sr, seed);
    }
}
/* Adam-mini with few large blocks (32 attention heads, one whole tensor) would leave most of
   the GPU idle at one CUDA block per Adam-mini block: each is cut into `split` equal slices, a
   CUDA block per slice. (1) each slice's sum of g^2, (2) per block the slices' sums in order
   (deterministic) -> v, (3) every slice updated with its block's v. */
HD void slice_of(const int64_t *start, int64_t item, int64_t split, int64_t *b, int64_t *lo, int64_t *hi) {
    int64_t a, len, j = item % split;
    *b = item / split;
    a = start[*b], len = start[*b + 1] - a;
    *lo = a + len * j / split, *hi = a + len * (j + 1) / split;
}
__global__ void k_slice_sumsq(const void *g, int gdt, const int64_t *start, int64_t n_v, int64_t split, prep_t q, float *partial) {
    for (int64_t item = blockIdx.x; item < n_v * split; item += gridDim.x) {
        int64_t b, lo, hi;
        slice_of(start, item, split, &b, &lo, &hi);
        float acc = 0.0f;
        for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) { float gi = prep(g, gdt, i, q); acc += gi * gi; }
        acc = block_sum(acc);
        if (threadIdx.x == 0) partial[item] = acc;
    }
}
__global__ void k_slice_v(const float *partial, const int64_t *start, int64_t n_v, int64_t split, float *v, adam_t h) {
    GLOBAL_LOOP(b, n_v) {
        float acc = 0.0f;
        for (int64_t j = 0; j < split; j++) acc += partial[b * split + j];
        v[b] = adam_v(v[b], acc / (float)(start[b + 1] - start[b]), h);
    }
}
__global__ void k_slice_apply(void *p, int pdt, const void *g, int gdt, struct moment M, const float *v, const int64_t *start, int64_t n_v, int64_t split, prep_t q, adam_t h, int sr, uint64_t seed) {
    for (int64_t item = blockIdx.x; item < n_v * split; item += gridDim.x) {
        int64_t b, lo, hi;
        slice_of(start, item, split, &b, &lo, &hi);
        for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) adam_elem(p, pdt, M, prep(g, gdt, i, q), v[b], i, h, sr, seed);
    }
}
/* Adam-mini with an 8-bit m: one CUDA block per run of QB (= THREADS) elements at a time, a
   thread per element: m from its code, m and the weight updated, then the run's new scale from
   the max |m| over the threads, and the codes. Each row's v: vrow[row], or with start (the
   Adam-mini blocks' element offsets, the first 0) the v of the block holding the row. */
HD int64_t block_at(const int64_t *start, int64_t n_v, int64_t e) {  /* the last b with start[b] <= e */
    int64_t lo = 0, hi = n_v - 1;
    while (lo < hi) { int64_t mid = (lo + hi + 1) / 2; if (start[mid] <= e) lo = mid; else hi = mid - 1; }
    return lo;
}
__global__ void k_adam_q8(void *p, int pdt, const void *g, int gdt, struct moment M, const float *v, const int64_t *start, int64_t n_v, int64_t rows, prep_t q, adam_t h, int sr, uint64_t seed) {
    __shared__ float inv;  /* 127 / the run's max |m| */
    int8_t *code = (int8_t *)M.m;
    for (int64_t k = blockIdx.x; k < rows * runs_per_row(M.cols); k += gridDim.x) {
        int64_t r = k / runs_per_row(M.cols), c = k % runs_per_row(M.cols) * QB + threadIdx.x, i = r * M.cols + c;
        float m = 0.0f;
        if (c < M.cols) {
            float vb = start ? v[block_at(start, n_v, r * M.cols)] : v[r];
            m = adam_m((float)code[i] * M.scale[k], prep(g, gdt, i, q), h);
            store(p, pdt, i, adam_w(load(p, pdt, i), m, adam_denom(vb, h), h), sr, seed);
        }
        float amax = block_reduce(fabsf(m), 1);  /* its barriers: every thread has read the old scale */
        if (threadIdx.x == 0) M.scale[k] = amax / 127.0f, inv = 127.0f / amax;
        __syncthreads();
        if (c < M.cols) code[i] = !q8_coded(inv) ? 0 : M.sr ? q8_sr(m, inv, byte_noise(mix64(M.seed), i)) : q8_near(m, inv);
        __syncthreads();  /* everyone has read inv before the next run's thread 0 writes it */
    }
}
__global__ void k_rowsum(const void *g, int gdt, int64_t rows, int64_t cols, prep_t q, float add, float *rowsum) {
    for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {  /* one CUDA block per row at a time */
        float acc = 0.0f;
        for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) { float x = prep(g, gdt, i * cols + j, q); acc += x * x + add; }
        acc = block_sum(acc);
        if (threadIdx.x == 0) rowsum[i] = acc;
    }
}
__global__ void k_adam_rows(void *p, int pdt, const void *g, int gdt, struct moment M, const float *vrow, int64_t rows, int64_t cols, prep_t q, adam_t h, int sr, uint64_t seed) {
    for (int64_t i = blockIdx.x; i < rows; i += gridDim.x)  /* one CUDA block per row */
        for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) adam_elem(p, pdt, M, prep(g, gdt, i * cols + j, q), vrow[i], i * cols + j, h, sr, seed);
}
__global__ void k_colsum(const void *g, int gdt, int64_t batch, int64_t rows, int64_t cols, prep_t q, float add, float *partial) {
    /* work item = (batch, chunk of 32 rows, column): adjacent threads read adjacent columns
       (coalesced) and there is enough parallelism for tall matrices; each writes its partial */
    int64_t chunks = (rows + 31) / 32;
    GLOBAL_LOOP(item, batch * chunks * cols) {
        int64_t c = item % cols, bk = item / cols, b = bk / chunks, r0 = (bk % chunks) * 32;
        int64_t r1 = r0 + 32 < rows ? r0 + 32 : rows;
        float acc = 0.0f;
        for (int64_t r = r0; r < r1; r++) { float x = prep(g, gdt, (b * rows + r) * cols + c, q); acc += x * x + add; }
        partial[item] = acc;
    }
}
__global__ void k_add_chunks(const float *partial, int64_t batch, int64_t chunks, int64_t cols, float *colsum) {
    GLOBAL_LOOP(i, batch * cols) {  /* each column's chunks, in order */
        int64_t b = i / cols, c = i % cols;
        float acc = 0.0f;
        for (int64_t k = 0; k < chunks; k++) acc += partial[(b * chunks + k) * cols + c];
        colsum[i] = acc;
    }
}
/* factored kernels: one CUDA block per row (threads over columns: no per-element integer
   division); a column vector (cols == 1, the unfactored 1-D case) goes element-wise */
__global__ void k_factored_sumsq(const void *g, int gdt, const void *p, int pdt, int64_t batch, int64_t rows, int64_t cols, prep_t q, const float *r, const float *c, float *partial) {
    float acc = 0.0f, psq = 0.0f;  /* partial: the update's squares per CUDA block, then p's */
    if (cols == 1) {
        GLOBAL_LOOP(i, batch * rows) { float u = prep(g, gdt, i, q) * r[i] * c[i / rows], w = load(p, pdt, i); acc += u * u; psq += w * w; }
    } else {
        for (int64_t i = blockIdx.x; i < batch * rows; i += gridDim.x) {
            const float *ci = c + (i / rows) * cols;
            for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
                float u = prep(g, gdt, i * cols + j, q) * r[i] * ci[j], w = load(p, pdt, i * cols + j);
                acc += u * u, psq += w * w;
            }
        }
    }
    acc = block_sum(acc);
    psq = block_sum(psq);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc, partial[gridDim.x + blockIdx.x] = psq;
}
__global__ void k_factors(float *row, float *col, int64_t batch, int64_t rows, int64_t cols, float beta2t, float *rowsum, float *colsum) {
    __shared__ float mean;  /* one CUDA block per matrix of the batch at a time */
    for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
        float *R = row + b * rows, *rb = rowsum + b * rows, acc = 0.0f;
        for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) { R[i] = beta2t * R[i] + (1.0f - beta2t) * (rb[i] / cols); acc += R[i]; }
        acc = block_sum(acc);  /* its barriers: every R[i] written before it is read, mean kept until all are done */
        if (threadIdx.x == 0) mean = acc / rows;
        __syncthreads();
        for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) rb[i] = 1.0f / sqrtf(R[i] / mean);
        for (int64_t j = b * cols + threadIdx.x; j < (b + 1) * cols; j += blockDim.x) {
            col[j] = beta2t * col[j] + (1.0f - beta2t) * (colsum[j] / rows);
            colsum[j] = 1.0f / sqrtf(col[j]);
        }
        __syncthreads();
    }
}
__global__ void k_factored_apply(void *p, int pdt, const void *g, int gdt, int64_t batch, int64_t rows, int64_t cols, prep_t q, const float *r, const float *c, const float *sums, int64_t n, adalomo_t h, int sr, uint64_t seed) {
    float decay, step;
    adalomo_steps(sums, n, h, &decay, &step);
    if (cols == 1) {
        GLOBAL_LOOP(i, batch * rows) store(p, pdt, i, load(p, pdt, i) * decay - step * r[i] * c[i / rows] * prep(g, gdt, i, q), sr, seed);
        return;
    }
    for (int64_t i = blockIdx.x; i < batch * rows; i += gridDim.x) {
        const float *ci = c + (i / rows) * cols;
        float ri = step * r[i];
        for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
            int64_t e = i * cols + j;
            store(p, pdt, e, load(p, pdt, e) * decay - ri * ci[j] * prep(g, gdt, e, q), sr, seed);
        }
    }
}

#define S ((cudaStream_t)stream)
#define DONE return (int)cudaGetLastError()
static int scratch(float **x, int64_t n, void *stream) {  /* stream-ordered: freed after the kernels that use it */
    int err = (int)cudaMallocAsync((void **)x, (size_t)n * sizeof(float), S);
    if (err) cudaGetLastError();  /* returned here, not left for the next call */
    return err;
}
EXPORT int lm_sumsq(const void *x, int dt, int64_t n, float scale, float *out, void *stream) {
    float *partial;
    int grid = grid_for(n), err;
    if (n <= 0) DONE;
    if ((err = scratch(&partial, grid, stream))) return err;
    k_sumsq<<<grid, THREADS, 0, S>>>(x, dt, n, scale, partial);
    k_add_partials<<<1, THREADS, 0, S>>>(partial, grid, 1, 0, out);
    cudaFreeAsync(partial, S); DONE;
}
EXPORT int lm_sgd(void *p, int pdt, const void *g, int gdt, int64_t n, prep_t q, float lr, float decay, int sr, uint64_t seed, void *stream) {
    if (n > 0) k_sgd<<<grid_for(n), THREADS, 0, S>>>(p, pdt, g, gdt, n, q, lr, decay, sr, seed); DONE;
}
EXPORT int lm_adam_elem(void *p, int pdt, const void *g, int gdt, void *m, float *v, int64_t n, int mdt, prep_t q, adam_t h, int sr, uint64_t seed, int msr, uint64_t mseed, void *stream) {
    struct moment M = {m, mdt, NULL, 0, msr, mseed};
    if (mdt == M_INT8) return 2;  /* 8-bit m is for blocks of rows */
    if (n > 0) k_adam_elem<<<grid_for(n), THREADS, 0, S>>>(p, pdt, g, gdt, M, v, n, q, h, sr, seed); DONE;
}
#define BUSY 1024  /* CUDA blocks that keep every SM of a large GPU streaming */
#define SLICE 2048  /* elements a slice has at least */
EXPORT int lm_adam_blocks(void *p, int pdt, const void *g, int gdt, void *m, float *mscale, float *v, const int64_t *start, int64_t n_v, int64_t n, int mdt, int64_t cols, prep_t q, adam_t h, int sr, uint64_t seed, int msr, uint64_t mseed, void *stream) {
    struct moment M = {m, mdt, mscale, cols, msr, mseed};
    int64_t split;  /* slices per block: CUDA blocks enough to keep the GPU busy, none under SLICE elements */
    float *partial;
    int err;
    if (n_v <= 0 || n <= 0) DONE;
    split = n / (n_v * SLICE);
    if (split > BUSY / n_v) split = BUSY / n_v;
    if (split < 1) split = 1;
    if (split == 1 && mdt != M_INT8) {  /* blocks enough: one CUDA block per Adam-mini block, g read while in cache */
        k_adam_blocks<<<capped(n_v), THREADS, 0, S>>>(p, pdt, g, gdt, M, v, start, n_v, q, h, sr, seed); DONE;
    }
    if ((err = scratch(&partial, n_v * split, stream))) return err;
    k_slice_sumsq<<<capped(n_v * split), THREADS, 0, S>>>(g, gdt, start, n_v, split, q, partial);
    k_slice_v<<<grid_for(n_v), THREADS, 0, S>>>(partial, start, n_v, split, v, h);
    if (mdt == M_INT8)  /* a CUDA block per run of m: its new scale needs the whole run */
        k_adam_q8<<<capped(n / cols * runs_per_row(cols)), THREADS, 0, S>>>(p, pdt, g, gdt, M, v, start, n_v, n / cols, q, h, sr, seed);
    else
        k_slice_apply<<<capped(n_v * split), THREADS, 0, S>>>(p, pdt, g, gdt, M, v, start, n_v, split, q, h, sr, seed);
    cudaFreeAsync(partial, S); DONE;
}
EXPORT int lm_row_sumsq(const void *g, int gdt, int64_t rows, int64_t cols, prep_t q, float add, float *rowsum, void *stream) {
    if (rows * cols > 0) k_rowsum<<<capped(rows), THREADS, 0, S>>>(g, gdt, rows, cols, q, add, rowsum); DONE;
}
EXPORT int lm_adam_rows(void *p, int pdt, const void *g, int gdt, void *m, float *mscale, const float *vrow, int64_t rows, int64_t cols, int mdt, prep_t q, adam_t h, int sr, uint64_t seed, int msr, uint64_t mseed, void *stream) {
    struct moment M = {m, mdt, mscale, cols, msr, mseed};
    if (rows * cols <= 0) DONE;
    if (mdt == M_INT8) k_adam_q8<<<capped(rows * runs_per_row(cols)), THREADS, 0, S>>>(p, pdt, g, gdt, M, vrow, NULL, 0, rows, q, h, sr, seed);
    else k_adam_rows<<<capped(rows), THREADS, 0, S>>>(p, pdt, g, gdt, M, vrow, rows, cols, q, h, sr, seed);
    DONE;
}
EXPORT int lm_rowcol_sumsq(const void *g, int gdt, int64_t batch, int64_t rows, int64_t cols, prep_t q, float add, float *rowsum, float *colsum, void *stream) {
    if (batch * rows * cols == 0) DONE;
    int64_t chunks = (rows + 31) / 32;
    float *partial;
    int err = lm_row_sumsq(g, gdt, batch * rows, cols, q, add, rowsum, stream);  /* clears the error it returns */
    if (err || (err = scratch(&partial, batch * chunks * cols, stream))) return err;
    k_colsum<<<grid_for(batch * chunks * cols), THREADS, 0, S>>>(g, gdt, batch, rows, cols, q, add, partial);
    k_add_chunks<<<grid_for(batch * cols), THREADS, 0, S>>>(partial, batch, chunks, cols, colsum);  /* assigned, as on the CPU */
    cudaFreeAsync(partial, S); DONE;
}
EXPORT int lm_adalomo_factors(float *row, float *col, int64_t batch, int64_t rows, int64_t cols, float beta2t, float *rowsum, float *colsum, void *stream) {
    if (batch * rows * cols > 0) k_factors<<<capped(batch), THREADS, 0, S>>>(row, col, batch, rows, cols, beta2t, rowsum, colsum); DONE;
}
EXPORT int lm_factored_sumsq(const void *g, int gdt, const void *p, int pdt, int64_t batch, int64_t rows, int64_t cols, prep_t q, const float *r, const float *c, float *sums, void *stream) {
    int64_t n = batch * rows * cols;
    int grid = cols == 1 ? grid_for(n) : capped(batch * rows), err;
    float *partial;
    if (n <= 0) { cudaMemsetAsync(sums, 0, 2 * sizeof(float), S); DONE; }
    if ((err = scratch(&partial, 2 * (int64_t)grid, stream))) return err;
    k_factored_sumsq<<<grid, THREADS, 0, S>>>(g, gdt, p, pdt, batch, rows, cols, q, r, c, partial);
    k_add_partials<<<1, THREADS, 0, S>>>(partial, grid, 2, 1, sums);  /* assigned, as on the CPU */
    cudaFreeAsync(partial, S); DONE;
}
EXPORT int lm_factored_apply(void *p, int pdt, const void *g, int gdt, int64_t batch, int64_t rows, int64_t cols, prep_t q, const float *r, const float *c, const float *sums, int64_t n_all, adalomo_t h, int sr, uint64_t seed, void *stream) {
    int64_t n = batch * rows * cols;
    if (n > 0) k_factored_apply<<<cols == 1 ? grid_for(n) : capped(batch * rows), THREADS, 0, S>>>(p, pdt, g, gdt, batch, rows, cols, q, r, c, sums, n_all, h, sr, seed); DONE;
}
#endif

/* ================================ multi-tensor calls ==================================
   Every whole-update call goes through these: the classic driver's step() issues one call per
   kernel for all its tensors, a hook one call with one item. Each item holds one per-tensor
   call's arguments, in the same order (the addresses as integers): p, pdt, g, gdt, the state
   tensors, the sizes, then the preparation and the per-step scalars. The per-tensor kernels above do the math. On the CPU, tensors of
   fewer than SMALL elements are spread over the threads one tensor per thread (a parallel
   region costs more than a tiny tensor's update); larger ones run in turn with every thread.
   On CUDA the items are launched in turn on the stream, except runs of small element-wise
   ones, which share launches (below). Returns the first nonzero error, and in *done how many items
   ran (on CUDA a failed launch ends the list: lowmem gives the others back their step). */
typedef struct { uintptr_t p; int pdt; uintptr_t g; int gdt; int64_t n; prep_t q; float lr, decay; int sr; uint64_t seed; } sgd_call;
typedef struct { uintptr_t p; int pdt; uintptr_t g; int gdt; uintptr_t m, v; int64_t n; int mdt; prep_t q; adam_t h; int sr; uint64_t seed; int msr; uint64_t mseed; } adam_elem_call;
typedef struct { uintptr_t p; int pdt; uintptr_t g; int gdt; uintptr_t m, mscale, v, start; int64_t n_v, n; int mdt; int64_t cols; prep_t q; adam_t h; int sr; uint64_t seed; int msr; uint64_t mseed; } adam_blocks_call;
typedef struct { uintptr_t p; int pdt; uintptr_t g; int gdt; uintptr_t row, col; int64_t batch, rows, cols; prep_t q; adalomo_t h; int sr; uint64_t seed; } adalomo_call;
#define P(x) ((void *)(x))

#ifdef __CUDACC__
/* Before the first item, the kernel itself is asked for (cudaFuncGetAttributes): one with no
   image for this GPU, or an error left pending by earlier work, fails with nothing launched.
   count 0 is that check alone: lowmem checks every kernel of a step before it launches any.
   Element-wise kernels (few: a launcher below) take each run of two or more consecutive items
   under FEW elements (biases, norms, small layers) BATCH at a time in one launch, whose
   arguments carry the items (no copy to the device, no sync): a launch each would cost more
   than their update. A hook's call has one item, and launches it alone. */
#define FEW 65536
#define BATCH 32     /* items per launch: 32 of the largest item are under the 4 KB of a launch's arguments */
#define PER_ITEM 8   /* CUDA blocks per item */
#define NONE ((void (*)(const void *, int64_t, void *))0)
#define MULTI(name, type, size, kernel, few, call) \
EXPORT int lm_multi_##name(const type *items, int64_t count, int64_t *done, void *stream) { \
    cudaFuncAttributes attr; \
    int64_t i = 0; \
    int err = (int)cudaPeekAtLastError(); \
    if (!err) err = (int)cudaFuncGetAttributes(&attr, kernel); \
    if (err) cudaGetLastError(); /* returned here, not left for the next call */ \
    while (!err && i < count) { \
        int64_t j = i; \
        for (const type *c = items + j; few != NONE && j < count && j - i < BATCH && (size) < FEW; c = items + ++j) {} \
        if (j - i >= 2) { few(items + i, j - i, stream); err = (int)cudaGetLastError(); if (!err) i = j; } \
        else { const type *c = items + i; if (!(err = call)) i++; } \
    } \
    *done = i; \
    return err; \
}
struct sgd_batch { sgd_call c[BATCH]; int64_t count; };  /* C++ (CUDA only): not among lowmem.py's declarations */
struct adam_elem_batch { adam_elem_call c[BATCH]; int64_t count; };
/* item blockIdx.x % count; its elements strided over that item's PER_ITEM CUDA blocks */
#define ITEM_LOOP(b, c, i) \
    const auto *c = b.c + blockIdx.x % b.count; \
    for (int64_t i = (blockIdx.x / b.count) * blockDim.x + threadIdx.x; i < c->n; i += PER_ITEM * blockDim.x)
__global__ void k_sgd_items(sgd_batch b) {
    ITEM_LOOP(b, c, i) sgd_at(P(c->p), c->pdt, P(c->g), c->gdt, i, c->q, c->lr, c->decay, c->sr, c->seed);
}
__global__ void k_adam_elem_items(adam_elem_batch b) {
    ITEM_LOOP(b, c, i) {
        struct moment M = {P(c->m), c->mdt, NULL, 0, c->msr, c->mseed};  /* fp32 or bf16 */
        adam_elem_at(P(c->p), c->pdt, P(c->g), c->gdt, M, (float *)P(c->v), i, c->q, c->h, c->sr, c->seed);
    }
}
static void sgd_items(const void *items, int64_t count, void *stream) {
    sgd_batch b;
    memcpy(b.c, items, count * sizeof(sgd_call)), b.count = count;
    k_sgd_items<<<(int)count * PER_ITEM, THREADS, 0, S>>>(b);
}
static void adam_elem_items(const void *items, int64_t count, void *stream) {
    adam_elem_batch b;
    memcpy(b.c, items, count * sizeof(adam_elem_call)), b.count = count;
    k_adam_elem_items<<<(int)count * PER_ITEM, THREADS, 0, S>>>(b);
}
#else
#define MULTI(name, type, size, kernel, few, call) \
int lm_multi_##name(const type *items, int64_t count, int64_t *done, void *stream) { \
    int err = 0; \
    PARALLEL_FOR(count > 1, schedule(dynamic) reduction(|:err), for (int64_t i = 0; i < count; i++), \
                 { const type *c = items + i; if ((size) < SMALL) err |= call; }); \
    for (int64_t i = 0; i < count; i++) { const type *c = items + i; if ((size) >= SMALL) err |= call; } \
    *done = count; /* the CPU kernels cannot fail: every item ran */ \
    return err; \
}
#endif

MULTI(sgd, sgd_call, c->n, k_sgd, sgd_items,
      lm_sgd(P(c->p), c->pdt, P(c->g), c->gdt, c->n, c->q, c->lr, c->decay, c->sr, c->seed, stream))
MULTI(adam_elem, adam_elem_call, c->n, k_adam_elem, adam_elem_items,
      lm_adam_elem(P(c->p), c->pdt, P(c->g), c->gdt, P(c->m), (float *)P(c->v), c->n, c->mdt, c->q, c->h, c->sr, c->seed,
                   c->msr, c->mseed, stream))
MULTI(adam_blocks, adam_blocks_call, c->n, k_adam_blocks, NONE,
      lm_adam_blocks(P(c->p), c->pdt, P(c->g), c->gdt, P(c->m), (float *)P(c->mscale), (float *)P(c->v), (const int64_t *)P(c->start),
                     c->n_v, c->n, c->mdt, c->cols, c->q, c->h, c->sr, c->seed, c->msr, c->mseed, stream))
#ifndef __CUDACC__
MULTI(adalomo, adalomo_call, c->batch * c->rows * c->cols, none, NONE,  /* CPU only: no CUDA kernel */
      lm_adalomo(P(c->p), c->pdt, P(c->g), c->gdt, (float *)P(c->row), (float *)P(c->col), c->batch, c->rows, c->cols,
                 c->q, c->h, c->sr, c->seed, stream))
#endif
