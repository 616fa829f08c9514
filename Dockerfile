# Sysgram agent image. Run (privileged, host PID namespace, tracefs and bpffs from the host):
#   docker run --rm --privileged --pid=host \
#     -v /sys/kernel/tracing:/sys/kernel/tracing -v /sys/fs/bpf:/sys/fs/bpf \
#     -v /usr/src:/usr/src:ro -v /lib/modules:/lib/modules:ro \
#     -v /var/lib/sysgram:/var/lib/sysgram sysgram run --alerts-jsonl /var/lib/sysgram/alerts.jsonl
FROM debian:12-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      bpfcc-tools python3-bpfcc python3-seccomp python3-venv python3-pip linux-headers-cloud-amd64 gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/sysgram
COPY pyproject.toml README.md ./
COPY agent ./agent
COPY training ./training
COPY bpf ./bpf
COPY models ./models
COPY rules ./rules
# The runtime needs no torch: only the base dependencies.
RUN python3 -m venv --system-site-packages /opt/sysgram/.venv \
 && /opt/sysgram/.venv/bin/pip install --no-cache-dir -e . \
 && ln -s /opt/sysgram/.venv/bin/sysgram /usr/local/bin/sysgram
ENV SYSGRAM_CACHE_DIR=/var/cache/sysgram
VOLUME ["/var/lib/sysgram"]
ENTRYPOINT ["sysgram"]
CMD ["run", "--alerts-jsonl", "/var/lib/sysgram/alerts.jsonl"]
