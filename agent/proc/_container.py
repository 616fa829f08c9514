"""Container id from /proc/PID/cgroup, for the runtimes a host agent meets.

The forms (cgroup v1 ``N:controllers:/path`` lines and the v2 ``0::/path`` line) all end in a path
component that carries the runtime's 64-hex container id:

* docker            ``/docker/<id>``, ``/system.slice/docker-<id>.scope``
* containerd / k8s  ``/kubepods/burstable/pod<uid>/<id>``,
                    ``/kubepods.slice/.../cri-containerd-<id>.scope``, ``/default/<id>`` (nerdctl)
* cri-o             ``/kubepods.slice/.../crio-<id>.scope``, ``/crio/<id>``
* podman            ``/machine.slice/libpod-<id>.scope``, ``/libpod_parent/libpod-<id>``,
                    rootless ``/user.slice/.../libpod-<id>.scope``

Podman's ``libpod-conmon-<id>.scope`` holds the monitor that runs on the host, not the container.
"""

from __future__ import annotations

import re

from agent.proc.info import HOST_CONTAINER_ID

# A component that is the id itself, or a runtime prefix, the id and an optional systemd suffix.
_ID_COMPONENT = re.compile(r"^(?:[a-z][a-z0-9_-]*-)?([0-9a-f]{64})(?:\.scope)?$")


def _id_in_path(path: str) -> str | None:
    # The innermost component wins: nested containers (docker in docker) report the inner one.
    for component in reversed(path.split("/")):
        if "conmon" in component:
            return None
        match = _ID_COMPONENT.match(component)
        if match:
            return match.group(1)
    return None


def parse_container_id(cgroup_text: str) -> str:
    """The 64-hex container id a /proc/PID/cgroup text names, or ``"host"``.

    The v2 line (``0::``) is preferred; v1 controller lines are the fallback (hybrid hosts keep the
    container path only in v1 hierarchies).
    """
    v1_found: str | None = None
    for line in cgroup_text.splitlines():
        hierarchy, sep, rest = line.partition(":")
        if not sep:
            continue
        _controllers, sep, path = rest.partition(":")
        if not sep:
            continue
        found = _id_in_path(path.strip())
        if found is None:
            continue
        if hierarchy == "0" and _controllers == "":
            return found
        if v1_found is None:
            v1_found = found
    return v1_found if v1_found is not None else HOST_CONTAINER_ID
