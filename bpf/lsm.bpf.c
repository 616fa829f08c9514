/* Sysgram BPF-LSM probe (experimental, see docs/lsm.md): deny exec for flagged thread groups.
 *
 * Where bpf/sysgram.bpf.c can only signal a flagged process at its next syscall (after the fact), an LSM
 * hook can refuse the operation itself: bprm_check_security returns -EPERM before the new program runs.
 * Userspace flags a tgid by writing it into `deny_exec`; every refusal is counted in `lsm_stats`.
 */
#include <linux/errno.h>
#include <linux/sched.h>

BPF_HASH(deny_exec, u32, u32, 65536);
BPF_ARRAY(lsm_stats, u64, 2); /* 0: exec checks seen, 1: execs denied */

LSM_PROBE(bprm_check_security, struct linux_binprm *bprm, int ret) {
    if (ret != 0)
        return ret; /* an earlier LSM already said no */
    int seen = 0;
    u64 *count = lsm_stats.lookup(&seen);
    if (count)
        __sync_fetch_and_add(count, 1);
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (deny_exec.lookup(&tgid)) {
        int denied = 1;
        count = lsm_stats.lookup(&denied);
        if (count)
            __sync_fetch_and_add(count, 1);
        return -EPERM;
    }
    return 0;
}
