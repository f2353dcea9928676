"""exec, pause, resume, update, checkpoint, restore: meaningless for a partition.

A cell has no Linux processes to exec into, freeze or checkpoint, and its CPUs
and memory are fixed when it is created. runc containers never get here: the
CLI forwards those verbs to runc when runphi holds no record for the id.
"""

from __future__ import annotations

from runphi.errors import NotSupported

_WHY = {
    "exec": "a cell runs no Linux processes to exec into",
    "pause": "a cell's CPUs cannot be frozen",
    "resume": "a cell's CPUs cannot be frozen",
    "update": "a cell's CPUs and memory are fixed when it is created",
    "checkpoint": "a cell's memory cannot be checkpointed",
    "restore": "a cell's memory cannot be checkpointed",
}


def run(args, ctx) -> int:
    """Refuse with one line naming the verb, the container and why."""
    raise NotSupported(
        f"{args.verb} is not supported for partitioned containers: {_WHY[args.verb]} "
        f"(container {args.container_id})",
        container_id=args.container_id)
