/* The cheapest possible tracer: count syscalls per CPU from the raw sys_enter tracepoint (no perf record
 * of the arguments is built). `sysgram bench capture` reports Sysgram's cost against it and against the
 * plain-tracepoint floor (floor.bpf.c). */
BPF_PERCPU_ARRAY(counts, u64, 1);

RAW_TRACEPOINT_PROBE(sys_enter) {
    u32 zero = 0;
    u64 *v = counts.lookup(&zero);
    if (v)
        *v += 1;
    return 0;
}
