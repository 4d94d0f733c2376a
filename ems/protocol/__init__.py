"""The EMS wire contract as pure Python: messages, codec, errors and the two link sessions.

Nothing here imports trio, opens a socket or reads a clock; the hub, the edge agent, the fleet
simulator and the tests all drive these same classes.
"""

from ems.protocol.codec import (
    Codec,
    SampleRules,
    decode_dashboard_message,
    decode_dashboard_update,
    decode_device_message,
    decode_hub_message,
    encode,
)
from ems.protocol.errors import CloseCode, EmsError, ErrorCode, LocalProtocolError, ProtocolError

__all__ = [
    "CloseCode",
    "Codec",
    "EmsError",
    "ErrorCode",
    "LocalProtocolError",
    "ProtocolError",
    "SampleRules",
    "decode_dashboard_message",
    "decode_dashboard_update",
    "decode_device_message",
    "decode_hub_message",
    "encode",
]
