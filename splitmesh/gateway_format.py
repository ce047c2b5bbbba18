"""OpenAI response bodies and stream chunks built from the SDK's token events.

Kept apart from the HTTP routes so the wire format can be read (and checked) in one place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from splitmesh.client import TokenEvent
from splitmesh.gateway_schema import FINISH_REASONS

Kind = Literal["chat", "text"]
DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class Header:
    """What every body and chunk of one response repeats."""

    kind: Kind
    id: str
    created: int
    model: str

    @staticmethod
    def of(kind: Kind, session_id: str, created: int, model: str) -> Header:
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        return Header(kind, f"{prefix}-{session_id}", created, model)

    def fields(self, stream: bool) -> dict[str, object]:
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": f"{obj}.chunk" if stream and self.kind == "chat" else obj,
                "created": self.created, "model": self.model}


def finish_reason(event: TokenEvent) -> str | None:
    """The mesh's eos/stop/length as OpenAI's stop/length; None while the generation goes on."""
    return FINISH_REASONS.get(event.finish_reason) if event.finish_reason else None


def usage(last: TokenEvent) -> dict[str, int]:
    """Counts come from the last event, where the head sets them."""
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens}


def fingerprint(event: TokenEvent) -> str:
    """The plan epoch that produced the answer: the backend configuration, in OpenAI's terms."""
    return f"splitmesh-epoch-{event.epoch}"


def _choice(kind: Kind, text: str, reason: str | None, stream: bool) -> dict[str, object]:
    if kind == "text":
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
    key = "delta" if stream else "message"
    return {"index": 0, key: {"role": "assistant", "content": text} if not stream else {"content": text},
            "logprobs": None, "finish_reason": reason}


def full_body(header: Header, events: list[TokenEvent]) -> dict[str, object]:
    """The non-streaming response: all the text in one choice, plus usage."""
    last = events[-1]
    text = "".join(e.text for e in events)
    return {**header.fields(stream=False), "system_fingerprint": fingerprint(last),
            "choices": [_choice(header.kind, text, finish_reason(last), stream=False)], "usage": usage(last)}


def sse(payload: dict[str, object]) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


@dataclass(frozen=True)
class ChunkWriter:
    """Server-sent events for one streamed response, in OpenAI's chunk format."""

    header: Header
    include_usage: bool

    def _chunk(self, choices: list[dict[str, object]], event: TokenEvent) -> bytes:
        payload: dict[str, object] = {**self.header.fields(stream=True), "system_fingerprint": fingerprint(event),
                                      "choices": choices}
        if self.include_usage:
            payload["usage"] = None
        return sse(payload)

    def opening(self, first: TokenEvent) -> bytes:
        """Chat streams open with the assistant role and no content, as OpenAI's do."""
        if self.header.kind != "chat":
            return b""
        delta = {"role": "assistant", "content": ""}
        return self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}], first)

    def token(self, event: TokenEvent) -> bytes:
        """A chunk per token that completed text; the finish travels in a chunk of its own for chat."""
        reason = finish_reason(event)
        out = b""
        if self.header.kind == "text":
            if event.text or reason:
                out += self._chunk([_choice("text", event.text, reason, stream=True)], event)
            return out
        if event.text:
            out += self._chunk([_choice("chat", event.text, None, stream=True)], event)
        if reason:
            out += self._chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}], event)
        return out

    def closing(self, last: TokenEvent) -> bytes:
        """With ``stream_options.include_usage``, a last chunk with no choices carries the usage."""
        if not self.include_usage:
            return DONE
        payload = {**self.header.fields(stream=True), "system_fingerprint": fingerprint(last), "choices": [],
                   "usage": usage(last)}
        return sse(payload) + DONE
