"""A built wheel is a working install: built from the checkout, installed into a fresh venv
outside it, and run from there with no path back to the source tree.

* the wheel holds the runtime with its platform templates, mkzic and the simulator, under
  runphi's own top-level names, and none of the checkout's test-only helpers;
* the installed ``runphi`` answers ``features`` and renders a cell on every shipped platform
  (found inside the package, no RUNPHI_TEMPLATES), from a bundle the installed
  ``runphi-mkzic`` built;
* the installed ``jailhouse-sim`` brings a board up and down (its daemon and the
  ``jailhouse cell linux`` helper import the simulator under its installed name), with
  ``bin/jailhouse`` compiled from the C client the wheel ships.

Slow-ish (a wheel build, a venv and a pip install: ~20-40 s) but part of every run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOP_LEVEL = {"runphi", "runphi_mkzic", "runphi_jailhouse_sim"}
TIMEOUT_S = 600

pytestmark = pytest.mark.wheel


@dataclass(frozen=True)
class Install:
    """The built wheel and the venv it was installed into."""

    wheel: Path
    venv: Path
    site_packages: Path
    work: Path  # a scratch directory outside the checkout, also the cwd of every command
    env: dict[str, str]

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def run(self, *argv: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(arg) for arg in argv], capture_output=True, text=True, cwd=self.work,
                              env={**self.env, **(env or {})}, timeout=TIMEOUT_S, check=False)


def missing_prerequisite() -> str | None:
    """Why this machine cannot build and install a wheel, or None."""
    try:
        import setuptools  # noqa: F401  (the build backend, used without build isolation)
    except ImportError:
        return f"setuptools is not installed in {sys.prefix} (it is in runphi's [test] extra)"
    try:
        import ensurepip  # noqa: F401
    except ImportError:
        return "this Python cannot create venvs with pip (install the python3-venv package)"
    return None


def clean_env(work: Path) -> dict[str, str]:
    """The environment a user's shell would have: nothing pointing at the checkout or a venv."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not key.startswith("RUNPHI_")}
    env["RUNPHI_CONFIG"] = str(work / "runphi.toml")  # empty: no /etc/runphi/runphi.toml of this machine
    return env


def source_copy(destination: Path) -> Path:
    """The checkout's sources without build leftovers: an in-tree build writes build/ and
    *.egg-info, and stale ones would leak into the wheel (or from another engineer's work)."""
    shutil.copytree(REPO, destination, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "out"))
    return destination


def build_wheel(source: Path, out: Path) -> Path:
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(source)], capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    wheels = list(out.glob("runphi-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory) -> Install:
    reason = missing_prerequisite()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("wheel")
    assert not base.is_relative_to(REPO), f"{base} must be outside the checkout"
    wheel = build_wheel(source_copy(base / "src"), base / "dist")
    shutil.rmtree(base / "src")
    work = base / "work"
    work.mkdir()
    (work / "runphi.toml").touch()
    env = clean_env(work)
    venv.EnvBuilder(with_pip=True).create(base / "venv")
    python = str(base / "venv" / "bin" / "python")
    done = subprocess.run([python, "-m", "pip", "install", "-q", str(wheel)], capture_output=True, text=True,
                          cwd=work, env=env, timeout=TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, cwd=work, env=env, check=True).stdout.strip()
    return Install(wheel=wheel, venv=base / "venv", site_packages=Path(purelib), work=work, env=env)


def checkout_templates(pattern: str = "*.toml") -> list[str]:
    """The checkout's templates (relative paths): the Jailhouse platforms by default;
    ``**/*.toml`` adds the KVM host templates of ``templates/kvm/``."""
    names = sorted(str(path.relative_to(REPO / "templates")) for path in (REPO / "templates").glob(pattern))
    assert names, "no platform templates in the checkout"
    return names


def checkout_packages() -> list[str]:
    """Every package of the runtime in the checkout (a new one must be listed in pyproject.toml)."""
    return sorted(str(init.parent.relative_to(REPO)) for init in (REPO / "runphi").rglob("__init__.py"))


# --- what the wheel holds -------------------------------------------------------


def test_wheel_holds_runtime_templates_mkzic_and_simulator_and_no_test_helpers(install: Install) -> None:
    names = zipfile.ZipFile(install.wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == TOP_LEVEL
    assert not [name for name in names if name.startswith("tools/") or "/tests/" in name]
    for template in checkout_templates("**/*.toml"):
        assert f"runphi/templates/{template}" in names
    for package in checkout_packages():
        assert f"{package}/__init__.py" in names, f"{package} is missing: list it in pyproject.toml"
    for board in (REPO / "tools/jailhouse_sim/boards").glob("*.toml"):
        assert f"runphi_jailhouse_sim/boards/{board.name}" in names
    assert "runphi_mkzic/cli.py" in names and "runphi_jailhouse_sim/engines/script.py" in names
    assert "runphi_jailhouse_sim/jailhouse_client.c" in names  # `up` compiles it into bin/jailhouse


def test_site_packages_has_no_tools_package_and_has_the_templates(install: Install) -> None:
    assert not (install.site_packages / "tools").exists()
    templates = install.site_packages / "runphi/templates"
    installed = sorted(str(path.relative_to(templates)) for path in templates.rglob("*.toml"))
    assert installed == checkout_templates("**/*.toml")


# --- what a user runs -------------------------------------------------------------


def test_runphi_features_answers_json(install: Install) -> None:
    done = install.run(install.bin("runphi"), "features")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ociVersionMin"]


@pytest.mark.parametrize("template", checkout_templates())
def test_cell_config_renders_a_mkzic_bundle_on_every_shipped_platform(install: Install, template: str) -> None:
    bundle = install.work / f"zic-{template.removesuffix('.toml')}"
    if not bundle.exists():
        (install.work / "zephyr.bin").write_bytes(b"\x00" * 64)
        built = install.run(install.bin("runphi-mkzic"), "--inmate", install.work / "zephyr.bin", "--os-var", "zephyr",
                            "--starting-vaddress", "0x70000000", "--memory", "16", "--vcpus", "1", "--bundle", bundle)
        assert built.returncode == 0, built.stderr
    done = install.run(install.bin("runphi"), "cell-config", bundle, "--platform", template.removesuffix(".toml"),
                       "--format", "text",
                       env={"RUNPHI_STATE_DIR": str(install.work / "state"),
                            "RUNPHI_SYSFS": str(install.work / "no-jailhouse")})
    assert done.returncode == 0, done.stderr
    assert f"name:              {bundle.name}" in done.stdout
    assert "cpu_reset_address: 0x70000000" in done.stdout


@pytest.mark.parametrize("command", ["runphi-mkzic", "jailhouse-sim"])
def test_tool_commands_answer_help(install: Install, command: str) -> None:
    done = install.run(install.bin(command), "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {command}")


def test_simulator_runs_from_the_install(install: Install) -> None:
    root = install.work / "sim"
    sim = install.bin("jailhouse-sim")
    boards = install.run(sim, "boards")
    assert boards.returncode == 0 and "sim-qemu-arm64 " in boards.stdout, boards.stderr
    up = install.run(sim, "up", "--root", root)
    try:
        assert up.returncode == 0, up.stderr
        if shutil.which("cc"):
            assert (root / "bin/jailhouse").read_bytes()[:4] == b"\x7fELF", "the C client was not built"
        listed = install.run(root / "bin/jailhouse", "cell", "list")
        assert listed.returncode == 0 and "running" in listed.stdout, listed.stderr
        helper = install.run(root / "bin/jailhouse-cell-linux", "--help")
        assert helper.returncode == 0 and "Boot Linux in a non-root cell" in helper.stdout, helper.stderr
    finally:
        down = install.run(sim, "down", "--root", root)
    assert down.returncode == 0, down.stderr
