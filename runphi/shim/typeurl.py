"""``google.protobuf.Any`` the way containerd 1.6 writes and reads it (typeurl v1).

containerd's typeurl names a protobuf message by its bare full name
(``containerd.events.TaskExit``), with no ``type.googleapis.com/`` prefix, and looks
that exact string up when it decodes (reference/shim-v2.md §5.2, §7). protobuf's own
``Any.Pack`` always writes a prefix (``""`` gives ``/name``) and ``Any.Unpack`` wants a
``/``, so neither is used here.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf import any_pb2
from google.protobuf.message import Message

M = TypeVar("M", bound=Message)


def type_url(message: Message | type[Message]) -> str:
    """The bare full name of a message (or message class), as containerd writes it."""
    return str(message.DESCRIPTOR.full_name)


def pack(message: Message) -> any_pb2.Any:
    """An Any holding ``message`` under its bare full name."""
    return any_pb2.Any(type_url=type_url(message), value=message.SerializeToString())


def unpack(packed: any_pb2.Any, message_type: type[M]) -> M:
    """``packed`` decoded as ``message_type``; ValueError if it holds another type.

    Accepts the bare name and the prefixed form (``type.googleapis.com/<name>``).
    """
    name = packed.type_url.rsplit("/", 1)[-1]
    if name != type_url(message_type):
        raise ValueError(f"Any holds {packed.type_url!r}, not {type_url(message_type)!r}")
    return message_type.FromString(packed.value)
