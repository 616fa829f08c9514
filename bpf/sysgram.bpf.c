/* Sysgram's tracer. Compiled by bcc with -D constants (see agent/capture/_loader.py):
 *   SELF_TGID     the agent's own process, never traced
 *   FLUSH_NR      the syscall the agent's ticker makes on each CPU in turn to send that CPU's batch
 *   EXECVE_NR, EXECVEAT_NR  native numbers of execve/execveat (always stamped)
 *   COMPACT_RB_PAGES, DETAIL_RB_PAGES  ring buffer sizes in pages
 *   ENFORCE       1 to compile the enforcement check into sys_enter (off: no cost when not enforcing)
 *   TI_STATUS_OFFSET, TS_COMPAT  where the running kernel keeps a thread's status word (from its BTF) and
 *                 the bit set while a 32-bit syscall runs; unset: no 32-bit detection (see compat_flag)
 *   TASK_BTF      1 when the kernel has bpf_get_current_task_btf (5.11+)
 *   COMPAT_DETAILS  1: details of 32-bit syscalls too (entry in sys_enter, exit in on_compat_exit, which
 *                 userspace attaches to the raw sys_exit tracepoint when needed; needs TI_STATUS_OFFSET)
 *   COMPAT_EXECVE_NR, COMPAT_EXECVEAT_NR  i386 numbers of execve/execveat (stamped like the native ones)
 *   COMPAT_SOCKETCALL_NR  i386 socketcall, which 32-bit libcs use for connect and the other socket calls
 *   CLONE_NR, CLONE3_NR, FORK_NR, VFORK_NR and their COMPAT_ twins: the syscalls whose entry the fork
 *                 handler reads clone flags from
 * Reads only tracepoint fields, BPF helpers, the syscall's registers (pt_regs: the ptrace ABI's layout,
 * which kernel versions keep) and one word whose place comes from the running kernel's BTF: no kernel
 * struct is walked through headers, so headers of another kernel version are good enough. x86_64 only. */
#include <uapi/linux/ptrace.h>
#include "sysgram.h"

#ifndef SELF_TGID
#error "SELF_TGID must be set"
#endif
#ifndef FLUSH_NR
#error "FLUSH_NR must be set"
#endif
#if !defined(EXECVE_NR) || !defined(EXECVEAT_NR)
#error "EXECVE_NR and EXECVEAT_NR must be set"
#endif
#ifndef ENFORCE
#define ENFORCE 0
#endif
#if !defined(TI_STATUS_OFFSET) || !defined(COMPAT_DETAILS)
#undef COMPAT_DETAILS
#define COMPAT_DETAILS 0
#endif
#define USER32_CS 0x23 /* x86_64's __USER32_CS: the code segment of a 32-bit process */
#define INT80_INSN 0x80cd /* `int $0x80` (cd 80) read as a little-endian u16 */
#ifndef COMPAT_SOCKETCALL_NR
#define COMPAT_SOCKETCALL_NR 0xffff
#endif
#if !defined(CLONE_NR) || !defined(CLONE3_NR) || !defined(FORK_NR) || !defined(VFORK_NR) || \
    !defined(COMPAT_CLONE_NR) || !defined(COMPAT_CLONE3_NR) || !defined(COMPAT_FORK_NR) || !defined(COMPAT_VFORK_NR)
#error "the clone family's numbers must be set"
#endif
#if !defined(COMPAT_EXECVE_NR) || !defined(COMPAT_EXECVEAT_NR)
#define COMPAT_EXECVE_NR 0xffff
#define COMPAT_EXECVEAT_NR 0xffff
#endif

enum stat_index {
    S_COMPACT_LOST = 0,   /* syscalls in batches the compact ring buffer had no room for */
    S_DETAIL_LOST = 1,    /* detail records that could not be reserved */
    S_PENDING_FULL = 2,   /* syscall entries with no room in the pending map (their detail is lost) */
    S_PROC_LOST = 3,      /* fork/exec/exit records that could not be reserved */
    S_BATCHES = 4,        /* compact batches sent */
    S_SIGNALS = 5,        /* signals sent by enforcement */
    S_SYSCALLS = 6,       /* syscalls seen (not the agent's own) */
    S_EXEC_ARGS_LOST = 7, /* execve argv records that could not be reserved */
    S_COUNT = 8,
};

BPF_PERCPU_ARRAY(batches, struct sc_batch, 1);
BPF_PERCPU_ARRAY(stats, __u64, S_COUNT);
BPF_RINGBUF_OUTPUT(compact_rb, COMPACT_RB_PAGES);
BPF_RINGBUF_OUTPUT(detail_rb, DETAIL_RB_PAGES);

struct pending {
    __u64 ts;
    __u64 args[6];
    __u64 deref;
    __u32 nr;
    __u32 compat; /* 1: entered through the 32-bit gate (nr is an i386 number, specs at nr + 512) */
};
BPF_HASH(pending, __u32, struct pending, 16384);
BPF_PERCPU_ARRAY(detail_scratch, struct sc_detail, 1);
BPF_ARRAY(arg_spec, struct arg_spec, 1024); /* [nr]: native syscalls, [512 + nr]: i386 ones */
#define SOCKETCALL_CALLS 21 /* socketcall's call numbers, SYS_SOCKET (1) .. SYS_SENDMMSG (20): linux/net.h */
BPF_ARRAY(socketcall_nrs, __u32, SOCKETCALL_CALLS);

BPF_HASH(enforce, __u32, struct enforce_entry, 65536);
BPF_HASH(protected_tgids, __u32, __u32, 65536);
struct deny_bitmap { __u64 bits[8]; };
/* policy_id: its native syscalls; policy_id + COMPAT_POLICY_BASE: the same names as i386 numbers */
BPF_ARRAY(deny_bitmaps, struct deny_bitmap, 2 * COMPAT_POLICY_BASE);
struct exe_key { char path[STR_LEN]; };
BPF_HASH(exe_policy, struct exe_key, struct enforce_entry, 1024);
BPF_PERCPU_ARRAY(exe_key_scratch, struct exe_key, 1);

static __always_inline void bump(__u32 index, __u64 by) {
    __u64 *v = stats.lookup(&index);
    if (v)
        *v += by;
}

/* Send this CPU's batch; an empty one too, so userspace learns that nothing older waits here. Compact
 * batches wake no reader (BPF_RB_NO_WAKEUP): a wakeup per batch cost every syscall more than the record
 * itself, and the reader drains on a timer. */
static __always_inline void flush(struct sc_batch *b) {
    __u32 n = b->count;
    if (n > BATCH_SIZE)
        n = BATCH_SIZE;
    b->end_ts = bpf_ktime_get_ns();
    b->cpu = bpf_get_smp_processor_id();
    __u64 size = sizeof(struct sc_batch) - sizeof(b->recs) + (__u64)n * sizeof(struct sc_rec);
    if (size > sizeof(struct sc_batch))
        size = sizeof(struct sc_batch);
    bump(S_SYSCALLS, n); /* counted per batch, not per syscall: the hot path stays lean */
    if (compact_rb.ringbuf_output(b, size, BPF_RB_NO_WAKEUP) == 0)
        bump(S_BATCHES, 1);
    else
        bump(S_COMPACT_LOST, n);
    b->count = 0;
    b->last_tid = 0;
}

/* Every detail record starts with this header. */
static __always_inline void fill_hdr(struct detail_hdr *h, __u8 kind, __u16 nr, __u64 pid_tgid, __u32 aux,
                                     __u64 ts) {
    h->kind = kind;
    h->flags = 0;
    h->nr = nr;
    h->tgid = pid_tgid >> 32;
    h->tid = (__u32)pid_tgid;
    h->aux = aux;
    h->ts = ts;
}

#if ENFORCE
static __always_inline int is_denied(__u32 policy_id, __u32 nr) {
    struct deny_bitmap *bm = deny_bitmaps.lookup(&policy_id);
    if (!bm || nr >= 512)
        return 0;
    __u32 word = nr >> 6;
    asm volatile("" : "+r"(word)); /* keep the mask below: the verifier needs it */
    word &= 7;
    return (bm->bits[word] >> (nr & 63)) & 1;
}

static __always_inline void enforce_check(__u32 tgid, __u32 tid, __u32 nr, __u16 compat) {
    struct enforce_entry *e = enforce.lookup(&tgid);
    if (!e)
        return;
    __u32 sig = e->signal;
    __u8 by_policy = 0; /* the agent already alerted on its own verdicts; the policy's kills it learns here */
    if (!sig && e->policy_id && is_denied(e->policy_id + (compat ? COMPAT_POLICY_BASE : 0), nr)) {
        sig = 9;
        by_policy = DETAIL_BY_POLICY;
    }
    if (!sig || tgid <= 1 || protected_tgids.lookup(&tgid))
        return;
    bpf_send_signal(sig);
    bump(S_SIGNALS, 1);
    /* A stop is sent once: the process stays frozen until someone sends SIGCONT, which must then resume it
     * (left pending, the entry stopped it again at its next syscall). Its deny policy, if any, stays. */
    if (sig == 19 && e->signal == 19)
        e->signal = 0;
    struct detail_hdr *h = detail_rb.ringbuf_reserve(sizeof(struct detail_hdr));
    if (!h) {
        bump(S_DETAIL_LOST, 1);
        return;
    }
    fill_hdr(h, K_ENFORCED, nr, ((__u64)tgid << 32) | tid, sig, bpf_ktime_get_ns());
    h->flags = (compat ? DETAIL_COMPAT : 0) | by_policy;
    detail_rb.ringbuf_submit(h, 0);
}
#endif
/* REC_COMPAT when this syscall came in through a 32-bit gate: a 32-bit program's syscalls, and also a 64-bit
 * program's `int 0x80`, whose i386 numbers would otherwise pass for other native syscalls (i386 5, open, is
 * x86_64 fstat) and get past a deny list of native numbers. The kernel sets TS_COMPAT in the thread's
 * status word for the length of such a syscall; the word's offset comes from the running kernel's BTF. */
static __always_inline __u16 compat_flag(void) {
#if defined(TI_STATUS_OFFSET) && defined(TS_COMPAT) && TASK_BTF
    /* a typed task pointer (5.11+): the verifier checks this load against the kernel's BTF and makes it a
     * plain guarded load, cheaper than a helper call (~1-2 ns against ~8-10 measured here) */
    const char *task = (const char *)bpf_get_current_task_btf();
    __u32 status = *(const __u32 *)(task + TI_STATUS_OFFSET);
    return (status & TS_COMPAT) ? REC_COMPAT : 0;
#elif defined(TI_STATUS_OFFSET) && defined(TS_COMPAT)
    __u32 status = 0;
    bpf_probe_read_kernel(&status, sizeof(status), (void *)(bpf_get_current_task() + TI_STATUS_OFFSET));
    return (status & TS_COMPAT) ? REC_COMPAT : 0;
#else
    return 0;
#endif
}

static __always_inline void detail_enter(struct bpf_raw_tracepoint_args *ctx, __u64 id, __u32 nr, __u16 compat);

/* Every syscall: append (tgid, tid, nr) to this CPU's batch; send the batch when it is full. A raw
 * tracepoint (args: pt_regs *, syscall number): the plain raw_syscalls:sys_enter tracepoint first copies
 * the six arguments into a perf record for every syscall, which measured ~30 ns we do not need. */
RAW_TRACEPOINT_PROBE(sys_enter) {
    long nr = (long)ctx->args[1];
    __u64 id = bpf_get_current_pid_tgid();
    __u32 tgid = id >> 32;
    __u32 tid = (__u32)id;
    __u32 zero = 0;
    struct sc_batch *b = batches.lookup(&zero);
    if (!b)
        return 0;
    if (tgid == SELF_TGID) {
        if (nr == FLUSH_NR)
            flush(b);
        return 0;
    }
    __u32 i = b->count & (BATCH_SIZE - 1);
    struct sc_rec *r = &b->recs[i];
    __u16 compat = compat_flag();
    r->tgid = tgid;
    r->tid = tid;
    r->nr = (__u16)nr;
    /* execve is stamped too: with the run that the exec starts (see sched_process_exec), the syscalls
     * before and after an exec get times on the right side of the exec event. */
    int is_exec = compat ? (nr == COMPAT_EXECVE_NR || nr == COMPAT_EXECVEAT_NR)
                         : (nr == EXECVE_NR || nr == EXECVEAT_NR);
    if (i == 0 || tid != b->last_tid || (i & (STAMP_EVERY - 1)) == 0 || is_exec) {
        __u64 now = bpf_ktime_get_ns();
        if (i == 0)
            b->base_ts = now;
        __u64 delta = now - b->base_ts;
        r->flags = REC_STAMPED | compat;
        r->ts_delta = delta > 0xffffffffULL ? 0xffffffffU : (__u32)delta;
        b->last_tid = tid;
    } else {
        r->flags = compat;
        r->ts_delta = 0;
    }
    b->count = i + 1;
    if (i + 1 == BATCH_SIZE)
        flush(b);
#if ENFORCE
    enforce_check(tgid, tid, (__u32)nr, compat);
#endif
    detail_enter(ctx, id, (__u32)nr, compat);
    return 0;
}

/* A context switch on this CPU: whichever thread runs next starts a new run, so its next syscall is
 * stamped, even when it is the thread that ran here last (it may have run on another CPU meanwhile). */
RAW_TRACEPOINT_PROBE(sched_switch) {
    __u32 zero = 0;
    struct sc_batch *b = batches.lookup(&zero);
    if (b)
        b->last_tid = 0;
    return 0;
}

/* The layout of every syscalls:sys_exit_* tracepoint (fixed by the kernel's syscall trace events): an
 * 8-byte common header, the syscall number, then the return value. */
struct sys_exit_ctx {
    __u64 common;
    __s32 nr;
    __u32 pad;
    __s64 ret;
};

static __always_inline __u64 arg_at(__u64 *args, __u8 index) {
    switch (index) {
    case 0: return args[0];
    case 1: return args[1];
    case 2: return args[2];
    case 3: return args[3];
    case 4: return args[4];
    case 5: return args[5];
    }
    return 0;
}

/* Exit of a syscall that needs details: one record with its arguments, strings and return value. ``tid``
 * is the thread its entry was kept under; ``read_strings`` 0 when the caller's memory is gone (an exec). */
static __always_inline int detail_exit(__u64 id, __u32 tid, __s64 ret, int read_strings) {
    struct pending *p = pending.lookup(&tid);
    if (!p)
        return 0;
    __u32 nr = p->nr;
    __u32 spec_index = p->compat ? nr + 512 : nr;
    struct arg_spec *spec = arg_spec.lookup(&spec_index);
    if (spec && !spec->enabled) {
        /* entry kept only for the fork handler (clone flags) */
        pending.delete(&tid);
        return 0;
    }
    /* Built in a per-CPU scratch record and sent only up to its last string in use: an openat takes
     * ~120 bytes of the ring instead of the whole 864-byte record. */
    __u32 zero = 0;
    struct sc_detail *d = detail_scratch.lookup(&zero);
    if (!d) {
        pending.delete(&tid);
        return 0;
    }
    fill_hdr(&d->h, K_SYSCALL, nr, id, 0, p->ts);
    d->h.flags = p->compat ? DETAIL_COMPAT : 0;
    d->ret = ret;
    #pragma unroll
    for (int k = 0; k < 6; k++)
        d->args[k] = p->args[k];
    d->deref = p->deref;
    d->len[0] = d->len[1] = d->len[2] = 0;
    d->str[0][0] = d->str[1][0] = 0;
    if (spec && read_strings) {
        if (spec->str0 < 6) {
            int n = bpf_probe_read_user_str(d->str[0], STR_LEN, (void *)arg_at(d->args, spec->str0));
            d->len[0] = n > 0 ? n : 0;
        }
        if (spec->str1 < 6) {
            int n = bpf_probe_read_user_str(d->str[1], STR_LEN, (void *)arg_at(d->args, spec->str1));
            d->len[1] = n > 0 ? n : 0;
        }
        if (spec->sockaddr < 6) {
            __u64 addr = arg_at(d->args, spec->sockaddr);
            __u32 len = 0;
            if (spec->sockaddr_len == 0xfe) {
                /* accept: the kernel wrote the peer's length into *addrlen */
                __u64 lenp = arg_at(d->args, 2);
                if (lenp)
                    bpf_probe_read_user(&len, sizeof(len), (void *)lenp);
            } else if (spec->sockaddr_len < 6) {
                len = arg_at(d->args, spec->sockaddr_len);
            }
            if (len > 128) /* sizeof(struct sockaddr_storage) */
                len = 128;
            /* Fixed-size reads (the verifier loses variable bounds here); a shorter one when the
             * address sits at the end of a mapping. */
            if (addr && len) {
                if (bpf_probe_read_user(d->str[2], 128, (void *)addr) == 0 ||
                    bpf_probe_read_user(d->str[2], 28, (void *)addr) == 0 ||
                    bpf_probe_read_user(d->str[2], 16, (void *)addr) == 0)
                    d->len[2] = len;
            }
        }
    }
    __u64 size = sizeof(struct sc_detail) - sizeof(d->str);
    if (d->len[2])
        size += 2 * STR_LEN + d->len[2];
    else if (d->len[1])
        size += STR_LEN + d->len[1];
    else
        size += d->len[0];
    asm volatile("" : "+r"(size)); /* keep the bound below: the verifier needs it */
    if (size > sizeof(struct sc_detail))
        size = sizeof(struct sc_detail);
    if (detail_rb.ringbuf_output(d, size, 0) != 0)
        bump(S_DETAIL_LOST, 1);
    pending.delete(&tid);
    return 0;
}

int on_detail_exit(struct sys_exit_ctx *ctx) {
    __u64 id = bpf_get_current_pid_tgid();
    return detail_exit(id, (__u32)id, ctx->ret, 1);
}

/* execve/execveat entry: read argv now, while the old memory still exists. ``ptr32``: a 32-bit caller's
 * argv, an array of 4-byte pointers. */
static __always_inline int read_exec(__u32 nr, __u64 filename, __u64 argv, int ptr32) {
    __u64 id = bpf_get_current_pid_tgid();
    if ((id >> 32) == SELF_TGID)
        return 0;
    struct exec_args *e = detail_rb.ringbuf_reserve(sizeof(struct exec_args));
    if (!e) {
        bump(S_EXEC_ARGS_LOST, 1);
        return 0;
    }
    fill_hdr(&e->h, K_EXEC_ARGS, nr, id, 0, bpf_ktime_get_ns());
    e->filename[0] = 0;
    bpf_probe_read_user_str(e->filename, STR_LEN, (void *)filename);
    __u32 off = 0;
    __u32 argc = 0;
    #pragma unroll
    for (int k = 0; k < ARGV_MAX; k++) {
        __u64 ptr = 0;
        long err = ptr32 ? bpf_probe_read_user(&ptr, 4, (void *)(argv + k * 4))
                         : bpf_probe_read_user(&ptr, sizeof(ptr), (void *)(argv + k * sizeof(__u64)));
        if (err != 0 || !ptr)
            break;
        if (off > ARGV_LEN - 1)
            break;
        __u32 at = off;
        asm volatile("" : "+r"(at)); /* keep the mask below: the verifier needs it */
        at &= ARGV_LEN - 1;
        int n = bpf_probe_read_user_str(&e->argv[at], ARG_CHUNK, (void *)ptr);
        if (n <= 0)
            break;
        off += n;
        argc++;
    }
    e->argc = argc;
    e->argv_len = off;
    detail_rb.ringbuf_submit(e, 0);
    return 0;
}

static __always_inline void keep_entry(__u64 id, struct pending *p) {
    __u32 tid = (__u32)id;
    if (pending.update(&tid, p) != 0)
        bump(S_PENDING_FULL, 1);
}

#if COMPAT_DETAILS
/* i386 socketcall(call, args): kept as the socket call it stands for (connect...), its arguments unpacked,
 * so the rules see the same event as from a direct call. socketcall_nrs[call]: that call's i386 number |
 * its argument count << 16 (0: not kept); accept, send and recv get 0 for their direct calls' extra ones. */
static __always_inline void compat_socketcall_enter(struct pt_regs *regs, __u64 id) {
    __u32 call = (__u32)regs->bx;
    if (call >= SOCKETCALL_CALLS)
        return;
    __u32 *entry = socketcall_nrs.lookup(&call);
    if (!entry || !*entry)
        return;
    __u32 nr = *entry & 0xffff, nargs = *entry >> 16;
    __u32 index = nr + 512;
    struct arg_spec *spec = arg_spec.lookup(&index);
    if (!spec || !spec->enabled)
        return;
    __u32 packed[6] = {};
    void *at = (void *)(__u64)(__u32)regs->cx;
    if (bpf_probe_read_user(packed, sizeof(packed), at) != 0 && bpf_probe_read_user(packed, 12, at) != 0)
        return; /* the shorter read: an array of three at the very end of a mapping */
    struct pending p = {};
    p.ts = bpf_ktime_get_ns();
    p.nr = nr;
    p.compat = 1;
    #pragma unroll
    for (int k = 0; k < 6; k++)
        p.args[k] = (__u32)k < nargs ? packed[k] : 0;
    keep_entry(id, &p);
}
#endif

/* Entry of a syscall that needs details (its arg_spec row is kept): keep its arguments until its exit.
 * Taken here, from the registers, not from a syscalls:sys_enter_X tracepoint: any program on one makes
 * the kernel run a dispatcher on every syscall's entry (docs/performance.md), and this program runs for
 * every syscall anyway; the per-syscall tracepoints skip 32-bit syscalls besides. The registers are
 * pt_regs in the ptrace ABI's layout; a 32-bit syscall's (only with COMPAT_DETAILS) are the i386
 * convention's, zero-extended, and its spec row is at nr + 512. */
static __always_inline void detail_enter(struct bpf_raw_tracepoint_args *ctx, __u64 id, __u32 nr, __u16 compat) {
    if (nr >= 512)
        return;
#if COMPAT_DETAILS
    if (compat && nr == COMPAT_SOCKETCALL_NR) {
        struct pt_regs call_regs = {};
        bpf_probe_read_kernel(&call_regs, sizeof(call_regs), (void *)ctx->args[0]);
        compat_socketcall_enter(&call_regs, id);
        return;
    }
#else
    if (compat)
        return;
#endif
    __u32 index = compat ? nr + 512 : nr;
    struct arg_spec *spec = arg_spec.lookup(&index); /* clone's row is kept, not enabled: for the fork handler */
    if (!spec || !spec->kept)
        return;
    struct pt_regs regs = {};
    bpf_probe_read_kernel(&regs, sizeof(regs), (void *)ctx->args[0]);
#if !defined(TI_STATUS_OFFSET)
    /* No kernel flag to tell 32-bit syscalls (no BTF): a 32-bit process's code segment does, and a 64-bit
     * one's int 0x80 is the instruction just before its return address; their syscalls are not kept under
     * the native numbers they are not (no native exit would ever send or remove the entry). */
    if ((regs.cs & 0xffff) == USER32_CS)
        return;
    __u16 insn = 0;
    if (bpf_probe_read_user(&insn, sizeof(insn), (void *)(regs.ip - 2)) == 0 && insn == INT80_INSN)
        return;
#endif
    struct pending p = {};
    p.ts = bpf_ktime_get_ns();
    p.nr = nr;
    if (compat) {
        p.compat = 1;
        p.args[0] = (__u32)regs.bx;
        p.args[1] = (__u32)regs.cx;
        p.args[2] = (__u32)regs.dx;
        p.args[3] = (__u32)regs.si;
        p.args[4] = (__u32)regs.di;
        p.args[5] = (__u32)regs.bp;
    } else {
        p.args[0] = regs.di;
        p.args[1] = regs.si;
        p.args[2] = regs.dx;
        p.args[3] = regs.r10;
        p.args[4] = regs.r8;
        p.args[5] = regs.r9;
    }
    if (spec->deref_u64 < 6)
        bpf_probe_read_user(&p.deref, sizeof(p.deref), (void *)arg_at(p.args, spec->deref_u64));
    /* argv is read now, while the caller's memory still exists */
    if (nr == (compat ? COMPAT_EXECVE_NR : EXECVE_NR))
        read_exec(nr, p.args[0], p.args[1], compat);
    else if (nr == (compat ? COMPAT_EXECVEAT_NR : EXECVEAT_NR))
        read_exec(nr, p.args[1], p.args[2], compat);
    keep_entry(id, &p);
}

#if COMPAT_DETAILS
/* Exit of every syscall (the per-syscall exit tracepoints skip 32-bit ones): only a 32-bit syscall with a
 * kept entry goes further. Every process pays for it (~11 ns a syscall here), so userspace attaches it to
 * the raw sys_exit tracepoint only once the host runs 32-bit code (or at start when configured so). */
int on_compat_exit(struct bpf_raw_tracepoint_args *ctx) {
    if (!compat_flag())
        return 0;
    __u64 id = bpf_get_current_pid_tgid();
    return detail_exit(id, (__u32)id, (__s64)ctx->args[1], 1);
}
#endif

static __always_inline struct proc_event *proc_reserve(__u8 kind) {
    struct proc_event *e = detail_rb.ringbuf_reserve(sizeof(struct proc_event));
    if (!e) {
        bump(S_PROC_LOST, 1);
        return 0;
    }
    fill_hdr(&e->h, kind, 0, bpf_get_current_pid_tgid(), 0, bpf_ktime_get_ns());
    e->clone_flags = 0;
    e->cgroup_id = bpf_get_current_cgroup_id();
    e->filename[0] = 0;
    bpf_get_current_comm(e->comm, sizeof(e->comm));
    return e;
}

#if ENFORCE
/* Enforcement upkeep runs before, and independently of, the event record: a full ring buffer must never
 * let a child escape its parent's policy or leave a stale entry for a reused pid. */
static __always_inline void enforce_fork(__u32 parent_tgid, __u32 child) {
    /* A child runs the same program as its parent until it execs: same policy. */
    struct enforce_entry *pe = enforce.lookup(&parent_tgid);
    if (pe && pe->policy_id) {
        struct enforce_entry ce = {.signal = 0, .policy_id = pe->policy_id};
        enforce.update(&child, &ce);
    }
    /* Protection passes to children only from allow-listed programs (INHERITED), never from PID 1, the
     * agent or its ancestors (PINNED): every process descends from those. */
    __u32 *prot = protected_tgids.lookup(&parent_tgid);
    if (prot && *prot == PROT_INHERITED) {
        __u32 inherited = PROT_INHERITED;
        protected_tgids.update(&child, &inherited);
    }
}

/* Per-exe policies and the allow-list apply from the first syscall of the new program. */
static __always_inline void enforce_exec(__u32 tgid, const char *filename) {
    __u32 zero = 0;
    struct exe_key *key = exe_key_scratch.lookup(&zero);
    if (!key)
        return;
    __builtin_memset(key, 0, sizeof(*key));
    bpf_probe_read_kernel_str(key->path, STR_LEN, filename);
    struct enforce_entry *pol = exe_policy.lookup(key);
    if (pol) {
        if (pol->signal == PROTECTED_FLAG) {
            __u32 inherited = PROT_INHERITED;
            protected_tgids.update(&tgid, &inherited);
        } else {
            struct enforce_entry ce = {.signal = 0, .policy_id = pol->policy_id};
            enforce.update(&tgid, &ce);
        }
        return;
    }
    struct enforce_entry *cur = enforce.lookup(&tgid);
    if (cur && !cur->signal)
        enforce.delete(&tgid);
    /* It left the allow-listed program it inherited protection from. */
    __u32 *prot = protected_tgids.lookup(&tgid);
    if (prot && *prot == PROT_INHERITED)
        protected_tgids.delete(&tgid);
}
#endif

static __always_inline int is_clone(__u32 nr, __u32 compat) {
    if (compat)
        return nr == COMPAT_CLONE_NR || nr == COMPAT_CLONE3_NR || nr == COMPAT_FORK_NR || nr == COMPAT_VFORK_NR;
    return nr == CLONE_NR || nr == CLONE3_NR || nr == FORK_NR || nr == VFORK_NR;
}

TRACEPOINT_PROBE(sched, sched_process_fork) {
    __u64 id = bpf_get_current_pid_tgid();
    __u32 parent_tgid = id >> 32;
    if (parent_tgid == SELF_TGID)
        return 0;
#if ENFORCE
    enforce_fork(parent_tgid, args->child_pid);
#endif
    struct proc_event *e = proc_reserve(K_FORK);
    if (!e)
        return 0;
    __u32 tid = (__u32)id;
    e->h.aux = args->child_pid;
    /* The parent is inside clone/clone3/fork/vfork: its pending entry holds the flags (an entry of any other
     * syscall is a stale one, e.g. an int 0x80 kept as a native syscall where the kernel flag is unknown). */
    struct pending *p = pending.lookup(&tid);
    if (p && !is_clone(p->nr, p->compat))
        p = 0;
    if (p) {
        e->clone_flags = p->deref ? p->deref : p->args[0];
        e->h.nr = p->nr;
    }
    e->h.flags = p ? (p->compat ? 3 : 1) : 0; /* 1: clone_flags are known; 2: h.nr is an i386 number */
    detail_rb.ringbuf_submit(e, 0);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec) {
    __u64 id = bpf_get_current_pid_tgid();
    if ((id >> 32) == SELF_TGID)
        return 0;
    __u32 zero_key = 0;
    struct sc_batch *b = batches.lookup(&zero_key);
    if (b)
        b->last_tid = 0; /* the new program's first syscall starts a run */
    const char *filename = (const char *)args + (args->data_loc_filename & 0xffff);
#if ENFORCE
    enforce_exec(id >> 32, filename);
#endif
    __u16 image_compat = compat_flag();
    struct proc_event *e = proc_reserve(K_EXEC);
    if (e) {
        e->h.aux = args->old_pid;
#if defined(TI_STATUS_OFFSET) && defined(TS_COMPAT)
        /* the loader set TS_COMPAT for a 32-bit image: the new program's class, exactly (2: told) */
        e->h.flags = 2 | (image_compat ? 1 : 0);
#endif
        bpf_probe_read_kernel_str(e->filename, STR_LEN, filename);
        detail_rb.ringbuf_submit(e, 0);
    }
    /* A 32-bit program was loaded: the kernel now takes the execve for a 32-bit syscall, and its exit
     * tracepoint will not fire. The exec succeeded (this tracepoint says so): its record goes out now,
     * without strings (the old memory is gone; the entry's argv record has them). */
    __u32 tid = (__u32)id;
    __u32 old_tid = args->old_pid;
    if (image_compat) {
        detail_exit(id, old_tid, 0, 0);
    } else if (old_tid != tid) {
        /* A thread other than the leader exec'd: it now has the leader's id (de_thread), which its exit
         * hook looks the entry up under. */
        struct pending *p = pending.lookup(&old_tid);
        if (p) {
            struct pending moved = *p;
            pending.delete(&old_tid); /* first: its room is the one the update may need */
            if (pending.update(&tid, &moved) != 0)
                bump(S_PENDING_FULL, 1);
        }
    }
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit) {
    __u64 id = bpf_get_current_pid_tgid();
    __u32 tgid = id >> 32;
    if (tgid == SELF_TGID)
        return 0;
    __u32 tid = (__u32)id;
    pending.delete(&tid); /* an entry whose exit never came (a syscall the thread did not return from) */
    if (args->group_dead) { /* before the record: a reused pid must never meet a stale entry */
        enforce.delete(&tgid);
        protected_tgids.delete(&tgid);
    }
    struct proc_event *e = proc_reserve(K_EXIT);
    if (!e)
        return 0;
    e->h.aux = args->group_dead;
    detail_rb.ringbuf_submit(e, 0);
    return 0;
}
