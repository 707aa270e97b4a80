/* Native CPU kernels behind condu_merge.kernels.native_backend (float32, float16, bfloat16;
 * x86-64 with AVX2 and F16C).
 *
 * Loaded through ctypes from this extension module's own file; the Python module object only
 * exists so that setuptools builds and installs the shared library like any extension, and so
 * that importing it tells whether the build happened. The functions are called with the GIL
 * released (ctypes does that) and run their own threads.
 *
 * Numeric contract (condu_merge.backends.base), as the numba kernels keep it:
 *   - unify: the elected sign is +1 iff the float64 sum of the deltas, in task order, is > 0;
 *     the task-order float64 sum per element is what the SIMD loop computes (4 lanes per
 *     register, one add per task: no reassociation);
 *   - an element agrees iff x * sg > 0 (sg = +-1: exact, zeros and NaN never agree);
 *   - u = best * sg where something agrees, +0.0 elsewhere;
 *   - L1 sums: num[i] = sum |d_i|, den[i] = sum M_i |u|, accumulated in float64 per lane and
 *     chunk (the order differs from numba's and torch's only by reassociation: ~1e-16 relative,
 *     so the rescalers agree with theirs to the last few float64 bits, not just the 1e-6 of the
 *     contract);
 *   - decouple: out = bit ? float32(u) * float32(lam) : +0.0, plus float32(base) when given.
 * Masks are packed little bit order: bit j of byte b is element 8b + j (movemask's order).
 */
/* Built with -ffp-contract=off (setup.py): a fused multiply-add would change base + u * lam. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CM_ABI 3
#define CM_MAXT 64 /* tasks per unify call (more go to another backend) */

int cm_abi(void) { return CM_ABI; }

/* ---------------------------------------------------------------- a tiny fork-join runner */
typedef void (*cm_chunk_fn)(void *args, int64_t c);

typedef struct {
    cm_chunk_fn fn;
    void *args;
    int64_t nchunks;
    atomic_llong next; /* chunks are handed out one at a time: a descheduled thread holds one */
} cm_job;

static void *cm_worker(void *p) {
    cm_job *job = (cm_job *)p;
    for (;;) {
        int64_t c = (int64_t)atomic_fetch_add(&job->next, 1);
        if (c >= job->nchunks) return NULL;
        job->fn(job->args, c);
    }
}

/* A persistent pool: threads started on first use wait for the next job, so a call does not
 * pay pthread_create (an mmap of a stack, which takes the address-space lock that page faults
 * of the fresh outputs also need). One job at a time; a caller that finds the pool busy (another
 * Python thread inside a kernel) starts its own threads as before. */
#define CM_POOL 64
static pthread_mutex_t cm_pool_busy = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t cm_pool_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cm_pool_go = PTHREAD_COND_INITIALIZER, cm_pool_done = PTHREAD_COND_INITIALIZER;
static cm_job *cm_pool_job;
static long cm_pool_gen;
static int cm_pool_size, cm_pool_want, cm_pool_left;

static void *cm_pool_main(void *p) {
    long seen = 0;
    int id = (int)(intptr_t)p;
    for (;;) {
        pthread_mutex_lock(&cm_pool_mu);
        while (cm_pool_gen == seen) pthread_cond_wait(&cm_pool_go, &cm_pool_mu);
        seen = cm_pool_gen;
        cm_job *job = id < cm_pool_want ? cm_pool_job : NULL;
        pthread_mutex_unlock(&cm_pool_mu);
        if (job) {
            cm_worker(job);
            pthread_mutex_lock(&cm_pool_mu);
            if (--cm_pool_left == 0) pthread_cond_signal(&cm_pool_done);
            pthread_mutex_unlock(&cm_pool_mu);
        }
    }
    return NULL;
}

/* In a child of fork() only the forking thread exists: forget the pool (its threads and any
 * lock a parent thread held at the fork) so the child starts a new one. */
static void cm_pool_forget(void) {
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t c = PTHREAD_COND_INITIALIZER;
    cm_pool_busy = m;
    cm_pool_mu = m;
    cm_pool_go = c;
    cm_pool_done = c;
    cm_pool_job = NULL;
    cm_pool_gen = 0;
    cm_pool_size = cm_pool_want = cm_pool_left = 0;
}

static pthread_once_t cm_pool_once = PTHREAD_ONCE_INIT;
static void cm_pool_init(void) { pthread_atfork(NULL, NULL, cm_pool_forget); }

static void cm_run(cm_chunk_fn fn, void *args, int64_t nchunks, int nthreads) {
    cm_job job;
    job.fn = fn;
    job.args = args;
    job.nchunks = nchunks;
    atomic_init(&job.next, 0);
    if (nthreads > nchunks) nthreads = (int)nchunks;
    if (nthreads > CM_POOL + 1) nthreads = CM_POOL + 1;
    if (nthreads <= 1) {
        cm_worker(&job);
        return;
    }
    pthread_once(&cm_pool_once, cm_pool_init);
    if (pthread_mutex_trylock(&cm_pool_busy) == 0) {
        while (cm_pool_size < nthreads - 1) {
            pthread_t t;
            if (pthread_create(&t, NULL, cm_pool_main, (void *)(intptr_t)cm_pool_size) != 0) break;
            pthread_detach(t);
            cm_pool_size++;
        }
        int helpers = nthreads - 1 < cm_pool_size ? nthreads - 1 : cm_pool_size;
        pthread_mutex_lock(&cm_pool_mu);
        cm_pool_job = &job;
        cm_pool_want = helpers;
        cm_pool_left = helpers;
        cm_pool_gen++;
        pthread_cond_broadcast(&cm_pool_go);
        pthread_mutex_unlock(&cm_pool_mu);
        cm_worker(&job);
        pthread_mutex_lock(&cm_pool_mu);
        while (cm_pool_left > 0) pthread_cond_wait(&cm_pool_done, &cm_pool_mu);
        pthread_mutex_unlock(&cm_pool_mu);
        pthread_mutex_unlock(&cm_pool_busy);
        return;
    }
    pthread_t tid[CM_POOL];
    int started = 0;
    for (int t = 1; t < nthreads; t++) {
        if (pthread_create(&tid[started], NULL, cm_worker, &job) != 0) break; /* fewer threads */
        started++;
    }
    cm_worker(&job);
    for (int t = 0; t < started; t++) pthread_join(tid[t], NULL);
}

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

int cm_have_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}

#pragma GCC push_options
#pragma GCC target("avx2,f16c")

/* ---------------------------------------------------------------- element types
 * kind: CM_F32, CM_F16 (IEEE binary16) or CM_BF16. Half types are widened to float32 on load
 * (exact) and every computation runs in float32/float64 as for float32 tensors (the contract's
 * opmath); a rescaled value lambda * |u| is rounded to the tensor's dtype (round to nearest even,
 * as torch rounds), and "lambda |u| does not round to zero" is a float32 compare against the
 * largest float32 that rounds to +0 (cm_cut). What is stored is on the dtype's grid already
 * (an input value, or a value rounded here), so the narrowing store is exact. */
#define CM_F32 0
#define CM_F16 1
#define CM_BF16 2

static inline __attribute__((always_inline)) __m256 cm_ld8(const void *p, int64_t k, const int kind) {
    if (kind == CM_F32) return _mm256_loadu_ps((const float *)p + k);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + k));
    if (kind == CM_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* x rounded to the dtype's grid (nearest even; bf16: a NaN becomes 0x7FC0 as in torch), as float32 */
static inline __attribute__((always_inline)) __m256 cm_round8(__m256 x, const int kind) {
    if (kind == CM_F32) return x;
    if (kind == CM_F16) return _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i b = _mm256_castps_si256(x);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
    r = _mm256_and_si256(r, _mm256_set1_epi32((int)0xffff0000u));
    return _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000)),
                            _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

/* store 8 values already on the dtype's grid */
static inline __attribute__((always_inline)) void cm_st8(void *p, int64_t k, __m256 x, const int kind) {
    if (kind == CM_F32) {
        _mm256_storeu_ps((float *)p + k, x);
        return;
    }
    __m128i h;
    if (kind == CM_F16) {
        h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
        __m256i b = _mm256_srli_epi32(_mm256_castps_si256(x), 16);
        h = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
    }
    _mm_storeu_si128((__m128i *)((uint16_t *)p + k), h);
}

static inline float cm_ld1(const void *p, int64_t k, int kind) {
    if (kind == CM_F32) return ((const float *)p)[k];
    uint16_t h = ((const uint16_t *)p)[k];
    if (kind == CM_F16) return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
    uint32_t w = (uint32_t)h << 16;
    float f;
    memcpy(&f, &w, 4);
    return f;
}

static inline float cm_round1(float x, int kind) {
    if (kind == CM_F32) return x;
    return _mm256_cvtss_f32(cm_round8(_mm256_set1_ps(x), kind));
}

static inline void cm_st1(void *p, int64_t k, float x, int kind) {
    if (kind == CM_F32) {
        ((float *)p)[k] = x;
        return;
    }
    if (kind == CM_F16) {
        ((uint16_t *)p)[k] = (uint16_t)_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(x), _MM_FROUND_TO_NEAREST_INT), 0);
        return;
    }
    uint32_t w;
    memcpy(&w, &x, 4);
    ((uint16_t *)p)[k] = (uint16_t)(w >> 16);
}

/* the largest float32 that rounds to +0 in the dtype (a tie that goes to even 0): a product
 * lambda |u| >= 0 rounds to a nonzero value iff it is > this */
static inline float cm_cut(int kind) {
    if (kind == CM_F16) return 0x1p-25f;
    if (kind == CM_BF16) {
        uint32_t w = 0x8000u;
        float f;
        memcpy(&f, &w, 4);
        return f;
    }
    return 0.0f;
}

/* CM_BY_KIND(kind, CALL): CALL(CM_BF16), CALL(CM_F16) or CALL(CM_F32) by the runtime kind, so each
 * loop is compiled once per element type with the type a constant inside it. */
#define CM_BY_KIND(kind, CALL)                                                                                         \
    do {                                                                                                               \
        if ((kind) == CM_BF16)                                                                                         \
            CALL(CM_BF16);                                                                                             \
        else if ((kind) == CM_F16)                                                                                     \
            CALL(CM_F16);                                                                                              \
        else                                                                                                           \
            CALL(CM_F32);                                                                                              \
    } while (0)

/* ---------------------------------------------------------------- scalar pieces (the last partial byte) */
/* Elements [k, e) of unify, e - k < 8, one mask byte per task at byte k / 8. */
static void cm_unify_tail(const void *const *d, int n, int64_t k, int64_t e, void *u, uint8_t *masks,
                          int64_t mstride, double *num, double *den, int kind) {
    uint8_t bits[CM_MAXT] = {0};
    for (int64_t j = 0; k + j < e; j++) {
        int64_t q = k + j;
        double tot = 0.0;
        for (int i = 0; i < n; i++) {
            double v = (double)cm_ld1(d[i], q, kind);
            tot = i ? tot + v : v;
            num[i] += fabs(v);
        }
        float sg = tot > 0.0 ? 1.0f : -1.0f, best = 0.0f;
        uint8_t ag[CM_MAXT];
        for (int i = 0; i < n; i++) {
            float v = cm_ld1(d[i], q, kind);
            ag[i] = v * sg > 0.0f;
            float a = ag[i] ? fabsf(v) : 0.0f;
            best = a > best ? a : best;
            bits[i] |= (uint8_t)(ag[i] << j);
        }
        cm_st1(u, q, best != 0.0f ? best * sg : best, kind); /* on the grid: one of the inputs */
        for (int i = 0; i < n; i++) den[i] += ag[i] ? (double)best : 0.0;
    }
    for (int i = 0; i < n; i++) masks[(int64_t)i * mstride + (k >> 3)] = bits[i];
}

/* One element of the continual step (the tail of a range): the same rules as the SIMD loop and
 * as numba's _step_elem for float32. Returns the bits: 1 = d agrees, 2 = u agrees; writes the
 * element of u_new and best (float32) and each earlier task's new bit into nb[i]. */
static int cm_step_elem(float x, float d, const uint8_t *old, int tp, const double *lam, const float *lam32,
                        const float *lampos, float *unew, float *best, uint8_t *nb, int kind) {
    double ls = 0.0;
    float lm = 0.0f;
    for (int i = 0; i < tp; i++) {
        if (old[i]) {
            ls += lam[i];
            lm = lampos[i] > lm ? lampos[i] : lm;
        } else {
            ls += 0.0;
        }
    }
    int pos = (double)x * ls > -(double)d;
    int ad = pos ? d > 0.0f : d < 0.0f;
    int au = pos ? x > 0.0f : x < 0.0f;
    float ax = fabsf(x), bd = ad ? fabsf(d) : 0.0f, sc = cm_round1(ax * lm, kind);
    float bk = (au && sc > bd) ? sc : bd;
    *best = bk;
    *unew = (pos || bk == 0.0f) ? bk : -bk;
    const float cut = cm_cut(kind);
    for (int i = 0; i < tp; i++) nb[i] = old[i] && au && lam[i] > 0.0 && ax * lam32[i] > cut;
    return ad | (au << 1);
}

/* Elements [k, e) (e - k < 8) of the continual step: the last, partial mask byte. */
static void cm_add_task_tail(const void *u, const uint8_t *masks, int64_t mstride, int tp, const double *lam,
                             const float *lam32, const float *lampos, const void *delta, void *u_new,
                             uint8_t *masks_new, int64_t nstride, double *absu, double *num_new, double *den,
                             int64_t k, int64_t e, int kind) {
    uint8_t newb[CM_MAXT + 1] = {0};
    for (int64_t j = 0; k + j < e; j++) {
        int64_t q = k + j;
        uint8_t old[CM_MAXT], nb[CM_MAXT];
        for (int i = 0; i < tp; i++) old[i] = (masks[(int64_t)i * mstride + (q >> 3)] >> (q & 7)) & 1;
        float bk, un, x = cm_ld1(u, q, kind), dq = cm_ld1(delta, q, kind);
        int f = cm_step_elem(x, dq, old, tp, lam, lam32, lampos, &un, &bk, nb, kind);
        cm_st1(u_new, q, un, kind);
        double ax = fabs((double)x);
        for (int i = 0; i < tp; i++) {
            if (old[i]) absu[i] += ax;
            if (nb[i]) den[i] += (double)bk;
            newb[i] |= (uint8_t)(nb[i] << j);
        }
        *num_new += fabs((double)dq);
        if (f & 1) den[tp] += (double)bk;
        newb[tp] |= (uint8_t)((f & 1) << j);
    }
    for (int i = 0; i <= tp; i++) masks_new[(int64_t)i * nstride + (k >> 3)] = newb[i];
}


static inline double cm_hsum(const __m256d a[2]) {
    double t[4];
    _mm256_storeu_pd(t, _mm256_add_pd(a[0], a[1]));
    return (t[0] + t[1]) + (t[2] + t[3]);
}

/* float32 lanes -> 2 x 4 float64 lanes (exact) */
static inline void cm_widen(__m256 x, __m256d *lo, __m256d *hi) {
    *lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
    *hi = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
}

/* a 32-bit lane mask -> 2 x 4 64-bit lane masks */
static inline void cm_widen_mask(__m256 m, __m256d *lo, __m256d *hi) {
    __m256i v = _mm256_castps_si256(m);
    *lo = _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)));
    *hi = _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
}

/* acc += a & m, lane by lane, in float64 */
static inline void cm_acc(__m256d acc[2], __m256d a0, __m256d a1, __m256d m0, __m256d m1) {
    acc[0] = _mm256_add_pd(acc[0], _mm256_and_pd(a0, m0));
    acc[1] = _mm256_add_pd(acc[1], _mm256_and_pd(a1, m1));
}

/* U consecutive 8-element blocks of unify from element k. U = 2 gives the out-of-order core two
 * independent chains of task-order float64 adds to overlap (one block alone waits on its n-long
 * chain). nacc / dacc: each task's float64 L1 sums, 2 x 4 lanes. */
static inline __attribute__((always_inline)) void cm_unify_blocks(const void *const *d, int n, int64_t k, void *u,
                                                                   uint8_t *masks, int64_t mstride,
                                                                   __m256d (*nacc)[2], __m256d (*dacc)[2],
                                                                   const int U, const int kind) {
    const __m256d absd = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7fffffffffffffffLL));
    const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 one = _mm256_set1_ps(1.0f), mone = _mm256_set1_ps(-1.0f), zero = _mm256_setzero_ps();
    const __m256i pick = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    __m256d t0[2], t1[2];
    __m256 sg[2], best[2], agv[CM_MAXT][2];
    /* the election sum, float64 in task order, and each task's sum |d| from the same widening */
    for (int j = 0; j < U; j++) {
        cm_widen(cm_ld8(d[0], k + 8 * j, kind), &t0[j], &t1[j]);
        nacc[0][0] = _mm256_add_pd(nacc[0][0], _mm256_and_pd(t0[j], absd));
        nacc[0][1] = _mm256_add_pd(nacc[0][1], _mm256_and_pd(t1[j], absd));
    }
    for (int i = 1; i < n; i++) {
        for (int j = 0; j < U; j++) {
            __m256d a0, a1;
            cm_widen(cm_ld8(d[i], k + 8 * j, kind), &a0, &a1);
            t0[j] = _mm256_add_pd(t0[j], a0);
            t1[j] = _mm256_add_pd(t1[j], a1);
            nacc[i][0] = _mm256_add_pd(nacc[i][0], _mm256_and_pd(a0, absd));
            nacc[i][1] = _mm256_add_pd(nacc[i][1], _mm256_and_pd(a1, absd));
        }
    }
    for (int j = 0; j < U; j++) {
        /* total > 0 per lane, back in element order: the low dword of each qword compare */
        __m256 p0 = _mm256_permutevar8x32_ps(_mm256_castpd_ps(_mm256_cmp_pd(t0[j], _mm256_setzero_pd(), _CMP_GT_OQ)), pick);
        __m256 p1 = _mm256_permutevar8x32_ps(_mm256_castpd_ps(_mm256_cmp_pd(t1[j], _mm256_setzero_pd(), _CMP_GT_OQ)), pick);
        sg[j] = _mm256_blendv_ps(mone, one, _mm256_permute2f128_ps(p0, p1, 0x20));
        best[j] = zero;
    }
    /* agree bits (one movemask = one mask byte) and the largest agreeing magnitude; the rows
     * were loaded a moment ago, so this second read comes from L1 */
    for (int i = 0; i < n; i++) {
        uint8_t *mb = masks + (int64_t)i * mstride + (k >> 3);
        for (int j = 0; j < U; j++) {
            __m256 x = cm_ld8(d[i], k + 8 * j, kind);
            __m256 g = _mm256_cmp_ps(_mm256_mul_ps(x, sg[j]), zero, _CMP_GT_OQ);
            agv[i][j] = g;
            mb[j] = (uint8_t)_mm256_movemask_ps(g);
            best[j] = _mm256_max_ps(best[j], _mm256_and_ps(_mm256_and_ps(x, absm), g));
        }
    }
    for (int j = 0; j < U; j++) {
        /* best * sg is exact; where best is +0 (nothing agrees) the AND keeps +0, never -0 */
        __m256 nz = _mm256_cmp_ps(best[j], zero, _CMP_NEQ_UQ);
        cm_st8(u, k + 8 * j, _mm256_and_ps(_mm256_mul_ps(best[j], sg[j]), nz), kind);
        __m256d b0, b1;
        cm_widen(best[j], &b0, &b1);
        for (int i = 0; i < n; i++) {
            __m256d m0, m1;
            cm_widen_mask(agv[i][j], &m0, &m1);
            cm_acc(dacc[i], b0, b1, m0, m1);
        }
    }
}

/* Unify elements [s, e) (s a multiple of 8), writing u, the mask bytes and num/den of the range. */
static inline __attribute__((always_inline)) void cm_unify_range_k(const void *const *d, int n, int64_t s, int64_t e,
                                                                    void *u, uint8_t *masks, int64_t mstride,
                                                                    double *num, double *den, const int kind) {
    __m256d nacc[CM_MAXT][2], dacc[CM_MAXT][2];
    for (int i = 0; i < n; i++) nacc[i][0] = nacc[i][1] = dacc[i][0] = dacc[i][1] = _mm256_setzero_pd();
    int64_t k = s;
    for (; k + 16 <= e; k += 16) cm_unify_blocks(d, n, k, u, masks, mstride, nacc, dacc, 2, kind);
    if (k + 8 <= e) {
        cm_unify_blocks(d, n, k, u, masks, mstride, nacc, dacc, 1, kind);
        k += 8;
    }
    for (int i = 0; i < n; i++) {
        num[i] = cm_hsum(nacc[i]);
        den[i] = cm_hsum(dacc[i]);
    }
    if (k < e) cm_unify_tail(d, n, k, e, u, masks, mstride, num, den, kind);
}

/* one copy of the loop per element type, the type a constant inside each */
static void cm_unify_range(const void *const *d, int n, int64_t s, int64_t e, void *u, uint8_t *masks,
                           int64_t mstride, double *num, double *den, int kind) {
#define CM_UNIFY(K_) cm_unify_range_k(d, n, s, e, u, masks, mstride, num, den, K_)
    CM_BY_KIND(kind, CM_UNIFY);
#undef CM_UNIFY
}

/* One mask byte -> 8 lanes of all-ones where its bit is set. */
static inline __m256 cm_expand(uint8_t b) {
    const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256i v = _mm256_and_si256(_mm256_set1_epi32(b), sel);
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(v, sel));
}

/* Rows r of decouple over elements [s, e) (s a multiple of 8): out = round(u * lam) in u's type
 * (kind) where the bit is set, +0.0 elsewhere; with a base (of type bkind, which is then the
 * output's), out = round(float32(base) + that), rounded to bkind: torch's `base + expert`. */
static inline __attribute__((always_inline)) void cm_decouple_range_k(const void *u, const uint8_t *packed,
                                                                       int64_t pstride, const float *lams, int K,
                                                                       const void *base, void *out, int64_t N,
                                                                       int64_t s, int64_t e, const int kind,
                                                                       const int bkind) {
    const int okind = base ? bkind : kind;
    const int64_t esz = okind == CM_F32 ? 4 : 2;
    for (int r = 0; r < K; r++) {
        const uint8_t *p = packed + (int64_t)r * pstride;
        void *o = (char *)out + (int64_t)r * N * esz;
        __m256 lam = _mm256_set1_ps(lams[r]);
        int64_t k = s;
        if (base) {
            for (; k + 8 <= e; k += 8) {
                __m256 v = _mm256_and_ps(cm_round8(_mm256_mul_ps(cm_ld8(u, k, kind), lam), kind), cm_expand(p[k >> 3]));
                cm_st8(o, k, cm_round8(_mm256_add_ps(cm_ld8(base, k, bkind), v), bkind), bkind);
            }
        } else {
            for (; k + 8 <= e; k += 8)
                cm_st8(o, k,
                       _mm256_and_ps(cm_round8(_mm256_mul_ps(cm_ld8(u, k, kind), lam), kind), cm_expand(p[k >> 3])),
                       kind);
        }
        for (; k < e; k++) {
            float v = ((p[k >> 3] >> (k & 7)) & 1) ? cm_round1(cm_ld1(u, k, kind) * lams[r], kind) : 0.0f;
            if (base)
                cm_st1(o, k, cm_round1(cm_ld1(base, k, bkind) + v, bkind), bkind);
            else
                cm_st1(o, k, v, kind);
        }
    }
}

/* one copy per (u type, base type) pair, both constants inside it */
static void cm_decouple_range(const void *u, const uint8_t *packed, int64_t pstride, const float *lams, int K,
                              const void *base, void *out, int64_t N, int64_t s, int64_t e, int kind, int bkind) {
#define CM_DEC(K_, B_) cm_decouple_range_k(u, packed, pstride, lams, K, base, out, N, s, e, K_, B_)
#define CM_DEC_BF16(B_) CM_DEC(CM_BF16, B_)
#define CM_DEC_F16(B_) CM_DEC(CM_F16, B_)
#define CM_DEC_F32(B_) CM_DEC(CM_F32, B_)
    if (kind == CM_BF16)
        CM_BY_KIND(bkind, CM_DEC_BF16);
    else if (kind == CM_F16)
        CM_BY_KIND(bkind, CM_DEC_F16);
    else
        CM_BY_KIND(bkind, CM_DEC_F32);
#undef CM_DEC_F32
#undef CM_DEC_F16
#undef CM_DEC_BF16
#undef CM_DEC
}


/* Per-task constants of one continual step, broadcast once per range. */
typedef struct {
    __m256d lamd[CM_MAXT];
    __m256 lamf[CM_MAXT], lamp[CM_MAXT];
    int live[CM_MAXT]; /* lam_i > 0: the expert can keep elements at all */
} cm_step_consts;

/* U (1 or 2) consecutive 8-element blocks of the continual step from element k (see
 * cm_add_task_range). Lane masks of the old bits are built once per task for both blocks: the
 * two mask bytes broadcast, then a variable shift puts bit 8j + l at the sign bit of lane l
 * (float32 lanes) or of its qword (float64 lanes); blendv and movemask read only that bit.
 * aacc[i]: sum over old bits of |u|; dacc[i]: sum over new bits of best; dacc[tp] and nacc for
 * the new task. */
static inline __attribute__((always_inline)) void cm_step_blocks(const void *u, const uint8_t *masks, int64_t mstride,
                                                                  int tp, const cm_step_consts *C, const void *delta,
                                                                  void *u_new, uint8_t *masks_new, int64_t nstride,
                                                                  __m256d (*aacc)[2], __m256d (*dacc)[2],
                                                                  __m256d *nacc, int64_t k, const int U,
                                                                  const int kind) {
    const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 sgnm = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));
    const __m256d sgnd = _mm256_castsi256_pd(_mm256_set1_epi64x((long long)0x8000000000000000ull));
    const __m256d absd = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7fffffffffffffffLL));
    const __m256 zero = _mm256_setzero_ps(), cutv = _mm256_set1_ps(cm_cut(kind));
    const __m256d zd = _mm256_setzero_pd();
    const __m256i pick = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    const __m256i sh32[2] = {_mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24),
                             _mm256_setr_epi32(23, 22, 21, 20, 19, 18, 17, 16)};
    const __m256i sh64[2][2] = {{_mm256_setr_epi64x(63, 62, 61, 60), _mm256_setr_epi64x(59, 58, 57, 56)},
                                {_mm256_setr_epi64x(55, 54, 53, 52), _mm256_setr_epi64x(51, 50, 49, 48)}};
    const int64_t b = k >> 3;
    __m256d l0[2], l1[2];
    __m256 lm[2];
    __m256i mv[CM_MAXT][2], mlo[CM_MAXT][2], mhi[CM_MAXT][2];
    for (int j = 0; j < U; j++) {
        l0[j] = l1[j] = zd;
        lm[j] = zero;
    }
    /* Lambda in float64, task order (+0.0 added where a bit is clear), and the largest lam */
    for (int i = 0; i < tp; i++) {
        const uint8_t *row = masks + (int64_t)i * mstride + b;
        int w = U == 2 ? (int)row[0] | ((int)row[1] << 8) : (int)row[0];
        __m256i v = _mm256_set1_epi32(w); /* as qwords: w in both dwords, so low-dword bits shift right */
        for (int j = 0; j < U; j++) {
            mv[i][j] = _mm256_sllv_epi32(v, sh32[j]);
            mlo[i][j] = _mm256_sllv_epi64(v, sh64[j][0]);
            mhi[i][j] = _mm256_sllv_epi64(v, sh64[j][1]);
            l0[j] = _mm256_add_pd(l0[j], _mm256_blendv_pd(zd, C->lamd[i], _mm256_castsi256_pd(mlo[i][j])));
            l1[j] = _mm256_add_pd(l1[j], _mm256_blendv_pd(zd, C->lamd[i], _mm256_castsi256_pd(mhi[i][j])));
            lm[j] = _mm256_max_ps(lm[j], _mm256_blendv_ps(zero, C->lamp[i], _mm256_castsi256_ps(mv[i][j])));
        }
    }
    __m256 au[2], ax[2], bk[2];
    __m256d ax0[2], ax1[2], bu0[2], bu1[2];
    for (int j = 0; j < U; j++) {
        __m256 x = cm_ld8(u, k + 8 * j, kind), dv = cm_ld8(delta, k + 8 * j, kind);
        __m256d x0, x1, d0, d1;
        cm_widen(x, &x0, &x1);
        cm_widen(dv, &d0, &d1);
        __m256 p0 = _mm256_permutevar8x32_ps(
            _mm256_castpd_ps(_mm256_cmp_pd(_mm256_mul_pd(x0, l0[j]), _mm256_xor_pd(d0, sgnd), _CMP_GT_OQ)), pick);
        __m256 p1 = _mm256_permutevar8x32_ps(
            _mm256_castpd_ps(_mm256_cmp_pd(_mm256_mul_pd(x1, l1[j]), _mm256_xor_pd(d1, sgnd), _CMP_GT_OQ)), pick);
        __m256 pos = _mm256_permute2f128_ps(p0, p1, 0x20);
        __m256 ad = _mm256_blendv_ps(_mm256_cmp_ps(dv, zero, _CMP_LT_OQ), _mm256_cmp_ps(dv, zero, _CMP_GT_OQ), pos);
        au[j] = _mm256_blendv_ps(_mm256_cmp_ps(x, zero, _CMP_LT_OQ), _mm256_cmp_ps(x, zero, _CMP_GT_OQ), pos);
        ax[j] = _mm256_and_ps(x, absm);
        __m256 bd = _mm256_and_ps(_mm256_and_ps(dv, absm), ad);
        __m256 sc = cm_round8(_mm256_mul_ps(ax[j], lm[j]), kind); /* the largest earlier expert, in the dtype */
        bk[j] = _mm256_blendv_ps(bd, sc, _mm256_and_ps(au[j], _mm256_cmp_ps(sc, bd, _CMP_GT_OQ)));
        /* -bk where the sign is negative and bk != 0 (never -0.0) */
        __m256 neg = _mm256_andnot_ps(pos, _mm256_cmp_ps(bk[j], zero, _CMP_NEQ_UQ));
        cm_st8(u_new, k + 8 * j, _mm256_xor_ps(bk[j], _mm256_and_ps(neg, sgnm)), kind);
        masks_new[(int64_t)tp * nstride + b + j] = (uint8_t)_mm256_movemask_ps(ad);
        nacc[0] = _mm256_add_pd(nacc[0], _mm256_and_pd(d0, absd));
        nacc[1] = _mm256_add_pd(nacc[1], _mm256_and_pd(d1, absd));
        __m256d b0, b1, m0, m1;
        cm_widen(bk[j], &b0, &b1);
        cm_widen_mask(ad, &m0, &m1);
        cm_acc(dacc[tp], b0, b1, m0, m1);
        cm_widen(ax[j], &ax0[j], &ax1[j]);
        cm_widen(_mm256_and_ps(bk[j], au[j]), &bu0[j], &bu1[j]); /* best where u agrees */
    }
    /* each earlier task: sum |u| over its old bits; its new bits (old, u agrees, lam |u| does
     * not round to 0); sum best over them, which is sum (best where u agrees) over the old bits
     * unless some lam |u| rounds to 0 (then that block takes the exact masked sum) */
    for (int i = 0; i < tp; i++) {
        for (int j = 0; j < U; j++) {
            __m256d mlo_ = _mm256_castsi256_pd(mlo[i][j]), mhi_ = _mm256_castsi256_pd(mhi[i][j]);
            aacc[i][0] = _mm256_add_pd(aacc[i][0], _mm256_blendv_pd(zd, ax0[j], mlo_));
            aacc[i][1] = _mm256_add_pd(aacc[i][1], _mm256_blendv_pd(zd, ax1[j], mhi_));
            if (C->live[i]) {
                __m256 oa = _mm256_and_ps(_mm256_castsi256_ps(mv[i][j]), au[j]);
                __m256 sv = _mm256_cmp_ps(_mm256_mul_ps(ax[j], C->lamf[i]), cutv, _CMP_GT_OQ);
                __m256 nb = _mm256_and_ps(oa, sv);
                int nbits = _mm256_movemask_ps(nb);
                masks_new[(int64_t)i * nstride + b + j] = (uint8_t)nbits;
                if (__builtin_expect(nbits == _mm256_movemask_ps(oa), 1)) {
                    dacc[i][0] = _mm256_add_pd(dacc[i][0], _mm256_blendv_pd(zd, bu0[j], mlo_));
                    dacc[i][1] = _mm256_add_pd(dacc[i][1], _mm256_blendv_pd(zd, bu1[j], mhi_));
                } else {
                    __m256d b0, b1, m0, m1;
                    cm_widen(bk[j], &b0, &b1);
                    cm_widen_mask(nb, &m0, &m1);
                    dacc[i][0] = _mm256_add_pd(dacc[i][0], _mm256_blendv_pd(zd, b0, m0));
                    dacc[i][1] = _mm256_add_pd(dacc[i][1], _mm256_blendv_pd(zd, b1, m1));
                }
            } else {
                masks_new[(int64_t)i * nstride + b + j] = 0;
            }
        }
    }
}

/* The continual step over elements [s, e) (s a multiple of 8); tp <= CM_MAXT earlier tasks.
 * Per 8-element block: Lambda_k = sum of lam_i over the set old bits, in float64 and task
 * order (adding +0.0 where a bit is clear, as the reference does), the largest such lam (float32:
 * max is exact), the elected sign from float64(u) * Lambda > -float64(d), then the rest in
 * float32, which is exact here: compares, |.|, the float32 product |u| * max lam that the
 * reference rounds to float32 too, and the sign flip. */
static inline __attribute__((always_inline)) void cm_add_task_range_k(
    const void *u, const uint8_t *masks, int64_t mstride, int tp, const double *lam, const float *lam32,
    const float *lampos, const void *delta, void *u_new, uint8_t *masks_new, int64_t nstride, double *absu,
    double *num_new, double *den, int64_t s, int64_t e, const int kind) {
    cm_step_consts C;
    __m256d aacc[CM_MAXT][2], dacc[CM_MAXT + 1][2], nacc[2];
    for (int i = 0; i <= tp; i++) {
        dacc[i][0] = dacc[i][1] = _mm256_setzero_pd();
        if (i < tp) {
            aacc[i][0] = aacc[i][1] = _mm256_setzero_pd();
            C.lamd[i] = _mm256_set1_pd(lam[i]);
            C.lamf[i] = _mm256_set1_ps(lam32[i]);
            C.lamp[i] = _mm256_set1_ps(lampos[i]);
            C.live[i] = lam[i] > 0.0;
        }
    }
    nacc[0] = nacc[1] = _mm256_setzero_pd();
    int64_t k = s;
    for (; k + 16 <= e; k += 16)
        cm_step_blocks(u, masks, mstride, tp, &C, delta, u_new, masks_new, nstride, aacc, dacc, nacc, k, 2, kind);
    if (k + 8 <= e) {
        cm_step_blocks(u, masks, mstride, tp, &C, delta, u_new, masks_new, nstride, aacc, dacc, nacc, k, 1, kind);
        k += 8;
    }
    for (int i = 0; i <= tp; i++) {
        if (i < tp) absu[i] = cm_hsum(aacc[i]);
        den[i] = cm_hsum(dacc[i]);
    }
    *num_new = cm_hsum(nacc);
    if (k < e)
        cm_add_task_tail(u, masks, mstride, tp, lam, lam32, lampos, delta, u_new, masks_new, nstride, absu, num_new,
                         den, k, e, kind);
}

static void cm_add_task_range(const void *u, const uint8_t *masks, int64_t mstride, int tp, const double *lam,
                              const float *lam32, const float *lampos, const void *delta, void *u_new,
                              uint8_t *masks_new, int64_t nstride, double *absu, double *num_new, double *den,
                              int64_t s, int64_t e, int kind) {
#define CM_STEP(K_)                                                                                                    \
    cm_add_task_range_k(u, masks, mstride, tp, lam, lam32, lampos, delta, u_new, masks_new, nstride, absu, num_new,  \
                        den, s, e, K_)
    CM_BY_KIND(kind, CM_STEP);
#undef CM_STEP
}

/* ---------------------------------------------------------------- the delta f - b
 * out = round(float32(f) - float32(b)) in the element type (what torch's half subtraction gives:
 * the float32 difference rounded once); out may be f. Counts the elements whose result is not
 * finite while the float32 difference is (the difference overflowed the dtype) and keeps their
 * largest |difference|, so the caller can refuse them without the inputs. */
static inline __attribute__((always_inline)) void cm_sub_range_k(const void *f, const void *b, void *out, int64_t s,
                                                                  int64_t e, int64_t *nbad, float *big,
                                                                  const int kind) {
    const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 inf = _mm256_castsi256_ps(_mm256_set1_epi32(0x7f800000));
    __m256 bigv = _mm256_setzero_ps();
    int64_t cnt = 0, k = s;
    for (; k + 8 <= e; k += 8) {
        __m256 w = _mm256_sub_ps(cm_ld8(f, k, kind), cm_ld8(b, k, kind));
        __m256 r = cm_round8(w, kind);
        cm_st8(out, k, r, kind);
        if (kind != CM_F32) {
            __m256 aw = _mm256_and_ps(w, absm);
            __m256 bad = _mm256_andnot_ps(_mm256_cmp_ps(_mm256_and_ps(r, absm), inf, _CMP_LT_OQ),
                                          _mm256_cmp_ps(aw, inf, _CMP_LT_OQ));
            int m = _mm256_movemask_ps(bad);
            if (__builtin_expect(m != 0, 0)) {
                cnt += __builtin_popcount((unsigned)m);
                bigv = _mm256_max_ps(bigv, _mm256_and_ps(aw, bad));
            }
        }
    }
    float t[8];
    _mm256_storeu_ps(t, bigv);
    float mx = 0.0f;
    for (int j = 0; j < 8; j++) mx = t[j] > mx ? t[j] : mx;
    for (; k < e; k++) {
        float w = cm_ld1(f, k, kind) - cm_ld1(b, k, kind), r = cm_round1(w, kind);
        cm_st1(out, k, r, kind);
        if (kind != CM_F32 && !isfinite(r) && isfinite(w)) {
            cnt++;
            mx = fabsf(w) > mx ? fabsf(w) : mx;
        }
    }
    *nbad = cnt;
    *big = mx;
}

static void cm_sub_range(const void *f, const void *b, void *out, int64_t s, int64_t e, int64_t *nbad, float *big,
                         int kind) {
#define CM_SUB(K_) cm_sub_range_k(f, b, out, s, e, nbad, big, K_)
    CM_BY_KIND(kind, CM_SUB);
#undef CM_SUB
}

#pragma GCC pop_options

/* ---------------------------------------------------------------- entry points
 * kind (last argument): CM_F32, CM_F16 or CM_BF16, the dtype of every tensor argument (u, the
 * deltas, base, the outputs); masks are uint8, sums float64, lambdas as described. */
typedef struct {
    const void *const *d;
    int n, kind;
    int64_t N, chunk, mstride;
    void *u;
    uint8_t *masks;
    double *num_part, *den_part;
} cm_unify_args;

static void cm_unify_chunk(void *p, int64_t c) {
    cm_unify_args *a = (cm_unify_args *)p;
    int64_t s = c * a->chunk, e = s + a->chunk < a->N ? s + a->chunk : a->N;
    cm_unify_range(a->d, a->n, s, e, a->u, a->masks, a->mstride, a->num_part + c * a->n, a->den_part + c * a->n,
                   a->kind);
}

static int cm_kind_ok(int kind) { return kind == CM_F32 || kind == CM_F16 || kind == CM_BF16; }

/* unify n (<= CM_MAXT) rows of N elements: u [N], masks [n, mstride], per-chunk sums
 * num_part / den_part [ceil(N / chunk), n]; chunk a positive multiple of 8. Returns 0, or -1
 * for arguments it does not take. */
int cm_unify(const void *const *d, int n, int64_t N, void *u, uint8_t *masks, int64_t mstride, double *num_part,
             double *den_part, int64_t chunk, int nthreads, int kind) {
    if (n < 1 || n > CM_MAXT || N < 0 || chunk <= 0 || chunk % 8 || mstride < (N + 7) / 8 || !cm_kind_ok(kind))
        return -1;
    if (N == 0) return 0;
    cm_unify_args a = {d, n, kind, N, chunk, mstride, u, masks, num_part, den_part};
    cm_run(cm_unify_chunk, &a, (N + chunk - 1) / chunk, nthreads);
    return 0;
}

typedef struct {
    const void *u;
    const uint8_t *packed;
    int64_t pstride;
    const float *lams;
    int K, kind, bkind;
    const void *base;
    void *out;
    int64_t N, chunk;
} cm_decouple_args;

static void cm_decouple_chunk(void *p, int64_t c) {
    cm_decouple_args *a = (cm_decouple_args *)p;
    int64_t s = c * a->chunk, e = s + a->chunk < a->N ? s + a->chunk : a->N;
    cm_decouple_range(a->u, a->packed, a->pstride, a->lams, a->K, a->base, a->out, a->N, s, e, a->kind, a->bkind);
}

/* out[r] = lam_r * M_r (.) u (+ base), out [K, N] in base's type (bkind) when base is given, else
 * in u's; base may be NULL (bkind is then ignored). */
int cm_decouple(const void *u, const uint8_t *packed, int64_t pstride, const float *lams, int K, const void *base,
                void *out, int64_t N, int64_t chunk, int nthreads, int kind, int bkind) {
    if (K < 0 || N < 0 || chunk <= 0 || chunk % 8 || pstride < (N + 7) / 8 || !cm_kind_ok(kind)) return -1;
    if (base && !cm_kind_ok(bkind)) return -1;
    if (N == 0 || K == 0) return 0;
    cm_decouple_args a = {u, packed, pstride, lams, K, kind, bkind, base, out, N, chunk};
    cm_run(cm_decouple_chunk, &a, (N + chunk - 1) / chunk, nthreads);
    return 0;
}

typedef struct {
    const void *u, *delta;
    const float *lam32, *lampos;
    const uint8_t *masks;
    const double *lam;
    int tp, kind;
    int64_t mstride, nstride, N, chunk;
    void *u_new;
    uint8_t *masks_new;
    double *absu_part, *num_new_part, *den_part;
} cm_add_task_args;

static void cm_add_task_chunk(void *p, int64_t c) {
    cm_add_task_args *a = (cm_add_task_args *)p;
    int64_t s = c * a->chunk, e = s + a->chunk < a->N ? s + a->chunk : a->N;
    cm_add_task_range(a->u, a->masks, a->mstride, a->tp, a->lam, a->lam32, a->lampos, a->delta, a->u_new,
                      a->masks_new, a->nstride, a->absu_part + c * a->tp, a->num_new_part + c,
                      a->den_part + c * (a->tp + 1), s, e, a->kind);
}

/* One continual step on N elements with tp (<= CM_MAXT) earlier tasks: masks [tp, mstride] in,
 * masks_new [tp + 1, nstride] out; lam holds the opmath (float32-rounded) rescalers as float64.
 * Per chunk c: absu_part[c, i] = sum over old bits of |u|, num_new_part[c] = sum |d|,
 * den_part[c, 0..tp]. */
int cm_add_task(const void *u, const uint8_t *masks, int64_t mstride, int tp, const double *lam, const void *delta,
                void *u_new, uint8_t *masks_new, int64_t nstride, double *absu_part, double *num_new_part,
                double *den_part, int64_t N, int64_t chunk, int nthreads, int kind) {
    if (tp < 0 || tp > CM_MAXT || N < 0 || chunk <= 0 || chunk % 8 || !cm_kind_ok(kind)) return -1;
    if (mstride < (N + 7) / 8 || nstride < (N + 7) / 8) return -1;
    if (N == 0) return 0;
    float lam32[CM_MAXT + 1], lampos[CM_MAXT + 1];
    for (int i = 0; i < tp; i++) {
        lam32[i] = (float)lam[i];
        lampos[i] = lam[i] > 0.0 ? (float)lam[i] : 0.0f;
    }
    cm_add_task_args a = {u,  delta, lam32,   lampos,    masks,     lam,       tp,           kind,     mstride,
                          nstride, N, chunk, u_new, masks_new, absu_part, num_new_part, den_part};
    cm_run(cm_add_task_chunk, &a, (N + chunk - 1) / chunk, nthreads);
    return 0;
}

typedef struct {
    const void *f, *b;
    void *out;
    int kind;
    int64_t N, chunk;
    int64_t *nbad;
    float *big;
} cm_sub_args;

static void cm_sub_chunk(void *p, int64_t c) {
    cm_sub_args *a = (cm_sub_args *)p;
    int64_t s = c * a->chunk, e = s + a->chunk < a->N ? s + a->chunk : a->N;
    cm_sub_range(a->f, a->b, a->out, s, e, a->nbad + c, a->big + c, a->kind);
}

/* out = f - b over N elements (see cm_sub_range); nbad / big [ceil(N / chunk)] per chunk. */
int cm_sub(const void *f, const void *b, void *out, int64_t N, int64_t *nbad, float *big, int64_t chunk, int nthreads,
           int kind) {
    if (N < 0 || chunk <= 0 || chunk % 8 || !cm_kind_ok(kind)) return -1;
    if (N == 0) return 0;
    cm_sub_args a = {f, b, out, kind, N, chunk, nbad, big};
    cm_run(cm_sub_chunk, &a, (N + chunk - 1) / chunk, nthreads);
    return 0;
}

#else /* not x86-64: the module builds, the backend reports itself unavailable */
int cm_have_avx2(void) { return 0; }
int cm_sub(const void *f, const void *b, void *out, int64_t N, int64_t *nbad, float *big, int64_t chunk, int nthreads,
           int kind) {
    return -1;
}
int cm_unify(const void *const *d, int n, int64_t N, void *u, uint8_t *masks, int64_t mstride, double *num_part,
             double *den_part, int64_t chunk, int nthreads, int kind) {
    return -1;
}
int cm_decouple(const void *u, const uint8_t *packed, int64_t pstride, const float *lams, int K, const void *base,
                void *out, int64_t N, int64_t chunk, int nthreads, int kind, int bkind) {
    return -1;
}
int cm_add_task(const void *u, const uint8_t *masks, int64_t mstride, int tp, const double *lam, const void *delta,
                void *u_new, uint8_t *masks_new, int64_t nstride, double *absu_part, double *num_new_part,
                double *den_part, int64_t N, int64_t chunk, int nthreads, int kind) {
    return -1;
}
#endif

/* ---------------------------------------------------------------- the module object */
static struct PyModuleDef cm_module = {
    PyModuleDef_HEAD_INIT, "_native",
    "Native CPU kernels of condu-merge, called through ctypes (see native_backend.py).", -1, NULL,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&cm_module); }
