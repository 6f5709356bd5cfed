/* Functions for the tests to probe: fxgen MODE N [ARG]. Built by the tests with gcc. */
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline)) int open_path(const char *path, int flags) {
    int fd = open(path, flags);
    if (fd >= 0) close(fd);
    return fd;
}

__attribute__((noinline)) long compute(int a, unsigned b) {
    volatile long acc = 0;
    for (unsigned i = 0; i < (b & 0xff); i++) acc += a * (long)i;
    return acc;
}

__attribute__((noinline)) int recurse(int depth) {
    if (depth <= 0) return 0;
    return 1 + recurse(depth - 1);
}

__attribute__((noinline)) void sleep_us(long us) {
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    nanosleep(&ts, NULL);
}

static long n_calls;
static const char *arg;

static void *worker(void *p) {
    (void)p;
    for (long i = 0; i < n_calls; i++) { compute((int)i, 7); open_path(arg ? arg : "/etc/hostname", O_RDONLY); }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: fxgen open|compute|recurse|sleep|threads|hang N [ARG]\n"); return 2; }
    const char *mode = argv[1];
    long n = atol(argv[2]);
    arg = argc > 3 ? argv[3] : NULL;
    if (!strcmp(mode, "open")) for (long i = 0; i < n; i++) open_path(arg ? arg : "/etc/hostname", O_RDONLY);
    else if (!strcmp(mode, "compute")) for (long i = 0; i < n; i++) compute((int)i - 5, 12345 + i);
    else if (!strcmp(mode, "recurse")) for (long i = 0; i < n; i++) recurse(arg ? atoi(arg) : 3);
    else if (!strcmp(mode, "sleep")) for (long i = 0; i < n; i++) sleep_us(arg ? atol(arg) : 1000);
    else if (!strcmp(mode, "threads")) {
        int t = arg ? atoi(arg) : 4; n_calls = n; arg = NULL;
        pthread_t th[256];
        for (int i = 0; i < t && i < 256; i++) pthread_create(&th[i], NULL, worker, NULL);
        for (int i = 0; i < t && i < 256; i++) pthread_join(th[i], NULL);
    } else if (!strcmp(mode, "hang")) { sleep_us(n * 1000000L); }
    else { fprintf(stderr, "unknown mode %s\n", mode); return 2; }
    return 0;
}
