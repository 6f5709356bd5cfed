/* The kernel-lab workload for recursion: kpe_recurse N D calls rec(D) N times; rec recurses D levels
 * (D + 1 calls of rec per top-level call). Built -O0 -static on the host, so the recursion stays a
 * recursion and the guest needs no compiler. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

__attribute__((noinline)) long rec(int d) {
    if (d == 0)
        return getppid();
    return rec(d - 1) + 1;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s N D\n", argv[0]);
        return 2;
    }
    int n = atoi(argv[1]), d = atoi(argv[2]);
    long acc = 0;
    for (int i = 0; i < n; i++)
        acc += rec(d);
    printf("kpe_recurse: %d calls of depth %d, %ld\n", n, d, acc);
    return 0;
}
