#!/usr/bin/env bash
# Installs Debian's libvirt 9.0 without systemd and starts virtlogd and libvirtd by hand, for
# server/tests/libvirt.rs. libvirt-daemon-system would pull systemd, so only its config files and
# its libvirt-qemu user are taken from the .deb (unpacked with dpkg-deb, not installed).
#
#   setup.sh install    packages, config, user and directories (idempotent)
#   setup.sh start      starts virtlogd and libvirtd unless they run (libvirtd reads hooks only
#                       when it starts); waits until `virsh version` answers
#   setup.sh stop       stops libvirtd (SIGTERM, waits for it to exit); virtlogd keeps running
set -euo pipefail

[ "$(id -u)" = 0 ] || { echo "setup.sh: needs root (installs packages, starts libvirtd)" >&2; exit 1; }

pid_of() { # a running daemon's pid from its pid file, or nothing
  local f=$1
  [ -s "$f" ] || return 0
  local p
  p=$(cat "$f")
  if [ -d "/proc/$p" ] && grep -q "$2" "/proc/$p/comm" 2>/dev/null; then echo "$p"; fi
}

wait_for() { # wait_for WHAT SECONDS COMMAND...: polls every 0.2 s, fails naming WHAT
  local what=$1 secs=$2
  shift 2
  local tries=$((secs * 5))
  until "$@" >/dev/null 2>&1; do
    tries=$((tries - 1))
    if [ $tries -le 0 ]; then
      echo "setup.sh: $what did not happen within ${secs} s" >&2
      return 1
    fi
    sleep 0.2
  done
}

install() {
  if ! command -v libvirtd >/dev/null || ! command -v virsh >/dev/null || ! command -v virtlogd >/dev/null; then
    echo "== installing libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients (no recommends)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 >/dev/null
  fi
  if [ ! -e /etc/libvirt/qemu.conf ] || [ ! -e /etc/libvirt/libvirtd.conf ]; then
    echo "== config files from libvirt-daemon-system (unpacked, not installed)"
    local tmp
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download -qq libvirt-daemon-system)
    dpkg-deb -x "$tmp"/libvirt-daemon-system_*.deb "$tmp/x"
    mkdir -p /etc/libvirt
    cp -n "$tmp"/x/etc/libvirt/*.conf /etc/libvirt/
    rm -rf "$tmp"
  fi
  # The user and groups libvirt-daemon-system's postinst makes.
  getent group libvirt >/dev/null || addgroup --quiet --system libvirt
  getent group kvm >/dev/null || addgroup --quiet --system kvm
  if ! getent passwd libvirt-qemu >/dev/null; then
    adduser --quiet --system --ingroup kvm --disabled-login --disabled-password \
      --home /var/lib/libvirt --no-create-home --gecos "Libvirt Qemu" libvirt-qemu
  fi
  if ! getent group libvirt-qemu >/dev/null; then
    addgroup --quiet --system libvirt-qemu
    adduser --quiet libvirt-qemu libvirt-qemu
  fi
  mkdir -p /var/lib/libvirt/qemu /var/lib/libvirt/images /var/log/libvirt/qemu /var/cache/libvirt/qemu \
    /etc/libvirt/hooks /run/libvirt
  chown libvirt-qemu:libvirt-qemu /var/lib/libvirt/qemu
  chmod 0750 /var/lib/libvirt/qemu
  # What Debian's udev rule does: the kvm group may use /dev/kvm. Without it libvirt cannot
  # cache QEMU's capabilities and probes QEMU again at every domain start (40 s under load).
  if [ -e /dev/kvm ]; then
    chgrp kvm /dev/kvm
    chmod 0660 /dev/kvm
  fi
}

start() {
  if [ -z "$(pid_of /run/virtlogd.pid virtlogd)" ]; then
    virtlogd -d
    wait_for "virtlogd's socket" 30 test -S /run/libvirt/virtlogd-sock
  fi
  if [ -z "$(pid_of /run/libvirtd.pid libvirtd)" ]; then
    libvirtd -d
  fi
  wait_for "libvirtd answering virsh" 120 virsh -c qemu:///system version
}

stop() {
  local p
  p=$(pid_of /run/libvirtd.pid libvirtd)
  [ -n "$p" ] || return 0
  kill -TERM "$p"
  wait_for "libvirtd (pid $p) exiting" 60 sh -c "! test -d /proc/$p"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: setup.sh install|start|stop" >&2; exit 2 ;;
esac
