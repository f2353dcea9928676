"""Print runphi's cell failures as containerd announces them (docs/shim-events.md).

Subscribes to containerd's events API (gRPC on $CONTAINERD_ADDRESS, by default
/run/containerd/containerd.sock) for the topic /runphi/cell/failed, in every namespace,
and prints each runphi.events.v1.CellFailed as one JSON line. Needs grpcio, runphi, and
containerd_events_pb2 (compiled from containerd_events.proto next to this file) on the path.
"""

import json
import os

import grpc
from containerd_events_pb2 import Envelope, SubscribeRequest
from google.protobuf.json_format import MessageToDict

from runphi.shim.proto.runphi_events_pb2 import CellFailed

TOPIC = "/runphi/cell/failed"


def cell_failures(address):
    """(namespace, CellFailed) for each cell failure containerd announces, as it comes."""
    with grpc.insecure_channel(f"unix://{address}") as channel:
        subscribe = channel.unary_stream("/containerd.services.events.v1.Events/Subscribe",
                                         request_serializer=SubscribeRequest.SerializeToString,
                                         response_deserializer=Envelope.FromString)
        for envelope in subscribe(SubscribeRequest(filters=[f'topic=="{TOPIC}"'])):
            # containerd names the type bare ("runphi.events.v1.CellFailed"), so no Any.Unpack.
            if envelope.event.type_url == CellFailed.DESCRIPTOR.full_name:
                yield envelope.namespace, CellFailed.FromString(envelope.event.value)


if __name__ == "__main__":
    for namespace, failed in cell_failures(os.environ.get("CONTAINERD_ADDRESS", "/run/containerd/containerd.sock")):
        fields = MessageToDict(failed, preserving_proto_field_name=True)
        print(json.dumps({"namespace": namespace, **fields}), flush=True)
