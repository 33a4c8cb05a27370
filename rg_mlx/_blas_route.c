/*
 * The cblas_sgemm that MLX's Linux CPU backend calls when rg_mlx's BLAS fast path uses OpenBLAS
 * (see rg_mlx/_blas.py, which loads this library with RTLD_GLOBAL before mlx.core and hands it
 * the OpenBLAS functions with rg_blas_route).
 *
 * It does two things MLX cannot do with a plain OpenBLAS:
 * - a product of one to three rows (a decode step, x @ W.T) goes to sgemv, row by row: OpenBLAS's
 *   sgemm packs the whole weight for a few rows and reads it at 3-6 GB/s, its sgemv reads it at
 *   15-26 GB/s (measured on a 2-core AMD EPYC: for a 79 MB weight, sgemm takes 16-18 ms for one to
 *   three rows, sgemv 4.3 ms a row; at four rows they are even);
 * - the OpenBLAS may be one whose symbols are renamed (scipy_cblas_sgemm64_, with 64-bit integers,
 *   in the copy NumPy's wheels carry), which MLX could not find by name.
 */
#include <stdint.h>

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

/* Up to this many rows, one sgemv per row. */
#define GEMV_ROWS 3

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
    if (route_int64)
        ((sgemm64_t)route_sgemm)(order, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    else
        ((sgemm32_t)route_sgemm)(order, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
