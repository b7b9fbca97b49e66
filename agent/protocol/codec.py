"""The one place where wire messages become bytes and bytes become wire messages.

``encode`` writes compact UTF-8 JSON; ``decode`` checks a payload's size, encoding,
JSON syntax, schema version and fields, and turns every problem into a
``ProtocolError`` with a one-line reason.  ``canonical_json`` is the deterministic
form that signatures are computed over.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from tinyfleet.agent.canonical import canonical_json as _canonical_json
from tinyfleet.agent.canonical import rfc3339
from tinyfleet.agent.errors import TinyfleetError

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails

__all__ = [
    "MAX_MESSAGE_BYTES",
    "SCHEMA_VERSION",
    "ProtocolError",
    "canonical_json",
    "decode",
    "encode",
    "rfc3339",
]

SCHEMA_VERSION: Literal[1] = 1
"""Value of the ``schema`` field of every message under the ``tinyfleet/v1/`` prefix."""

MAX_MESSAGE_BYTES = 256 * 1024
"""Default upper bound of a JSON payload accepted by ``decode``."""


_REASON_CHARS = 300

M = TypeVar("M", bound=BaseModel)


class ProtocolError(TinyfleetError):
    """A message, topic or state change does not follow the wire protocol."""

    exit_code = 14


def encode(msg: BaseModel) -> bytes:
    """Compact UTF-8 JSON of a message; fields that are ``None`` are left out."""
    return msg.model_dump_json(by_alias=True, exclude_none=True).encode("utf-8")


def decode(
    kind: type[M],
    payload: bytes | bytearray | memoryview,
    *,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> M:
    """Parse and validate one message of type ``kind`` from a payload.

    Raises ``ProtocolError`` naming the first problem: empty or oversized payload,
    bytes that are not UTF-8, text that is not JSON, a missing or unsupported
    ``schema`` version, an unknown field, or a field that fails validation.
    """
    name = kind.__name__
    size = len(payload)
    if size == 0:
        raise ProtocolError(f"invalid {name}: empty payload (a cleared retained message)")
    if size > max_bytes:
        raise ProtocolError(
            f"invalid {name}: payload of {size} bytes exceeds the {max_bytes} limit"
        )
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(
            f"invalid {name}: payload is not UTF-8 (bad byte at offset {exc.start})"
        ) from None
    try:
        msg = kind.model_validate_json(text, strict=True)
    except ValidationError as exc:
        raise ProtocolError(f"invalid {name}: {_reason(exc.errors())}") from None
    missing = _missing_schema(msg)
    if missing is not None:
        raise ProtocolError(f"invalid {name}: {missing}the schema field is missing")
    return msg


def _missing_schema(msg: BaseModel, path: str = "") -> str | None:
    """Where a message or a message nested in it lacks an explicit ``schema`` (``None``: nowhere).

    The field has a default so that code need not pass it; on the wire it is required.
    """
    fields = type(msg).model_fields
    if "schema_" in fields and "schema_" not in msg.model_fields_set:
        return path
    for field_name, info in fields.items():
        value = getattr(msg, field_name)
        if isinstance(value, BaseModel) and "schema_" in type(value).model_fields:
            found = _missing_schema(value, f"{path}{info.alias or field_name}: ")
            if found is not None:
                return found
    return None


def _loc(error: ErrorDetails) -> str:
    return ".".join(str(part) for part in error["loc"])


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 1] + "…"


def _reason(errors: list[ErrorDetails]) -> str:
    """One line for the most telling of pydantic's errors."""
    for error in errors:
        if error["type"] == "json_invalid":
            return _clip(f"payload is not JSON ({error['msg']})")
    for error in errors:
        if error["loc"] == () and error["type"] in {"model_type", "model_attributes_type"}:
            return "payload is not a JSON object"
        if error["loc"][-1:] == ("schema",):
            found = error.get("input")
            return _clip(
                f"unsupported schema version {json.dumps(found)} at {_loc(error)} "
                f"(this side speaks {SCHEMA_VERSION})"
            )
    for error in errors:
        if error["type"] == "extra_forbidden":
            return _clip(f"unknown field '{_loc(error)}'")
    first = errors[0]
    where = _loc(first) or "message"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return _clip(f"{where}: {first['msg']}{more}")


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON (``tinyfleet.agent.canonical``, the manifests' form too).

    Non-finite floats and naive datetimes raise ``ProtocolError``.
    """
    try:
        return _canonical_json(value)
    except ValueError as exc:
        raise ProtocolError(f"value cannot be written as canonical JSON: {exc}") from None
