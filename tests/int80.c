/* Test program: a 64-bit program making 32-bit syscalls through `int 0x80` (i386 numbers), a known way round
 * syscall monitors that read every syscall number as a native one (i386 getppid, 64, is x86_64 semget).
 *   int80 PATH SECONDS         i386 getpid, i386 open(PATH), then i386 getppid every ms for SECONDS
 *   int80 native PATH SECONDS  the same calls through the native gate
 * Exits 0 if nobody stopped it. */
#include <asm/unistd_32.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long i386_syscall(long nr, long a, long b, long c) {
    long ret;
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory");
    return ret;
}

int main(int argc, char **argv) {
    int native = argc > 1 && strcmp(argv[1], "native") == 0;
    if (native) {
        argv++;
        argc--;
    }
    const char *path = argc > 1 ? argv[1] : "/etc/hostname";
    double seconds = argc > 2 ? atof(argv[2]) : 1.0;
    /* int 0x80 passes 32-bit registers: the path must sit below 4 GiB, as a non-PIE binary's data does */
    static char low_path[4096];
    strncpy(low_path, path, sizeof(low_path) - 1);
    usleep(300000); /* let the agent see the exec first */
    long fd;
    if (native) {
        getpid();
        fd = open(low_path, O_RDONLY);
    } else {
        i386_syscall(__NR_getpid, 0, 0, 0);
        fd = i386_syscall(__NR_open, (long)low_path, O_RDONLY, 0);
    }
    if (fd >= 0)
        close((int)fd);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    do {
        if (native)
            getppid();
        else
            i386_syscall(__NR_getppid, 0, 0, 0);
        usleep(1000);
        clock_gettime(CLOCK_MONOTONIC, &b);
    } while ((b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9 < seconds);
    return 0;
}
