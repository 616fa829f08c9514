/* Records shared by the BPF programs (sysgram.bpf.c) and the Python decoder (agent/capture/_layout.py).
 * Keep both in step: the decoder's numpy dtypes mirror these structs byte for byte, and a test checks it. */
#ifndef SYSGRAM_H
#define SYSGRAM_H

#ifndef BATCH_SIZE
#define BATCH_SIZE 1024 /* syscalls per compact batch; a power of two (fewer, larger ring records: less per-record Python) */
#endif
#ifndef STR_LEN
#define STR_LEN 256 /* bytes kept of each path or address argument */
#endif
#ifndef ARGV_LEN
#define ARGV_LEN 1024 /* bytes kept of an execve argv, NUL-separated */
#endif
#ifndef ARG_CHUNK
#define ARG_CHUNK 128 /* bytes kept of each argv entry */
#endif
#ifndef ARGV_MAX
#define ARGV_MAX 20 /* argv entries read */
#endif

/* Compact stream: one record per syscall, BATCH_SIZE of them per ring-buffer record.
 * Reading the clock is the costliest part of a record, so only some records carry a time (REC_STAMPED):
 * the first of a batch, the first after a change of thread on this CPU, and every STAMP_EVERY-th. The
 * records between two stamps are therefore one thread's contiguous run on one CPU; userspace orders runs
 * by their exact start time (a thread's runs never overlap) and interpolates the times inside a run. */
#ifndef STAMP_EVERY
#define STAMP_EVERY 64 /* a power of two */
#endif
#define REC_COMPAT 0x1  /* the syscall came in through a 32-bit gate: nr is an i386 number */
#define REC_STAMPED 0x2

struct sc_rec {
    __u32 tgid;
    __u32 tid;
    __u16 nr;
    __u16 flags;    /* REC_STAMPED: ts_delta is valid; REC_COMPAT */
    __u32 ts_delta; /* ns since the batch's base_ts (saturates at 2^32-1) */
};

struct sc_batch {
    __u64 base_ts;  /* the time of recs[0] */
    __u64 end_ts;   /* when the batch was sent: every record of this CPU before it has been sent */
    __u32 count;
    __u32 cpu;
    __u32 last_tid; /* the thread of the latest record (kernel-side bookkeeping) */
    __u32 pad;
    struct sc_rec recs[BATCH_SIZE];
};

/* Detail stream: kinds of record. */
enum detail_kind {
    K_SYSCALL = 1, /* a security-relevant syscall at its exit */
    K_EXEC_ARGS = 2, /* execve/execveat argv, read at entry (the memory is gone after exec) */
    K_FORK = 3,
    K_EXEC = 4,
    K_EXIT = 5,
    K_ENFORCED = 6, /* the kernel side sent a signal to a process */
};

#define DETAIL_COMPAT 0x1 /* detail_hdr.flags (K_ENFORCED): nr is an i386 number */
#define DETAIL_BY_POLICY 0x2 /* detail_hdr.flags (K_ENFORCED): the per-exe deny policy decided, not a verdict */

struct detail_hdr {
    __u8 kind;
    __u8 flags;
    __u16 nr;
    __u32 tgid;
    __u32 tid;
    __u32 aux; /* fork: child tid; exec: old pid; exit: group_dead; enforced: signal */
    __u64 ts;
};

/* Which arguments of a syscall are strings or socket addresses: filled per syscall number by userspace
 * (agent/capture/_decode.py) into the `arg_spec` map. 0xff = none. */
struct arg_spec {
    __u8 str0;
    __u8 str1;
    __u8 sockaddr;     /* index of a struct sockaddr * argument */
    __u8 sockaddr_len; /* index of its length (a value), or 0xfe: a socklen_t * (accept) */
    __u8 deref_u64;    /* index of a pointer to a u64 to read (clone3 flags, open_how.flags) */
    __u8 enabled;
    __u8 kept;         /* 1 on every row written: a 32-bit entry is kept only where its row says so */
    __u8 pad;
};

struct sc_detail {
    struct detail_hdr h;
    __s64 ret;
    __u64 args[6];
    __u64 deref;
    __u16 len[3];
    __u16 pad;
    char str[3][STR_LEN]; /* str0, str1, raw sockaddr bytes */
};

struct exec_args {
    struct detail_hdr h;
    __u32 argc;
    __u32 argv_len;
    char filename[STR_LEN];
    char argv[ARGV_LEN + ARG_CHUNK]; /* slack: the last entry may start just before ARGV_LEN */
};

struct proc_event {
    struct detail_hdr h;
    __u64 clone_flags; /* fork: the parent's clone flags when known (CLONE_THREAD => a thread) */
    __u64 cgroup_id;   /* the task's cgroup v2 id: a process gone before /proc is read still names its container */
    char comm[16];
    char filename[STR_LEN]; /* exec */
};

/* Enforcement: per process, what the kernel side does at its next syscall. */
#define COMPAT_POLICY_BASE 64 /* deny_bitmaps: policies 1..63, their i386 bitmaps at +64 */

struct enforce_entry {
    __u32 signal;    /* 0: none; 9 SIGKILL; 19 SIGSTOP */
    __u32 policy_id; /* index into deny_bitmaps, 0: none */
};

#define PROTECTED_FLAG 1u /* exe_policy: this executable is allow-listed */

/* protected_tgids values (agent/enforce.py writes the same): INHERITED for allow-listed programs, whose
 * children share it until they exec something else; PINNED for PID 1, the agent, its ancestors and
 * configured pids, never passed on. */
#define PROT_INHERITED 1u
#define PROT_PINNED 2u

#endif
