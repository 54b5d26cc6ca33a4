"""JSON encoding of job data and results. JSON only: nothing read from Redis can run code."""
from __future__ import annotations

import json
from typing import Any

from .errors import InvalidPayload, PayloadTooLarge


# One encoder for every call: json.dumps with other than default arguments builds a new one each time.
_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"), ensure_ascii=False)


def encode(value: Any, *, what: str = "job data", limit: int | None = None) -> str:
    try:
        text = _ENCODER.encode(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidPayload(f"{what} must be JSON-serialisable: {exc}") from None
    if text.isascii():
        size = len(text)
    else:
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as exc:  # a lone surrogate (say, a file name read with surrogateescape)
            lone = exc.object[exc.start]
            raise InvalidPayload(f"{what} must be valid Unicode text: character {exc.start} of its JSON is "
                                 f"a lone surrogate ({lone!a}), which UTF-8 cannot hold") from None
    if limit is not None and size > limit:
        raise PayloadTooLarge(f"{what} is {size} bytes as JSON, over max_payload_bytes={limit}")
    return text


def decode(text: str | None) -> Any:
    if text is None or text == "":
        return None
    return json.loads(text)
