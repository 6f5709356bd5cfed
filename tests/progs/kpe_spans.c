/* The kernel-lab workload for spans from kernel mode: kpe_spans N K calls work(i) N times; every K-th
 * call sleeps SLOW_US microseconds (300 ms), the others return at once. It prints how many calls slept, so the
 * test compares what arrives as spans with what the workload itself counted. Built -O0 -static. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define SLOW_US 300000

__attribute__((noinline)) long work(int i, int k) {
    if (i % k == 0) {
        usleep(SLOW_US);
        return 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s N K\n", argv[0]);
        return 2;
    }
    int n = atoi(argv[1]), k = atoi(argv[2]);
    long slow = 0;
    for (int i = 1; i <= n; i++)
        slow += work(i, k);
    printf("calls=%d slow=%ld\n", n, slow);
    return 0;
}
