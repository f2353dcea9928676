import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CellFailed(_message.Message):
    __slots__ = ("container_id", "cell", "failed_cpus", "state", "failed_at", "cpus")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    FAILED_CPUS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FAILED_AT_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    cell: str
    failed_cpus: _containers.RepeatedScalarFieldContainer[int]
    state: str
    failed_at: _timestamp_pb2.Timestamp
    cpus: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, container_id: _Optional[str] = ..., cell: _Optional[str] = ..., failed_cpus: _Optional[_Iterable[int]] = ..., state: _Optional[str] = ..., failed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., cpus: _Optional[_Iterable[int]] = ...) -> None: ...
