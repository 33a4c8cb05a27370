/*
 * The cblas_sgemm that MLX's Linux CPU backend calls when rg_mlx's BLAS fast path uses OpenBLAS
 * (see rg_mlx/_blas.py, which loads this library with RTLD_GLOBAL before mlx.core and hands it
 * the OpenBLAS functions with rg_blas_route).
 *
 * It does three things MLX cannot do with a plain OpenBLAS:
 * - a product of one to three rows (a decode step, x @ W.T) goes to sgemv, row by row: OpenBLAS's
 *   sgemm packs the whole weight for a few rows and reads it at 3-6 GB/s, its sgemv reads it at
 *   15-26 GB/s (measured on a 2-core AMD EPYC: for a 79 MB weight, sgemm takes 16-18 ms for one to
 *   three rows, sgemv 4.3 ms a row; at four rows they are even);
 * - a product of four to eight rows (a batch of decode steps) with a large weight goes to
 *   rg_rows_sgemm below, which reads the weight once for all rows, split over the cores;
 * - the OpenBLAS may be one whose symbols are renamed (scipy_cblas_sgemm64_, with 64-bit integers,
 *   in the copy NumPy's wheels carry), which MLX could not find by name.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define RG_X86 1
#endif

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

typedef void (*sgemm32_t)(int, int, int, int32_t, int32_t, int32_t, float, const float *, int32_t, const float *,
                          int32_t, float, float *, int32_t);
typedef void (*sgemv32_t)(int, int, int32_t, int32_t, float, const float *, int32_t, const float *, int32_t, float,
                          float *, int32_t);
typedef void (*sgemm64_t)(int, int, int, int64_t, int64_t, int64_t, float, const float *, int64_t, const float *,
                          int64_t, float, float *, int64_t);
typedef void (*sgemv64_t)(int, int, int64_t, int64_t, float, const float *, int64_t, const float *, int64_t, float,
                          float *, int64_t);

static void *route_sgemm, *route_sgemv;
static int route_int64;

/* sgemm and sgemv: the library's functions; int64: whether their integers are 64-bit (ILP64). */
void rg_blas_route(void *sgemm, void *sgemv, int int64) {
    route_sgemm = sgemm;
    route_sgemv = sgemv;
    route_int64 = int64;
}

static void gemv(int trans, int m, int n, float alpha, const float *a, int lda, const float *x, int incx, float beta,
                 float *y) {
    if (route_int64)
        ((sgemv64_t)route_sgemv)(ROW_MAJOR, trans, m, n, alpha, a, lda, x, incx, beta, y, 1);
    else
        ((sgemv32_t)route_sgemv)(ROW_MAJOR, trans, m, n, alpha, a, lda, x, incx, beta, y, 1);
}

/* ---- Few rows, one read of the weight ------------------------------------------------------------------------
 * C[m x n] = alpha A[m x k] op(B) + beta C, m <= RG_MAX_ROWS, A row-major contiguous (lda = k). op(B) is B^T with
 * B stored n x k (the weight of x @ W.T: each output is a dot product with one row of B), or B stored k x n (each
 * row of B is scaled by A's column and added to all m output rows). Either way every element of B is read once;
 * the m rows of A are small enough to stay in cache. The work is split over the outputs (columns of C). */

#define RG_MAX_ROWS 8

typedef struct {
    int m, n, k, transb;
    float alpha, beta;
    const float *a, *b;
    int ldb;
    float *c;
    int ldc;
} rows_job;

static float finish(const rows_job *j, float sum, const float *c) {
    return j->beta == 0.0f ? j->alpha * sum : j->alpha * sum + j->beta * *c; /* beta 0: C is not read (BLAS) */
}

/* Portable: any CPU. Columns [lo, hi). */
static void rows_portable(const rows_job *j, int lo, int hi) {
    const int m = j->m, k = j->k;
    if (j->transb == TRANS) {
        for (int col = lo; col < hi; col++) {
            const float *w = j->b + (long)col * j->ldb;
            float sum[RG_MAX_ROWS] = {0};
            for (int i = 0; i < k; i++)
                for (int r = 0; r < m; r++) sum[r] += j->a[(long)r * k + i] * w[i];
            for (int r = 0; r < m; r++) {
                float *c = j->c + (long)r * j->ldc + col;
                *c = finish(j, sum[r], c);
            }
        }
        return;
    }
    for (int col = lo; col < hi; col++) {
        float sum[RG_MAX_ROWS] = {0};
        for (int i = 0; i < k; i++) {
            const float w = j->b[(long)i * j->ldb + col];
            for (int r = 0; r < m; r++) sum[r] += j->a[(long)r * k + i] * w;
        }
        for (int r = 0; r < m; r++) {
            float *c = j->c + (long)r * j->ldc + col;
            *c = finish(j, sum[r], c);
        }
    }
}

#ifdef RG_X86
/* The SIMD kernels are written for a row count `m` known at compile time (RG_BY_ROWS instantiates each for 1..8),
   so that their per-row accumulators live in registers. */
#define RG_UNROLL _Pragma("GCC unroll 8")
#define RG_BY_ROWS(kernel, j, lo, hi)                                                                             \
    switch ((j)->m) {                                                                                         \
    case 1: kernel(j, lo, hi, 1); break;                                                                      \
    case 2: kernel(j, lo, hi, 2); break;                                                                      \
    case 3: kernel(j, lo, hi, 3); break;                                                                      \
    case 4: kernel(j, lo, hi, 4); break;                                                                      \
    case 5: kernel(j, lo, hi, 5); break;                                                                      \
    case 6: kernel(j, lo, hi, 6); break;                                                                      \
    case 7: kernel(j, lo, hi, 7); break;                                                                      \
    default: kernel(j, lo, hi, 8); break;                                                                     \
    }
#define RG_AVX512 __attribute__((always_inline, target("avx512f"))) static inline
#define RG_AVX2 __attribute__((always_inline, target("avx2,fma"))) static inline

/* AVX-512, B^T: two rows of B at a time against the m rows of A (up to 16 accumulators), each lane summing every
   16th product, then the lanes summed. */
RG_AVX512 void bt_avx512(const rows_job *j, int lo, int hi, const int m) {
    const int k = j->k, k16 = k & ~15;
    const __mmask16 tail = (__mmask16)((1u << (k - k16)) - 1u);
    const float *a = j->a;
    int col = lo;
    for (; col + 1 < hi; col += 2) {
        const float *w0 = j->b + (long)col * j->ldb, *w1 = w0 + j->ldb;
        __m512 s0[RG_MAX_ROWS], s1[RG_MAX_ROWS];
        RG_UNROLL for (int r = 0; r < m; r++) s0[r] = s1[r] = _mm512_setzero_ps();
        for (int i = 0; i < k16; i += 16) {
            const __m512 v0 = _mm512_loadu_ps(w0 + i), v1 = _mm512_loadu_ps(w1 + i);
            RG_UNROLL for (int r = 0; r < m; r++) {
                const __m512 x = _mm512_loadu_ps(a + (long)r * k + i);
                s0[r] = _mm512_fmadd_ps(x, v0, s0[r]);
                s1[r] = _mm512_fmadd_ps(x, v1, s1[r]);
            }
        }
        if (k16 < k) {
            const __m512 v0 = _mm512_maskz_loadu_ps(tail, w0 + k16), v1 = _mm512_maskz_loadu_ps(tail, w1 + k16);
            RG_UNROLL for (int r = 0; r < m; r++) {
                const __m512 x = _mm512_maskz_loadu_ps(tail, a + (long)r * k + k16);
                s0[r] = _mm512_fmadd_ps(x, v0, s0[r]);
                s1[r] = _mm512_fmadd_ps(x, v1, s1[r]);
            }
        }
        RG_UNROLL for (int r = 0; r < m; r++) {
            float *c = j->c + (long)r * j->ldc + col;
            c[0] = finish(j, _mm512_reduce_add_ps(s0[r]), c);
            c[1] = finish(j, _mm512_reduce_add_ps(s1[r]), c + 1);
        }
    }
    if (col < hi) {
        const float *w0 = j->b + (long)col * j->ldb;
        __m512 s0[RG_MAX_ROWS];
        RG_UNROLL for (int r = 0; r < m; r++) s0[r] = _mm512_setzero_ps();
        for (int i = 0; i < k; i += 16) {
            const __mmask16 mask = i < k16 ? (__mmask16)0xffff : tail;
            const __m512 v0 = _mm512_maskz_loadu_ps(mask, w0 + i);
            RG_UNROLL for (int r = 0; r < m; r++)
                s0[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, a + (long)r * k + i), v0, s0[r]);
        }
        RG_UNROLL for (int r = 0; r < m; r++) {
            float *c = j->c + (long)r * j->ldc + col;
            c[0] = finish(j, _mm512_reduce_add_ps(s0[r]), c);
        }
    }
}

/* AVX-512, B: 16 columns at a time, one accumulator per row, each row of B scaled by A's column. */
RG_AVX512 void b_avx512(const rows_job *j, int lo, int hi, const int m) {
    const int k = j->k;
    for (int col = lo; col < hi; col += 16) {
        const __mmask16 mask = hi - col >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (hi - col)) - 1u);
        __m512 s[RG_MAX_ROWS];
        RG_UNROLL for (int r = 0; r < m; r++) s[r] = _mm512_setzero_ps();
        for (int i = 0; i < k; i++) {
            const __m512 w = _mm512_maskz_loadu_ps(mask, j->b + (long)i * j->ldb + col);
            RG_UNROLL for (int r = 0; r < m; r++) s[r] = _mm512_fmadd_ps(_mm512_set1_ps(j->a[(long)r * k + i]), w, s[r]);
        }
        RG_UNROLL for (int r = 0; r < m; r++) {
            float out[16], *c = j->c + (long)r * j->ldc + col;
            _mm512_storeu_ps(out, s[r]);
            for (int q = 0; q < 16 && col + q < hi; q++) c[q] = finish(j, out[q], c + q);
        }
    }
}

__attribute__((target("avx512f"))) static void rows_avx512(const rows_job *j, int lo, int hi) {
    if (j->transb == TRANS) {
        RG_BY_ROWS(bt_avx512, j, lo, hi)
    } else {
        RG_BY_ROWS(b_avx512, j, lo, hi)
    }
}

/* AVX2 + FMA: 8 lanes; B^T one row of B at a time (m accumulators of the 16 registers), B 8 columns at a time. */
RG_AVX2 float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

RG_AVX2 void bt_avx2(const rows_job *j, int lo, int hi, const int m) {
    const int k = j->k, k8 = k & ~7;
    for (int col = lo; col < hi; col++) {
        const float *w = j->b + (long)col * j->ldb;
        __m256 s[RG_MAX_ROWS];
        RG_UNROLL for (int r = 0; r < m; r++) s[r] = _mm256_setzero_ps();
        for (int i = 0; i < k8; i += 8) {
            const __m256 v = _mm256_loadu_ps(w + i);
            RG_UNROLL for (int r = 0; r < m; r++) s[r] = _mm256_fmadd_ps(_mm256_loadu_ps(j->a + (long)r * k + i), v, s[r]);
        }
        RG_UNROLL for (int r = 0; r < m; r++) {
            float sum = hsum256(s[r]);
            for (int i = k8; i < k; i++) sum += j->a[(long)r * k + i] * w[i];
            float *c = j->c + (long)r * j->ldc + col;
            *c = finish(j, sum, c);
        }
    }
}

RG_AVX2 void b_avx2(const rows_job *j, int lo, int hi, const int m) {
    const int k = j->k;
    int col = lo;
    for (; col + 8 <= hi; col += 8) {
        __m256 s[RG_MAX_ROWS];
        RG_UNROLL for (int r = 0; r < m; r++) s[r] = _mm256_setzero_ps();
        for (int i = 0; i < k; i++) {
            const __m256 w = _mm256_loadu_ps(j->b + (long)i * j->ldb + col);
            RG_UNROLL for (int r = 0; r < m; r++) s[r] = _mm256_fmadd_ps(_mm256_set1_ps(j->a[(long)r * k + i]), w, s[r]);
        }
        RG_UNROLL for (int r = 0; r < m; r++) {
            float out[8], *c = j->c + (long)r * j->ldc + col;
            _mm256_storeu_ps(out, s[r]);
            for (int q = 0; q < 8; q++) c[q] = finish(j, out[q], c + q);
        }
    }
    if (col < hi) rows_portable(j, col, hi);
}

__attribute__((target("avx2,fma"))) static void rows_avx2(const rows_job *j, int lo, int hi) {
    if (j->transb == TRANS) {
        RG_BY_ROWS(bt_avx2, j, lo, hi)
    } else {
        RG_BY_ROWS(b_avx2, j, lo, hi)
    }
}
#endif

typedef void (*rows_kernel)(const rows_job *, int, int);

/* The fastest kernel this CPU runs, or the one RG_MLX_ROWS_KERNEL names ("portable", "avx2", "avx512" where the CPU
   has it; "off": none, the router leaves 4-8 rows to sgemm). */
static rows_kernel choose_kernel(void) {
    const char *forced = getenv("RG_MLX_ROWS_KERNEL");
    if (forced && !strcmp(forced, "off")) return NULL;
#ifdef RG_X86
    __builtin_cpu_init();
    const int avx512 = __builtin_cpu_supports("avx512f");
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (forced && !strcmp(forced, "portable")) return rows_portable;
    if (forced && !strcmp(forced, "avx2") && avx2) return rows_avx2;
    if (avx512 && !(forced && !strcmp(forced, "avx2"))) return rows_avx512;
    if (avx2) return rows_avx2;
#endif
    (void)forced;
    return rows_portable;
}

/* The kernel's name, for tests and benchmarks. */
const char *rg_rows_kernel(void) {
    rows_kernel kernel = choose_kernel();
    if (!kernel) return "off";
#ifdef RG_X86
    if (kernel == rows_avx512) return "avx512";
    if (kernel == rows_avx2) return "avx2";
#endif
    return "portable";
}

/* A small pool of worker threads, made on first use (again in a forked child, which has none), that split a
   job's columns with the calling thread. Workers sleep on a condition variable between jobs. One job at a time:
   a caller that finds the pool busy (another MLX stream in a product) runs its job alone. */
#define RG_MAX_THREADS 64
static pid_t pool_pid; /* the process whose workers these are; 0: none yet */
static pthread_mutex_t start_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER, pool_busy = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_start = PTHREAD_COND_INITIALIZER, pool_done = PTHREAD_COND_INITIALIZER;
static int pool_threads = 1, pool_pending;
static long pool_generation;
static const rows_job *pool_job;
static rows_kernel pool_kernel;
static int pool_step, pool_align;

static void run_part(const rows_job *j, rows_kernel kernel, int part, int parts, int align) {
    int per = (j->n + parts - 1) / parts;
    per = (per + align - 1) / align * align;
    const int lo = part * per, hi = lo + per < j->n ? lo + per : j->n;
    if (lo < hi) kernel(j, lo, hi);
}

static void *worker(void *arg) {
    const int id = (int)(intptr_t)arg;
    long seen = 0;
    for (;;) {
        pthread_mutex_lock(&pool_lock);
        while (pool_generation == seen) pthread_cond_wait(&pool_start, &pool_lock);
        seen = pool_generation;
        const rows_job *job = pool_job;
        rows_kernel kernel = pool_kernel;
        const int parts = pool_step, align = pool_align;
        pthread_mutex_unlock(&pool_lock);
        run_part(job, kernel, id, parts, align);
        pthread_mutex_lock(&pool_lock);
        if (--pool_pending == 0) pthread_cond_signal(&pool_done);
        pthread_mutex_unlock(&pool_lock);
    }
    return NULL;
}

/* In a forked child: the workers stayed in the parent, where a lock may have been held. */
static void forget_pool(void) {
    pthread_mutex_init(&start_lock, NULL);
    pthread_mutex_init(&pool_lock, NULL);
    pthread_mutex_init(&pool_busy, NULL);
    pthread_cond_init(&pool_start, NULL);
    pthread_cond_init(&pool_done, NULL);
    pool_pid = 0;
}

static void start_pool(void) {
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    const char *forced = getenv("RG_MLX_ROWS_THREADS");
    if (forced && atoi(forced) > 0) cores = atoi(forced);
    if (cores < 1) cores = 1;
    if (cores > RG_MAX_THREADS) cores = RG_MAX_THREADS;
    pool_threads = 1;
    pool_pending = 0;
    pool_generation = 0; /* new workers wait for the next job */
    for (long t = 1; t < cores; t++) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&thread, &attr, worker, (void *)(intptr_t)t) == 0) pool_threads++;
        pthread_attr_destroy(&attr);
        if (pool_threads != t + 1) break; /* ids must stay 1..threads-1 */
    }
}

static void ensure_pool(void) {
    static int forks_handled;
    if (pool_pid == getpid()) return;
    pthread_mutex_lock(&start_lock);
    if (pool_pid != getpid()) {
        if (!forks_handled) forks_handled = pthread_atfork(NULL, NULL, forget_pool) == 0;
        start_pool();
        pool_pid = getpid();
    }
    pthread_mutex_unlock(&start_lock);
}

/* C = alpha A op(B) + beta C for 1 <= m <= RG_MAX_ROWS rows, row-major, reading B once, split over the cores.
   Same arguments as cblas_sgemm (order must be row-major). Returns 0, or -1 for arguments it does not take. */
int rg_rows_sgemm(int order, int transa, int transb, int m, int n, int k, float alpha, const float *a, int lda,
                  const float *b, int ldb, float beta, float *c, int ldc) {
    rows_kernel kernel = choose_kernel();
    if (!kernel || order != ROW_MAJOR || m < 1 || m > RG_MAX_ROWS || n < 1 || k < 1) return -1;
    float packed[RG_MAX_ROWS * 4096], *copy = NULL;
    if (transa != NO_TRANS || lda != k) { /* the kernels read A's rows contiguously: pack them */
        copy = (long)m * k <= (long)(sizeof packed / sizeof *packed) ? packed : malloc(sizeof(float) * m * k);
        if (!copy) return -1;
        for (int r = 0; r < m; r++)
            for (int i = 0; i < k; i++) copy[(long)r * k + i] = transa == NO_TRANS ? a[(long)r * lda + i] : a[(long)i * lda + r];
        a = copy;
    }
    const rows_job job = {m, n, k, transb, alpha, beta, a, b, ldb, c, ldc};
    const int align = transb == TRANS ? 2 : 16;
    ensure_pool();
    int parts = pool_threads;
    /* At least 64 KB of B per thread: below that, waking a thread costs more than it saves. */
    const long min_cols = (16384 + k - 1) / k;
    if ((long)n / parts < min_cols) parts = (int)((long)n / min_cols > 1 ? (long)n / min_cols : 1);
    if (parts > 1 && pthread_mutex_trylock(&pool_busy) == 0) {
        pthread_mutex_lock(&pool_lock);
        pool_job = &job;
        pool_kernel = kernel;
        pool_step = parts;
        pool_align = align;
        pool_pending = pool_threads - 1;
        pool_generation++;
        pthread_cond_broadcast(&pool_start);
        pthread_mutex_unlock(&pool_lock);
        run_part(&job, kernel, 0, parts, align);
        pthread_mutex_lock(&pool_lock);
        while (pool_pending) pthread_cond_wait(&pool_done, &pool_lock);
        pthread_mutex_unlock(&pool_lock);
        pthread_mutex_unlock(&pool_busy);
    } else {
        kernel(&job, 0, n);
    }
    if (copy && copy != packed) free(copy);
    return 0;
}

/* Up to this many rows, one sgemv per row; up to RG_MAX_ROWS, rg_rows_sgemm where B is at least ROWS_MIN_B floats. */
#define GEMV_ROWS 3
#define ROWS_MIN_B (1L << 20)

static long routed_to_rows; /* for tests and diagnostics; not exact under concurrent calls */

/* How many of MLX's products the router sent to rg_rows_sgemm so far. */
long rg_rows_calls(void) { return routed_to_rows; }

void cblas_sgemm(int order, int transa, int transb, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
    if (route_sgemv && order == ROW_MAJOR && m <= GEMV_ROWS && n > 0 && k > 0) {
        /* Row r: c[r, :n] = alpha a[r, :k] op(b) + beta c[r], i.e. alpha op(b)^T a[r] + beta c[r]. Row r of
           op(a) is contiguous, or (transposed: a stored k x m) strided by lda from column r. */
        int inca = transa == NO_TRANS ? 1 : lda;
        for (int r = 0; r < m; r++) {
            const float *row = transa == NO_TRANS ? a + (long)r * lda : a + r;
            if (transb == NO_TRANS) /* b is k x n */
                gemv(TRANS, k, n, alpha, b, ldb, row, inca, beta, c + (long)r * ldc);
            else /* b is n x k */
                gemv(NO_TRANS, n, k, alpha, b, ldb, row, inca, beta, c + (long)r * ldc);
        }
        return;
    }
    if (route_sgemm && m <= RG_MAX_ROWS && (long)n * k >= ROWS_MIN_B &&
        rg_rows_sgemm(order, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc) == 0) {
        routed_to_rows++;
        return;
    }
    if (route_int64)
        ((sgemm64_t)route_sgemm)(order, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    else
        ((sgemm32_t)route_sgemm)(order, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
