/* Test program: `threads N` starts N threads, each making one syscall, joins them and exits 0. Built with
 * -m32 its threads come from an i386 clone3 (glibc 2.34+; clone before). */
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

static void *work(void *arg) {
    (void)arg;
    getppid();
    return NULL;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 2;
    pthread_t threads[16];
    if (n < 1 || n > 16)
        return 2;
    usleep(300000); /* let the agent see the exec first */
    for (int i = 0; i < n; i++)
        if (pthread_create(&threads[i], NULL, work, NULL) != 0)
            return 1;
    for (int i = 0; i < n; i++)
        pthread_join(threads[i], NULL);
    return 0;
}
