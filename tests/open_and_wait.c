/* Test workload: open PATH, then keep making syscalls for SECONDS; exit 0 if nobody stopped it. */
#include <fcntl.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    double seconds = argc > 2 ? atof(argv[2]) : 3.0;
    usleep(300000); /* let the agent see the exec first */
    int fd = open(argv[1], O_RDONLY | O_CREAT, 0600);
    if (fd >= 0)
        close(fd);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    do {
        syscall(SYS_getppid);
        usleep(1000);
        clock_gettime(CLOCK_MONOTONIC, &b);
    } while ((b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9 < seconds);
    return 0;
}
