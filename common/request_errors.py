"""Which request field a refusal is about, carried next to the status as gRPC trailing metadata.

The status message is for people; a program that translates the refusal into another API (the
OpenAI gateway names ``max_tokens`` where the mesh says ``max_new_tokens``) reads these instead of
parsing the message, as google.rpc.BadRequest's field violations do.
"""

from __future__ import annotations

from collections.abc import Iterable

FIELD_KEY = "splitmesh-field"  # the GenerateRequest field at fault: "prompt", "max_new_tokens", ...
LIMIT_KEY = "splitmesh-limit"  # the bound it crossed (tokens), when there is one


def field_metadata(field: str, limit: int = 0) -> tuple[tuple[str, str], ...]:
    if not field:
        return ()
    return ((FIELD_KEY, field),) + (((LIMIT_KEY, str(limit)),) if limit else ())


def field_details(metadata: Iterable[tuple[str, str | bytes]] | None) -> dict[str, str]:
    """The splitmesh keys of a call's trailing metadata (empty when there are none)."""
    return {k: v if isinstance(v, str) else v.decode(errors="replace") for k, v in metadata or ()
            if k in (FIELD_KEY, LIMIT_KEY)}
