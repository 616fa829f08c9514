/* Empty programs on one syscall's per-syscall tracepoints (execve, which a getppid loop never makes).
 * With any program on a syscalls:sys_exit_X tracepoint, the kernel runs a dispatcher on every syscall's
 * exit that tests whether that syscall is traced: the agent's detail exit hooks cost a getppid loop this
 * much although their own programs never run. The benchmarks add the exit one to the raw floor. The entry
 * one is the dispatch the agent does not pay (it keeps detail entries in its raw sys_enter program);
 * `sysgram bench capture` measures what it would cost. bcc attaches both at load; the benchmarks detach
 * them until their loops. */
TRACEPOINT_PROBE(syscalls, sys_exit_execve) {
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_execve) {
    return 0;
}
