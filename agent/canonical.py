"""The canonical JSON form that signatures are computed over (manifests, desired states).

One definition for every signer and verifier: sorted keys, no whitespace, UTF-8,
non-finite numbers refused, aware datetimes as RFC 3339 UTC with ``Z``
(microseconds only when non-zero).  Pure standard library.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any


def rfc3339(value: datetime) -> str:
    """An aware datetime as RFC 3339 UTC with ``Z``; ``ValueError`` for a naive one."""
    if value.tzinfo is None:
        raise ValueError("a naive datetime has no defined instant; use a timezone-aware one")
    value = value.astimezone(UTC)
    if value.microsecond:
        return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return rfc3339(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def canonical_json(value: Any) -> bytes:
    """The canonical bytes of ``value``; ``ValueError`` if it has no canonical form."""
    try:
        text = json.dumps(
            _plain(value),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        )
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    return text.encode("utf-8")
