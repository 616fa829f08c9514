"""Finding the kernel's thread status word (32-bit syscall detection) in its BTF, and the ways without it."""

from __future__ import annotations

import os
import platform

import pytest

from agent.capture import _btf


@pytest.mark.skipif(not os.path.exists("/sys/kernel/btf/vmlinux") or platform.machine() != "x86_64",
                    reason="needs an x86_64 kernel with BTF")
def test_the_status_word_is_found_in_this_kernels_btf() -> None:
    probe = _btf.compat_probe()
    assert probe.status_offset is not None, probe.reason
    # thread_info leads task_struct; flags and syscall_work (two longs) come before status
    assert probe.status_offset % 4 == 0 and 8 <= probe.status_offset < 64
    assert f"-DTI_STATUS_OFFSET={probe.status_offset}" in probe.cflags and "-DTS_COMPAT=0x2" in probe.cflags


def test_another_architecture_gets_no_flag_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_btf.platform, "machine", lambda: "aarch64")
    probe = _btf.compat_probe()
    assert probe.status_offset is None and probe.cflags == [] and "aarch64" in probe.reason


def test_without_libbpf_there_is_no_flag_and_the_reason_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_btf.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(_btf, "_libbpf", lambda: None)
    probe = _btf.compat_probe()
    assert probe.status_offset is None and probe.cflags == [] and "libbpf" in probe.reason


def test_a_kernel_before_5_11_reads_the_word_through_a_helper(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_btf.platform, "release", lambda: "5.10.0-28-amd64")
    assert not _btf._kernel_at_least(5, 11)
    monkeypatch.setattr(_btf.platform, "release", lambda: "6.18.0")
    assert _btf._kernel_at_least(5, 11)
