"""The package as a user gets it: the top-level API, and a wheel installed into a fresh venv.

The wheel test builds `lvat` from a copy of the sources (the checkout stays untouched: no build/
or egg-info), installs it with pip into a new venv without touching the network, and runs the
`lvat` console script of that venv. torch and the other dependencies are not reinstalled: a .pth
file puts this environment's site-packages *after* the new venv's own, so `lvat` itself can only
come from the wheel (checked), while torch, numpy, matplotlib, ... come from here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import lvat

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def test_the_top_level_package_exports_the_transformers():
    from lvat.models import VAE, Glow, load_transformer

    assert lvat.VAE is VAE and lvat.Glow is Glow and lvat.load_transformer is load_transformer
    assert {"VAE", "Glow", "load_transformer", "LVAT", "VAT"} <= set(lvat.__all__)
    assert all(hasattr(lvat, name) for name in lvat.__all__)


def _run(cmd: list[str], env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path, dict]:
    """(wheel, venv, env): a wheel built from a copy of the sources, installed into a fresh venv."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src-copy"
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(ROOT / "src", src / "src", ignore=junk)
    for name in ("pyproject.toml", "README.md"):  # README.md: the package's long description
        shutil.copy2(ROOT / name, src / name)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    pip = [sys.executable, "-m", "pip"]
    # No build isolation and no index: the build backend (setuptools) is this venv's, offline.
    _run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(tmp / "dist")], env)  # fmt: skip
    (wheel,) = (tmp / "dist").glob("lvat-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env)
    python = venv / "bin" / "python"
    _run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)], env)  # fmt: skip
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                      "['purelib'])"], env).stdout.strip())  # fmt: skip
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    # Plain path lines: appended to sys.path, and the .pth files there (this checkout's
    # editable `lvat`) are not processed, so they cannot shadow the wheel.
    (site / "zz_lvat_test_dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    env.pop("PYTHONPATH", None)
    return wheel, venv, env


@pytest.mark.slow
def test_the_wheel_holds_the_package_its_script_and_dependencies(installed):
    wheel, _, _ = installed
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = zf.read("lvat-0.1.0.dist-info/METADATA").decode()
        scripts = zf.read("lvat-0.1.0.dist-info/entry_points.txt").decode()
    assert {"lvat/__init__.py", "lvat/cli.py", "lvat/py.typed", "lvat/models/glow.py"} <= names
    assert not any("__pycache__" in n or "/tests/" in n for n in names)
    assert "lvat = lvat.cli:main" in scripts
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]  # fmt: skip
    assert any(r.startswith("matplotlib") for r in requires), requires
    assert any(r.startswith("torch") for r in requires), requires


@pytest.mark.slow
def test_the_installed_wheel_imports_and_its_lvat_command_runs(installed):
    _, venv, env = installed
    code = ("import lvat, lvat.analysis.figures; "
            "print(lvat.__file__, lvat.VAE.__name__, lvat.Glow.__name__, "
            "lvat.load_transformer.__name__)")  # fmt: skip
    out = _run([str(venv / "bin" / "python"), "-c", code], env).stdout.split()
    assert Path(out[0]).is_relative_to(venv), f"lvat imported from {out[0]}, not from the wheel"
    assert out[1:] == ["VAE", "Glow", "load_transformer"]
    helped = _run([str(venv / "bin" / "lvat"), "--help"], env).stdout
    for command in ("train", "fit", "eval", "data", "figures"):
        assert command in helped


@pytest.mark.slow
def test_the_installed_lvat_checks_fashion_mnist(installed):
    if not FASHION_MNIST.is_dir() and os.environ.get("LVAT_REQUIRE_DATA") != "1":
        pytest.skip(f"{FASHION_MNIST} is missing (apt-get install dataset-fashion-mnist); "
                    "set LVAT_REQUIRE_DATA=1 to make this a failure")  # fmt: skip
    _, venv, env = installed
    out = _run([str(venv / "bin" / "lvat"), "data", "check", "fashion-mnist"], env).stdout
    assert out.rstrip().endswith("OK"), out
    assert f"from {FASHION_MNIST}" in out and "train: 60000 images of 1x28x28" in out, out
