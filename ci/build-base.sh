#!/usr/bin/env bash
# Make the base image ($BASE_IMG, default pyworker/base:bookworm-slim) with no container registry:
#   1. present in the local engine  -> nothing to do
#   2. saved in $PYWORKER_CACHE/base -> docker load (seconds)
#   3. otherwise debootstrap a minimal Debian from Debian's mirror, slim it like debian:*-slim,
#      docker import it, and save it to the cache.
# FORCE=1 rebuilds from the mirror. Needs root, debootstrap and a running engine.
# Mirror URLs come from the host's apt sources (override: DEB_MIRROR, DEB_SECURITY, DEB_SUITE).
set -euo pipefail
LOG_TAG=base
# shellcheck source=ci/lib-image.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib-image.sh"

DEB_SUITE=${DEB_SUITE:-bookworm}
FORCE=${FORCE:-0}
ROOTFS=""

cleanup() {
  if [[ -n $ROOTFS && -d $ROOTFS ]]; then rm -rf --one-file-system "$ROOTFS" "$ROOTFS.log"; fi
}
trap cleanup EXIT

mirror_urls() {
  local src=/etc/apt/sources.list.d/debian.sources
  if [[ -z ${DEB_MIRROR:-} && -f $src ]]; then
    DEB_MIRROR=$(awk '/^URIs:/{print $2; exit}' "$src")
    DEB_SECURITY=${DEB_SECURITY:-$(awk '/^URIs:/{if (++n == 2) {print $2; exit}}' "$src")}
  fi
  DEB_MIRROR=${DEB_MIRROR:-http://deb.debian.org/debian}
  DEB_SECURITY=${DEB_SECURITY:-http://deb.debian.org/debian-security}
}

slim_config() { # dpkg/apt settings of the official debian:*-slim images (debuerreotype)
  local r=$1
  cat >"$r/etc/dpkg/dpkg.cfg.d/docker-slim" <<'CFG'
# no documentation, manuals or translations in the image (copyright files stay)
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/info/*
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
CFG
  printf 'force-unsafe-io\n' >"$r/etc/dpkg/dpkg.cfg.d/docker-apt-speedup"
  cat >"$r/etc/apt/apt.conf.d/docker-clean" <<'CFG'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CFG
  cat >"$r/etc/apt/apt.conf.d/docker-slim" <<'CFG'
Acquire::Languages "none";
APT::Install-Recommends "false";
APT::Install-Suggests "false";
APT::AutoRemove::SuggestsImportant "false";
CFG
  # Daemons never start during image builds (redis-server's postinst would try).
  printf '#!/bin/sh\nexit 101\n' >"$r/usr/sbin/policy-rc.d"
  chmod 0755 "$r/usr/sbin/policy-rc.d"
  rm -f "$r/etc/apt/sources.list"
  cat >"$r/etc/apt/sources.list.d/debian.sources" <<CFG
Types: deb
URIs: $DEB_MIRROR
Suites: $DEB_SUITE $DEB_SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $DEB_SECURITY
Suites: $DEB_SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
CFG
}

slim_files() { # drop what the excludes would have kept out, caches, logs and the host's own files
  local r=$1
  find "$r/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  find "$r/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$r"/usr/share/{info,man,groff,linda,lintian,locale}/*
  rm -rf "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/* "$r"/var/cache/debconf/*-old \
    "$r"/var/lib/dpkg/*-old "$r"/tmp/* "$r"/var/tmp/* "$r"/root/.bash_history
  find "$r/var/log" -type f -delete
  # debootstrap copies these from the build machine; the engine provides them at run time.
  rm -f "$r/etc/resolv.conf" "$r/etc/hostname"
  printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$r/etc/hosts"
  : >"$r/etc/machine-id"
}

build_from_mirror() {
  command -v debootstrap >/dev/null || die "debootstrap missing: run 'bash ci/setup-image.sh'"
  [[ $(id -u) == 0 ]] || die "debootstrap needs root"
  mirror_urls
  ROOTFS=$(mktemp -d "${TMPDIR:-/tmp}/pyworker-rootfs.XXXXXX")
  chmod 0755 "$ROOTFS" # a 0700 root breaks apt's _apt download sandbox
  local t=$SECONDS
  log "debootstrap --variant=minbase $DEB_SUITE from $DEB_MIRROR (about 30 s)"
  debootstrap --variant=minbase "$DEB_SUITE" "$ROOTFS" "$DEB_MIRROR" >"$ROOTFS.log" 2>&1 \
    || { tail -n 30 "$ROOTFS.log" >&2; die "debootstrap failed (log above)"; }
  rm -f "$ROOTFS.log"
  slim_config "$ROOTFS"
  log "apt-get upgrade from $DEB_SUITE-updates and $DEB_SUITE-security"
  # The chroot needs name resolution for the upgrade; resolv.conf is removed again below.
  cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
  chroot "$ROOTFS" sh -ec 'export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get -y -qq -o Dpkg::Use-Pty=0 upgrade && apt-get clean' \
    >"$ROOTFS.log" 2>&1 || { tail -n 30 "$ROOTFS.log" >&2; die "apt-get upgrade in the chroot failed"; }
  rm -f "$ROOTFS.log"
  slim_files "$ROOTFS"
  log "docker import -> $BASE_IMG"
  tar --numeric-owner --xattrs --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
    -C "$ROOTFS" -c . \
    | docker import \
      --change 'ENV LANG=C.UTF-8' \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'CMD ["bash"]' \
      --message "debootstrap --variant=minbase $DEB_SUITE, slimmed (pyworker ci/build-base.sh)" \
      - "$BASE_IMG" >/dev/null
  log "base built from the mirror in $(elapsed "$t"): $(chroot "$ROOTFS" dpkg-query -f '.\n' -W | wc -l) packages"
}

main() {
  need_docker
  local arch cache_tar
  arch=$(docker_arch)
  mkdir -p "$PYWORKER_CACHE/base"
  cache_tar="$PYWORKER_CACHE/base/$(tr '/:' '__' <<<"$BASE_IMG")-$arch.tar"
  if [[ $FORCE != 1 ]]; then
    if image_exists "$BASE_IMG"; then
      log "$BASE_IMG present ($(image_id "$BASE_IMG" | cut -c8-19))"
      return 0
    fi
    if [[ -s $cache_tar ]]; then
      log "loading $BASE_IMG from $cache_tar"
      docker load -q -i "$cache_tar" >/dev/null && image_exists "$BASE_IMG" && return 0
      log "cached tar unusable; rebuilding from the mirror"
    fi
  fi
  build_from_mirror
  docker save "$BASE_IMG" -o "$cache_tar.tmp" && mv "$cache_tar.tmp" "$cache_tar"
  log "saved to $cache_tar ($(du -h "$cache_tar" | cut -f1))"
}

main "$@"
