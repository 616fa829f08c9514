/* Test workload: N getppid calls, then open PATH (O_WRONLY|O_CREAT), then exit. */
#include <fcntl.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv) {
    long n = atol(argv[1]);
    usleep(200000); /* let the recorder see the exec first */
    for (long i = 0; i < n; i++)
        syscall(SYS_getppid);
    int fd = open(argv[2], O_WRONLY | O_CREAT, 0600);
    if (fd >= 0)
        close(fd);
    return 0;
}
