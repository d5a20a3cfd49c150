"""The wire between edge and cloud: the gRPC service (tandem.proto, generated/), tensor encoding (tensors.py) and
the one description of a step's message order and byte accounting (step.py)."""
from protocol.generated import tandem_pb2 as pb, tandem_pb2_grpc as pb_grpc

PROTOCOL_VERSION = 4  # 4: carried DoRA and (IA)³ (SiteWeights), branches on a site's output (adapters); 3: the carried mode (LoRA weights in Begin); 2: an empty Begin.active_blocks means no LoRA site
GRPC_PREFIX_BYTES = 5  # each gRPC message on a stream: 1 byte compressed-flag + 4 bytes length
AUTH_HEADER = "authorization"  # metadata key: "Bearer <token>"


def wire_size(message) -> int:
    """Bytes one protobuf message occupies on a gRPC stream (payload + gRPC length prefix).

    HTTP/2 frame headers (9 bytes per frame of at most 16 KiB) and TLS records are not counted; see sim/ for them.
    """
    return message.ByteSize() + GRPC_PREFIX_BYTES


__all__ = ["pb", "pb_grpc", "PROTOCOL_VERSION", "GRPC_PREFIX_BYTES", "AUTH_HEADER", "wire_size"]
