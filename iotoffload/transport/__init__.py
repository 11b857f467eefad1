"""The wire protocol: topics, frames, and the MQTT client wrapper."""

from iotoffload.transport.frame import (
    FRAME_VERSION,
    FrameError,
    decode,
    encode,
    encode_tensor_frame,
    tensor_of,
)
from iotoffload.transport.topics import DEFAULT_PREFIX, Topics, check_id

__all__ = [
    "DEFAULT_PREFIX",
    "FRAME_VERSION",
    "FrameError",
    "Topics",
    "check_id",
    "decode",
    "encode",
    "encode_tensor_frame",
    "tensor_of",
]
