/* bench/lab_kernel_agg.py's workload: N getppid() calls; prints the ns per call (CLOCK_MONOTONIC) and the
 * CPU (user+sys) per call, both measured by the loop itself. Built -static on the host. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 100000;
    struct rusage a, b;
    getrusage(RUSAGE_SELF, &a);
    double t0 = now();
    for (long i = 0; i < n; i++)
        getppid();
    double t1 = now();
    getrusage(RUSAGE_SELF, &b);
    double cpu = (b.ru_utime.tv_sec - a.ru_utime.tv_sec + b.ru_stime.tv_sec - a.ru_stime.tv_sec) * 1e9 +
                 (b.ru_utime.tv_usec - a.ru_utime.tv_usec + b.ru_stime.tv_usec - a.ru_stime.tv_usec) * 1e3;
    printf("%ld %.1f %.1f\n", n, (t1 - t0) / n, cpu / n);
    return 0;
}
