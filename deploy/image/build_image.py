#!/usr/bin/env python3
"""Build kprobe-exporter's image with no registry: a Python base from Debian packages, then the Containerfile.

    python3 deploy/image/build_image.py [--tag localhost/kprobe-exporter:VERSION] [--rebuild-base]

The base is debootstrapped Debian (minbase + python3 + python3-venv), cached as a tarball in
``$KPROBE_IMAGE_CACHE`` (default /var/cache/kprobe-exporter-image) under a key of its inputs
(suite, mirror, packages, trimmed paths), and imported as ``localhost/kpe-base:SUITE-KEY``; the
image is then ``buildah bud --layers`` with ``--build-arg BASE=`` that name. It prints each command
it runs. Needs root, debootstrap, podman and buildah (Debian packages).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = Path("/var/cache/kprobe-exporter-image")
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("python3", "python3-venv")
# Nothing at run time reads these; they are a third of a minbase tree.
TRIMMED = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "var/lib/apt/lists",
           "var/cache/apt/archives", "var/cache/apt/pkgcache.bin", "var/cache/apt/srcpkgcache.bin", "var/log")
BASE_REPOSITORY = "localhost/kpe-base"
IMAGE_REPOSITORY = "localhost/kprobe-exporter"


def log(message: str) -> None:
    print(f"build_image: {message}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    log("$ " + " ".join(cmd))
    done = subprocess.run(cmd, text=True, capture_output=True, check=False, **kw)  # type: ignore[call-overload]
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        raise SystemExit(f"build_image: `{' '.join(cmd)}` exited {done.returncode}:\n{tail}")
    return done  # type: ignore[no-any-return]


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def project_version() -> str:
    return str(pyproject()["project"]["version"])


def default_tag() -> str:
    """The name deploy/kubernetes/daemonset.yaml runs."""
    return f"{IMAGE_REPOSITORY}:{project_version()}"


def cache_dir() -> Path:
    return Path(os.environ.get("KPROBE_IMAGE_CACHE") or DEFAULT_CACHE)


def base_key() -> str:
    inputs = {"suite": SUITE, "mirror": MIRROR, "packages": PACKAGES, "trimmed": TRIMMED, "variant": "minbase"}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]


def base_name() -> str:
    return f"{BASE_REPOSITORY}:{SUITE}-{base_key()}"


def image_exists(name: str) -> bool:
    return subprocess.run(["podman", "image", "exists", name], capture_output=True, check=False).returncode == 0


def debootstrap_tarball(tarball: Path) -> None:
    """Debootstrap the base tree, trim it and pack it as tarball (written whole, then renamed)."""
    work = tarball.parent / f"work-{base_key()}"
    shutil.rmtree(work, ignore_errors=True)
    tree = work / "tree"
    run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(tree), MIRROR],
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"})
    for rel in TRIMMED:
        path = tree / rel
        if path.is_dir():
            shutil.rmtree(path)
            path.mkdir()
        elif path.exists():
            path.unlink()
    partial = tarball.with_suffix(".partial")
    run(["tar", "--numeric-owner", "--xattrs", "-C", str(tree), "-cf", str(partial), "."])
    partial.rename(tarball)
    shutil.rmtree(work)


def ensure_base(rebuild: bool = False) -> str:
    """The base image's name, importing it from the cached tarball or debootstrapping it first."""
    name = base_name()
    if image_exists(name) and not rebuild:
        log(f"base {name}: present")
        return name
    tarball = cache_dir() / f"base-{SUITE}-{base_key()}.tar"
    if rebuild or not tarball.exists():
        debootstrap_tarball(tarball)
    run(["podman", "import", "--change", 'CMD=["python3"]', "--change", f"LABEL=kpe.base.key={base_key()}",
         str(tarball), name])
    return name


def git_revision() -> str:
    done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def build_command(base: str, tag: str) -> list[str]:
    """buildah bud of the Containerfile on base.

    --isolation chroot: RUN steps need no OCI runtime; --force-rm: a failed step leaves no working
    container behind. The host's CA certificates are lent to RUN
    steps (Debian's pip trusts /etc/ssl/certs), so that pip reaches PyPI through a TLS-intercepting
    proxy too; a --volume is never committed to the image.
    """
    certs = ["--volume", "/etc/ssl/certs:/etc/ssl/certs:ro"] if Path("/etc/ssl/certs").is_dir() else []
    return ["buildah", "bud", "--layers", "--force-rm", "--format", "docker", "--isolation", "chroot", *certs,
            "--build-arg", f"BASE={base}", "--build-arg", f"VERSION={project_version()}",
            "--label", f"org.opencontainers.image.version={project_version()}",
            "--label", f"org.opencontainers.image.revision={git_revision()}",
            "--tag", tag, "--file", str(REPO / "Containerfile"), str(REPO)]  # fmt: skip


def build(tag: str, rebuild_base: bool = False) -> str:
    """The base, then the image; one build at a time on this machine (they share the cache and the tags)."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        base = ensure_base(rebuild_base)
        run(build_command(base, tag))
    return tag


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tag", default=default_tag())
    p.add_argument("--rebuild-base", action="store_true", help="debootstrap the base again even if cached")
    args = p.parse_args(argv)
    start = time.monotonic()
    build(args.tag, args.rebuild_base)
    log(f"built {args.tag} in {time.monotonic() - start:.0f} s")
    print(args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
