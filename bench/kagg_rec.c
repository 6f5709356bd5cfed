/* Recursion for bench/lab_kernel_agg.py: M calls of rec(D), which recurses D levels deep (D calls of rec per
 * outer call). Prints the calls of rec made (M*D) and the mean ns of one outer call. Built -static. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static volatile long sink;

__attribute__((noinline)) long rec(long d) {
    for (int i = 0; i < 200; i++)
        sink += i;
    long r = d > 1 ? rec(d - 1) : 0;
    sink += r;
    return r + 1;
}

int main(int argc, char **argv) {
    long m = argc > 1 ? atol(argv[1]) : 1000, d = argc > 2 ? atol(argv[2]) : 4;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < m; i++)
        rec(d);
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%ld %.1f\n", m * d, ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / m);
    return 0;
}
