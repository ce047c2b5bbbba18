"""The OpenAI request bodies the gateway accepts, and their translation into one mesh generation.

Semantics follow OpenAI, not the SDK's defaults: ``temperature`` defaults to 1.0 (so ``temperature=0``
is the way to ask for greedy decoding), and a request without ``seed`` gets a fresh random seed, so
repeated sampled requests differ unless the caller pins one. ``top_k`` and ``ignore_eos`` are accepted
as extensions (as vLLM does). Fields the mesh cannot honour are refused rather than silently ignored.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from splitmesh.client import Messages
from splitmesh.gateway_errors import ApiError

DEFAULT_TEMPERATURE = 1.0  # OpenAI's default
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
MAX_STOP = 4  # OpenAI's limit on stop sequences
# Fields of the OpenAI API the mesh cannot honour; a request that sets one to a non-neutral value is refused.
UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "logprobs", "top_logprobs", "logit_bias",
               "presence_penalty", "frequency_penalty", "echo", "suffix", "audio", "prediction")
NEUTRAL_RESPONSE_FORMAT = {"type": "text"}


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # "developer" is OpenAI's newer name for the system role.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def as_mesh(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or ())
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class SamplingFields(BaseModel):
    """What chat and text completions share; unknown fields are kept so they can be checked, not lost."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # extension: 0 = off
    seed: int | None = None
    stop: str | list[str] | None = None
    n: Literal[1] | None = 1  # one choice per request
    best_of: Literal[1] | None = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension: generate max_tokens even past the end-of-sequence token
    response_format: dict[str, object] | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(stop)}")
        return stop

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]


@dataclass(frozen=True)
class Generation:
    """One mesh generation, in the SDK's terms."""

    prompt: str | Messages | Sequence[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: tuple[str, ...]
    ignore_eos: bool
    prompt_param: str = "messages"  # the OpenAI field that carried the prompt, named in errors about it
    max_tokens_param: str = "max_tokens"  # and the one that carried max_new_tokens


def refuse_unsupported(body: SamplingFields) -> None:
    """Ignoring e.g. ``tools`` or ``logprobs`` would hand back an answer to a different question."""
    extra = body.model_extra or {}
    for name in UNSUPPORTED:
        if extra.get(name) not in (None, False, 0, [], {}):
            raise ApiError(400, f"{name} is not supported by splitmesh", param=name, code="unsupported_parameter")
    if body.response_format not in (None, NEUTRAL_RESPONSE_FORMAT):
        raise ApiError(400, "only response_format {\"type\": \"text\"} is supported", param="response_format",
                       code="unsupported_parameter")


def _sampling(body: SamplingFields) -> tuple[float, float, int]:
    """(temperature, top_p, top_k); OpenAI's ``top_p=0`` keeps only the likeliest token, i.e. top_k=1."""
    temperature = DEFAULT_TEMPERATURE if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    if top_p == 0.0:
        return temperature, 1.0, 1
    return temperature, top_p, body.top_k


def _seed(seed: int | None) -> int:
    """OpenAI seeds may be any integer; the mesh takes a uint64. Absent -> random, as OpenAI samples."""
    return secrets.randbits(63) if seed is None else seed % 2**64


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _generation(body: SamplingFields, prompt: str | Messages | Sequence[int], max_tokens: int, prompt_param: str,
                max_tokens_param: str) -> Generation:
    refuse_unsupported(body)
    temperature, top_p, top_k = _sampling(body)
    return Generation(prompt=prompt, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                      seed=_seed(body.seed), stop=_stops(body.stop), ignore_eos=body.ignore_eos,
                      prompt_param=prompt_param, max_tokens_param=max_tokens_param)


def chat_generation(body: ChatCompletionRequest, default_max_tokens: int) -> Generation:
    """``max_completion_tokens`` is OpenAI's newer name for ``max_tokens``; it wins when both are set."""
    max_tokens = body.max_completion_tokens or body.max_tokens or default_max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    return _generation(body, [m.as_mesh() for m in body.messages], max_tokens, "messages", param)


def _single_prompt(prompt: str | list[str] | list[int] | list[list[int]]) -> str | list[int]:
    """A text or token-id prompt; batches of several prompts are refused (one choice per request).

    An empty string is a prompt, as for OpenAI: the generation starts from the beginning-of-sequence token.
    """
    if isinstance(prompt, str):
        return prompt
    if not prompt:
        raise ApiError(400, "prompt is empty", param="prompt", code="invalid_value")
    if all(isinstance(p, int) for p in prompt):
        return [p for p in prompt if isinstance(p, int)]
    single = prompt[0] if len(prompt) == 1 else None
    if isinstance(single, str):
        return single
    if isinstance(single, list):
        return single
    raise ApiError(400, "prompt must be one string or one list of token ids: batches are not supported",
                   param="prompt", code="invalid_value")


def completion_generation(body: CompletionRequest) -> Generation:
    max_tokens = body.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS
    return _generation(body, _single_prompt(body.prompt), max_tokens, "prompt", "max_tokens")
