/* The kernel-lab tests' workload: kpe_opener PATH N [openat|open]. Opens PATH N times (O_RDONLY, then
 * closes it), through openat(2) (glibc's open) or the old open(2) syscall. Built -static on the host: the
 * guest has no compiler. Its comm, "kpe_opener", is what the tests' kernel filters select. compute() is a
 * function for uprobes. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

__attribute__((noinline)) long compute(int a, long b) {
    volatile long acc = a;
    return acc * 3 + b;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s PATH N [openat|open]\n", argv[0]);
        return 2;
    }
    int n = atoi(argv[2]), failed = 0;
    int old_open = argc > 3 && strcmp(argv[3], "open") == 0;
    long acc = 0;
    for (int i = 0; i < n; i++) {
        int fd = old_open ? (int)syscall(SYS_open, argv[1], O_RDONLY) : open(argv[1], O_RDONLY);
        if (fd < 0)
            failed++;
        else
            close(fd);
        acc += compute(i, n);
    }
    printf("kpe_opener: %d opens of %s (%s), %d failed, %ld\n", n, argv[1], old_open ? "open" : "openat", failed,
           acc);
    return 0;
}
