"""The wheel and the sdist, built with `python -m build` (the wheel from the sdist) and checked by `twine check`.

The wheel must carry the embedded default configs (package data) and every deployment file the
README documents (data files under PREFIX/share/kprobe-exporter/), byte for byte as in this checkout;
the sdist must be enough to build the wheel and the image again.
"""

from __future__ import annotations

import email.parser
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
VERSION = PROJECT["version"]
DATA = f"kprobe_exporter-{VERSION}.data/data/share/kprobe-exporter"
# Where each deployment file lands in the wheel: the README's "Running in production" names them all.
SHIPPED = {
    "systemd/kprobe-exporter.service": "systemd/kprobe-exporter.service",
    "systemd/kprobe-exporter.default": "systemd/kprobe-exporter.default",
    "systemd/config.yaml": "systemd/config.yaml",
    "alerts/kprobe-exporter.rules.yml": "alerts/kprobe-exporter.rules.yml",
    "alerts/kprobe-exporter.rules.test.yml": "alerts/kprobe-exporter.rules.test.yml",
    "grafana/dashboards/kprobe-exporter.json": "grafana/dashboards/kprobe-exporter.json",
    "grafana/provisioning/dashboards/kprobe-exporter.yaml": "grafana/provisioning/dashboards/kprobe-exporter.yaml",
    "grafana/provisioning/datasources/kprobe-exporter.yaml": "grafana/provisioning/datasources/kprobe-exporter.yaml",
    **{f"deploy/kubernetes/{p.name}": f"kubernetes/{p.name}" for p in sorted((ROOT / "deploy/kubernetes").glob("*"))},
}


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("build")
    if shutil.which("twine") is None:
        pytest.fail("twine is needed (pip install -e '.[test]')")
    out = tmp_path_factory.mktemp("dist")
    # a copy of the checkout without build leftovers (egg-info, build/) that could leak into the sdist
    src = out / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "*.egg-info", "build", "dist", "__pycache__",
                                                               ".*_cache", ".hypothesis", ".benchmarks"))
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(out / "dist"), str(src)], check=True,
                   capture_output=True, timeout=600)
    [wheel] = (out / "dist").glob("*.whl")
    [sdist] = (out / "dist").glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def test_twine_check_passes(dist: dict[str, Path]) -> None:
    done = subprocess.run(["twine", "check", "--strict", str(dist["wheel"]), str(dist["sdist"])],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("PASSED") == 2


def test_wheel_carries_the_package_and_its_files(dist: dict[str, Path]) -> None:
    assert dist["wheel"].name == f"kprobe_exporter-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(dist["wheel"]) as whl:
        names = set(whl.namelist())
        modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "kprobe_exporter").rglob("*.py")}  # raw/ too
        assert modules <= names
        for config in ("default-kprobes.yaml", "default-tracepoints.yaml"):
            assert whl.read(f"kprobe_exporter/{config}") == (ROOT / "kprobe_exporter" / config).read_bytes()
        for repo_path, shipped in SHIPPED.items():
            assert whl.read(f"{DATA}/{shipped}") == (ROOT / repo_path).read_bytes(), repo_path
        # nothing else: no tests, no caches, no stray files
        data = {n for n in names if ".data/" in n}
        assert data == {f"{DATA}/{s}" for s in SHIPPED.values()}
        stray = {n for n in names - modules - data if not n.startswith(f"kprobe_exporter-{VERSION}.dist-info/")}
        assert stray == {"kprobe_exporter/default-kprobes.yaml", "kprobe_exporter/default-tracepoints.yaml"}
        meta = email.parser.Parser().parsestr(whl.read(f"kprobe_exporter-{VERSION}.dist-info/METADATA").decode())
        entry_points = whl.read(f"kprobe_exporter-{VERSION}.dist-info/entry_points.txt").decode()
    assert meta["Name"] == "kprobe-exporter" and meta["Version"] == VERSION
    assert meta["License-Expression"] == PROJECT["license"]
    assert meta["Requires-Python"] == PROJECT["requires-python"]
    required = {r for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r}
    assert required == set(PROJECT["dependencies"])
    assert "kprobe-exporter = kprobe_exporter.cli:main" in entry_points


def test_sdist_builds_the_wheel_and_the_image(dist: dict[str, Path]) -> None:
    """`python -m build` made the wheel from the sdist; the sdist also has what the image build copies."""
    with tarfile.open(dist["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = {"pyproject.toml", "README.md", "Containerfile", ".containerignore", "deploy/image/build_image.py",
              *SHIPPED, *(f"kprobe_exporter/{p.name}" for p in (ROOT / "kprobe_exporter").iterdir() if p.is_file())}
    assert needed <= names, needed - names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
