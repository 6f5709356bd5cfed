"""Kernel: a release string parsed once into (major, minor)."""

from __future__ import annotations

import os

import pytest

from kprobe_exporter import kernel


@pytest.mark.parametrize(("release", "version"), [
    ("6.1.0-56-amd64", (6, 1)), ("6.12.48+deb12-amd64", (6, 12)), ("5.10.0-30-amd64", (5, 10)),
    ("4.19.0", (4, 19)), ("6.18.0-1-amd64", (6, 18)), ("linux", (0, 0)), ("", (0, 0)),
])
def test_version_of_a_release(release: str, version: tuple[int, int]) -> None:
    assert kernel.version(release) == version


def test_the_running_kernel() -> None:
    assert kernel.release() == os.uname().release
    assert kernel.version() == kernel.version(os.uname().release) > (0, 0)
