"""Regenerate the checked-in ``*_pb2.py``/``*_pb2.pyi`` from this directory's ``.proto`` files.

``python -m runphi.shim.proto.generate`` rewrites them in place; :func:`generate` with
another ``out_root`` writes the same files under ``out_root/runphi/shim/proto/``
(tests/test_shim_proto.py diffs those against the checked-in ones).

The include root is the repository root, so each ``.proto`` is named
``runphi/shim/proto/x.proto``: protoc then writes cross-file imports as
``from runphi.shim.proto import x_pb2``, which resolve in the installed package.
grpcio-tools (a test dependency, not a runtime one) provides protoc and the bundled
well-known types (``google/protobuf/*.proto``); ``python -m grpc_tools.protoc`` adds
their include path itself.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parent.parent.parent
PROTOS = ("status.proto", "ttrpc.proto", "mount.proto", "task_types.proto", "task.proto",
          "events_service.proto", "events.proto", "runphi_events.proto", "cgroups_v1.proto",
          "cgroups_v2.proto", "runc.proto")


def protoc_argv(out_root: Path) -> list[str]:
    """The exact protoc command line, writing under ``out_root`` (run from :data:`REPO_ROOT`)."""
    return [sys.executable, "-m", "grpc_tools.protoc", "-I.",
            f"--python_out={out_root}", f"--pyi_out={out_root}",
            *(f"runphi/shim/proto/{name}" for name in PROTOS)]


def generate(out_root: Path = REPO_ROOT) -> None:
    """Run protoc; on success every ``x_pb2.py``/``.pyi`` under ``out_root/runphi/shim/proto`` is fresh.

    Raises :class:`subprocess.CalledProcessError` (protoc's messages on stderr) otherwise.
    """
    (out_root / "runphi" / "shim" / "proto").mkdir(parents=True, exist_ok=True)
    subprocess.run(protoc_argv(out_root), cwd=REPO_ROOT, check=True)


if __name__ == "__main__":
    generate()
