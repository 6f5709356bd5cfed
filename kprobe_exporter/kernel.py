"""Kernel: the running kernel's release, parsed once into the version the kind table and checks compare."""

from __future__ import annotations

import functools
import os
import re


def version(release: str | None = None) -> tuple[int, int]:
    """(major, minor) of a release string like '6.1.0-56-amd64' (the running kernel's by default); (0, 0)
    when it has no such shape."""
    if release is None:
        return _running()
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


@functools.cache
def _running() -> tuple[int, int]:
    return version(os.uname().release)


def release() -> str:
    return os.uname().release
