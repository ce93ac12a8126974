// Streaming-read memory bandwidth: sum a large float array (default 2 GiB) with 1..N OpenMP
// threads, static schedule, 8 independent accumulators per thread so the loop is load-bound.
// Array is first-touched by the same thread layout. Reports best and median of REPS passes.
// Build: gcc -O3 -march=native -fopenmp membw.c -o membw ; run: ./membw [GiB] [reps] [maxthreads]
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef float v16 __attribute__((vector_size(64)));

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    double gib = argc > 1 ? atof(argv[1]) : 2.0;
    int reps = argc > 2 ? atoi(argv[2]) : 10;
    int maxt = argc > 3 ? atoi(argv[3]) : 2;
    size_t n = (size_t)(gib * (1ull << 30) / sizeof(float));
    n -= n % 64;
    float *a = aligned_alloc(64, n * sizeof(float));
    if (!a) { fprintf(stderr, "alloc failed\n"); return 1; }
#pragma omp parallel for schedule(static) num_threads(maxt)
    for (size_t i = 0; i < n; i++) a[i] = (float)(i & 1023) * 1e-3f;
    printf("{\"bytes\": %zu, \"reps\": %d, \"results\": [", n * sizeof(float), reps);
    double *ts = malloc(sizeof(double) * reps);
    for (int t = 1; t <= maxt; t++) {
        double check = 0;
        for (int r = 0; r < reps; r++) {
            double t0 = now(), total = 0;
#pragma omp parallel num_threads(t) reduction(+ : total)
            {
                // 4 independent 64-byte vector accumulators (GCC vector extension), 256 B per step
                v16 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
                const v16 *v = (const v16 *)a;
                size_t nv = n / 16;
#pragma omp for schedule(static)
                for (size_t i = 0; i < nv; i += 4) {
                    s0 += v[i]; s1 += v[i + 1]; s2 += v[i + 2]; s3 += v[i + 3];
                }
                v16 s = s0 + s1 + s2 + s3;
                for (int k = 0; k < 16; k++) total += s[k];
            }
            ts[r] = now() - t0;
            check += total;
        }
        qsort(ts, reps, sizeof(double), cmp);
        double gb = n * sizeof(float) / 1e9;
        printf("%s{\"threads\": %d, \"best_GBps\": %.2f, \"median_GBps\": %.2f, \"worst_GBps\": %.2f, \"check\": %.3g}",
               t > 1 ? ", " : "", t, gb / ts[0], gb / ts[reps / 2], gb / ts[reps - 1], check);
        fflush(stdout);
    }
    printf("]}\n");
    return 0;
}
