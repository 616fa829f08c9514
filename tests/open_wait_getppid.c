/* Test workload: open PATH (argv[1]), wait until GO (argv[2]) exists (at most 20 s), then make one getppid
 * and exit 0. The getppid comes only when the test says so: after a stop and a SIGCONT, say. */
#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 3)
        return 2;
    usleep(300000); /* let the agent see the exec first */
    int fd = open(argv[1], O_RDONLY | O_CREAT, 0600);
    if (fd >= 0)
        close(fd);
    for (int i = 0; i < 20000 && access(argv[2], F_OK) != 0; i++)
        usleep(1000);
    syscall(SYS_getppid);
    usleep(300000);
    return 0;
}
