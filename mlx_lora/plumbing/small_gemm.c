/* Small-batch float32 products for MLX's CPU backend (Linux x86-64, AVX2 + FMA).
 *
 * MLX's CPU matmul calls cblas_sgemm. For a decode step of a batch of a few requests that is
 * x (rows x in) times a weight's transpose, with rows <= 16: a BLAS packs the whole weight into
 * its own layout before every such product, which costs more than the product itself reads. This
 * library is preloaded before the BLAS; it defines cblas_sgemm, runs those products reading each
 * weight row once (several rows of x at a time, the weight split over a few threads), and hands
 * every other call to the next cblas_sgemm in the search order (the BLAS).
 *
 * Every output element is computed by the same instructions in the same order whatever the
 * number of rows or threads, so a row's result does not depend on what it is batched with.
 * Shallow products against a transposed weight (in < 64, such as an adapter's rank-r factor) stay
 * with the BLAS: one dot product per output element costs more than the BLAS's packing there.
 * Products of at most 16 rows against a matrix that is not transposed (K x N: an adapter's factor
 * kept as rank x out, attention's values) are taken too, eight columns at a time.
 * Built by mlx_lora.plumbing.native with -mavx2 -mfma -ffp-contract=off.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdlib.h>
#include <unistd.h>

enum { ROW_MAJOR = 101 };
enum { NO_TRANS = 111, TRANS = 112 };
enum { MAX_ROWS = 16, MIN_DEPTH = 64, NB = 3, MB = 4, MAX_THREADS = 8, SPINS = 20000 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);

static sgemm_fn next_sgemm;
static pthread_once_t next_once = PTHREAD_ONCE_INIT;

static void find_next(void) { next_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm"); }

/* The library whose cblas_sgemm this one hands the other calls to (for `mlx-lora doctor`). */
const char *mlx_lora_small_gemm_next_library(void) {
  Dl_info info;
  pthread_once(&next_once, find_next);
  if (next_sgemm && dladdr((void *)next_sgemm, &info) && info.dli_fname) return info.dli_fname;
  return NULL;
}

static atomic_long products;

/* How many products this library has run itself (the rest went to the BLAS). */
long mlx_lora_small_gemm_products(void) { return atomic_load_explicit(&products, memory_order_relaxed); }

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

/* C[i, j] = alpha * sum_k A[i, k] B[j, k] (+ beta C[i, j]) for i < mb, j < nb. */
static inline __attribute__((always_inline)) void block(int mb, int nb, int K, const float *A, int lda,
                                                        const float *B, int ldb, float *C, int ldc,
                                                        float alpha, float beta) {
  __m256 acc[MB][NB];
  for (int i = 0; i < MB; i++)
    for (int j = 0; j < NB; j++) acc[i][j] = _mm256_setzero_ps();
  int k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 b[NB];
    for (int j = 0; j < NB; j++) b[j] = j < nb ? _mm256_loadu_ps(B + (size_t)j * ldb + k) : _mm256_setzero_ps();
    if ((k & 15) == 0) /* the next block's weight rows, a cache line at a time, while this one computes */
      for (int j = 0; j < NB; j++) _mm_prefetch((const char *)(B + (size_t)(NB + j) * ldb + k), _MM_HINT_T0);
    for (int i = 0; i < mb; i++) {
      __m256 a = _mm256_loadu_ps(A + (size_t)i * lda + k);
      for (int j = 0; j < NB; j++) acc[i][j] = _mm256_fmadd_ps(a, b[j], acc[i][j]);
    }
  }
  for (int i = 0; i < mb; i++)
    for (int j = 0; j < nb; j++) {
      float s = hsum(acc[i][j]);
      for (int t = k; t < K; t++) s += A[(size_t)i * lda + t] * B[(size_t)j * ldb + t];
      float *c = C + (size_t)i * ldc + j;
      *c = beta == 0.0f ? alpha * s : alpha * s + beta * *c;
    }
}

typedef struct {
  int M, N, K, lda, ldb, ldc, plain_b; /* plain_b: B is K x N (B not transposed) */
  float alpha, beta;
  const float *A, *B;
  float *C;
} job_t;

/* B not transposed (K x N, such as an adapter's factor kept as rank x out, or attention's values):
 * C[i, n] = alpha * sum_k A[i, k] B[k, n], eight columns per register, k in order. Each output is the
 * same chain of fused multiply-adds from zero wherever its column falls. */
static void plain_columns(const job_t *p, int first, int last) {
  for (int m = 0; m < p->M; m++) {
    const float *a = p->A + (size_t)m * p->lda;
    float *c = p->C + (size_t)m * p->ldc;
    int n = first;
    for (; n + 64 <= last; n += 64) {
      __m256 acc[8];
      for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
      for (int k = 0; k < p->K; k++) {
        __m256 x = _mm256_broadcast_ss(a + k);
        const float *b = p->B + (size_t)k * p->ldb + n;
        for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(x, _mm256_loadu_ps(b + 8 * j), acc[j]);
      }
      for (int j = 0; j < 8; j++) {
        float out[8];
        _mm256_storeu_ps(out, acc[j]);
        for (int t = 0; t < 8; t++) {
          float *o = c + n + 8 * j + t;
          *o = p->beta == 0.0f ? p->alpha * out[t] : p->alpha * out[t] + p->beta * *o;
        }
      }
    }
    for (; n + 8 <= last; n += 8) {
      __m256 acc = _mm256_setzero_ps();
      for (int k = 0; k < p->K; k++)
        acc = _mm256_fmadd_ps(_mm256_broadcast_ss(a + k), _mm256_loadu_ps(p->B + (size_t)k * p->ldb + n), acc);
      float out[8];
      _mm256_storeu_ps(out, acc);
      for (int t = 0; t < 8; t++) {
        float *o = c + n + t;
        *o = p->beta == 0.0f ? p->alpha * out[t] : p->alpha * out[t] + p->beta * *o;
      }
    }
    for (; n < last; n++) {
      float s = 0.0f;
      for (int k = 0; k < p->K; k++) s = fmaf(a[k], p->B[(size_t)k * p->ldb + n], s);
      c[n] = p->beta == 0.0f ? p->alpha * s : p->alpha * s + p->beta * c[n];
    }
  }
}

/* Weight rows [first, last) in steps of NB, every row of x. */
static void run_part(const job_t *p, int first, int last) {
  if (p->plain_b) {
    plain_columns(p, first, last);
    return;
  }
  for (int n = first; n < last; n += NB) {
    const float *b = p->B + (size_t)n * p->ldb;
    int nb = p->N - n < NB ? p->N - n : NB;
    for (int m = 0; m < p->M; m += MB) {
      const float *a = p->A + (size_t)m * p->lda;
      float *c = p->C + (size_t)m * p->ldc + n;
      int mb = p->M - m < MB ? p->M - m : MB;
      if (nb == NB && mb == 4)
        block(4, NB, p->K, a, p->lda, b, p->ldb, c, p->ldc, p->alpha, p->beta);
      else if (nb == NB && mb == 3)
        block(3, NB, p->K, a, p->lda, b, p->ldb, c, p->ldc, p->alpha, p->beta);
      else if (nb == NB && mb == 2)
        block(2, NB, p->K, a, p->lda, b, p->ldb, c, p->ldc, p->alpha, p->beta);
      else if (nb == NB)
        block(1, NB, p->K, a, p->lda, b, p->ldb, c, p->ldc, p->alpha, p->beta);
      else
        block(mb, nb, p->K, a, p->lda, b, p->ldb, c, p->ldc, p->alpha, p->beta);
    }
  }
}

/* A pool of threads - 1 workers; the calling thread does part 0. Workers spin briefly between
 * calls (a decode step makes hundreds of products), then sleep. A forked child starts a new pool. */
static struct {
  job_t job;
  int threads, started, start_generation;
  atomic_int generation, pending, sleeping;
  pthread_mutex_t lock, busy;
  pthread_cond_t wake;
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .busy = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static void part_bounds(const job_t *p, int part, int parts, int *first, int *last) {
  int unit = p->plain_b ? 64 : NB;
  long blocks = (p->N + unit - 1) / unit;
  *first = (int)(blocks * part / parts) * unit;
  *last = (int)(blocks * (part + 1) / parts) * unit;
  if (*last > p->N) *last = p->N;
}

static void *worker(void *arg) {
  int part = (int)(size_t)arg, seen = pool.start_generation;
  for (;;) {
    int spins = 0;
    while (atomic_load(&pool.generation) == seen) {
      if (++spins < SPINS) {
        _mm_pause();
        continue;
      }
      pthread_mutex_lock(&pool.lock);
      atomic_fetch_add(&pool.sleeping, 1);
      while (atomic_load(&pool.generation) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
      atomic_fetch_sub(&pool.sleeping, 1);
      pthread_mutex_unlock(&pool.lock);
    }
    seen = atomic_load(&pool.generation);
    int first, last;
    part_bounds(&pool.job, part, pool.threads, &first, &last);
    run_part(&pool.job, first, last);
    atomic_fetch_sub(&pool.pending, 1);
  }
  return NULL;
}

static void after_fork_in_child(void) {
  pthread_mutex_init(&pool.lock, NULL);
  pthread_mutex_init(&pool.busy, NULL);
  pthread_cond_init(&pool.wake, NULL);
  pool.started = 0;
  pool.threads = 0;
  atomic_store(&pool.sleeping, 0);
  atomic_store(&pool.pending, 0);
}

static void start_pool(void) {
  long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  const char *env = getenv("MLX_LORA_SMALL_GEMM_THREADS");
  int want = env && atoi(env) > 0 ? atoi(env) : (int)(cpus > 0 ? cpus : 1);
  if (want > MAX_THREADS) want = MAX_THREADS;
  static int atfork_set;
  if (!atfork_set) {
    pthread_atfork(NULL, NULL, after_fork_in_child);
    atfork_set = 1;
  }
  pool.started = 1;
  pool.threads = 1;
  pool.start_generation = atomic_load(&pool.generation);
  for (int part = 1; part < want; part++) {
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int failed = pthread_create(&t, &attr, worker, (void *)(size_t)part);
    pthread_attr_destroy(&attr);
    if (failed) break;
    pool.threads = part + 1;
  }
}

void cblas_sgemm(int order, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
                 int lda, const float *B, int ldb, float beta, float *C, int ldc) {
  pthread_once(&next_once, find_next);
  if (order != ROW_MAJOR || trans_a != NO_TRANS || M < 1 || M > MAX_ROWS || N < 1 || K < 1 ||
      !(trans_b == NO_TRANS || (trans_b == TRANS && K >= MIN_DEPTH))) {
    if (next_sgemm) next_sgemm(order, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  atomic_fetch_add_explicit(&products, 1, memory_order_relaxed);
  job_t job = {M, N, K, lda, ldb, ldc, trans_b == NO_TRANS, alpha, beta, A, B, C};
  /* small products, or another thread using the pool now: this thread does it all */
  if ((long)N * K < 65536 || pthread_mutex_trylock(&pool.busy) != 0) {
    run_part(&job, 0, N);
    return;
  }
  if (!pool.started) start_pool();
  if (pool.threads < 2) {
    run_part(&job, 0, N);
    pthread_mutex_unlock(&pool.busy);
    return;
  }
  pool.job = job;
  atomic_store(&pool.pending, pool.threads - 1);
  atomic_fetch_add(&pool.generation, 1);
  if (atomic_load(&pool.sleeping)) {
    pthread_mutex_lock(&pool.lock);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
  }
  int first, last;
  part_bounds(&job, 0, pool.threads, &first, &last);
  run_part(&job, first, last);
  while (atomic_load(&pool.pending) > 0) _mm_pause();
  pthread_mutex_unlock(&pool.busy);
}
