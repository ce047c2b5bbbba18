"""The head's side of a generation: check the request, tokenize on the trusted head, drive the ring.

Raw text lives only here; downstream nodes see activations, and only a token id comes back.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from common.chat import chat_token_ids, decode, text_token_ids
from common.plan_view import PlanView
from common.proto import splitmesh_pb2 as pb
from node_agent.metrics_registry import TOKENS
from node_agent.ring_session import RingSession
from node_agent.runtime import NodeRuntime
from node_agent.sampler import SamplingConfig

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


class RequestError(ValueError):
    """The request itself is invalid (INVALID_ARGUMENT).

    ``field`` names the request field at fault and ``limit`` the bound it crossed: they travel as trailing
    metadata (common.request_errors) so a gateway names the field in its own API's terms.
    """

    def __init__(self, message: str, field: str = "", limit: int = 0) -> None:
        super().__init__(message)
        self.field = field
        self.limit = limit


class ContextLengthError(RequestError):
    """The prompt, or the prompt with the completion asked for, does not fit (OUT_OF_RANGE)."""


@dataclass(frozen=True)
class PreparedRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingConfig
    stop: tuple[str, ...]
    eos_ids: frozenset[int]


def _sampling_of(request: pb.GenerateRequest) -> SamplingConfig:
    config = SamplingConfig.from_proto(request.sampling)
    try:
        config.validate()
    except ValueError as exc:
        raise RequestError(str(exc)) from exc
    return config


def _eos_ids(tokenizer: PreTrainedTokenizerBase | None, config_eos: object) -> frozenset[int]:
    ids: set[int] = set()
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif isinstance(config_eos, list):
        ids.update(int(i) for i in config_eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


@dataclass(frozen=True)
class RequestLimits:
    """What one head accepts in a GenerateRequest (node config plus the model's own limits)."""

    vocab_size: int
    max_positions: int  # the model's max_position_embeddings: prompt + new tokens never exceed it
    max_prompt_tokens: int
    max_new_tokens: int
    max_prompt_bytes: int  # UTF-8 bytes of the prompt, or of all chat messages together
    max_messages: int
    bos_token_id: object = None  # the model config's, used when the tokenizer names none


def _text_bytes(texts: list[str], limit: int) -> int:
    """UTF-8 size of ``texts``, stopping early once past ``limit`` (a char is at least one byte)."""
    total = 0
    for text in texts:
        total += len(text) if total + len(text) > limit else len(text.encode("utf-8"))
        if total > limit:
            break
    return total


def check_request(request: pb.GenerateRequest, has_tokenizer: bool, limits: RequestLimits) -> None:
    """Everything that can be judged without tokenizing, in time linear in the request and never more:
    run on the event loop before the request takes any other work (or a tokenizer thread)."""
    which = request.WhichOneof("input")
    if which is None:
        raise RequestError("request has no input: set prompt, messages or token_ids")
    if which in ("prompt", "messages") and not has_tokenizer:
        raise RequestError("this model was imported without a tokenizer: send token_ids")
    if which == "prompt":
        size = _text_bytes([request.prompt], limits.max_prompt_bytes)
        if size > limits.max_prompt_bytes:
            raise RequestError(f"prompt exceeds the {limits.max_prompt_bytes}-byte limit", "prompt")
    elif which == "messages":
        messages = request.messages.messages
        if not messages:
            raise RequestError("messages is empty")
        if len(messages) > limits.max_messages:
            raise RequestError(f"{len(messages)} messages, the limit is {limits.max_messages}")
        size = _text_bytes([t for m in messages for t in (m.role, m.content)], limits.max_prompt_bytes)
        if size > limits.max_prompt_bytes:
            raise RequestError(f"messages exceed the {limits.max_prompt_bytes}-byte limit", "prompt")
        bad_roles = {m.role for m in messages} - {"system", "user", "assistant"}
        if bad_roles:
            raise RequestError(f"unknown message roles: {sorted(bad_roles)}")
    else:
        ids = request.token_ids.ids
        if not ids:
            raise RequestError("token_ids is empty")
        if len(ids) > limits.max_prompt_tokens:
            raise ContextLengthError(f"prompt has {len(ids)} tokens, the limit is {limits.max_prompt_tokens}",
                                     "prompt", limits.max_prompt_tokens)
        bad = [i for i in ids if i >= limits.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary of {limits.vocab_size}")
    if not 1 <= request.max_new_tokens <= limits.max_new_tokens:
        raise RequestError(f"max_new_tokens must be in 1..{limits.max_new_tokens}, got {request.max_new_tokens}",
                           "max_new_tokens", limits.max_new_tokens)
    if request.max_new_tokens >= limits.max_positions:
        raise ContextLengthError(f"max_new_tokens ({request.max_new_tokens}) leaves no room for a prompt in the "
                                 f"model's {limits.max_positions} positions", "prompt", limits.max_positions)
    if len(request.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_LENGTH for s in request.stop):
        raise RequestError(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings of <= {MAX_STOP_LENGTH} chars")
    if request.stop and not has_tokenizer:
        raise RequestError("stop strings need a tokenizer")
    _sampling_of(request)


def _start_ids(tokenizer: PreTrainedTokenizerBase, limits: RequestLimits) -> list[int]:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else limits.bos_token_id
    if not isinstance(bos, int):
        raise RequestError("prompt is empty and this model has no beginning-of-sequence token", "prompt")
    return [bos]


def tokenize_request(request: pb.GenerateRequest, tokenizer: PreTrainedTokenizerBase | None,
                     limits: RequestLimits, config_eos: object) -> PreparedRequest:
    """The request as token ids, after :func:`check_request`; seconds for a large input, so run it
    on a worker thread, never on the event loop."""
    which = request.WhichOneof("input")
    ids: list[int]
    if which == "prompt":
        assert tokenizer is not None
        # As OpenAI's completions: an empty prompt is a generation from the beginning-of-sequence token.
        ids = text_token_ids(tokenizer, request.prompt) if request.prompt else _start_ids(tokenizer, limits)
    elif which == "messages":
        assert tokenizer is not None
        if tokenizer.chat_template is None:
            raise RequestError("this model has no chat template: send a prompt")
        ids = chat_token_ids(tokenizer, [{"role": m.role, "content": m.content} for m in request.messages.messages])
    else:
        ids = list(request.token_ids.ids)
    if not ids:
        raise RequestError("input encodes to no tokens")
    if len(ids) > limits.max_prompt_tokens:
        raise ContextLengthError(f"prompt has {len(ids)} tokens, the limit is {limits.max_prompt_tokens}", "prompt",
                                 limits.max_prompt_tokens)
    if len(ids) + request.max_new_tokens > limits.max_positions:
        raise ContextLengthError(f"the prompt ({len(ids)} tokens) and the completion ({request.max_new_tokens} "
                                 f"tokens) exceed the model's {limits.max_positions} positions", "prompt",
                                 limits.max_positions)
    eos = frozenset() if request.ignore_eos else _eos_ids(tokenizer, config_eos)
    return PreparedRequest(ids, request.max_new_tokens, _sampling_of(request), tuple(request.stop), eos)


class Detokenizer:
    """Turns a growing list of ids into text deltas, holding back incomplete UTF-8 sequences.

    Each step decodes only a short window (the ids since the last emitted text plus the few before
    them, which fix spacing), so a long generation costs O(1) per token, not O(length).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start: ids before it are settled text
        self._read = 0  # ids before this were already emitted
        self.text = ""

    def add(self, token_id: int) -> str:
        if self._tokenizer is None:
            return ""
        self._ids.append(token_id)
        before = decode(self._tokenizer, self._ids[self._prefix:self._read])
        window = decode(self._tokenizer, self._ids[self._prefix:])
        if len(window) <= len(before) or window.endswith("\ufffd"):
            return ""  # nothing printable yet (a special token, or half of a multi-byte character)
        delta = window[len(before):]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += delta
        return delta


def new_session_id() -> str:
    """122 random bits: in dev mode without TLS, knowing a session's id is what lets a caller cancel it."""
    return uuid.uuid4().hex


async def generate(runtime: NodeRuntime, view: PlanView, request: PreparedRequest,
                   tokenizer: PreTrainedTokenizerBase | None,
                   session_id: str | None = None,
                   on_prefilled: Callable[[str], None] | None = None) -> AsyncGenerator[pb.GenerateEvent, None]:
    """Run the ring for one request, yielding one event per token; the last carries finish and usage.
    ``on_prefilled`` hears the session id once the prompt is through (its first token exists)."""
    session = RingSession(runtime, session_id or new_session_id(), request.sampling, request.prompt_ids,
                          runtime.config.recovery_timeout_s)
    await session.open(view)
    session_id = session.session_id
    detok = Detokenizer(tokenizer)
    try:
        for index in range(request.max_new_tokens):
            started = time.perf_counter()
            token = await session.next_token(index)
            if index == 0 and on_prefilled is not None:
                on_prefilled(session_id)
            if index > 0:
                runtime.stats.record_token((time.perf_counter() - started) * 1000.0)
            TOKENS.inc()
            delta = detok.add(token)
            finish = ""
            if token in request.eos_ids:
                finish = "eos"
            else:
                hit = _first_stop(detok.text, request.stop, len(detok.text) - len(delta))
                if hit is not None:
                    delta = delta[: max(0, hit - (len(detok.text) - len(delta)))]
                    finish = "stop"
                elif index + 1 == request.max_new_tokens:
                    finish = "length"
            assert session.view is not None
            event = pb.GenerateEvent(session_id=session_id, index=index, token_id=token, text=delta,
                                     finish_reason=finish, epoch=session.view.epoch)
            if finish:
                event.usage.CopyFrom(pb.Usage(prompt_tokens=len(request.prompt_ids), completion_tokens=index + 1))
            yield event
            if finish:
                return
    finally:
        session.close()


def _first_stop(text: str, stops: tuple[str, ...], new_from: int) -> int | None:
    """Index where the earliest stop string that ends in the new text begins, if any."""
    hits = []
    for stop in stops:
        at = text.find(stop, max(0, new_from - len(stop) + 1))
        if at != -1:
            hits.append(at)
    return min(hits) if hits else None
