"""OpenAI-style error bodies for the gateway, so OpenAI clients raise their usual exception types.

Every failure leaves as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status that
says whose fault it is: 4xx for the caller's request, 5xx when the mesh behind the gateway fails.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from splitmesh.client import SplitmeshError

if TYPE_CHECKING:  # gateway_schema raises ApiError: import it for the annotation only
    from splitmesh.gateway_schema import Generation

log = logging.getLogger(__name__)

# gRPC status of a failed mesh call -> HTTP status. Only the caller's own mistakes map to 4xx; anything
# else is the mesh's (or the gateway's link to it) and maps to 5xx. Unlisted codes map to 502.
HTTP_STATUS_OF_GRPC = {
    "INVALID_ARGUMENT": 400,
    "OUT_OF_RANGE": 400,
    "RESOURCE_EXHAUSTED": 429,  # node session limits: OpenAI clients back off and retry
    "FAILED_PRECONDITION": 503,  # e.g. no committed plan yet
    "ABORTED": 503,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


class ApiError(Exception):
    """A failure the gateway reports to its caller in OpenAI's error format."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": error_type(self.status), "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def error_type(status: int) -> str:
    """OpenAI's ``type`` field for an HTTP status."""
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if status < 500 else "server_error"


def from_mesh(exc: SplitmeshError, generation: Generation | None = None) -> ApiError:
    """Translate a failed mesh call; the gRPC status name travels on as the (lower-case) error code.

    A refusal about a request field (the head says which, see common.request_errors) names the
    OpenAI field of ``generation``'s request, with OpenAI's code where it has one.
    """
    if generation is not None and exc.field == "prompt" and exc.code == "OUT_OF_RANGE":
        param = generation.prompt_param
        return ApiError(400, f"This request exceeds the model's context length: {exc.message}. Please reduce the "
                             f"length of the {param}.", param=param, code="context_length_exceeded")
    if generation is not None and exc.field == "max_new_tokens":
        param, value = generation.max_tokens_param, generation.max_new_tokens
        limit = f"at most {exc.limit}" if exc.limit else "fewer"
        return ApiError(400, f"{param} is too large: {value}. This model supports {limit} completion tokens, "
                             f"whereas you provided {value}.", param=param, code="invalid_value")
    status = HTTP_STATUS_OF_GRPC.get(exc.code, 502)
    message = exc.message or exc.code
    if status >= 500:
        log.warning("mesh call failed: %s: %s", exc.code, exc.message)
        message = f"the mesh failed ({exc.code}): {message}"
    return ApiError(status, message, code=exc.code.lower())


def _param(loc: Sequence[int | str]) -> str | None:
    """``("body", "messages", 0, "content")`` -> ``"messages[0].content"`` (OpenAI's way of naming a field)."""
    name = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or None


def from_validation(exc: RequestValidationError) -> ApiError:
    """A body that does not parse or validate is a 400 naming the first offending field."""
    errors = exc.errors()
    first: dict[str, Any] = dict(errors[0]) if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":  # its loc holds a character offset, not a field
        return ApiError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                        code="invalid_json")
    param = _param(first.get("loc", ()))
    message = f"{param}: {first['msg']}" if param else str(first["msg"])
    return ApiError(400, message, param=param, code="invalid_value")


def install_handlers(app: FastAPI) -> None:
    """Route every error, including FastAPI's own 404/405/422, through the OpenAI error format."""

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def on_mesh_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, SplitmeshError)
        return from_mesh(exc).response()

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return from_validation(exc).response()

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return ApiError(exc.status_code, str(exc.detail)).response()

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(SplitmeshError, on_mesh_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
