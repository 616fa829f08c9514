/* A thread other than the leader calls execve: the kernel gives it the leader's id (de_thread), and its
 * execve's details must still reach the rules. Usage: thread_exec MARKER (runs /bin/true MARKER) */
#include <pthread.h>
#include <unistd.h>

static char *marker;

static void *run(void *unused) {
    (void)unused;
    /* on this thread's stack, so the pages the tracer reads at entry are resident (a string literal's
     * page may not be faulted in yet, and a BPF program cannot fault it in) */
    char path[] = "/bin/true";
    char *argv[] = {path, marker, 0};
    char *envp[] = {0};
    execve(path, argv, envp);
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2)
        return 2;
    marker = argv[1];
    pthread_t thread;
    pthread_create(&thread, 0, run, 0);
    pthread_join(thread, 0); /* never returns: the exec replaces the process */
    return 1;
}
