#!/bin/sh
# Installs everything the test suite needs on a fresh Debian machine, as root.
set -eu
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    gcc libc6-dev prometheus systemd util-linux curl strace \
    qemu-system-x86 busybox-static cpio kmod debootstrap e2fsprogs \
    buildah podman runc >/dev/null
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing
