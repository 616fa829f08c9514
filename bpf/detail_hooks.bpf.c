/* An empty program on one syscall's per-syscall exit tracepoint (execve, which a getppid loop never
 * makes). With any program on a syscalls:sys_exit_X tracepoint, the kernel runs a dispatcher on every
 * syscall's exit that tests whether that syscall is traced: the agent's detail exit hooks cost a getppid
 * loop this much although their own programs never run. The benchmarks add it to the raw floor. (The
 * agent keeps detail entries in its raw sys_enter program, so no sys_enter_X dispatch is paid.) */
TRACEPOINT_PROBE(syscalls, sys_exit_execve) {
    return 0;
}
