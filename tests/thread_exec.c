/* A thread other than the leader calls execve: the kernel gives it the leader's id (de_thread), and its
 * execve's details must still reach the rules. Usage: thread_exec MARKER [PATHFILE] (runs /bin/true
 * MARKER). With PATHFILE (a file holding the path and a NUL), the path is read from an untouched mapping
 * of it: its page is not faulted in, so the tracer cannot read it at entry. */
#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

static char *marker;
static const char *unfaulted_path;

static void *run(void *unused) {
    (void)unused;
    /* on this thread's stack, so the pages the tracer reads at entry are resident (a string literal's
     * page may not be faulted in yet, and a BPF program cannot fault it in) */
    char path[] = "/bin/true";
    char *argv[] = {path, marker, 0};
    char *envp[] = {0};
    execve(unfaulted_path ? unfaulted_path : path, argv, envp);
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2 && argc != 3)
        return 2;
    marker = argv[1];
    if (argc == 3) {
        int fd = open(argv[2], O_RDONLY);
        unfaulted_path = mmap(0, 4096, PROT_READ, MAP_PRIVATE, fd, 0);
        if (fd < 0 || unfaulted_path == MAP_FAILED)
            return 2;
    }
    pthread_t thread;
    pthread_create(&thread, 0, run, 0);
    pthread_join(thread, 0); /* never returns: the exec replaces the process */
    return 1;
}
