/* Two empty programs on one syscall's per-syscall tracepoints (execve, which a getppid loop never makes).
 * With any program on a syscalls:sys_enter_X / sys_exit_X tracepoint, the kernel runs a dispatcher on
 * every syscall's entry and exit that tests whether that syscall is traced: the agent's detail hooks cost a
 * getppid loop this much although their own programs never run. The benchmarks add it to the raw floor. */
TRACEPOINT_PROBE(syscalls, sys_enter_execve) {
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_execve) {
    return 0;
}
