"""Shared fixtures: tracefs, the probed C programs (built with gcc), configs in tmp dirs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
TRACEFS = Path("/sys/kernel/tracing")


def need_root() -> None:
    if os.geteuid() != 0:
        msg = "needs root and the real kernel's tracefs"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="session")
def tracefs() -> Path:
    need_root()
    if not (TRACEFS / "instances").exists():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], check=True)
    return TRACEFS


@pytest.fixture(scope="session")
def progs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """fxgen built four ways: PIE, non-PIE, stripped, and with its functions in a shared library."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the probed test program")
    d = tmp_path_factory.mktemp("progs")
    src = HERE / "progs" / "fxgen.c"
    out = {"pie": d / "fxgen", "nopie": d / "fxgen-nopie", "stripped": d / "fxgen-stripped"}
    subprocess.run(["gcc", "-O1", "-pthread", "-fPIE", "-pie", "-o", str(out["pie"]), str(src)], check=True)
    subprocess.run(["gcc", "-O1", "-pthread", "-fno-pie", "-no-pie", "-o", str(out["nopie"]), str(src)], check=True)
    subprocess.run(["gcc", "-O1", "-pthread", "-s", "-o", str(out["stripped"]), str(src)], check=True)
    lib = d / "libfx.so"
    subprocess.run(
        ["gcc", "-O1", "-pthread", "-shared", "-fPIC", "-Dmain=fx_unused_main", "-o", str(lib), str(src)], check=True
    )
    out["lib"] = lib
    driver = d / "driver.c"
    driver.write_text("int fx_unused_main(int, char **);\nint main(int c, char **v) { return fx_unused_main(c, v); }\n")
    out["libdriver"] = d / "fxgen-lib"
    subprocess.run(["gcc", "-o", str(out["libdriver"]), str(driver), f"-L{d}", "-lfx", f"-Wl,-rpath,{d}"], check=True)
    return out


@pytest.fixture
def write_config(tmp_path: Path):  # type: ignore[no-untyped-def]
    def write(text: str, name: str = "config.yaml") -> Path:
        p = tmp_path / name
        p.write_text(text)
        return p

    return write


# Tiers are directories; each directory's tests carry its marker, so `-m unit`, `-m root`,
# `-m kernel_lab` and `-m deploy` select a tier without a mark in every file.
TIER_MARKERS = {"unit": "unit", "live": "root", "lab": "kernel_lab", "deploy": "deploy"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(str(item.fspath)).resolve().parent.name
        marker = TIER_MARKERS.get(tier)
        if marker is not None:
            item.add_marker(marker)
