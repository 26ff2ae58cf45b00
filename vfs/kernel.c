/* Region-score numerators of the "pairs" form (vfs/kernel.py): for every image, every data cell
 * and every query cell that some placement puts on it, one dot product over the channels, added
 * to that placement's sum. Nothing else is computed: no cell outside a placement, no padding.
 *
 *   vfs_pairs_f16:  fp16 features (F16C, exact in fp32), fp32 weights, fp32 FMAs (AVX2 or AVX-512)
 *   vfs_pairs_f32:  fp32 features, each value rounded to fp16 (to nearest, F16C) as it is loaded:
 *                   the values of the array's fp16 copy, without the copy; then as vfs_pairs_f16
 *   vfs_pairs_bf16: bf16 features and weights, VDPBF16PS (AVX512-BF16: exact products, fp32 sums;
 *                   the instruction treats subnormal inputs as zero and flushes subnormal sums)
 *
 * Layout: x (n, cells, c) row-major — or (n, c, cells), a channels-first array (kinds CF16 / CF32,
 * `vfs_pairs_channels_first`; under one placement that covers the grid WCF16 / WCF32,
 * `vfs_whole_channels_first`); w (K, cp) row-major, cp = c rounded up to the vector width
 * with zeros; pairs of data cell d: pk[j], pp[j] for j in start[d]..start[d+1] (query cell, and the
 * placement it lands in); out[p * stride + i] for images i in [i0, i1); acc: scratch of
 * vfs_scratch_floats(places) floats (the team's: vfs_thread_floats per thread). Each placement
 * sums its lanes over all its pairs, then once across.
 * Given a `struct vfs_best`, each image's placements are scored instead (see there). */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#define L 16
typedef __m512 vf;
static inline vf load_h(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
static inline vf load_r(const float *p) {
    return _mm512_cvtph_ps(_mm512_cvtps_ph(_mm512_loadu_ps(p), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
static inline vf load_f(const float *p) { return _mm512_loadu_ps(p); }
static inline vf fma_(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf add_(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf zero_(void) { return _mm512_setzero_ps(); }
static inline void store_f(float *p, vf v) { _mm512_storeu_ps(p, v); }
static inline float hsum(vf v) { return _mm512_reduce_add_ps(v); }
static inline int any_below_zero(vf v) { return _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NGE_UQ) != 0; }
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define L 8
typedef __m256 vf;
static inline vf load_h(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline vf load_r(const float *p) { return _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(p), _MM_FROUND_TO_NEAREST_INT)); }
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
static inline int any_below_zero(vf v) { return _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_NGE_UQ)) != 0; }
#else
#error "the pairs kernel needs AVX-512F, or AVX2 with F16C and FMA"
#endif

#define AI static inline __attribute__((always_inline))

/* The features' type (`kind` below): each its own code, the kind a constant where it is used.
 * CF16 / CF32: a channels-first (n, c, cells) array of fp16 / fp32 values, IMAGES images at a time
 * transposed to (cells, c) fp16 in the thread's scratch (fp32 first rounded to nearest in order, as
 * F32 rounds it), then run as F16 (`vfs_pairs_channels_first`). WCF16 / WCF32: such an array under one
 * placement that covers the grid, read in order (`vfs_whole_channels_first`). */
enum { F16 = 0, BF16 = 1, F32 = 2, CF16 = 3, CF32 = 4, WCF16 = 5, WCF32 = 6 };
#define ESIZE(kind) ((kind) == F32 ? 4 : 2) /* bytes per value */
#define TAIL_BYTES 64                       /* the widest vector of values: 32 bf16 or 16 fp32 */

/* fp32 values of fp16 (F16), or of fp32 features rounded to fp16 (F32), `off` values past p. */
AI vf load_x(int kind, const void *p, int64_t off) {
    return kind == F32 ? load_r((const float *)p + off) : load_h((const uint16_t *)p + off);
}

/* A cell's last c % width channels, zero-padded to one vector (the weights are padded alike). */
static inline const void *tail_of(const void *xd, int full, int c, int esize, unsigned char *buf, int width) {
    if (full == c) return 0;
    memset(buf, 0, (size_t)esize * (size_t)width);
    memcpy(buf, (const char *)xd + (size_t)esize * (size_t)full, (size_t)esize * (size_t)(c - full));
    return buf;
}

/* The squared norm of one row of c values as fp16 (fp32 squares and sums: fp16 is exact in fp32),
 * in two chains; *below set where a value is not ≥ 0 (negative or NaN). */
AI float row_sqnorm(int kind, const void *p, int c, int *below) {
    const int full = c / L * L;
    unsigned char buf[TAIL_BYTES];
    vf a0 = zero_(), a1 = zero_();
    int k = 0, neg = 0;
    for (; k + 2 * L <= full; k += 2 * L) {
        const vf v0 = load_x(kind, p, k), v1 = load_x(kind, p, k + L);
        a0 = fma_(v0, v0, a0);
        a1 = fma_(v1, v1, a1);
        neg |= any_below_zero(v0) | any_below_zero(v1);
    }
    for (; k < full; k += L) {
        const vf v = load_x(kind, p, k);
        a0 = fma_(v, v, a0);
        neg |= any_below_zero(v);
    }
    const void *tail = tail_of(p, full, c, ESIZE(kind), buf, L);
    if (tail) {
        const vf v = load_x(kind, tail, 0);
        a0 = fma_(v, v, a0);
        neg |= any_below_zero(v);
    }
    *below |= neg;
    return hsum(add_(a0, a1));
}

#if defined(__AVX512BF16__)
#define HAS_BF16 1
static inline __m512bh load_bh(const uint16_t *p) { return (__m512bh)_mm512_loadu_si512((const void *)p); }
#else
#define HAS_BF16 0
#endif

/* Bit 0: vfs_pairs_f16 is built; bit 1: vfs_pairs_bf16; bit 2: vfs_pairs_f32 (and the channels-first
 * kinds). Bits 8..15: the fp16 (and fp32) vector width. */
int vfs_kernel_info(void) { return 1 | (HAS_BF16 ? 2 : 0) | 4 | (L << 8); }

#define WIDTH(kind) ((kind) == BF16 ? 32 : L)  /* channels per vector */
#define LANES(kind) ((kind) == BF16 ? 16 : L)  /* fp32 sums per vector */

/* Images per step: each weight vector loaded serves all of them (2,048-channel query cells outgrow
 * the L1 cache, and a block's set-up is paid once for them). Pairs per block: at most RMAX, so that
 * IMAGES · RMAX sums, IMAGES data vectors and a weight vector stay in registers (AVX-512: 24 + 4 + 1
 * of 32; AVX2: 12 + 3 + 1 of 16 — on Zen 4's AVX2 build 5-16% faster than 2 images × 4 pairs on the
 * grid's 3×3 and blob masks, and 4 × 3 spills). Fewer, larger blocks read and convert a cell's data
 * fewer times: a data cell has up to K pairs (9 for a 3×3 region), split into blocks of near-equal
 * size. */
#if L == 16
#define IMAGES 4
#define RMAX 6
#else
#define IMAGES 3
#define RMAX 4
#endif
/* Pairs in a cell's first block where it also takes the cell's squared norm (`vfs_best.fill`): one
 * more sum per image in registers (AVX-512: 20 + 4 + 1 + 4 of 32; AVX2: 9 + 3 + 1 + 3 of 16). */
#define RNORM (RMAX - 1)

/* One step of R pairs over one channel vector (at `off` in each of the M images' `src`, at `c` in
 * the weights). */
AI void step(int kind, int R, int M, const void *const *src, int off, const void *w, int cp, int c,
             const int32_t *k, vf (*a)[RMAX], vf *norm) {
#if HAS_BF16
    if (kind == BF16) {
        __m512bh xv[IMAGES];
        for (int i = 0; i < M; i++) xv[i] = load_bh((const uint16_t *)src[i] + off);
        for (int t = 0; t < R; t++) {
            __m512bh wt = load_bh((const uint16_t *)w + (int64_t)k[t] * cp + c);
            __asm__("" : "+v"(wt)); /* in a register: see below */
            for (int i = 0; i < M; i++) a[i][t] = _mm512_dpbf16_ps(a[i][t], xv[i], wt);
        }
        return;
    }
#endif
    vf xv[IMAGES];
    for (int i = 0; i < M; i++) xv[i] = load_x(kind, src[i], off);
    if (norm)
        for (int i = 0; i < M; i++) norm[i] = fma_(xv[i], xv[i], norm[i]);
    for (int t = 0; t < R; t++) {
        vf wt = load_f((const float *)w + (int64_t)k[t] * cp + c);
        /* In a register, not folded by the compiler into each of the M multiply-adds as a memory
         * operand: M loads per weight vector held the loop to 55-70% of the FMA rate on Zen 4. */
        __asm__("" : "+v"(wt));
        for (int i = 0; i < M; i++) a[i][t] = fma_(xv[i], wt, a[i][t]);
    }
}

/* The lines `ahead` values past `off` in each of the M images, requested a 64-byte line per call
 * while a cell's first block runs: the hardware's prefetch of M interleaved streams runs behind the
 * multiply-adds. Into L1 where they are at most 512 bytes on (a cell of ≤ 256 fp16 channels in a
 * large image), into L2 beyond — which short images' 2 KB always are (into L1 they were 10-13%
 * slower on 7×7×192, and evicted the weights of 2,048-channel queries). Zen 4: 7-15% off queries
 * on 768 and 2,048 channels. */
AI void prefetch_next(int kind, int M, const void *const *src, int off, int64_t ahead) {
    if (off % (64 / ESIZE(kind))) return;
    for (int i = 0; i < M; i++) {
        const char *line = (const char *)src[i] + (off + ahead) * ESIZE(kind);
        if (ahead * ESIZE(kind) <= 512) _mm_prefetch(line, _MM_HINT_T0);
        else _mm_prefetch(line, _MM_HINT_T1);
    }
}

/* How far past the start of data cell d its first block prefetches, in bytes: the next cell; in
 * images of at most SHORT_IMAGE bytes (7×7 grids up to 512 channels), the whole cells in NEAR bytes,
 * and past the image's end in image m + M, the one its stream reads next (m + 1 is another stream's,
 * read already). The hardware's prefetch restarts at each short image. Zen 4, 10,000 × 7×7×192:
 * 7-13% off each mask (AVX2 build 12-14%), 2,000 × 7×7×512: 4-10%; at 14×14×384 and 768, two cells
 * ahead cost whole-grid masks 5-14%, and wrapping into the next images cost 2,048-channel ones 2%. */
#define SHORT_IMAGE 65536
#define NEAR 2048
static inline int64_t prefetch_distance(int M, int32_t d, int64_t cell_bytes, int64_t image_bytes) {
    if (image_bytes > SHORT_IMAGE || cell_bytes >= NEAR || cell_bytes == 0) return cell_bytes;
    const int64_t to = d * cell_bytes + NEAR / cell_bytes * cell_bytes;
    return to - d * cell_bytes + to / image_bytes * (M - 1) * image_bytes;
}

/* R pairs of one data cell in M images: R dot products each over the cell's channels (the last
 * vector from `tails` where c is not a multiple of the width), added to their placements' lane
 * sums (acc + i·places·lanes for image i); the lines `ahead` values on prefetched where it is not 0; and,
 * where `sq` is given (not bf16), each image's squared norm of the cell into sq[i · cells]. */
AI void block(int kind, int R, int M, const void *const *xs, const void *const *tails, int full, int cp,
              const void *w, const int32_t *k, const int32_t *p, float *acc, int64_t per_image, int64_t ahead,
              float *sq, int32_t cells) {
    vf a[IMAGES][RMAX], n[IMAGES];
    vf *norm = sq ? n : 0;
    for (int i = 0; i < M; i++) {
        n[i] = zero_();
        for (int t = 0; t < R; t++) a[i][t] = zero_();
    }
    if (ahead)
        for (int c = 0; c < full; c += WIDTH(kind)) {
            prefetch_next(kind, M, xs, c, ahead);
            step(kind, R, M, xs, c, w, cp, c, k, a, norm);
        }
    else
        for (int c = 0; c < full; c += WIDTH(kind)) step(kind, R, M, xs, c, w, cp, c, k, a, norm);
    if (tails) step(kind, R, M, tails, 0, w, cp, full, k, a, norm);
    for (int i = 0; i < M; i++)
        for (int t = 0; t < R; t++) {
            float *dst = acc + i * per_image + (int64_t)p[t] * LANES(kind);
            store_f(dst, add_(load_f(dst), a[i][t]));
        }
    if (sq)
        for (int i = 0; i < M; i++) sq[i * (int64_t)cells] = hsum(n[i]);
}

/* What the fast pass keeps of an image's placements, computed where its numerators are summed
 * (no (placements, n) arrays, no passes over them): each window's norm ‖r‖ = sqrt(Σ_k m²_k ‖f‖²)
 * over the query cells in order, the score num / max(‖r‖·‖q‖, smallest) (an all-zero window's
 * numerator is exactly 0), its proven upper bound (FastBound.upper: (tiny + score + weight_term) /
 * scale, tiny = output_error / ‖r‖ or 0, ∞ where not finite), the best score (the first NaN, else
 * the first largest) and its placement, the largest bound, and the largest over the other
 * placements. As vfs.triton_products.best_kernel and the torch operators it replaces: fp32,
 * rounded to nearest (a multiply-add rounds once: within the same bound). */
struct vfs_best {
    float *sq;              /* (n, cells) the cells' squared norms, fp32: given, or written (`fill`) */
    const float *m2;        /* (K,) the query cells' squared mask weights, fp32 */
    const int32_t *origin;  /* (K,) the data cell each query cell covers at placement (0, 0) */
    int32_t k, ph, pw, w;   /* query cells, placements (ph, pw), grid width */
    float qnorm, smallest, output_error, weight_term, scale;
    float *best, *upper, *runner; /* (n,) each */
    int64_t *where;                /* (n,) placement index py * pw + px */
    /* fill: the kernel takes each cell's squared norm into sq (fp16 or fp32 features) in the cell's
     * first block, which reads it anyway; the bound above is then the one for features of either
     * sign. */
    int32_t fill;
};

#if L == 16
static inline vf load_n(const float *p, int n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
static inline void store_n(float *p, vf v, int n) { _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), v); }
static inline vf below_to(vf a, vf b, vf c) { return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), a, c); }
static inline vf positive_or_zero(vf a, vf x) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a, zero_(), _CMP_GT_OQ), x); }
static inline vf finite_or_inf(vf v) {
    const vf inf = _mm512_set1_ps(INFINITY);
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(_mm512_abs_ps(v), inf, _CMP_LT_OQ), inf, v);
}
static inline vf keep_bits(vf v, unsigned bits, vf other) { return _mm512_mask_blend_ps((__mmask16)bits, other, v); }
static inline unsigned nan_bits(vf v) { return _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q); }
static inline unsigned equal_bits(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
static inline float hmax(vf v) { return _mm512_reduce_max_ps(v); }
#define set1_ _mm512_set1_ps
#define max_ _mm512_max_ps
#define mul_ _mm512_mul_ps
#define div_ _mm512_div_ps
#define sqrt_ _mm512_sqrt_ps
#else
static inline __m256i first_n(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
static inline vf load_n(const float *p, int n) { return _mm256_maskload_ps(p, first_n(n)); }
static inline void store_n(float *p, vf v, int n) { _mm256_maskstore_ps(p, first_n(n), v); }
static inline vf below_to(vf a, vf b, vf c) { return _mm256_blendv_ps(a, c, _mm256_cmp_ps(a, b, _CMP_LT_OQ)); }
static inline vf positive_or_zero(vf a, vf x) { return _mm256_and_ps(_mm256_cmp_ps(a, zero_(), _CMP_GT_OQ), x); }
static inline vf finite_or_inf(vf v) {
    const vf inf = _mm256_set1_ps(INFINITY), size = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);
    return _mm256_blendv_ps(inf, v, _mm256_cmp_ps(size, inf, _CMP_LT_OQ));
}
static inline vf keep_bits(vf v, unsigned bits, vf other) {
    const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i on = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)bits), lane), lane);
    return _mm256_blendv_ps(other, v, _mm256_castsi256_ps(on));
}
static inline unsigned nan_bits(vf v) { return (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)); }
static inline unsigned equal_bits(vf a, vf b) { return (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_EQ_OQ)); }
static inline float hmax(vf v) {
    const __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 q = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(q, _mm_movehdup_ps(q)));
}
#define set1_ _mm256_set1_ps
#define max_ _mm256_max_ps
#define mul_ _mm256_mul_ps
#define div_ _mm256_div_ps
#define sqrt_ _mm256_sqrt_ps
#endif

/* The bits of a vector's first n lanes (all of them from L on). */
static inline unsigned first_lanes(int n) { return n < L ? (1u << n) - 1 : (1u << L) - 1; }

/* The scratch a thread needs: ≤ 4 images' lane sums (places × 16 each), then `best_of`'s three
 * arrays, each padded to whole vectors (on the heap, not a thread's stack: 12 bytes a placement). */
int64_t vfs_scratch_floats(int32_t places) { return 4 * (int64_t)places * 16 + 3 * ((int64_t)places + 16); }

/* The placements of image i from its lane sums `acc` (places × lanes). The window norms are summed
 * a row of placements at a time (query cell k covers a contiguous row of pw cells in each of ph
 * rows), over the query cells in 4 interleaved sums: any order is within the bound (K terms). */
static void best_of(const struct vfs_best *b, int64_t i, int32_t cells, int32_t places, int lanes, const float *acc,
                    float *scratch) {
    if (places < 1) return; /* no placement: `PairKernel` is never made so (the region fits the grid) */
    if (places == 1) { /* a whole-grid region: the same operations in scalars, not in vectors of one lane
                        * (1.0 of 7.1 ms at 10,000 × 7×7×192 on a Xeon went to those) */
        const float *sq = b->sq + i * cells;
        float sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        int k = 0;
        for (; k + 4 <= b->k; k += 4)
            for (int u = 0; u < 4; u++) sum[u] = fmaf(b->m2[k + u], sq[b->origin[k + u]], sum[u]);
        for (; k < b->k; k++) sum[0] = fmaf(b->m2[k], sq[b->origin[k]], sum[0]);
        const float wn = sqrtf((sum[0] + sum[1]) + (sum[2] + sum[3]));
        const float product = wn * b->qnorm;
        const float s = hsum(load_f(acc)) / (product < b->smallest ? b->smallest : product); /* NaN stays */
        const float tiny = wn > 0.0f ? b->output_error / wn : 0.0f;
        const float up = ((tiny + s) + b->weight_term) / b->scale;
        b->best[i] = s;
        b->where[i] = 0;
        b->upper[i] = fabsf(up) < INFINITY ? up : INFINITY;
        b->runner[i] = -INFINITY;
        return;
    }
    const int32_t ph = b->ph, pw = b->pw;
    float *score = scratch, *up = score + places + L, *wn2 = up + places + L; /* padded to whole vectors */
    for (int p = 0; p < places; p++) score[p] = hsum(load_f(acc + (int64_t)p * lanes)); /* the numerator, for now */
    const float *sq = b->sq + i * cells;
    for (int y = 0; y < ph; y++)
        for (int x = 0; x < pw; x += L) {
            const int n = pw - x < L ? pw - x : L;
            const float *row = sq + y * b->w + x;
            vf sum[4] = {zero_(), zero_(), zero_(), zero_()}; /* 4 chains of multiply-adds */
            int k = 0;
            for (; k + 4 <= b->k; k += 4)
                for (int u = 0; u < 4; u++) sum[u] = fma_(set1_(b->m2[k + u]), load_n(row + b->origin[k + u], n), sum[u]);
            for (; k < b->k; k++) sum[0] = fma_(set1_(b->m2[k]), load_n(row + b->origin[k], n), sum[0]);
            store_n(wn2 + y * pw + x, add_(add_(sum[0], sum[1]), add_(sum[2], sum[3])), n);
        }
    const vf qnorm = set1_(b->qnorm), smallest = set1_(b->smallest), output_error = set1_(b->output_error);
    const vf weight_term = set1_(b->weight_term), scale = set1_(b->scale);
    for (int p = 0; p < places; p += L) {
        const vf wn = sqrt_(load_f(wn2 + p));
        const vf s = div_(load_f(score + p), below_to(mul_(wn, qnorm), smallest, smallest)); /* NaN stays */
        const vf tiny = positive_or_zero(wn, div_(output_error, wn)); /* overflow: ∞, where torch's gives 0 */
        store_f(score + p, s);
        store_f(up + p, finite_or_inf(div_(add_(add_(tiny, s), weight_term), scale)));
    }
    /* The best score (the first NaN, else the first largest) and its placement, the largest bound
     * and the largest over the other placements, a vector at a time (no branch on a placement's
     * score: which wins is not predictable). max_(a, b) is b where a is NaN; no bound is NaN. */
    const vf lowest = set1_(-INFINITY);
    vf top = lowest, high = lowest;
    int64_t where = -1;
    for (int p = 0; p < places; p += L) {
        const unsigned valid = first_lanes(places - p);
        const vf s = load_f(score + p);
        const unsigned nan = nan_bits(s) & valid;
        if (nan && where < 0) where = p + __builtin_ctz(nan);
        top = max_(keep_bits(s, valid, lowest), top);
        high = max_(keep_bits(load_f(up + p), valid, lowest), high);
    }
    if (where < 0) { /* no NaN: the first of the largest, a valid lane's (−∞ where all are) */
        const vf largest = set1_(hmax(top));
        for (int p = 0; where < 0; p += L) {
            const unsigned valid = first_lanes(places - p);
            const unsigned equal = equal_bits(load_f(score + p), largest) & valid;
            if (equal) where = p + __builtin_ctz(equal);
        }
    }
    vf others = lowest;
    for (int p = 0; p < places; p += L) {
        unsigned valid = first_lanes(places - p);
        if (where >= p && where < p + L) valid &= ~(1u << (where - p));
        others = max_(keep_bits(load_f(up + p), valid, lowest), others);
    }
    const float best = score[where], upper = hmax(high), runner = hmax(others);
    b->best[i] = best;
    b->where[i] = where;
    b->upper[i] = upper;
    b->runner[i] = runner;
}

/* Every pair of images [i, i + M): the cells in order, each cell's pairs in blocks. */
AI void images(int kind, int M, int norms, const void *x, int64_t i, int32_t cells, int32_t c, const void *w,
               int32_t cp, const int32_t *start, const int32_t *pk, const int32_t *pp, int32_t places, float *out,
               int64_t stride, const struct vfs_best *b, float *acc) {
    const int width = WIDTH(kind), lanes = LANES(kind), full = c / width * width, esize = ESIZE(kind);
    const int64_t per_image = (int64_t)places * lanes, cell_bytes = (int64_t)c * esize;
    unsigned char buf[IMAGES][TAIL_BYTES];
    float *fill = norms ? b->sq + i * cells : 0;
    memset(acc, 0, sizeof(float) * (size_t)(per_image * M));
    for (int d = 0; d < cells; d++) {
        int j = start[d];
        const int e = start[d + 1];
        const void *xs[IMAGES], *ts[IMAGES];
        const int64_t ahead = prefetch_distance(M, d, cell_bytes, cells * cell_bytes) / esize;
        for (int m = 0; m < M; m++) {
            xs[m] = (const char *)x + ((i + m) * cells + d) * (int64_t)c * esize;
            ts[m] = tail_of(xs[m], full, c, esize, buf[m], width);
        }
        const void *const *tails = full < c ? ts : 0;
        if (fill && j == e) { /* a cell no placement weighs: its norm only (a NaN there is still found) */
            int unused = 0;
            for (int m = 0; m < M; m++) fill[m * (int64_t)cells + d] = row_sqnorm(kind, xs[m], c, &unused);
        }
        while (j < e) {
            float *sq = fill && j == start[d] ? fill + d : 0; /* the cell's first block takes its norm */
            int r = e - j;
            if (r > RMAX) r = r <= 2 * RMAX ? (r + 1) / 2 : RMAX;
            if (sq && r > RNORM) r = RNORM;
            switch (r) { /* each size its own code: R is a constant in `block` */
#define BLOCK(R) \
    case R: \
        if (sq) block(kind, R, M, xs, tails, full, cp, w, pk + j, pp + j, acc, per_image, ahead, sq, cells); \
        else block(kind, R, M, xs, tails, full, cp, w, pk + j, pp + j, acc, per_image, j == start[d] ? ahead : 0, 0, 0); \
        break;
                BLOCK(1) BLOCK(2) BLOCK(3) BLOCK(4)
#if RMAX > 4
                BLOCK(5) BLOCK(6)
#endif
#undef BLOCK
            }
            j += r;
        }
    }
    for (int m = 0; m < M; m++)
        if (b) best_of(b, i + m, cells, places, lanes, acc + m * per_image, acc + 4 * (int64_t)places * 16);
        else
            for (int p = 0; p < places; p++)
                out[p * stride + i + m] = hsum(load_f(acc + m * per_image + (int64_t)p * lanes));
}

/* Images [i0, i1), IMAGES at a time, then one by one. acc: vfs_scratch_floats(places) floats. */
AI void run(int kind, const void *x, int64_t i0, int64_t i1, int32_t cells, int32_t c, const void *w,
            int32_t cp, const int32_t *start, const int32_t *pk, const int32_t *pp, int32_t places, float *out,
            int64_t stride, const struct vfs_best *b, float *acc) {
    int64_t i = i0;
    /* The norms taken or given: each its own code (constants in `images`), so that the common case
     * (given: caches, prepared sources) runs the same instructions as without the other. Not bf16. */
    if (kind != BF16 && b && b->fill) {
        for (; i + IMAGES <= i1; i += IMAGES)
            images(kind, IMAGES, 1, x, i, cells, c, w, cp, start, pk, pp, places, out, stride, b, acc);
        for (; i < i1; i++) images(kind, 1, 1, x, i, cells, c, w, cp, start, pk, pp, places, out, stride, b, acc);
        return;
    }
    for (; i + IMAGES <= i1; i += IMAGES)
        images(kind, IMAGES, 0, x, i, cells, c, w, cp, start, pk, pp, places, out, stride, b, acc);
    for (; i < i1; i++) images(kind, 1, 0, x, i, cells, c, w, cp, start, pk, pp, places, out, stride, b, acc);
}

void vfs_pairs_f16(const uint16_t *x, int64_t i0, int64_t i1, int32_t cells, int32_t c, const float *w,
                   int32_t cp, const int32_t *start, const int32_t *pk, const int32_t *pp, int32_t places,
                   float *out, int64_t stride, const struct vfs_best *b, float *acc) {
    run(F16, x, i0, i1, cells, c, w, cp, start, pk, pp, places, out, stride, b, acc);
}

void vfs_pairs_f32(const float *x, int64_t i0, int64_t i1, int32_t cells, int32_t c, const float *w,
                   int32_t cp, const int32_t *start, const int32_t *pk, const int32_t *pp, int32_t places,
                   float *out, int64_t stride, const struct vfs_best *b, float *acc) {
    run(F32, x, i0, i1, cells, c, w, cp, start, pk, pp, places, out, stride, b, acc);
}

#if HAS_BF16
void vfs_pairs_bf16(const uint16_t *x, int64_t i0, int64_t i1, int32_t cells, int32_t c, const uint16_t *w,
                    int32_t cp, const int32_t *start, const int32_t *pk, const int32_t *pp, int32_t places,
                    float *out, int64_t stride, const struct vfs_best *b, float *acc) {
    run(BF16, x, i0, i1, cells, c, w, cp, start, pk, pp, places, out, stride, b, acc);
}
#endif

/* Channels last: one image's (c, cells) fp16 values as (cells, c) — a CNN's (N, C, h, w) output,
 * which a notebook permutes to (N, h, w, C) without moving it, laid out as the kernel reads it.
 * 8 × 8 tiles transposed in registers. torch's strided copy of such a view ran at a tenth of the
 * memory's speed. */
static inline void transpose8_epi16(__m128i *r) {
    const __m128i t0 = _mm_unpacklo_epi16(r[0], r[1]), t1 = _mm_unpackhi_epi16(r[0], r[1]);
    const __m128i t2 = _mm_unpacklo_epi16(r[2], r[3]), t3 = _mm_unpackhi_epi16(r[2], r[3]);
    const __m128i t4 = _mm_unpacklo_epi16(r[4], r[5]), t5 = _mm_unpackhi_epi16(r[4], r[5]);
    const __m128i t6 = _mm_unpacklo_epi16(r[6], r[7]), t7 = _mm_unpackhi_epi16(r[6], r[7]);
    const __m128i u0 = _mm_unpacklo_epi32(t0, t2), u1 = _mm_unpackhi_epi32(t0, t2);
    const __m128i u2 = _mm_unpacklo_epi32(t1, t3), u3 = _mm_unpackhi_epi32(t1, t3);
    const __m128i u4 = _mm_unpacklo_epi32(t4, t6), u5 = _mm_unpackhi_epi32(t4, t6);
    const __m128i u6 = _mm_unpacklo_epi32(t5, t7), u7 = _mm_unpackhi_epi32(t5, t7);
    r[0] = _mm_unpacklo_epi64(u0, u4), r[1] = _mm_unpackhi_epi64(u0, u4);
    r[2] = _mm_unpacklo_epi64(u1, u5), r[3] = _mm_unpackhi_epi64(u1, u5);
    r[4] = _mm_unpacklo_epi64(u2, u6), r[5] = _mm_unpackhi_epi64(u2, u6);
    r[6] = _mm_unpacklo_epi64(u3, u7), r[7] = _mm_unpackhi_epi64(u3, u7);
}

/* One image: s (c, cells) → d (cells, c). 8 cells at a time (past a multiple of 8, the last 8
 * again), their rows written in order, 16 channels at a time: two tiles, a longer run of each row
 * per step (1.4× faster than one tile on Zen 4, measured writing fp32: whole 64-byte lines; fp16
 * rows get 32 bytes a step); past a multiple of 16 one tile, past 8 one by one. */
static void cells_last(const uint16_t *s, uint16_t *d, int32_t c, int32_t cells) {
    const int32_t c8 = c / 8 * 8;
    for (int32_t y0 = 0; y0 < cells && cells >= 8; y0 += 8) {
        const int32_t y = y0 + 8 <= cells ? y0 : cells - 8;
        for (int32_t k = 0; k < c8; k += 8) {
            __m128i r[8], q[8];
            const int two = k + 16 <= c8;
            for (int j = 0; j < 8; j++) r[j] = _mm_loadu_si128((const __m128i *)(s + (int64_t)(k + j) * cells + y));
            if (two)
                for (int j = 0; j < 8; j++) q[j] = _mm_loadu_si128((const __m128i *)(s + (int64_t)(k + 8 + j) * cells + y));
            transpose8_epi16(r);
            if (two) transpose8_epi16(q);
            for (int j = 0; j < 8; j++) {
                _mm_storeu_si128((__m128i *)(d + (int64_t)(y + j) * c + k), r[j]);
                if (two) _mm_storeu_si128((__m128i *)(d + (int64_t)(y + j) * c + k + 8), q[j]);
            }
            k += two ? 8 : 0;
        }
    }
    for (int32_t y = 0; y < cells; y++) /* the channels past 8's multiple; every one where cells < 8 */
        for (int32_t k = cells < 8 ? 0 : c8; k < c; k++) d[(int64_t)y * c + k] = s[(int64_t)k * cells + y];
}

/* n fp32 values rounded to fp16 (to nearest, as load_r rounds), read and written in order: an fp32
 * image is rounded so before `cells_last` reads it, which then transposes half the bytes, in cache
 * (1,000 × 2,048 × 7×7, Zen 4: the kernel's pass 40 → 27 ms; transposing the fp32 values from
 * memory had cost 2.5× a read of them). */
static void rounded_f16(const float *s, uint16_t *d, int64_t n) {
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) {
        _mm_storeu_si128((__m128i *)(d + k), _mm256_cvtps_ph(_mm256_loadu_ps(s + k), _MM_FROUND_TO_NEAREST_INT));
        _mm_storeu_si128((__m128i *)(d + k + 8), _mm256_cvtps_ph(_mm256_loadu_ps(s + k + 8), _MM_FROUND_TO_NEAREST_INT));
    }
    for (; k < n; k++) d[k] = _cvtss_sh(s[k], _MM_FROUND_TO_NEAREST_INT);
}

/* The scratch a thread needs for `kind`: the lane sums and `best_of`'s arrays
 * (`vfs_scratch_floats`), and for a channels-first array IMAGES transposed fp16 images (fp32: and
 * one rounded in order) — under a whole-grid placement one placement's, its lane sums and
 * `whole_image`'s slots. */
int64_t vfs_thread_floats(int32_t places, int kind, int32_t cells, int32_t c) {
    if (kind == WCF16 || kind == WCF32) return vfs_scratch_floats(1) + L + (int64_t)cells * L;
    const int64_t fp16 = kind == CF16 ? IMAGES : kind == CF32 ? IMAGES + 1 : 0; /* fp16 images */
    const int64_t images = fp16 ? (fp16 * cells * c + 1) / 2 + 16 : 0;
    return vfs_scratch_floats(places) + images;
}

/* Images [i0, i1) of a channels-first (n, c, cells) array (kind CF16 / CF32), IMAGES at a time:
 * transposed into the fp16 scratch after the lane sums in `acc` (`vfs_thread_floats`), where the
 * F16 kernel reads them while they are in cache — one read of the array, no copy of it. */
void vfs_pairs_channels_first(int kind, const void *x, int64_t i0, int64_t i1, int32_t cells, int32_t c,
                              const float *w, int32_t cp, const int32_t *start, const int32_t *pk, const int32_t *pp,
                              int32_t places, float *out, int64_t stride, const struct vfs_best *b, float *acc) {
    uint16_t *scratch = (uint16_t *)(acc + vfs_scratch_floats(places));
    const int64_t size = (int64_t)c * cells;
    uint16_t *rounded = scratch + IMAGES * size; /* CF32's */
    for (int64_t g = i0; g < i1; g += IMAGES) {
        const int64_t g1 = g + IMAGES < i1 ? g + IMAGES : i1;
        for (int64_t i = g; i < g1; i++)
            if (kind == CF16) cells_last((const uint16_t *)x + i * size, scratch + (i - g) * size, c, cells);
            else { /* rounded in order first: see `rounded_f16` */
                rounded_f16((const float *)x + i * size, rounded, size);
                cells_last(rounded, scratch + (i - g) * size, c, cells);
            }
        /* images g..g1 are the scratch's 0..g1-g: the outputs shifted to match */
        struct vfs_best shifted;
        if (b) {
            shifted = *b;
            shifted.sq += g * cells, shifted.best += g, shifted.upper += g, shifted.runner += g, shifted.where += g;
        }
        vfs_pairs_f16(scratch, 0, g1 - g, cells, c, w, cp, start, pk, pp, places, out ? out + g : out, stride,
                      b ? &shifted : b, acc);
    }
}

/* A channels-first array's images under one placement that covers the grid (kinds WCF16 / WCF32):
 * its numerator is one dot product of the image's (c, cells) values as they lie with weights laid
 * out alike (`wcf`: c × cells fp32, zero in cells no query cell covers, padded with zeros to whole
 * vectors), read in order: no transposition, which streams at a third of the memory's speed
 * (1,000 × 2,048 × 7×7 fp32, Zen 4: 39 ms, read in order 14.5, against a 12.2 ms read). CHAINS chains of multiply-adds,
 * each summed `block` vectors at a time into its total, bound the roundings a product passes through
 * (`vfs_whole_grid_block`). Each cell's squared norm (`fill`): lane l of the image's vector j holds
 * cell (j·L + l) mod cells, the same every `period` = cells / gcd(cells, L) vectors — one sum per
 * slot (j mod period) and lane, then each cell's L / gcd of them added in order. */
#define CHAINS 4
static inline int32_t gcd_(int32_t a, int32_t b) {
    while (b) {
        const int32_t t = a % b;
        a = b, b = t;
    }
    return a;
}

/* The `block` for c channels of `cells` cells and in *depth the most roundings a product passes
 * through: ≤ block in its chain's block sum, one per block added to the chain's total (and a last
 * one), the tree over the CHAINS totals and the sum across lanes. A cell's squared norm passes its
 * values through at most ⌈c·g/L⌉ in their slot's sum and L/g − 1 across slots (g = gcd(cells, L)):
 * where that could exceed c, the bound's count for a norm, the path is not taken (0). */
int32_t vfs_whole_grid_block(int32_t c, int32_t cells, int32_t *depth) {
    const int64_t vectors = ((int64_t)c * cells + L - 1) / L, per_chain = (vectors + CHAINS - 1) / CHAINS;
    const int32_t g = gcd_(cells, L);
    if (c <= 0 || cells <= 0 || ((int64_t)c * g + L - 1) / L + L / g - 1 > c) return *depth = 0;
    int32_t block = 1;
    while ((int64_t)block * block < per_chain) block++; /* ⌈√per_chain⌉: block + per_chain / block at its least */
    *depth = (int32_t)(block + (per_chain + block - 1) / block + 1 + __builtin_ctz(CHAINS) + __builtin_ctz(L));
    return block;
}

/* One image (`values` = c · cells of them at `img`): the placement's lane sums into lanes (L floats),
 * and with `norms` the cells' squared norms into sq (slots: period × L floats of scratch). */
AI void whole_image(int kind, int norms, const void *img, int64_t values, int32_t cells, const float *wcf, int32_t block,
                    float *slots, int32_t period, float *lanes, float *sq) {
    const int esize = kind == WCF32 ? 4 : 2, as = kind == WCF32 ? F32 : F16; /* read as F32 / F16 read */
    vf total[CHAINS], part[CHAINS];
    for (int a = 0; a < CHAINS; a++) total[a] = part[a] = zero_();
    if (norms) memset(slots, 0, sizeof(float) * (size_t)period * L);
    int32_t s = 0, in_block = 0;
    int64_t v = 0;
    for (; v + CHAINS * L <= values; v += CHAINS * L) {
        for (int a = 0; a < CHAINS; a++) {
            const vf x = load_x(as, img, v + a * L);
            part[a] = fma_(x, load_f(wcf + v + a * L), part[a]);
            if (norms) {
                store_f(slots + (int64_t)s * L, fma_(x, x, load_f(slots + (int64_t)s * L)));
                s = s + 1 == period ? 0 : s + 1;
            }
        }
        if (++in_block == block) {
            for (int a = 0; a < CHAINS; a++) total[a] = add_(total[a], part[a]), part[a] = zero_();
            in_block = 0;
        }
    }
    unsigned char buf[TAIL_BYTES];
    for (int a = 0; v < values; v += L, a++) { /* fewer than CHAINS vectors, the last maybe partial */
        const int64_t n = values - v < L ? values - v : L;
        const void *at = (const char *)img + v * esize;
        if (n < L) {
            memset(buf, 0, sizeof buf);
            memcpy(buf, at, (size_t)(n * esize));
            at = buf;
        }
        const vf x = load_x(as, at, 0);
        part[a] = fma_(x, load_f(wcf + v), part[a]);
        if (norms) {
            store_f(slots + (int64_t)s * L, fma_(x, x, load_f(slots + (int64_t)s * L)));
            s = s + 1 == period ? 0 : s + 1;
        }
    }
    for (int a = 0; a < CHAINS; a++) total[a] = add_(total[a], part[a]);
    store_f(lanes, add_(add_(total[0], total[1]), add_(total[2], total[3]))); /* CHAINS = 4 */
    if (norms) {
        for (int32_t d = 0; d < cells; d++) sq[d] = 0.0f;
        for (int64_t e = 0, d = 0; e < (int64_t)period * L; e++, d = d + 1 == cells ? 0 : d + 1) sq[d] += slots[e];
    }
}

/* Images [i0, i1) of kind WCF16 / WCF32 (see `whole_image`): each image's best (its one placement)
 * into `b`, or its numerator into out[i]. acc: vfs_thread_floats(1, kind, cells, c) floats. */
void vfs_whole_channels_first(int kind, const void *x, int64_t i0, int64_t i1, int32_t cells, int32_t c,
                              const float *wcf, int32_t block, float *out, const struct vfs_best *b, float *acc) {
    const int64_t values = (int64_t)c * cells;
    const int32_t period = cells / gcd_(cells, L);
    float *lanes = acc + vfs_scratch_floats(1), *slots = lanes + L;
    const int esize = kind == WCF32 ? 4 : 2;
    for (int64_t i = i0; i < i1; i++) {
        const void *img = (const char *)x + i * values * esize;
        if (b && b->fill) whole_image(kind, 1, img, values, cells, wcf, block, slots, period, lanes, b->sq + i * cells);
        else whole_image(kind, 0, img, values, cells, wcf, block, slots, period, lanes, 0);
        if (b) best_of(b, i, cells, 1, L, lanes, acc);
        else out[i] = hsum(load_f(lanes));
    }
}

/* The kernels on the caller's OpenMP team: `parallel` is the GOMP_parallel of the OpenMP runtime
 * PyTorch runs its own operators on, so the threads it keeps spinning after an operator take this
 * work instead of competing with other threads for the cores. The threads take the images SHARE at
 * a time from a shared counter, not a fixed half each: where another process holds a core (the
 * app's browser redrawing during a search), the thread that runs takes the work of the one that
 * waits. */
#define SHARE (8 * IMAGES) /* images per take */
typedef void (*vfs_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*vfs_team_fn)(void);

struct vfs_job {
    int kind;
    const void *x;
    int64_t n;
    int32_t cells, c;
    const void *w;
    int32_t cp;
    const int32_t *start, *pk, *pp;
    int32_t places;
    float *out;
    int64_t stride;
    const struct vfs_best *b;
    float *acc; /* per thread: vfs_thread_floats(places, kind, cells, c) floats */
    int max_threads;
    vfs_team_fn thread_num, num_threads;
    int64_t next; /* the first image no thread has taken yet */
};

static void vfs_job_run(void *arg) {
    struct vfs_job *j = arg;
    int t = j->thread_num(), team = j->num_threads();
    if (team > j->max_threads) team = j->max_threads; /* never more scratch than allocated */
    if (t >= team) return;
    float *acc = j->acc + t * vfs_thread_floats(j->places, j->kind, j->cells, j->c);
    for (;;) {
        const int64_t i0 = __atomic_fetch_add(&j->next, SHARE, __ATOMIC_RELAXED);
        if (i0 >= j->n) return;
        const int64_t i1 = i0 + SHARE < j->n ? i0 + SHARE : j->n;
        if (j->kind == WCF16 || j->kind == WCF32) { /* w: the weights laid out as the images, cp: the block */
            vfs_whole_channels_first(j->kind, j->x, i0, i1, j->cells, j->c, j->w, j->cp, j->out, j->b, acc);
            continue;
        }
        if (j->kind == CF16 || j->kind == CF32) {
            vfs_pairs_channels_first(j->kind, j->x, i0, i1, j->cells, j->c, j->w, j->cp, j->start, j->pk, j->pp,
                                     j->places, j->out, j->stride, j->b, acc);
            continue;
        }
#if HAS_BF16
        if (j->kind == BF16) {
            vfs_pairs_bf16(j->x, i0, i1, j->cells, j->c, j->w, j->cp, j->start, j->pk, j->pp, j->places, j->out,
                           j->stride, j->b, acc);
            continue;
        }
#endif
        if (j->kind == F32) {
            vfs_pairs_f32(j->x, i0, i1, j->cells, j->c, j->w, j->cp, j->start, j->pk, j->pp, j->places, j->out,
                          j->stride, j->b, acc);
            continue;
        }
        vfs_pairs_f16(j->x, i0, i1, j->cells, j->c, j->w, j->cp, j->start, j->pk, j->pp, j->places, j->out,
                      j->stride, j->b, acc);
    }
}

void vfs_pairs_team(vfs_parallel_fn parallel, vfs_team_fn thread_num, vfs_team_fn num_threads, int threads,
                    int kind, const void *x, int64_t n, int32_t cells, int32_t c, const void *w, int32_t cp,
                    const int32_t *start, const int32_t *pk, const int32_t *pp, int32_t places, float *out,
                    int64_t stride, const struct vfs_best *b, float *acc) {
    struct vfs_job j = {kind, x, n, cells, c, w, cp, start, pk, pp, places, out, stride, b, acc, threads,
                        thread_num, num_threads, 0};
    parallel(vfs_job_run, &j, (unsigned)threads, 0);
}


/* Squared norms of rows [r0, r1) of c fp16 values (fp32 squares and sums; fp16 is exact in fp32)
 * into sq[r], in one read of the features; returns whether some value is not ≥ 0 (negative or NaN).
 * What an array searched from a notebook is prepared with: torch's blocks (fp16 → fp32, then a
 * minimum and the norms) took 3-5× a read of it. */
int vfs_sqnorms_f16(const uint16_t *x, int64_t r0, int64_t r1, int32_t c, float *sq) {
    int below = 0;
    for (int64_t r = r0; r < r1; r++) sq[r] = row_sqnorm(F16, x + r * (int64_t)c, c, &below);
    return below;
}

#define SQ_SHARE 1024 /* rows per take */

struct vfs_sq_job {
    const uint16_t *x;
    int64_t rows;
    int32_t c;
    float *sq;
    int *below; /* per thread */
    int max_threads;
    vfs_team_fn thread_num, num_threads;
    int64_t next;
};

static void vfs_sq_job_run(void *arg) {
    struct vfs_sq_job *j = arg;
    int t = j->thread_num(), team = j->num_threads();
    if (team > j->max_threads) team = j->max_threads;
    if (t >= team) return;
    for (;;) {
        const int64_t r0 = __atomic_fetch_add(&j->next, SQ_SHARE, __ATOMIC_RELAXED);
        if (r0 >= j->rows) return;
        const int64_t r1 = r0 + SQ_SHARE < j->rows ? r0 + SQ_SHARE : j->rows;
        j->below[t] |= vfs_sqnorms_f16(j->x, r0, r1, j->c, j->sq);
    }
}

/* `vfs_sqnorms_f16` over all rows on the caller's OpenMP team (see `vfs_pairs_team`). */
void vfs_sqnorms_team(vfs_parallel_fn parallel, vfs_team_fn thread_num, vfs_team_fn num_threads, int threads,
                      const uint16_t *x, int64_t rows, int32_t c, float *sq, int *below) {
    struct vfs_sq_job j = {x, rows, c, sq, below, threads, thread_num, num_threads, 0};
    parallel(vfs_sq_job_run, &j, (unsigned)threads, 0);
}
