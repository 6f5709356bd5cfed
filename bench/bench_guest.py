#!/usr/bin/env python3
"""The benchmarks' kernel-lab guest: the lab's guest plus extra Debian packages (bpftrace), in its own directory.

    python3 bench/bench_guest.py [--kernel 6.1|6.12] [--extra bpftrace] [--force]

Lives beside the lab's guests in the same cache ($KPROBE_LAB_CACHE, default /var/cache/kprobe-exporter-lab)
as ``guest-KERNEL-bench/``, with a key of its own (the lab guest's key, the kernel and the extra packages),
so building it never invalidates the guests the tests boot, and editing this file rebuilds nothing. The
kernel (vmlinux, initrd, config) is copied from the lab's guest of the same kernel (built first if needed);
only the root file system is made again, by debootstrap with the extra packages included.
Used by the lab benchmarks (lab_kernel_agg.py); the tests never boot it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from kernel_lab import build_guest as bg  # noqa: E402
from kernel_lab import guest as lab  # noqa: E402

DEFAULT_EXTRA = ("bpftrace",)


def bench_key(kernel: str, extra: tuple[str, ...]) -> str:
    digest = hashlib.sha256(bg.build_key(kernel).encode())
    digest.update(f"{kernel}\n{','.join(sorted(extra))}".encode())
    return digest.hexdigest()[:16]


def bench_dir(cache: Path, kernel: str) -> Path:
    return cache / f"guest-{kernel}-bench"


def debootstrap(work: Path, extra: tuple[str, ...]) -> None:
    """build_guest.debootstrap with more packages (debootstrap resolves their dependencies)."""
    tree = work / "tree"
    include = ",".join(("python3", *extra))
    bg.log(f"debootstrap {bg.SUITE} (minbase + {include})")
    with open(work / "debootstrap.log", "w") as out:
        done = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={include}", bg.SUITE, str(tree)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"},
        )  # fmt: skip
    if done.returncode != 0:
        tail = "\n".join((work / "debootstrap.log").read_text(errors="replace").splitlines()[-25:])
        raise bg.LabError(f"debootstrap exited {done.returncode}:\n{tail}")
    for d in ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "var/lib/apt/lists"):
        shutil.rmtree(tree / d, ignore_errors=True)
    for deb in (tree / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()


def build(cache: Path, kernel: str, extra: tuple[str, ...], key: str) -> bg.GuestImage:
    base = bg.ensure_guest(cache, kernel=kernel)
    started = time.monotonic()
    bg.ensure_tools(bg.BUILD_TOOLS)
    busybox = bg.ensure_static_busybox()
    work = cache / f"build-bench.{os.getpid()}"
    bg.remove_tree(work)
    work.mkdir()
    try:
        debootstrap(work, extra)
        bg.install_deps(work)
        release = base.kernel_release
        (work / "tree/boot").mkdir(exist_ok=True)
        config = next(base.directory.glob("config*"), None)
        if config is not None:
            shutil.copy2(config, work / f"tree/boot/config-{release}")
        bg.make_rootfs(work, busybox)
        for name in ("vmlinux", "initrd.cpio.gz", "kernel-release"):
            if (base.directory / name).exists():
                shutil.copy2(base.directory / name, work / name)
    except BaseException:
        bg.remove_tree(work)
        raise
    (work / "stamp").write_text(key + "\n")
    dest = bench_dir(cache, kernel)
    if dest.exists():
        shutil.rmtree(dest)
    work.rename(dest)
    bg.log(f"bench guest built in {time.monotonic() - started:.0f} s into {dest}")
    return bg._image(dest)


def ensure_bench_guest(kernel: str = bg.DEFAULT_KERNEL, extra: tuple[str, ...] = DEFAULT_EXTRA,
                       force: bool = False) -> bg.GuestImage:
    cache = bg.cache_dir()
    key = bench_key(kernel, extra)
    dest = bench_dir(cache, kernel)
    stamp = dest / "stamp"
    if not force and stamp.exists() and stamp.read_text().strip() == key:
        return bg._image(dest)
    cache.mkdir(parents=True, exist_ok=True)
    with bg.locked(cache):
        if not force and stamp.exists() and stamp.read_text().strip() == key:
            return bg._image(dest)
    # Not under the lock: build() calls ensure_guest, which takes it itself.
    return build(cache, kernel, extra, key)


def run_in_bench_guest(image: bg.GuestImage, script: str, files: dict[str, bytes],
                       timeout: float, package: Path | None = None) -> lab.GuestResult:
    """guest.run_in_guest on the bench image (same job disk, boot and results).

    A bench boot runs for many minutes at full load on a shared host, where the tests' 180 s silence limit
    has killed a guest that was only starved: the bench waits 15 minutes of silence.
    """
    lab.SILENT_LIMIT_S = max(lab.SILENT_LIMIT_S, 900.0)
    script_timeout = max(5, int(timeout - lab.SCRIPT_MARGIN_S))
    with tempfile.TemporaryDirectory(prefix="kprobe-bench-") as tmp_name:
        tmp = Path(tmp_name)
        disk = lab.make_job_disk(tmp, script, files, package or bg.REPO_ROOT / "kprobe_exporter",
                                 script_timeout)
        console, boot_seconds, seconds = lab.boot(image, disk, tmp, timeout)
        returncode, out_files = lab.read_results(disk, tmp / "results")
    if returncode is None:
        raise bg.LabError(f"the guest stopped without the script's exit status; console tail:\n{lab.tail(console)}")
    return lab.GuestResult(console, returncode, out_files, boot_seconds, seconds)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--kernel", choices=bg.KERNELS, default=bg.DEFAULT_KERNEL)
    ap.add_argument("--extra", action="append", help="extra Debian package (repeatable; default bpftrace)")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    try:
        image = ensure_bench_guest(a.kernel, tuple(a.extra or DEFAULT_EXTRA), a.force)
    except bg.LabError as e:
        print(f"bench guest: {e}", file=sys.stderr)
        return 1
    print(f"bench guest ready: {image.directory} ({image.kernel_release})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
