#!/usr/bin/env bash
# Installs the Debian packages Sysgram needs, only those missing. Run as root.
set -euo pipefail
need=()
for pkg in bpfcc-tools python3-bpfcc python3-seccomp python3-venv linux-headers-cloud-amd64 \
           gcc libc6-dev gcc-multilib; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
# Headers for the running kernel when Debian has them; otherwise the cloud headers above are merged
# into a tree under the cache directory at load time (agent/capture/_headers.py).
release=$(uname -r)
if ! dpkg-query -W -f='${Status}' "linux-headers-$release" 2>/dev/null | grep -q "install ok installed"; then
    if apt-cache show "linux-headers-$release" >/dev/null 2>&1; then need+=("linux-headers-$release"); fi
fi
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi
# tracefs, where tracepoints live
if ! mountpoint -q /sys/kernel/tracing 2>/dev/null; then
    mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || echo "warning: could not mount tracefs" >&2
fi
