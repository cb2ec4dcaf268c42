"""Connect's streaming framing from a client's side: the host and the CLI read envd's streamed answers with
it. (No dependencies: the CLI imports it.)"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator


def connect_envelopes(chunks: Iterable[bytes]) -> Iterator[tuple[int, dict]]:
    """The messages of a Connect streaming body, as (flags, JSON object), from its bytes in any chunking."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        while len(buffer) >= 5:
            flags, length = struct.unpack(">BI", buffer[:5])
            if len(buffer) < 5 + length:
                break
            yield flags, json.loads(buffer[5:5 + length] or b"{}")
            buffer = buffer[5 + length:]
