/* A kernel-lab workload of many short threads: kpe_threads PATH THREADS OPENS. Starts THREADS threads one
 * after another (each joined before the next starts, so no call is in flight between them), each opening
 * PATH OPENS times. Every thread has its own thread id: what fills a hist table keyed by common_pid. Built
 * -static on the host. */
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static const char *path;
static int opens;

static void *work(void *arg) {
    long failed = 0;
    for (int i = 0; i < opens; i++) {
        int fd = open(path, O_RDONLY);
        if (fd < 0)
            failed++;
        else
            close(fd);
    }
    return (void *)failed;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s PATH THREADS OPENS\n", argv[0]);
        return 2;
    }
    path = argv[1];
    int threads = atoi(argv[2]);
    opens = atoi(argv[3]);
    long failed = 0, started = 0;
    for (int t = 0; t < threads; t++) {
        pthread_t th;
        void *res;
        if (pthread_create(&th, NULL, work, NULL) != 0)
            continue;
        started++;
        pthread_join(th, &res);
        failed += (long)res;
    }
    printf("kpe_threads: %ld opens in %ld threads, %ld failed\n", started * opens, started, failed);
    return 0;
}
