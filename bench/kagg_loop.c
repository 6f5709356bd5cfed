/* bench/lab_kernel_agg.py's workload: N getppid() calls on each of P CPUs at once (P defaults to every online
 * CPU; child i pinned to CPU i). Prints the calls made in all (P*N, counted here), the wall ns per call on
 * one CPU (CLOCK_MONOTONIC from the forks to the last exit, over N) and the CPU (user+sys of the children)
 * per call. Built -static on the host. */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 100000;
    long p = argc > 2 ? atol(argv[2]) : sysconf(_SC_NPROCESSORS_ONLN);
    long made = 0;
    double t0 = now();
    for (long c = 0; c < p; c++) {
        if (fork() == 0) {
            cpu_set_t set;
            CPU_ZERO(&set);
            CPU_SET(c, &set);
            sched_setaffinity(0, sizeof set, &set);
            for (long i = 0; i < n; i++)
                getppid();
            _exit(0);
        }
    }
    int status;
    while (wait(&status) > 0)
        if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
            made += n;
    double t1 = now();
    struct rusage r;
    getrusage(RUSAGE_CHILDREN, &r);
    double cpu = (r.ru_utime.tv_sec + r.ru_stime.tv_sec) * 1e9 + (r.ru_utime.tv_usec + r.ru_stime.tv_usec) * 1e3;
    printf("%ld %.1f %.1f\n", made, (t1 - t0) / n, cpu / (made ? made : 1));
    return 0;
}
