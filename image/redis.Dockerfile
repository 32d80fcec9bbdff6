# A small Redis for offline tests and the chart, from Debian's redis-server (no registry needed).
# Build it with `make image-redis`. Runs as numeric uid 999 with tini as PID 1; /data holds the
# dump and can be a volume (then the root filesystem can be read-only).
ARG BASE=debian:bookworm-slim
FROM ${BASE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
LABEL org.opencontainers.image.title="pyworker-redis" \
      org.opencontainers.image.description="redis-server from Debian for pyworker" \
      org.opencontainers.image.licenses="BSD-3-Clause"
# The redis user/group exist with uid/gid 999 before the package is installed, so its postinst
# reuses them and USER below can be numeric (runAsNonRoot can verify a number, not a name).
# redis-server brings redis-tools (redis-cli); tini is PID 1.
RUN groupadd --system --gid 999 redis \
 && useradd --system --uid 999 --gid redis --home-dir /var/lib/redis --no-create-home \
      --shell /usr/sbin/nologin redis \
 && apt-get update -q \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server tini \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log \
 && install -d -o 999 -g 999 -m 0750 /data
ENV LANG=C.UTF-8
USER 999:999
WORKDIR /data
EXPOSE 6379
ENTRYPOINT ["/usr/bin/tini", "--", "redis-server"]
# Arguments go to redis-server, e.g. `docker run IMG --bind 0.0.0.0 --requirepass "$PW"`.
# Defaults: listen on all interfaces (inside the pod/container network) and keep the dump in /data.
CMD ["--bind", "0.0.0.0", "--dir", "/data"]
