/* Region-score numerators of the "pairs" form (vfs/kernel.py): for every image, every data cell
 * and every query cell that some placement puts on it, one dot product over the channels, added
 * to that placement's sum. Nothing else is computed: no cell outside a placement, no padding.
 *
 *   vfs_pairs_f16:  fp16 features (F16C, exact in fp32), fp32 weights, fp32 FMAs (AVX2 or AVX-512)
 *   vfs_pairs_bf16: bf16 features and weights, VDPBF16PS (AVX512-BF16: exact products, fp32 sums;
 *                   the instruction treats subnormal inputs as zero and flushes subnormal sums)
 *
 * Layout: x (n, cells, c) row-major; w (K, cp) row-major, cp = c rounded up to the vector width
 * with zeros; pairs of data cell d: pk[j], pp[j] for j in start[d]..start[d+1] (query cell, and the
 * placement it lands in); out[p * stride + i] for images i in [i0, i1); acc: scratch of
 * 2 * places * 16 floats. Each placement sums its lanes over all its pairs, then once across. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#define L 16
typedef __m512 vf;
static inline vf load_h(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static inline vf load_f(const float *p) { return _mm512_loadu_ps(p); }
static inline vf fma_(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf add_(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf zero_(void) { return _mm512_setzero_ps(); }
static inline void store_f(float *p, vf v) { _mm512_storeu_ps(p, v); }
static inline float hsum(vf v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define L 8
typedef __m256 vf;
static inline vf load_h(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline vf load_f(const float *p) { return _mm256_loadu_ps(p); }
static inline vf fma_(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf add_(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf zero_(void) { return _mm256_setzero_ps(); }
static inline void store_f(float *p, vf v) { _mm256_storeu_ps(p, v); }
static inline float hsum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#else
#error "the pairs kernel needs AVX-512F, or AVX2 with F16C and FMA"
#endif


/* A cell's last c % width channels, zero-padded to one vector (the weights are padded alike). */
static inline const uint16_t *tail_of(const uint16_t *xd, int full, int c, uint16_t *buf, int width) {
    if (full == c) return 0;
    memset(buf, 0, sizeof(uint16_t) * (size_t)width);
    memcpy(buf, xd + full, sizeof(uint16_t) * (size_t)(c - full));
    return buf;
}

#if defined(__AVX512BF16__)
#define HAS_BF16 1
static inline __m512bh load_bh(const uint16_t *p) { return (__m512bh)_mm512_loadu_si512((const void *)p); }
#else
#define HAS_BF16 0
#endif

/* Bit 0: vfs_pairs_f16 is built; bit 1: vfs_pairs_bf16. Bits 8..15: the fp16 vector width. */
int vfs_kernel_info(void) { return 1 | (HAS_BF16 ? 2 : 0) | (L << 8); }

#define WIDTH(bf16) ((bf16) ? 32 : L)  /* channels per vector */
#define LANES(bf16) ((bf16) ? 16 : L)  /* fp32 sums per vector */

/* One step of R pairs over one channel vector at offset c, for one image (v = 0) or two: each
 * weight vector loaded serves both (2,048-channel query cells outgrow the L1 cache). */
static inline __attribute__((always_inline)) void step(int bf16, int R, const uint16_t *u, const uint16_t *v,
                                                       const void *w, int cp, int c, const int32_t *k,
                                                       vf *a, vf *b) {
#if HAS_BF16
    if (bf16) {
        __m512bh xu = load_bh(u), xv = v ? load_bh(v) : xu;
        for (int t = 0; t < R; t++) {
            __m512bh wt = load_bh((const uint16_t *)w + (int64_t)k[t] * cp + c);
            a[t] = _mm512_dpbf16_ps(a[t], xu, wt);
            if (v) b[t] = _mm512_dpbf16_ps(b[t], xv, wt);
        }
        return;
    }
#endif
    (void)bf16;
    vf xu = load_h(u), xv = v ? load_h(v) : xu;
    for (int t = 0; t < R; t++) {
        vf wt = load_f((const float *)w + (int64_t)k[t] * cp + c);
        a[t] = fma_(xu, wt, a[t]);
        if (v) b[t] = fma_(xv, wt, b[t]);
    }
}

/* R pairs of one data cell in one or two images: R dot products each over the cell's channels,
 * added to their placements' lane sums. */
static inline __attribute__((always_inline)) void block(int bf16, int R, const uint16_t *x0, const uint16_t *x1,
                                                        const uint16_t *t0, const uint16_t *t1, int full, int cp,
                                                        const void *w, const int32_t *k, const int32_t *p,
                                                        float *acc0, float *acc1) {
    vf a[8], b[8];
    for (int t = 0; t < R; t++) a[t] = b[t] = zero_();
    if (x1) {
        for (int c = 0; c < full; c += WIDTH(bf16)) step(bf16, R, x0 + c, x1 + c, w, cp, c, k, a, b);
        if (t0) step(bf16, R, t0, t1, w, cp, full, k, a, b);
    } else {
        for (int c = 0; c < full; c += WIDTH(bf16)) step(bf16, R, x0 + c, 0, w, cp, c, k, a, b);
        if (t0) step(bf16, R, t0, 0, w, cp, full, k, a, b);
    }
    for (int t = 0; t < R; t++) {
        float *d0 = acc0 + (int64_t)p[t] * LANES(bf16);
        store_f(d0, add_(load_f(d0), a[t]));
        if (x1) {
            float *d1 = acc1 + (int64_t)p[t] * LANES(bf16);
            store_f(d1, add_(load_f(d1), b[t]));
        }
    }
}

/* Images [i0, i1), two at a time. With AVX2's 16 registers, at most 4 pairs at once (2 × 4 sums). */
static inline __attribute__((always_inline)) void run(int bf16, const uint16_t *x, int64_t i0, int64_t i1,
                                                      int32_t cells, int32_t c, const void *w, int32_t cp,
                                                      const int32_t *start, const int32_t *pk, const int32_t *pp,
                                                      int32_t places, float *out, int64_t stride, float *acc) {
    const int width = WIDTH(bf16), lanes = LANES(bf16), full = c / width * width;
    uint16_t buf0[32], buf1[32];
    float *acc1 = acc + (int64_t)places * lanes;
    for (int64_t i = i0; i < i1; i += 2) {
        const int two = i + 1 < i1;
        memset(acc, 0, sizeof(float) * (size_t)places * lanes * 2);
        for (int d = 0; d < cells; d++) {
            int j = start[d];
            const int e = start[d + 1];
            const uint16_t *x0 = x + (i * cells + d) * (int64_t)c, *x1 = two ? x0 + (int64_t)cells * c : 0;
            const uint16_t *t0 = tail_of(x0, full, c, buf0, width), *t1 = two ? tail_of(x1, full, c, buf1, width) : 0;
#if L == 16
            for (; j + 8 <= e; j += 8) block(bf16, 8, x0, x1, t0, t1, full, cp, w, pk + j, pp + j, acc, acc1);
#endif
            for (; j + 4 <= e; j += 4) block(bf16, 4, x0, x1, t0, t1, full, cp, w, pk + j, pp + j, acc, acc1);
            if (j + 2 <= e) { block(bf16, 2, x0, x1, t0, t1, full, cp, w, pk + j, pp + j, acc, acc1); j += 2; }
            if (j < e) block(bf16, 1, x0, x1, t0, t1, full, cp, w, pk + j, pp + j, acc, acc1);
        }
        for (int p = 0; p < places; p++) {
            out[p * stride + i] = hsum(load_f(acc + (int64_t)p * lanes));
            if (two) out[p * stride + i + 1] = hsum(load_f(acc1 + (int64_t)p * lanes));
        }
    }
}

void vfs_pairs_f16(const uint16_t *x, int64_t i0, int64_t i1, int32_t cells, int32_t c, const float *w,
                   int32_t cp, const int32_t *start, const int32_t *pk, const int32_t *pp, int32_t places,
                   float *out, int64_t stride, float *acc) {
    run(0, x, i0, i1, cells, c, w, cp, start, pk, pp, places, out, stride, acc);
}

#if HAS_BF16
void vfs_pairs_bf16(const uint16_t *x, int64_t i0, int64_t i1, int32_t cells, int32_t c, const uint16_t *w,
                    int32_t cp, const int32_t *start, const int32_t *pk, const int32_t *pp, int32_t places,
                    float *out, int64_t stride, float *acc) {
    run(1, x, i0, i1, cells, c, w, cp, start, pk, pp, places, out, stride, acc);
}
#endif

/* Both kernels on the caller's OpenMP team: `parallel` is the GOMP_parallel of the OpenMP runtime
 * PyTorch runs its own operators on, so the threads it keeps spinning after an operator take this
 * work instead of competing with other threads for the cores. */
typedef void (*vfs_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*vfs_team_fn)(void);

struct vfs_job {
    int bf16;
    const uint16_t *x;
    int64_t n;
    int32_t cells, c;
    const void *w;
    int32_t cp;
    const int32_t *start, *pk, *pp;
    int32_t places;
    float *out;
    int64_t stride;
    float *acc; /* per thread: 2 * places * 16 floats */
    int max_threads;
    vfs_team_fn thread_num, num_threads;
};

static void vfs_job_run(void *arg) {
    const struct vfs_job *j = arg;
    int t = j->thread_num(), team = j->num_threads();
    if (team > j->max_threads) team = j->max_threads; /* never more scratch than allocated */
    if (t >= team) return;
    int64_t i0 = j->n * t / team, i1 = j->n * (t + 1) / team;
    float *acc = j->acc + (int64_t)t * 2 * j->places * 16;
#if HAS_BF16
    if (j->bf16) {
        vfs_pairs_bf16(j->x, i0, i1, j->cells, j->c, j->w, j->cp, j->start, j->pk, j->pp, j->places, j->out,
                       j->stride, acc);
        return;
    }
#endif
    vfs_pairs_f16(j->x, i0, i1, j->cells, j->c, j->w, j->cp, j->start, j->pk, j->pp, j->places, j->out,
                  j->stride, acc);
}

void vfs_pairs_team(vfs_parallel_fn parallel, vfs_team_fn thread_num, vfs_team_fn num_threads, int threads,
                    int bf16, const uint16_t *x, int64_t n, int32_t cells, int32_t c, const void *w, int32_t cp,
                    const int32_t *start, const int32_t *pk, const int32_t *pp, int32_t places, float *out,
                    int64_t stride, float *acc) {
    struct vfs_job j = {bf16, x, n, cells, c, w, cp, start, pk, pp, places, out, stride, acc, threads,
                        thread_num, num_threads};
    parallel(vfs_job_run, &j, (unsigned)threads, 0);
}
