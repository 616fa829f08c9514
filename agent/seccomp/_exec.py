"""Running a program under a profile with the kernel enforcing it (``sysgram exec --seccomp``)."""

from __future__ import annotations

import faulthandler
import os
import shutil
import signal
import threading
from collections.abc import Sequence

from agent.errors import ConfigError
from agent.seccomp._evaluate import ProfileEvaluator
from agent.seccomp._kernel import build_filter
from agent.seccomp._profile import Profile


def run_under_profile(profile: Profile, argv: Sequence[str], caps: int | None = None) -> int:
    """Fork, load the filter in the child (no_new_privs set), exec ``argv``; its exit code or 128+signal.

    The filter is compiled in the parent so the child does nothing between loading it and execve but
    execve itself. ``caps`` picks the includes/excludes rules (default: this process's effective set).
    """
    if not argv:
        raise ConfigError("exec: no command given (sysgram exec --seccomp PROFILE -- CMD [ARG...])")
    program = argv[0] if "/" in argv[0] else shutil.which(argv[0])
    if program is None or not os.access(program, os.X_OK) or os.path.isdir(program):  # a directory is "x" too
        raise ConfigError(f"exec: {argv[0]}: command not found or not executable")
    caps = _own_caps() if caps is None else caps
    execve = ProfileEvaluator(profile).decide("execve", (), caps)
    if execve.violation:  # the child could not even report it: refuse up front
        raise ConfigError(f"the profile refuses execve, so no program can start ({execve.explanation})",
                          path=profile.path)
    compiled = build_filter(profile, caps)
    env = dict(os.environ)
    pid = os.fork()
    if pid == 0:  # the child: only async-signal-safe work from here
        faulthandler.disable()  # a program killed by its filter should not print the parent's stack
        try:
            compiled.filter.load()
            os.execve(program, list(argv), env)
        except BaseException:
            os._exit(127)
    # The child gets the terminal's SIGINT itself; the parent just waits for it.
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if on_main_thread else None
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        if on_main_thread:
            signal.signal(signal.SIGINT, previous)
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _own_caps() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0
