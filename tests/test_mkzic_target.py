"""The operator files in target/: they must agree with the code and with each other.

* target/runphi.toml documents exactly the keys runphi.config reads, and loads;
* the containerd snippet is accepted by the real containerd and names the handler
  the RuntimeClass refers to;
* target/BOARDS.md describes every platform template as it is;
* target/install.sh installs a working runphi into a prefix (real venv, real pip);
* the Dockerfile example agrees with its boot description.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import msgspec
import pytest

from runphi.config import JailhouseConfig, LogConfig, RuntimeConfig, load_runtime_config
from tools.mkzic.cli import main as mkzic_main

REPO = Path(__file__).resolve().parent.parent
TARGET = REPO / "target"
CRI_RUNTIMES = ("plugins", "io.containerd.grpc.v1.cri", "containerd", "runtimes")


def dig(table: dict, *keys: str):
    for key in keys:
        table = table[key]
    return table


def struct_keys(struct: type[msgspec.Struct]) -> set[str]:
    return set(struct.__struct_fields__)


# --- runphi.toml -------------------------------------------------------------


def test_example_config_documents_every_key_and_only_real_ones() -> None:
    example = tomllib.loads((TARGET / "runphi.toml").read_text())
    assert set(example) == struct_keys(RuntimeConfig) - {"source"}
    assert set(example["jailhouse"]) == struct_keys(JailhouseConfig)
    assert set(example["log"]) == struct_keys(LogConfig)


def test_example_config_loads_and_only_differs_from_defaults_in_backend() -> None:
    path = TARGET / "runphi.toml"
    loaded = load_runtime_config({"RUNPHI_CONFIG": str(path)})
    expected = msgspec.structs.replace(RuntimeConfig(), backend="jailhouse", source=str(path))
    assert loaded == expected


# --- containerd snippet and Kubernetes manifests ----------------------------


def test_containerd_snippet_declares_the_runphi_handlers() -> None:
    snippet = tomllib.loads((TARGET / "containerd-runphi.toml").read_text())
    assert snippet["version"] == 2
    assert dig(snippet, *CRI_RUNTIMES[:-1])["default_runtime_name"] == "runc"
    # declaring any runtime drops containerd's built-in table: runc must be declared too
    assert dig(snippet, *CRI_RUNTIMES, "runc")["runtime_type"] == "io.containerd.runc.v2"
    shim = dig(snippet, *CRI_RUNTIMES, "runphi")
    assert shim["runtime_type"] == "io.containerd.runphi.v2"
    assert "options" not in shim  # runc's shim would refuse runphi-typed options on handed-over containers
    runc_cli = dig(snippet, *CRI_RUNTIMES, "runphi-runc")
    assert runc_cli["runtime_type"] == "io.containerd.runc.v2"
    for handler in (shim, runc_cli):
        assert handler["pod_annotations"] == handler["container_annotations"] == ["org.runphi.*"]
    assert runc_cli["options"]["BinaryName"].endswith("/runphi")
    assert runc_cli["options"]["Root"] == RuntimeConfig().state_dir


@pytest.mark.containerd
def test_real_containerd_accepts_the_snippet() -> None:
    containerd = shutil.which("containerd")
    if containerd is None:
        pytest.skip("containerd is not installed (Debian: apt-get install containerd)")
    result = subprocess.run(
        [containerd, "--config", str(TARGET / "containerd-runphi.toml"), "config", "dump"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    merged = dig(tomllib.loads(result.stdout), *CRI_RUNTIMES)
    for handler in ("runphi", "runphi-runc"):
        expected = dig(tomllib.loads((TARGET / "containerd-runphi.toml").read_text()), *CRI_RUNTIMES, handler)
        assert merged[handler]["runtime_type"] == expected["runtime_type"]
        assert merged[handler]["pod_annotations"] == expected["pod_annotations"]
        assert merged[handler]["container_annotations"] == expected["container_annotations"]
        if "options" in expected:
            assert merged[handler]["options"] == expected["options"]
    assert merged["runc"]["runtime_type"] == "io.containerd.runc.v2"  # the default runtime survives


def yaml_value(text: str, key: str) -> str:
    """The scalar value of the one ``key:`` line in a simple manifest (quotes stripped)."""
    values = re.findall(rf"^\s*{re.escape(key)}:\s*(\S.*?)\s*$", text, flags=re.MULTILINE)
    assert len(values) == 1, f"{key}: {values}"
    return values[0].strip("\"'")


def test_runtimeclass_and_pod_select_the_containerd_handler() -> None:
    snippet = tomllib.loads((TARGET / "containerd-runphi.toml").read_text())
    runtime_class = (TARGET / "kubernetes/runtimeclass.yaml").read_text()
    pod = (TARGET / "kubernetes/zic-pod.yaml").read_text()
    assert yaml_value(runtime_class, "apiVersion") == "node.k8s.io/v1"
    assert yaml_value(runtime_class, "kind") == "RuntimeClass"
    assert yaml_value(runtime_class, "handler") == "runphi"
    assert dig(snippet, *CRI_RUNTIMES, "runphi")["runtime_type"] == "io.containerd.runphi.v2"
    assert yaml_value(pod, "kind") == "Pod"
    assert yaml_value(pod, "runtimeClassName") == yaml_value(runtime_class, "name")
    assert yaml_value(pod, "org.runphi.runtime") == "runphi"
    assert yaml_value(pod, "imagePullPolicy") == "Never"
    limits = re.search(r"limits:\n\s+cpu: \"(\d+)\"\n\s+memory: (\d+)Mi", pod)
    requests = re.search(r"requests:\n\s+cpu: \"(\d+)\"\n\s+memory: (\d+)Mi", pod)
    assert limits and requests and limits.groups() == requests.groups()


def kubectl_decode(manifest: Path) -> dict:
    """The manifest as kubectl reads it, offline (YAML → JSON, no server), for exact comparison."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (Debian: apt-get install kubernetes-client)")
    result = subprocess.run([kubectl, "annotate", "--local", "-o", "json", "-f", str(manifest), "checked=yes"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    decoded = json.loads(result.stdout)
    del decoded["metadata"]["annotations"]["checked"]
    return decoded


def test_kubernetes_manifests_decode_as_kubernetes_types() -> None:
    runtime_class = kubectl_decode(TARGET / "kubernetes/runtimeclass.yaml")
    assert runtime_class == {
        "apiVersion": "node.k8s.io/v1",
        "kind": "RuntimeClass",
        "metadata": {"name": "runphi", "annotations": {}},
        "handler": "runphi",
        "scheduling": {"nodeSelector": {"runphi.io/jailhouse": "true"}},
    }
    pod = kubectl_decode(TARGET / "kubernetes/zic-pod.yaml")
    limits = {"cpu": "1", "memory": "64Mi"}
    assert pod == {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "hello-zic", "annotations": {"org.runphi.runtime": "runphi"}},
        "spec": {
            "runtimeClassName": runtime_class["metadata"]["name"],
            "restartPolicy": "Never",
            "containers": [{
                "name": "hello",
                "image": "docker.io/library/hello:latest",
                "imagePullPolicy": "Never",
                "resources": {"limits": limits, "requests": limits},
            }],
        },
    }


# --- BOARDS.md ---------------------------------------------------------------


def board_rows() -> dict[str, list[str]]:
    rows = {}
    for line in (TARGET / "BOARDS.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 7:
            rows[cells[0].strip("`")] = cells
    return rows


def test_board_guide_describes_every_platform_template() -> None:
    rows = board_rows()
    templates = {path.stem: tomllib.loads(path.read_text()) for path in (REPO / "templates").glob("*.toml")}
    assert templates, "no platform templates found"
    assert set(rows) == set(templates)
    for name, template in templates.items():
        _, fmt, cpus, console, tty, hypervisor_slot, default = rows[name]
        assert fmt == f"`{template['format']}`", name
        assert cpus == f"`{template['cell_cpus']}`", name
        uarts = template["uarts"]
        assert f"IRQ {uarts[0]['irq']}" in console, name
        assert all(f"`0x{u['phys']:08x}`" in console for u in (uarts[0], uarts[-1])), name
        assert (f"{len(uarts)} slots" if len(uarts) > 1 else "1 ") in console, name
        assert ("shared" in console) == any(u.get("shared", False) for u in uarts), name
        devices = [u.get("device", "") for u in uarts]
        if any(devices):
            assert f"`{devices[0]}`" in tty and Path(devices[-1]).name in tty, name
        else:
            assert tty == "none", name
        assert hypervisor_slot == ("yes" if "hypervisor_console" in template else "no"), name
        assert default == ("UART" if any(devices) or "hypervisor_console" not in template else "hypervisor"), name


# --- Dockerfile example ------------------------------------------------------


def test_dockerfile_example_matches_its_boot_description(tmp_path: Path) -> None:
    example = TARGET / "zic-example"
    description = json.loads((example / "boot/config.json").read_bytes())
    lines = [line for line in (example / "Dockerfile").read_text().splitlines() if line and not line.startswith("#")]
    assert lines == ["FROM scratch", "COPY boot/ /boot/", f'CMD ["{description["inmate"]}"]']
    inmate = tmp_path / Path(description["inmate"]).name
    inmate.write_bytes(b"\x00" * 64)
    assert mkzic_main(["--config", str(example / "boot/config.json"), "--inmate", str(inmate),
                       "--bundle", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b/rootfs/boot/config.json").read_bytes()) == description


# --- install.sh --------------------------------------------------------------


def source_tree(tmp_path: Path) -> Path:
    """A clean copy of the source tree, so pip's in-tree build leaves the checkout alone."""
    tree = tmp_path / "src"
    if not tree.exists():
        shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "out"))
    return tree


def run_install(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(source_tree(tmp_path) / "target/install.sh")],
        env={**os.environ, "RUNPHI_PREFIX": str(tmp_path / "opt"), "RUNPHI_BINDIR": str(tmp_path / "bin"),
             "RUNPHI_CONFIG": str(tmp_path / "etc/runphi.toml"), "PYTHON": sys.executable, **env},
        capture_output=True, text=True, check=False, timeout=600,
    )


def test_install_script_installs_a_working_runphi_and_keeps_existing_config(tmp_path: Path) -> None:
    result = run_install(tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    runphi = tmp_path / "bin/runphi"
    assert runphi.resolve() == (tmp_path / "opt/bin/runphi").resolve()

    config = load_runtime_config({"RUNPHI_CONFIG": str(tmp_path / "etc/runphi.toml")})
    assert config.backend == "jailhouse"
    assert config.jailhouse.templates_dir == ""  # the templates installed inside the runphi package
    assert not (tmp_path / "opt/templates").exists()
    shipped = subprocess.run([str(tmp_path / "opt/bin/python"), "-c", "from runphi.config import shipped_templates_dir; "
                              "print(shipped_templates_dir())"], capture_output=True, text=True, check=True, cwd="/",
                             env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}).stdout.strip()
    assert Path(shipped).is_relative_to(tmp_path / "opt")
    assert sorted(p.name for p in Path(shipped).glob("*.toml")) == sorted(
        p.name for p in (REPO / "templates").glob("*.toml"))

    version = subprocess.run([str(runphi), "--version"], capture_output=True, text=True, check=False,
                             env={**os.environ, "RUNPHI_CONFIG": str(tmp_path / "etc/runphi.toml")})
    assert version.returncode == 0 and "backend: jailhouse" in version.stdout, version.stderr

    snippet = tomllib.loads(result.stdout.split("# Merge into /etc/containerd/config.toml, then restart containerd:\n")[1])
    assert dig(snippet, *CRI_RUNTIMES, "runphi-runc", "options")["BinaryName"] == str(runphi)
    shim = tmp_path / "bin/containerd-shim-runphi-v2"
    assert shim.resolve() == (tmp_path / "opt/bin/containerd-shim-runphi-v2").resolve()
    shown = subprocess.run([str(shim), "-v"], capture_output=True, text=True, check=False)
    assert shown.returncode == 0 and "io.containerd.runphi.v2" in shown.stdout, shown.stderr

    edited = (tmp_path / "etc/runphi.toml").read_text().replace('level = "info"', 'level = "debug"')
    (tmp_path / "etc/runphi.toml").write_text(edited)
    again = run_install(tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "keeping the existing" in again.stdout
    assert (tmp_path / "etc/runphi.toml").read_text() == edited


def test_install_script_refuses_an_unusable_python(tmp_path: Path) -> None:
    result = run_install(tmp_path, PYTHON=str(tmp_path / "no-python"))
    assert result.returncode == 1
    assert result.stderr.startswith("install.sh: ") and result.stderr.count("\n") == 1
    assert "older than 3.11" in result.stderr
    assert not (tmp_path / "opt").exists() and not (tmp_path / "etc").exists()
