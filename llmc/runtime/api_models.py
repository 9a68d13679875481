"""The HTTP API's request models, limits and errors (OpenAI's shapes), apart from the app.

Pydantic models with ``extra="forbid"`` and strict types: a malformed request becomes an
``ApiError`` (a 400 naming the field), never a 422 or a 500. The limits below are the per-request
bounds ``server.py``'s docstring lists.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_CHOICES = 64          # n x prompts of one request
MAX_LOGPROBS = 20         # top alternatives per token (OpenAI allows 5 for completions, 20 for chat)
MAX_STOP_CHARS = 256      # per stop string: the engine thread matches stop strings against every new token
MAX_ERROR_CHARS = 512     # of an error message (param: a quarter); messages quote request values of any size

# ---- errors ---------------------------------------------------------------------------------------

class ApiError(Exception):
    """An error answered with OpenAI's JSON shape."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.type, self.headers = status, param, code, type, headers

    def response(self) -> JSONResponse:
        return error_response(self.status, str(self), param=self.param, code=self.code, type=self.type,
                              headers=self.headers)


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> JSONResponse:
    def clip(text: str | None, limit: int) -> str | None:
        return text if text is None or len(text) <= limit else text[:limit] + "..."

    body = {"error": {"message": clip(message, MAX_ERROR_CHARS), "type": type,
                      "param": clip(param, MAX_ERROR_CHARS // 4), "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def validation_error(exc: ValidationError | RequestValidationError) -> ApiError:
    """The first pydantic error as a 400 naming the field (``messages.0.content``)."""
    error = exc.errors()[0]
    loc = [str(part) for part in error.get("loc", ()) if part not in ("body",)]
    param = ".".join(loc) or None
    message = error.get("msg", "invalid value").removeprefix("Value error, ")
    if error.get("type") == "extra_forbidden":
        message = f"unknown field {param!r} (llmc rejects fields it does not know rather than ignore them)"
    elif param:
        message = f"{param}: {message}"
    return ApiError(message, param=param, code=error.get("type"))


# ---- request models -------------------------------------------------------------------------------

def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Strict(BaseModel):
    # strict: "1" is not a number and true is not 1; NaN and inf are not numbers either.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        # OpenAI's API takes null for any optional field and means "use the default".
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(_Strict):
    include_usage: bool = False


class GenerationRequest(_Strict):
    """Fields shared by both endpoints."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: list[str] = Field(default_factory=list, max_length=16)
    seed: int | None = Field(None, ge=-2**63, lt=2**64)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    # extensions (vLLM's names)
    top_k: int = Field(0, ge=-1)  # -1 (vLLM's "off") and 0 both mean off
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    ignore_eos: bool = False
    stop_token_ids: list[int] = Field(default_factory=list, max_length=64)
    priority: int = 0
    # OpenAI fields that change nothing here: accepted, ignored
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    # OpenAI fields llmc cannot honour: accepted only at their do-nothing value (see NEUTRAL)
    logit_bias: dict[str, float] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        if any(len(s) > MAX_STOP_CHARS for s in value):
            raise ValueError(f"a stop string may be at most {MAX_STOP_CHARS} characters long")
        return value


class CompletionRequest(GenerationRequest):
    prompt: Any
    max_tokens: int | None = Field(None, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value:
            if all(is_int(t) for t in value) or all(isinstance(s, str) for s in value):
                return value
            if all(isinstance(p, list) and p and all(is_int(t) for t in p) for p in value):
                return value
        raise ValueError("prompt must be a string, a list of token ids, or a non-empty list of either")


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str = ""  # null (an assistant turn with tool calls) reads as empty
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        if isinstance(value, list):  # OpenAI's content parts: only text ones mean anything here
            if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   and set(p) == {"type", "text"} for p in value):
                return "".join(p["text"] for p in value)
            raise ValueError("content parts must be {\"type\": \"text\", \"text\": ...}; this model reads text only")
        if not isinstance(value, str):
            raise ValueError("content must be a string or a list of text parts")
        return value

    def template_dict(self) -> dict:
        message = {"role": self.role, "content": self.content}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI in favour of the next one
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    parallel_tool_calls: bool | None = None  # ignored: there are no tools
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None


# Field -> the values that ask for nothing llmc would have to do; anything else is a 400.
NEUTRAL: dict[str, tuple] = {
    "logit_bias": (None, {}),
    "echo": (False,),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
}


def check_neutral(body: BaseModel) -> None:
    for name, allowed in NEUTRAL.items():
        if name in type(body).model_fields and getattr(body, name) not in allowed:
            raise ApiError(f"{name} is not supported by this server (accepted only as "
                           f"{' or '.join(json.dumps(a) for a in allowed)})", param=name, code="unsupported")
