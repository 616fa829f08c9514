"""Container ids from the cgroup path forms of docker, containerd, cri-o, podman and kubernetes."""

from __future__ import annotations

import pytest

from agent.proc import HOST_CONTAINER_ID, parse_container_id

CID = "3f4e5d6c7b8a" + "0123456789abcdef" * 3 + "0123"
OTHER = "f" * 64


@pytest.mark.parametrize(
    "text",
    [
        # docker, cgroup v1 (cgroupfs driver)
        f"12:memory:/docker/{CID}\n11:cpu,cpuacct:/docker/{CID}\n1:name=systemd:/docker/{CID}\n",
        # docker, cgroup v2 (systemd driver)
        f"0::/system.slice/docker-{CID}.scope\n",
        # kubernetes + containerd, cgroupfs driver, v1
        f"4:pids:/kubepods/burstable/pod0d0f4a1b-7c6e-4e9f-8a4b-2b3c4d5e6f70/{CID}\n",
        # kubernetes + containerd, systemd driver, v2
        "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0d0f4a1b_7c6e_4e9f.slice/"
        f"cri-containerd-{CID}.scope\n",
        # kubernetes + cri-o
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podabc.slice/crio-{CID}.scope\n",
        f"7:devices:/crio/{CID}\n",
        # podman rootful, rootless and cgroupfs
        f"0::/machine.slice/libpod-{CID}.scope\n",
        f"0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope/container\n",
        f"3:memory:/libpod_parent/libpod-{CID}\n",
        # containerd without kubernetes (nerdctl: namespace/id)
        f"0::/default/{CID}\n",
    ],
)
def test_runtime_forms_give_the_container_id(text: str) -> None:
    assert parse_container_id(text) == CID


@pytest.mark.parametrize(
    "text",
    [
        "0::/\n",
        "0::/user.slice/user-0.slice/session-3.scope\n",
        "0::/system.slice/containerd.service\n",
        "12:memory:/process_api/3542d50bf3c5758fbbd8dc7063a86172\n0::/\n",  # 32 hex: not a container id
        f"0::/machine.slice/libpod-conmon-{CID}.scope\n",  # podman's monitor runs on the host
        "",
        "garbage without colons\n",
    ],
)
def test_host_forms(text: str) -> None:
    assert parse_container_id(text) == HOST_CONTAINER_ID


def test_v2_line_wins_over_v1_and_innermost_component_wins() -> None:
    hybrid = f"5:memory:/docker/{OTHER}\n0::/system.slice/docker-{CID}.scope\n"
    assert parse_container_id(hybrid) == CID
    nested = f"0::/docker/{OTHER}/docker/{CID}\n"
    assert parse_container_id(nested) == CID
    v1_only = f"0::/\n5:memory:/docker/{CID}\n"
    assert parse_container_id(v1_only) == CID
