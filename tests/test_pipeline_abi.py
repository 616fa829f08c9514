"""Syscalls through the other ABI's gate than the process's executable: one alert per process, none for
what its executable explains, none for the syscalls its previous program made before an exec."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from agent.capture.names import syscall_number
from agent.events import FLAG_COMPAT, SYSCALL_DTYPE, ProcEvent
from agent.pipeline import ABI_RULE_32_IN_64, ABI_RULE_64_IN_32, Pipeline
from agent.proc import ProcessTable
from agent.proc.info import ProcessInfo
from agent.respond import JsonlConfig, OutputConfig, build_outputs

# above any pid_max (2^22): no live process answers for them in /proc
SIXTY_FOUR, THIRTY_TWO, EXECS = 5_000_001, 5_000_002, 5_000_003


def build(tmp_path: Path, *, kernel_compat: bool) -> tuple[Pipeline, Path]:
    table = ProcessTable()
    table.add(ProcessInfo(pid=SIXTY_FOUR, ppid=1, comm="tool64", exe="/usr/bin/tool64", args=("tool64", "-x")))
    table.add(ProcessInfo(pid=THIRTY_TWO, ppid=1, comm="tool32", exe="/opt/tool32", compat=True))
    table.add(ProcessInfo(pid=EXECS, ppid=1, comm="old32", exe="/opt/old32", compat=True))
    alerts = tmp_path / "alerts.jsonl"
    outputs = build_outputs(OutputConfig(console=None, jsonl=JsonlConfig(str(alerts)), fold_window=0), state_dir=tmp_path)
    return Pipeline(table=table, outputs=outputs, kernel_compat=kernel_compat), alerts


def rows(pid: int, names: list[str], *, compat: bool, start_ts: int = 1_000) -> np.ndarray:
    out = np.zeros(len(names), SYSCALL_DTYPE)
    out["tgid"] = out["tid"] = pid
    out["ts"] = start_ts + np.arange(len(names))
    out["nr"] = [syscall_number(n, compat=compat) for n in names]
    out["flags"] = FLAG_COMPAT if compat else 0
    return out


def abi_alerts(path: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in records if r["rule"] in (ABI_RULE_32_IN_64, ABI_RULE_64_IN_32)]


def test_int80_from_a_64_bit_program_is_one_alert_naming_its_syscalls(tmp_path: Path) -> None:
    pipeline, alerts = build(tmp_path, kernel_compat=True)
    pipeline.handle([rows(SIXTY_FOUR, ["read", "getpid", "open", "getpid", "execve"], compat=True)])
    pipeline.handle([rows(SIXTY_FOUR, ["open", "write"], compat=True, start_ts=2_000)])  # once per process
    pipeline.handle([rows(SIXTY_FOUR, ["read", "openat"], compat=False, start_ts=3_000)])
    pipeline.outputs.close()
    found = abi_alerts(alerts)
    assert len(found) == 1
    fields = found[0]["output_fields"]
    assert found[0]["rule"] == ABI_RULE_32_IN_64 and found[0]["priority"] == "Warning"
    assert fields["sysgram.abi.syscalls"] == ["read", "getpid", "open", "execve"]  # i386 names, each once
    assert fields["proc.pid"] == SIXTY_FOUR and fields["proc.exe"] == "/usr/bin/tool64"
    assert fields["proc.cmdline"] == "tool64 -x" and fields["evt.type"] == "read"
    assert pipeline.counters["abi_mismatches"] == 1


def test_a_32_bit_program_is_judged_by_the_kernels_flag(tmp_path: Path) -> None:
    pipeline, alerts = build(tmp_path, kernel_compat=True)
    pipeline.handle([rows(THIRTY_TWO, ["read", "open", "mmap2"], compat=True)])  # what a 32-bit program does
    assert not abi_alerts(alerts)
    pipeline.handle([rows(THIRTY_TWO, ["mmap", "mprotect"], compat=False, start_ts=2_000)])  # 64-bit code
    pipeline.outputs.close()
    found = abi_alerts(alerts)
    assert [f["rule"] for f in found] == [ABI_RULE_64_IN_32]
    assert found[0]["output_fields"]["sysgram.abi.syscalls"] == ["mmap", "mprotect"]


def test_without_the_kernels_flag_a_32_bit_executable_marks_its_syscalls(tmp_path: Path) -> None:
    """No BTF (or a recording made so): every syscall of a 32-bit executable is taken as i386, as before."""
    pipeline, alerts = build(tmp_path, kernel_compat=False)
    seen: list[np.ndarray] = []

    class Spy:  # what the detector is handed
        def push(self, batch: np.ndarray, *_: object) -> list[object]:
            seen.append(batch.copy())
            return []

    pipeline.detector = Spy()
    pipeline.handle([rows(THIRTY_TWO, ["read", "open"], compat=False)])
    pipeline.outputs.close()
    assert not abi_alerts(alerts)
    assert (seen[0]["flags"] & FLAG_COMPAT).all()


def test_syscalls_before_an_exec_belong_to_the_previous_program(tmp_path: Path) -> None:
    pipeline, alerts = build(tmp_path, kernel_compat=True)
    # a 32-bit program execs a 64-bit one at t=5,000; the batch holding both sides comes after the event
    pipeline.handle([ProcEvent("exec", 5_000, EXECS, EXECS, comm="new64", filename="/usr/bin/new64")])
    pipeline.handle([np.concatenate([rows(EXECS, ["read", "execve"], compat=True, start_ts=4_000),
                                     rows(EXECS, ["brk", "mmap"], compat=False, start_ts=5_500)])])
    assert not abi_alerts(alerts)
    pipeline.handle([rows(EXECS, ["getpid"], compat=True, start_ts=6_000)])  # the new program's int 0x80
    pipeline.outputs.close()
    found = abi_alerts(alerts)
    assert [(f["rule"], f["output_fields"]["sysgram.abi.syscalls"]) for f in found] == [
        (ABI_RULE_32_IN_64, ["getpid"])]


def test_a_32_bit_program_gone_before_proc_was_read_is_judged_by_its_first_syscall(tmp_path: Path) -> None:
    """The table could not read its executable (it had exited), so the table does not know it is 32-bit;
    its first syscall after the exec does, and all of its syscalls are 32-bit: nothing odd."""
    pipeline, alerts = build(tmp_path, kernel_compat=True)
    pipeline.handle([ProcEvent("exec", 5_000, EXECS, EXECS, comm="short32", filename="/tmp/short32")])
    info = pipeline.table.get(EXECS)
    assert info is not None and not info.compat  # what the table could tell
    pipeline.handle([rows(EXECS, ["brk", "mmap2", "open", "exit_group"], compat=True, start_ts=6_000)])
    # its fork child runs the same 32-bit program: its 32-bit syscalls are not odd either, its 64-bit ones are
    child = EXECS + 10
    pipeline.handle([ProcEvent("fork", 7_000, child, child, ppid=EXECS)])
    pipeline.handle([rows(child, ["read"], compat=True, start_ts=7_100)])
    assert not abi_alerts(alerts)
    pipeline.handle([rows(child, ["read"], compat=False, start_ts=7_200)])
    pipeline.outputs.close()
    assert [f["rule"] for f in abi_alerts(alerts)] == [ABI_RULE_64_IN_32]


def _elf(path: Path, elf_class: int, machine: int) -> str:
    header = bytearray(64)
    header[:6] = b"\x7fELF" + bytes([elf_class, 1])
    header[18:20] = machine.to_bytes(2, "little")
    path.write_bytes(bytes(header))
    return str(path)


def test_a_64_bit_program_whose_every_syscall_is_int80_is_judged_by_its_executable(tmp_path: Path) -> None:
    """Its first syscall is already a 32-bit one: the first-syscall rule alone would call it a 32-bit program."""
    pipeline, alerts = build(tmp_path, kernel_compat=True)
    only80 = _elf(tmp_path / "only80", 2, 62)  # ELFCLASS64, x86-64; the process is gone before /proc is read
    pipeline.handle([ProcEvent("exec", 5_000, EXECS, EXECS, comm="only80", filename=only80)])
    assert pipeline.table.compat_of(EXECS) is False
    pipeline.handle([rows(EXECS, ["getpid", "write", "exit"], compat=True, start_ts=6_000)])
    pipeline.outputs.close()
    found = abi_alerts(alerts)
    assert [(f["rule"], f["output_fields"]["sysgram.abi.syscalls"]) for f in found] == [
        (ABI_RULE_32_IN_64, ["getpid", "write", "exit"])]


def test_int80_just_before_an_exec_is_judged_by_the_program_that_made_it(tmp_path: Path) -> None:
    """A 64-bit child makes int 0x80 calls, then execs a 32-bit program; its rows come after the exec event."""
    pipeline, alerts = build(tmp_path, kernel_compat=True)
    child = SIXTY_FOUR + 100
    tool32 = _elf(tmp_path / "tool32", 1, 3)
    pipeline.handle([ProcEvent("fork", 4_000, child, child, ppid=SIXTY_FOUR),
                     ProcEvent("exec", 5_000, child, child, comm="tool32", filename=tool32)])
    pipeline.handle([np.concatenate([rows(child, ["read"], compat=False, start_ts=4_100),
                                     rows(child, ["getpid", "open"], compat=True, start_ts=4_200),
                                     rows(child, ["execve"], compat=False, start_ts=4_900),
                                     rows(child, ["brk", "mmap2"], compat=True, start_ts=5_100)])])
    pipeline.outputs.close()
    found = abi_alerts(alerts)
    assert [(f["rule"], f["output_fields"]["sysgram.abi.syscalls"]) for f in found] == [
        (ABI_RULE_32_IN_64, ["getpid", "open"])]


def _recording(path: Path, *, compat_from_kernel: bool) -> str:
    from agent.capture.recording import RecordingWriter

    writer = RecordingWriter(str(path), compat_from_kernel=compat_from_kernel)
    writer.add_process(ProcessInfo(pid=THIRTY_TWO, ppid=1, comm="tool32", exe="/opt/tool32", compat=True))
    writer.add_syscalls(np.concatenate([rows(THIRTY_TWO, ["brk", "read"], compat=True),
                                        rows(THIRTY_TWO, ["mmap"], compat=False, start_ts=2_000)]))
    writer.close({})
    return str(path)


def test_replay_takes_the_kernels_flags_as_recorded(tmp_path: Path) -> None:
    """A recording whose flags are the kernel's keeps a 32-bit program's 64-bit syscall as one; an older one
    (flags from the executable) is judged as it was recorded: every row of a 32-bit executable is i386."""
    from tests.conftest import sysgram

    for kernel, expected in ((True, [ABI_RULE_64_IN_32]), (False, [])):
        alerts = tmp_path / f"alerts-{kernel}.jsonl"
        done = sysgram("replay", _recording(tmp_path / f"r-{kernel}.parquet", compat_from_kernel=kernel),
                       "--no-model", "--no-default-rules", "--alerts-jsonl", str(alerts), "--quiet",
                       "--state-dir", str(tmp_path / "state"))
        assert done.returncode == 0, done.stderr
        assert [a["rule"] for a in abi_alerts(alerts)] == expected


def test_a_shells_child_that_execs_a_32_bit_program_is_not_odd_even_when_the_table_knew_the_new_class(
    tmp_path: Path,
) -> None:
    """A replayed recording's table holds each process as the recorder last saw it: here already the 32-bit
    program, while the rows before its exec are the 64-bit shell child's (session 10: a false alarm)."""
    pipeline, alerts = build(tmp_path, kernel_compat=True)
    pipeline.handle([ProcEvent("exec", 5_000, THIRTY_TWO, THIRTY_TWO, comm="tool32", filename="/opt/tool32")])
    pipeline.handle([np.concatenate([rows(THIRTY_TWO, ["set_robust_list", "rt_sigaction", "execve"], compat=False,
                                          start_ts=4_000),
                                     rows(THIRTY_TWO, ["brk", "mmap2", "openat"], compat=True, start_ts=5_100)])])
    pipeline.outputs.close()
    assert not abi_alerts(alerts)


def test_the_kernels_word_at_exec_tells_the_new_programs_class(tmp_path: Path) -> None:
    """The exec event says whether the loader made the image 32-bit: no executable to read, no guess from
    the first syscall (an int 0x80-only 64-bit program starts with a 32-bit syscall)."""
    pipeline, alerts = build(tmp_path, kernel_compat=True)
    pipeline.handle([ProcEvent("exec", 5_000, EXECS, EXECS, comm="only80", filename="/gone/only80",
                               image_compat=False)])
    pipeline.handle([rows(EXECS, ["getpid", "exit"], compat=True, start_ts=6_000)])
    pipeline.outputs.close()
    assert [f["rule"] for f in abi_alerts(alerts)] == [ABI_RULE_32_IN_64]


def test_two_execs_before_their_rows_each_judge_their_own(tmp_path: Path) -> None:
    """64-bit shell child -> 32-bit program -> 64-bit program, all three events before any of the rows."""
    pipeline, alerts = build(tmp_path, kernel_compat=True)
    pipeline.handle([ProcEvent("exec", 5_000, EXECS, EXECS, comm="a32", filename="/gone/a32", image_compat=True),
                     ProcEvent("exec", 7_000, EXECS, EXECS, comm="b64", filename="/gone/b64", image_compat=False)])
    pipeline.handle([np.concatenate([rows(EXECS, ["read", "execve"], compat=False, start_ts=4_000),
                                     rows(EXECS, ["brk", "mmap2", "execve"], compat=True, start_ts=5_100),
                                     rows(EXECS, ["brk", "mmap"], compat=False, start_ts=7_100)])])
    assert not abi_alerts(alerts)
    pipeline.handle([rows(EXECS, ["getpid"], compat=True, start_ts=8_000)])  # the 64-bit program's int 0x80
    pipeline.outputs.close()
    assert [f["output_fields"]["sysgram.abi.syscalls"] for f in abi_alerts(alerts)] == [["getpid"]]


def test_the_first_32_bit_code_starts_the_32_bit_details_once(tmp_path: Path) -> None:
    """compat_details "auto": the exit program every syscall pays for is attached only once 32-bit code runs."""
    pipeline, _ = build(tmp_path, kernel_compat=True)
    calls: list[int] = []

    def attach() -> bool:
        calls.append(1)
        return True  # "attached now"

    pipeline.on_compat = attach
    pipeline.handle([rows(SIXTY_FOUR, ["read", "write"], compat=False)])
    pipeline.handle([ProcEvent("exec", 5_000, EXECS, EXECS, comm="b64", filename="/gone/b64", image_compat=False)])
    assert calls == []
    pipeline.handle([ProcEvent("exec", 6_000, EXECS, EXECS, comm="a32", filename="/gone/a32", image_compat=True)])
    pipeline.handle([rows(SIXTY_FOUR, ["getpid"], compat=True, start_ts=7_000)])
    pipeline.outputs.close()
    assert calls == [1] and pipeline.counters["compat_details_started"] == 1
