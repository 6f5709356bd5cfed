#!/usr/bin/env python3
"""Build, or reuse from its cache, the kernel-lab guest: Debian's stock kernel (real kprobes), a Python root.

Two kernels (``--kernel``): ``6.1``, bookworm's own (the default), and ``6.12``, bookworm-backports' (fprobe
events, BTF arguments). Everything lives in one cache directory, ``$KPROBE_LAB_CACHE`` (default
/var/cache/kprobe-exporter-lab); the 6.1 guest is ``guest/``, the 6.12 one ``guest-6.12/``, laid out alike::

    guest/vmlinux         ELF kernel extracted from Debian's bzImage (xz on 6.1, zstd on 6.12); qemu boots
                          it directly (PVH)
    guest/initrd.cpio.gz  busybox initramfs: loads virtio-blk + ext4, mounts the root (vda, read-only)
                          and the per-boot job disk (vdb, read-write) at /job, runs /job/init.sh
    guest/rootfs.ext4     debootstrapped bookworm (minbase + python3), the project's dependencies in
                          /opt/kprobe-lab/site (wheels fetched on the host, installed offline), a static
                          busybox in /opt/kprobe-lab/bin; never the project's own source (guest.py
                          injects that per boot); the kernel's config as /boot/config-RELEASE
    guest/stamp           hash of this file and of the dependency list: the build is reused while it matches

Run it as a script to build ahead of time: ``python3 tests/kernel_lab/build_guest.py [--kernel 6.12] [--force]``.
Needs root and Debian's apt (bookworm); about 1.5-3 minutes from nothing, well under a second when cached.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fcntl
import gzip
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = Path("/var/cache/kprobe-exporter-lab")
REPO_ROOT = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
# Needed in the guest beyond pyproject's [project].dependencies (the OTLP gRPC exporter's runtime).
EXTRA_GUEST_REQUIREMENTS = ("grpcio", "protobuf")
# Modules that the initramfs loads, in order, to mount ext4 on virtio-blk (paths under kernel/, no .ko).
BOOT_MODULES = (
    "crypto/crc32c_generic",
    "lib/crc16",
    "fs/mbcache",
    "fs/jbd2/jbd2",
    "fs/ext4/ext4",
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci",
    "drivers/block/virtio_blk",
)
REQUIRED_KERNEL_CONFIG = ("CONFIG_KPROBES=y", "CONFIG_KPROBE_EVENTS=y", "CONFIG_UPROBE_EVENTS=y")
DEFAULT_KERNEL = "6.1"
# 6.12: bookworm-backports' unsigned image (cloud and rt flavours excluded); virtio and virtio_pci are built in.
BACKPORTS_612 = (
    "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]"
    " http://deb.debian.org/debian bookworm-backports main\n"
)
PACKAGE_612 = re.compile(r"^linux-image-(6\.12\.(\d+)\+deb\d+-amd64)-unsigned$")
BOOT_MODULES_612 = (
    "crypto/crc32c_generic",
    "lib/crc16",
    "fs/mbcache",
    "fs/jbd2/jbd2",
    "fs/ext4/ext4",
    "drivers/block/virtio_blk",
)
REQUIRED_KERNEL_CONFIG_612 = (
    *REQUIRED_KERNEL_CONFIG,
    "CONFIG_FPROBE_EVENTS=y",
    "CONFIG_PROBE_EVENTS_BTF_ARGS=y",
    "CONFIG_DEBUG_INFO_BTF=y",
    "CONFIG_HIST_TRIGGERS=y",
    "CONFIG_SYNTH_EVENTS=y",
)
KERNELS = ("6.1", "6.12")
# Host tools: command -> Debian package that provides it.
RUN_TOOLS = {"qemu-system-x86_64": "qemu-system-x86", "mke2fs": "e2fsprogs", "debugfs": "e2fsprogs"}
BUILD_TOOLS = {"debootstrap": "debootstrap", "cpio": "cpio", "dpkg-deb": "dpkg", "apt-get": "apt", "zstd": "zstd"}

INITRAMFS_INIT = """#!/bin/sh
# /init of the kernel-lab initramfs: load virtio-blk + ext4, mount the cached root (vda, read-only) and
# the per-boot job disk (vdb, read-write) at /job, then hand PID 1 over to /job/init.sh in the root.
export PATH=/bin
fail() { echo "kernel-lab initramfs: $*"; ls /dev; poweroff -f; }
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
for m in MODULES; do insmod /mod/$m.ko || echo "kernel-lab initramfs: insmod $m failed"; done
for i in $(seq 100); do [ -b /dev/vda ] && [ -b /dev/vdb ] && break; sleep 0.05; done
mount -t ext4 -o ro /dev/vda /newroot || fail "cannot mount the root file system /dev/vda"
mount -t ext4 /dev/vdb /newroot/job || fail "cannot mount the job disk /dev/vdb"
[ -f /newroot/job/init.sh ] || fail "the job disk has no init.sh"
umount /proc /sys; mount --move /dev /newroot/dev
exec switch_root /newroot /bin/sh /job/init.sh
"""

ETC_HOSTS = "127.0.0.1\tlocalhost\n127.0.1.1\tkernel-lab\n::1\tlocalhost ip6-localhost ip6-loopback\n"


class LabError(RuntimeError):
    """The guest cannot be built or run; the message says exactly why."""


@dataclass(frozen=True)
class GuestImage:
    """A built guest in the cache: what qemu needs to boot it."""

    directory: Path
    vmlinux: Path
    initrd: Path
    rootfs: Path
    kernel_release: str


def cache_dir() -> Path:
    return Path(os.environ.get("KPROBE_LAB_CACHE") or DEFAULT_CACHE)


def guest_requirements() -> list[str]:
    """The guest's Python requirements: pyproject's runtime dependencies plus the gRPC runtime."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return sorted(set(project.get("dependencies", [])) | set(EXTRA_GUEST_REQUIREMENTS))


def build_key(kernel: str = DEFAULT_KERNEL) -> str:
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update("\n".join(guest_requirements()).encode())
    if kernel != DEFAULT_KERNEL:
        digest.update(kernel.encode())
    return digest.hexdigest()[:16]


def log(message: str) -> None:
    print(f"kernel-lab: {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    """Run cmd; on failure raise LabError naming what failed, with the tail of its output."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
    try:
        done = subprocess.run(
            cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
        )
    except OSError as e:
        raise LabError(f"{what}: cannot run {cmd[0]}: {e}") from e
    out: str = done.stdout + done.stderr
    if done.returncode != 0:
        tail = "\n".join(out.strip().splitlines()[-25:])
        raise LabError(f"{what}: `{' '.join(cmd)}` exited {done.returncode}:\n{tail}")
    return out


def ensure_tools(tools: dict[str, str]) -> None:
    """apt-get install the packages of the missing commands."""
    missing = sorted({pkg for cmd, pkg in tools.items() if shutil.which(cmd) is None})
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise LabError(f"missing host packages {missing} and no apt-get to install them")
    log(f"installing {' '.join(missing)}")
    run(["apt-get", "update", "-qq"], "apt-get update")
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], "installing host packages")
    still = [cmd for cmd in tools if shutil.which(cmd) is None]
    if still:
        raise LabError(f"commands still missing after apt-get install: {still}")


def ensure_static_busybox() -> Path:
    status = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", "busybox-static"], capture_output=True, text=True, check=False
    ).stdout
    if "install ok installed" not in status:
        log("installing busybox-static")
        run(["apt-get", "update", "-qq"], "apt-get update")
        run(["apt-get", "install", "-y", "-qq", "busybox-static"], "installing busybox-static")
    return Path("/bin/busybox")


def extract_vmlinux(bzimage: Path, out: Path) -> None:
    """Write the ELF kernel (the xz or zstd payload of Debian's bzImage) to out, so qemu can PVH-boot it."""
    data = bzimage.read_bytes()
    if (zstd_payload := bzimage_payload(data)).startswith(b"\x28\xb5\x2f\xfd"):
        # The payload ends with the decompressed size (4 bytes, little-endian) after the zstd frame.
        elf = run_bytes(["zstd", "-dc"], zstd_payload[:-4], bzimage.parent)
        if elf[:4] != b"\x7fELF" or len(elf) != int.from_bytes(zstd_payload[-4:], "little"):
            raise LabError(f"{bzimage}: the zstd payload is not an ELF kernel")
        out.write_bytes(elf)
        return
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise LabError(f"{bzimage}: no xz payload (not a Debian x86 bzImage?)")
    elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
    if elf[:4] != b"\x7fELF":
        raise LabError(f"{bzimage}: the xz payload is not an ELF kernel")
    out.write_bytes(elf)


def bzimage_payload(data: bytes) -> bytes:
    """The compressed kernel of a bzImage, located by its setup header (payload_offset, payload_length)."""
    if data[0x202:0x206] != b"HdrS":
        return b""
    setup_sects = data[0x1F1] or 4
    start = (setup_sects + 1) * 512 + int.from_bytes(data[0x248:0x24C], "little")
    return data[start : start + int.from_bytes(data[0x24C:0x250], "little")]


def download_backports_kernel(debs: Path) -> str:
    """apt-get download bookworm-backports' newest 6.12 unsigned image; its package name.

    The suite is added for this download only: a sources list and package lists of its own under debs/,
    so the host's apt configuration and lists are left as they were.
    """
    apt = debs / "apt"
    for d in ("lists/partial", "cache/archives/partial"):
        (apt / d).mkdir(parents=True)
    (apt / "sources.list").write_text(BACKPORTS_612)
    options = [
        f"-oDir::Etc::SourceList={apt / 'sources.list'}", "-oDir::Etc::SourceParts=/nonexistent",
        f"-oDir::State::Lists={apt / 'lists'}", f"-oDir::Cache={apt / 'cache'}", "-oDebug::NoLocking=1",
    ]  # fmt: skip
    run(["apt-get", *options, "update", "-qq"], "apt-get update of bookworm-backports")
    found = run(["apt-cache", *options, "search", "--names-only", "^linux-image-6\\.12\\."], "apt-cache search")
    names = [m for line in found.splitlines() if (m := PACKAGE_612.match(line.split(" - ")[0].strip()))]
    if not names:
        raise LabError(f"bookworm-backports has no linux-image-6.12.*-amd64-unsigned:\n{found}")
    pkg = max(names, key=lambda m: int(m.group(2))).group(0)
    run(["apt-get", *options, "download", pkg], f"downloading the kernel package {pkg}", cwd=debs)
    shutil.rmtree(apt)
    return pkg


def download_kernel(debs: Path) -> str:
    """apt-get download Debian's current kernel package (linux-image-amd64's dependency); its name.

    Stale or missing apt lists (no such package, a version gone from the mirror) get one apt-get update.
    """
    for attempt in (1, 2):
        try:
            depends = run(["apt-cache", "depends", "linux-image-amd64"], "resolving linux-image-amd64")
            pkgs = [w for w in depends.split() if w.startswith("linux-image-") and w != "linux-image-amd64"]
            if not pkgs:
                raise LabError(f"apt-cache depends linux-image-amd64 names no kernel package:\n{depends}")
            run(["apt-get", "download", pkgs[0]], f"downloading the kernel package {pkgs[0]}", cwd=debs)
            return pkgs[0]
        except LabError:
            if attempt == 2:
                raise
            log("refreshing the apt lists (apt-get update)")
            run(["apt-get", "update", "-qq"], "apt-get update")
    raise AssertionError("unreachable")


def fetch_kernel(work: Path, kernel: str = DEFAULT_KERNEL) -> str:
    """Download Debian's kernel package; leave vmlinux, config and the boot modules in work; its release."""
    debs = work / "debs"
    debs.mkdir()
    pkg = download_backports_kernel(debs) if kernel == "6.12" else download_kernel(debs)
    release = pkg.removeprefix("linux-image-").removesuffix("-unsigned")
    deb = next(debs.glob(f"{pkg}_*.deb"))
    # 6.12's modules are xz-compressed (.ko.xz): unpacked here, since busybox's insmod takes plain .ko files.
    suffix = ".ko.xz" if kernel == "6.12" else ".ko"
    wanted = {f"./boot/vmlinuz-{release}", f"./boot/config-{release}"} | {
        f"./lib/modules/{release}/kernel/{m}{suffix}" for m in boot_modules(kernel)
    }
    kdir = work / "kernel"
    kdir.mkdir()
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    src = tar.extractfile(member)
                    assert src is not None
                    data = src.read()
                    name = Path(member.name).name
                    if name.endswith(".ko.xz"):
                        data, name = lzma.decompress(data), name.removesuffix(".xz")
                    (kdir / name).write_bytes(data)
    missing = sorted(w for w in wanted if not (kdir / Path(w).name.removesuffix(".xz")).exists())
    if missing:
        raise LabError(f"{deb.name} lacks {missing}")
    config = (kdir / f"config-{release}").read_text()
    required = REQUIRED_KERNEL_CONFIG_612 if kernel == "6.12" else REQUIRED_KERNEL_CONFIG
    absent = [opt for opt in required if opt not in config.splitlines()]
    if absent:
        raise LabError(f"kernel {release} lacks {absent}")
    extract_vmlinux(kdir / f"vmlinuz-{release}", work / "vmlinux")
    shutil.move(kdir / f"config-{release}", work / "config")
    shutil.rmtree(debs)
    return release


def boot_modules(kernel: str) -> tuple[str, ...]:
    return BOOT_MODULES_612 if kernel == "6.12" else BOOT_MODULES


def guest_dir_name(kernel: str) -> str:
    """The guest's directory in the cache: guest/ for the default kernel (as before), guest-KERNEL/ for others."""
    return "guest" if kernel == DEFAULT_KERNEL else f"guest-{kernel}"


def make_initramfs(work: Path, busybox: Path, kernel: str = DEFAULT_KERNEL) -> None:
    root = work / "initramfs"
    for d in ("bin", "proc", "sys", "dev", "newroot", "mod"):
        (root / d).mkdir(parents=True)
    shutil.copy2(busybox, root / "bin/busybox")
    for applet in ("sh", "mount", "umount", "insmod", "switch_root", "poweroff", "echo", "ls", "seq"):
        (root / "bin" / applet).symlink_to("busybox")
    for m in boot_modules(kernel):
        name = Path(m).name + ".ko"
        shutil.move(work / "kernel" / name, root / "mod" / name)
    init = root / "init"
    init.write_text(INITRAMFS_INIT.replace("MODULES", " ".join(Path(m).name for m in boot_modules(kernel))))
    init.chmod(0o755)
    names = "\n".join(str(p.relative_to(root)) for p in sorted(root.rglob("*"))) + "\n"
    cpio = run_bytes(["cpio", "-o", "-H", "newc", "--quiet"], names.encode(), root)
    (work / "initrd.cpio.gz").write_bytes(gzip.compress(cpio, 9))
    shutil.rmtree(root)
    shutil.rmtree(work / "kernel")


def run_bytes(cmd: list[str], stdin: bytes, cwd: Path) -> bytes:
    done = subprocess.run(cmd, input=stdin, cwd=cwd, capture_output=True, check=False)
    if done.returncode != 0:
        raise LabError(f"`{' '.join(cmd)}` exited {done.returncode}: {done.stderr.decode(errors='replace')}")
    return done.stdout


def debootstrap(work: Path) -> None:
    tree = work / "tree"
    log(f"debootstrap {SUITE} (minbase + python3)")
    with open(work / "debootstrap.log", "w") as out:
        done = subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=python3", SUITE, str(tree)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"},
        )  # fmt: skip
    if done.returncode != 0:
        tail = "\n".join((work / "debootstrap.log").read_text(errors="replace").splitlines()[-25:])
        raise LabError(f"debootstrap exited {done.returncode}:\n{tail}")
    for d in ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "var/lib/apt/lists"):
        shutil.rmtree(tree / d, ignore_errors=True)
    for deb in (tree / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()


def install_deps(work: Path) -> None:
    """pip-install the guest's requirements from cp311 manylinux wheels into work/site, on the host."""
    reqs = guest_requirements()
    log(f"pip install --target for the guest: {' '.join(reqs)}")
    platforms = [arg for p in ("manylinux2014_x86_64", "manylinux_2_28_x86_64") for arg in ("--platform", p)]
    run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-warn-script-location",
         "--target", str(work / "site"), "--only-binary=:all:", *platforms,
         "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", *reqs],
        "installing the guest's Python dependencies",
    )  # fmt: skip
    pip_list = [sys.executable, "-m", "pip", "list", "--format=freeze", "--path", str(work / "site")]
    freeze = run(pip_list, "pip list")
    (work / "site-packages.txt").write_text(freeze)


def make_rootfs(work: Path, busybox: Path) -> None:
    tree = work / "tree"
    lab = tree / "opt/kprobe-lab"
    (lab / "bin").mkdir(parents=True)
    shutil.move(work / "site", lab / "site")
    shutil.copy2(busybox, lab / "bin/busybox")
    for d in ("job", "out"):
        (tree / d).mkdir()
    (tree / "etc/hosts").write_text(ETC_HOSTS)
    (tree / "etc/hostname").write_text("kernel-lab\n")
    used = sum(p.lstat().st_blocks * 512 for p in tree.rglob("*"))
    size_mb = used * 13 // 10 // 2**20 + 64
    log(f"mke2fs rootfs.ext4 ({size_mb} MiB, {used // 2**20} MiB used)")
    run(
        ["mke2fs", "-q", "-t", "ext4", "-O", "^has_journal", "-L", "kprobe-lab-root", "-d", str(tree),
         str(work / "rootfs.ext4"), f"{size_mb}M"],
        "making the root file system image",
    )  # fmt: skip
    remove_tree(tree)


def remove_tree(path: Path) -> None:
    """rm -rf path, first detaching whatever an interrupted debootstrap left mounted under it (proc, dev binds)."""
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f]
    for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    shutil.rmtree(path, ignore_errors=True)


def _image(directory: Path) -> GuestImage:
    return GuestImage(
        directory=directory,
        vmlinux=directory / "vmlinux",
        initrd=directory / "initrd.cpio.gz",
        rootfs=directory / "rootfs.ext4",
        kernel_release=(directory / "kernel-release").read_text().strip()
        if (directory / "kernel-release").exists()
        else "",
    )


def cached_guest(cache: Path, key: str, kernel: str = DEFAULT_KERNEL) -> GuestImage | None:
    guest = cache / guest_dir_name(kernel)
    stamp = guest / "stamp"
    if not stamp.exists() or stamp.read_text().strip() != key:
        return None
    image = _image(guest)
    if not all(p.is_file() for p in (image.vmlinux, image.initrd, image.rootfs)):
        return None
    return image


@contextmanager
def locked(cache: Path) -> Iterator[None]:
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build(cache: Path, key: str, kernel: str = DEFAULT_KERNEL) -> GuestImage:
    """Build a fresh guest in a staging directory and swap it in; the caller holds the lock."""
    if os.geteuid() != 0:
        raise LabError("building the kernel-lab guest needs root (debootstrap, apt-get)")
    started = time.monotonic()
    ensure_tools({**RUN_TOOLS, **BUILD_TOOLS})
    busybox = ensure_static_busybox()
    for stale in cache.glob("build.*"):
        remove_tree(stale)
    work = cache / f"build.{os.getpid()}"
    work.mkdir()
    try:
        # Network-bound steps in parallel: debootstrap, the kernel package, the wheels.
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            boot = pool.submit(debootstrap, work)
            fetched = pool.submit(fetch_kernel, work, kernel)
            deps = pool.submit(install_deps, work)
            release = fetched.result()
            log(f"kernel {release}: vmlinux extracted ({time.monotonic() - started:.0f} s)")
            make_initramfs(work, busybox, kernel)
            deps.result()
            boot.result()
        (work / "tree/boot").mkdir(exist_ok=True)
        shutil.copy2(work / "config", work / f"tree/boot/config-{release}")
        make_rootfs(work, busybox)
    except BaseException:
        remove_tree(work)
        raise
    (work / "kernel-release").write_text(release + "\n")
    (work / "stamp").write_text(key + "\n")
    old = cache / guest_dir_name(kernel)
    if old.exists():
        shutil.rmtree(old)
    work.rename(old)
    log(f"guest built in {time.monotonic() - started:.0f} s into {old}")
    return _image(old)


def ensure_guest(cache: Path | None = None, force: bool = False, kernel: str = DEFAULT_KERNEL) -> GuestImage:
    """The cached guest of `kernel` if its stamp matches this build, else a fresh build (needs root and apt)."""
    if kernel not in KERNELS:
        raise LabError(f"unknown lab kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
    cache = cache or cache_dir()
    key = build_key(kernel)
    if not force and (image := cached_guest(cache, key, kernel)) is not None:
        ensure_tools(RUN_TOOLS)
        return image
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LabError(f"cannot create the kernel-lab cache {cache}: {e}") from e
    with locked(cache):
        if not force and (image := cached_guest(cache, key, kernel)) is not None:
            return image
        return build(cache, key, kernel)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache is valid")
    parser.add_argument("--cache", type=Path, default=None, help=f"cache directory (default {DEFAULT_CACHE})")
    parser.add_argument("--kernel", choices=KERNELS, default=DEFAULT_KERNEL, help="Debian kernel (default 6.1)")
    args = parser.parse_args()
    started = time.monotonic()
    try:
        image = ensure_guest(args.cache, force=args.force, kernel=args.kernel)
    except LabError as e:
        print(f"kernel-lab: {e}", file=sys.stderr)
        return 1
    took = time.monotonic() - started
    print(f"kernel-lab guest ready in {took:.2f} s: {image.directory} ({image.kernel_release})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
