/* Calls that never return: escaper THREADS CALLS K [PREFIX] [SECONDS].
 *
 * Each thread calls `work` CALLS times; work calls `leaf` (which returns) and then, for K of every
 * 250 calls, longjmp()s back to its caller past its own return, so a uretprobe on work never fires
 * for that call and its entry stays pending (as exceptions, longjmp and killed threads leave them).
 * PREFIX calls first escape every time (pending built up front). With SECONDS > 0 (the live bench)
 * the threads then wait: escaper prints "ready", and on a line from stdin calls for SECONDS of wall
 * clock instead of CALLS times. Prints the escapes made. Built with gcc -O1.
 */
#include <pthread.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static long n_calls, n_prefix, k_escape;
static double seconds;
static long escapes[256];
static pthread_barrier_t prefixed, go;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

__attribute__((noinline)) long leaf(long i) {
    volatile long x = i;
    return x * 3;
}

__attribute__((noinline)) long work(long i, int escape, jmp_buf *out) {
    long r = leaf(i);
    if (escape) longjmp(*out, 1);
    return r + 1;
}

static void *worker(void *p) {
    long id = (long)p, done = 0;
    jmp_buf out;
    double end = 0;
    for (long i = 0; seconds > 0 || i < n_calls + n_prefix; i++) {
        if (seconds > 0 && i == n_prefix) {
            pthread_barrier_wait(&prefixed);
            pthread_barrier_wait(&go);
            end = now() + seconds;
        }
        int escape = i < n_prefix || (i - n_prefix) % 250 < k_escape;
        if (!setjmp(out)) work(i, escape, &out);
        else done++;
        if (end > 0 && (i & 1023) == 0 && now() >= end) break;
    }
    escapes[id] = done;
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: escaper THREADS CALLS K [PREFIX] [SECONDS]\n");
        return 2;
    }
    int threads = atoi(argv[1]);
    n_calls = atol(argv[2]);
    k_escape = atol(argv[3]);
    n_prefix = argc > 4 ? atol(argv[4]) : 0;
    seconds = argc > 5 ? atof(argv[5]) : 0;
    if (threads < 1 || threads > 256) return 2;
    pthread_t th[256];
    pthread_barrier_init(&prefixed, NULL, threads + 1);
    pthread_barrier_init(&go, NULL, threads + 1);
    for (long i = 0; i < threads; i++) pthread_create(&th[i], NULL, worker, (void *)i);
    if (seconds > 0) {
        char line[16];
        pthread_barrier_wait(&prefixed);
        printf("ready\n");
        fflush(stdout);
        if (!fgets(line, sizeof line, stdin)) return 1;
        pthread_barrier_wait(&go);
    }
    long total = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(th[i], NULL);
        total += escapes[i];
    }
    printf("%ld\n", total);
    return 0;
}
