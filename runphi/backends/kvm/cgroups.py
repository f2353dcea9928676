"""The container's cgroup (OCI ``linux.cgroupsPath``) on this host, for a ZIC's VM process.

runphi creates the directories it needs, moves the VM process in when it comes up
(:func:`join_cgroup`) and removes them once empty when the cell is destroyed. cgroup v2:
one directory; v1: one per hierarchy except ``cpuset`` (which needs its CPUs and memory
nodes written before anyone may join, and the VM's vCPUs are pinned anyway). Lean: the
``delete`` verb imports it.
"""

from __future__ import annotations

from pathlib import Path

from runphi.backends.base import BackendError

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_dirs(cgroups_path: str) -> list[Path]:
    """The directories of OCI ``linux.cgroupsPath`` on this host (cgroup v2: one; v1: one per
    hierarchy but cpuset, which needs its CPUs set before anyone joins)."""
    relative = cgroup_relative(cgroups_path)
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [CGROUP_ROOT / relative]
    try:
        hierarchies = sorted(entry for entry in CGROUP_ROOT.iterdir()
                             if entry.name not in ("cpuset", "unified") and (entry / "cgroup.procs").exists())
    except OSError:
        return []
    return [hierarchy / relative for hierarchy in hierarchies]


def cgroup_relative(cgroups_path: str) -> str:
    """A cgroupfs path as is; systemd's ``slice:prefix:name`` as the path systemd gives it."""
    parts = cgroups_path.split(":")
    if len(parts) != 3 or "/" in cgroups_path:
        return cgroups_path.strip("/")
    slice_name, prefix, name = parts
    nested: list[str] = []
    if slice_name and slice_name != "-.slice":
        words = slice_name.removesuffix(".slice").split("-")
        nested = ["-".join(words[: i + 1]) + ".slice" for i in range(len(words))]
    return "/".join([*nested, f"{prefix}-{name}.scope" if prefix else f"{name}.scope"])


def join_cgroup(pid: int, cgroups_path: str) -> None:
    for directory in cgroup_dirs(cgroups_path) if cgroups_path else []:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            raise BackendError(f"cannot move the VM into cgroup {directory}: {exc.strerror}") from None


def remove_cgroup(cgroups_path: str) -> None:
    """Remove the container's cgroup directories once empty (never raises)."""
    for directory in cgroup_dirs(cgroups_path) if cgroups_path else []:
        try:
            directory.rmdir()
        except OSError:
            pass
