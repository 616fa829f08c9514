/* Test workload: ROUNDS rounds of the fixed syscall pattern getppid, getuid, getgid, geteuid; every
 * HOP rounds the thread moves to the next CPU (sched_setaffinity), so its syscalls land in batches of
 * different CPUs and only a correct reordering gives back the pattern. */
#define _GNU_SOURCE
#include <sched.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv) {
    long rounds = atol(argv[1]), hop = atol(argv[2]);
    int ncpu = (int)sysconf(_SC_NPROCESSORS_ONLN);
    usleep(200000); /* let the recorder see the exec first */
    for (long i = 0; i < rounds; i++) {
        if (i % hop == 0) {
            cpu_set_t set;
            CPU_ZERO(&set);
            CPU_SET((int)((i / hop) % ncpu), &set);
            sched_setaffinity(0, sizeof(set), &set);
        }
        syscall(SYS_getppid);
        syscall(SYS_getuid);
        syscall(SYS_getgid);
        syscall(SYS_geteuid);
    }
    return 0;
}
