"""The Python decoder's dtypes mirror bpf/sysgram.h byte for byte (compiled here with the C compiler)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from agent.capture import _layout as L
from agent.config import MAX_DENY_PROGRAMS
from agent.events import FLAG_COMPAT
from tests.conftest import ROOT

PROGRAM = r"""
#include <linux/types.h>
#include <stddef.h>
#include <stdio.h>
#include "sysgram.h"
int main(void) {
    printf("%zu %zu %zu %zu %zu %zu %zu\n", sizeof(struct sc_rec), offsetof(struct sc_batch, recs),
           sizeof(struct sc_detail), sizeof(struct exec_args), sizeof(struct proc_event),
           sizeof(struct arg_spec), offsetof(struct sc_detail, str));
    printf("%d %d %d %d %d\n", REC_COMPAT, REC_STAMPED, DETAIL_COMPAT, COMPAT_POLICY_BASE, DETAIL_BY_POLICY);
    return 0;
}
"""


def test_dtypes_match_the_c_structs(tmp_path: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "sizes.c"
    src.write_text(PROGRAM)
    exe = tmp_path / "sizes"
    subprocess.run([cc, "-I", str(ROOT / "bpf"), "-o", str(exe), str(src)], check=True)
    sizes_line, flags_line = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines()
    sizes = [int(x) for x in sizes_line.split()]
    assert [int(x) for x in flags_line.split()] == [
        L.REC_COMPAT, L.REC_STAMPED, L.DETAIL_COMPAT, L.COMPAT_POLICY_BASE, L.DETAIL_BY_POLICY]
    assert L.REC_COMPAT == FLAG_COMPAT  # the decoder copies the kernel's bit into the rows as is
    assert MAX_DENY_PROGRAMS == L.COMPAT_POLICY_BASE - 1  # policy ids 1..63, their i386 bitmaps above
    assert sizes == [
        L.SC_REC.itemsize,
        L.BATCH_HEADER.itemsize,
        L.SC_DETAIL.itemsize,
        L.EXEC_ARGS.itemsize,
        L.PROC_EVENT.itemsize,
        L.ARG_SPEC.itemsize,
        dict(L.SC_DETAIL.fields or {})["str"][1],
    ]


def test_sockaddr_decoding() -> None:
    import socket
    import struct

    from agent.capture._decode import decode_sockaddr

    v4 = struct.pack("<H", socket.AF_INET) + struct.pack(">H", 443) + bytes([10, 1, 2, 3]) + b"\0" * 8
    assert decode_sockaddr(v4) == {"family": socket.AF_INET, "port": 443, "addr": "10.1.2.3"}
    v6 = (
        struct.pack("<H", socket.AF_INET6)
        + struct.pack(">H", 22)
        + b"\0" * 4
        + bytes(15)
        + b"\x01"
        + b"\0" * 4
    )
    assert decode_sockaddr(v6) == {"family": socket.AF_INET6, "port": 22, "addr": "::1"}
    unix = struct.pack("<H", socket.AF_UNIX) + b"/run/x.sock\0"
    assert decode_sockaddr(unix)["addr"] == "/run/x.sock"
    assert decode_sockaddr(b"") == {}


def test_compat_names_come_from_libseccomp() -> None:
    from agent.capture.names import syscall_name, syscall_number

    assert syscall_name(5, compat=True) == "open"
    assert syscall_name(2) == "open"
    assert syscall_name(102, compat=True) == "socketcall"
    assert syscall_number("socketcall") == -1  # no such syscall on x86_64
    assert syscall_name(1000) == "sys_1000"


def test_detail_records_decode_from_raw_bytes() -> None:
    import socket
    import struct

    import numpy as np

    from agent.capture._decode import decode_detail, decode_exec_args, decode_kernel_signal, decode_proc
    from agent.capture.names import syscall_number

    rec = np.zeros(1, L.SC_DETAIL)
    rec["h"]["kind"], rec["h"]["nr"], rec["h"]["tgid"], rec["h"]["tid"], rec["h"]["ts"] = (
        L.K_SYSCALL, syscall_number("connect"), 7, 8, 123,
    )
    rec["ret"] = -111
    rec["args"][0] = [3, 0x7FFF0000, 16, 0, 0, 0]
    addr = struct.pack("<H", socket.AF_INET) + struct.pack(">H", 8080) + bytes([127, 0, 0, 1]) + b"\0" * 8
    rec["str"][0, 2] = addr
    rec["len"][0] = [0, 0, len(addr)]
    event = decode_detail(rec.tobytes())
    assert (event.syscall, event.tgid, event.tid, event.ts, event.res) == ("connect", 7, 8, 123, -111)
    assert event.args["fd"] == 3 and event.args["port"] == 8080 and event.args["addr"] == "127.0.0.1"

    exe = np.zeros(1, L.EXEC_ARGS)
    exe["h"]["tid"], exe["argc"], exe["filename"] = 9, 2, b"/bin/ls"
    argv = b"ls\0-l\0"
    exe["argv"] = np.frombuffer(argv.ljust(L.EXEC_ARGS["argv"].itemsize, b"\0"), dtype=L.EXEC_ARGS["argv"])
    exe["argv_len"] = len(argv)
    assert decode_exec_args(exe.tobytes()) == (9, "/bin/ls", ("ls", "-l"))

    proc = np.zeros(1, L.PROC_EVENT)
    proc["h"]["kind"], proc["h"]["tgid"], proc["h"]["tid"], proc["h"]["ts"] = L.K_EXEC, 9, 9, 5
    proc["comm"], proc["filename"], proc["cgroup_id"] = b"ls", b"/bin/ls", 4242
    ev = decode_proc(proc.tobytes())
    assert (ev.kind, ev.pid, ev.tid, ev.comm, ev.filename, ev.cgroup_id) == ("exec", 9, 9, "ls", "/bin/ls", 4242)

    hdr = np.zeros(1, L.DETAIL_HDR)
    hdr["kind"], hdr["nr"], hdr["tgid"], hdr["tid"], hdr["aux"], hdr["ts"] = L.K_ENFORCED, 110, 9, 10, 9, 77
    sig = decode_kernel_signal(hdr.tobytes())
    assert (sig.pid, sig.tid, sig.nr, sig.signal, sig.ts) == (9, 10, 110, 9, 77)


def test_a_recording_whose_json_has_the_wrong_shape_is_one_recording_error(tmp_path: Path) -> None:
    """Rewritten by hand (pyarrow): args that are a JSON list, metadata that is a list or nested too deep."""
    import json

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from agent.capture.recording import RecordingWriter, read_recording
    from agent.errors import RecordingError
    from agent.events import SYSCALL_DTYPE
    from agent.proc.info import ProcessInfo

    good = tmp_path / "good.parquet"
    writer = RecordingWriter(str(good))
    writer.add_process(ProcessInfo(pid=100, ppid=1, comm="app", exe="/usr/bin/app"))
    writer.add_syscalls(np.zeros(2, dtype=SYSCALL_DTYPE))
    writer.close({})
    table = pq.read_table(good)
    meta = table.schema.metadata
    args = table.column("args").to_pylist()
    bad_args = table.set_column(table.schema.get_field_index("args"), "args",
                                pa.array([json.dumps([1, 2]) if a else a for a in args], type=table.schema.field("args").type))
    cases = {
        "args.parquet": (bad_args, "malformed args (a JSON list"),
        "meta.parquet": (table.replace_schema_metadata({**meta, b"sysgram": b"[1, 2]"}), "corrupt recording metadata"),
        "deep.parquet": (table.replace_schema_metadata({**meta, b"sysgram": b"[" * 100_000}), "corrupt recording metadata"),
    }
    for name, (damaged, words) in cases.items():
        pq.write_table(damaged, tmp_path / name)
        with pytest.raises(RecordingError) as err:
            read_recording(str(tmp_path / name))
        assert words in str(err.value) and name in str(err.value)
    assert read_recording(str(good)).processes[0].exe == "/usr/bin/app"


def test_record_and_eval_refuse_bad_paths_and_filters_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli import main

    for argv, words in (
        (["record", "-o", str(tmp_path), "--seconds", "1"], "must be a file path, not a directory"),
        (["record", "-o", str(tmp_path / "r.parquet"), "--exe", "bash"], "absolute path"),
        (["record", "-o", str(tmp_path / "r.parquet"), "--seconds", "nan"], "expected a positive duration"),
        (["eval", "adfa", str(tmp_path), "--plot", str(tmp_path / "no" / "roc.png")], "--plot takes a .png"),
        (["eval", "adfa", str(tmp_path), "--plot", str(tmp_path / "roc.xyz")], "--plot takes a .png"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "r.parquet").exists()


def test_inspect_of_a_pid_the_recording_never_saw_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    from agent.capture.recording import RecordingWriter
    from agent.cli import main
    from agent.events import SYSCALL_DTYPE
    from agent.proc.info import ProcessInfo

    path = tmp_path / "r.parquet"
    writer = RecordingWriter(str(path))
    writer.add_process(ProcessInfo(pid=100, ppid=1, comm="app", exe="/usr/bin/app"))
    rows = np.zeros(3, dtype=SYSCALL_DTYPE)
    rows["tgid"] = rows["tid"] = 100
    writer.add_syscalls(rows)
    writer.close({})
    assert main(["inspect", str(path), "--pid", "100"]) == 0
    assert "/usr/bin/app" in capsys.readouterr().out
    for pid in ("999999", "-5"):  # was exit 0 with nothing, or only the summary
        assert main(["inspect", str(path), "--pid", pid, "--events"]) == 2
        assert f"--pid {pid}: no such process in the recording" in capsys.readouterr().err
