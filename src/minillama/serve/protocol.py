"""The shapes of the API: OpenAI's completions request (with vLLM's token-id prompts and `top_k` where OpenAI
leaves gaps), its responses and errors, and the tokenizer endpoints' bodies."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from minillama.inference.engine import Completion
from minillama.inference.sampling import MAX_SEED
from minillama.inference.scoring import TokenLogprobs
from minillama.tokenizer import Tokenizer

MAX_N = 16  # completions per prompt
MAX_LOGPROBS = 5  # alternatives per token, as OpenAI allows


class ServerError(Exception):
    """A request the server refuses or fails: HTTP status, OpenAI-style message, the field it is about."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def error_response(message: str, param: str | None = None, status: int = 400, code: str | None = None) -> JSONResponse:
    kind = {429: "rate_limit_error", 503: "server_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def _no_lone_surrogates(value: Any) -> Any:
    """Text from JSON may hold a lone surrogate ("\\ud800"), which is not Unicode text and cannot be encoded."""
    for text in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"holds a lone surrogate ({text[exc.start]!a}), which is not Unicode text") from None
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "5" is not 5, nor "yes" true: OpenAI refuses them too

    include_usage: bool = False  # a last chunk with usage and no choices, as OpenAI sends only when asked


class CompletionRequest(BaseModel):
    """Every field of OpenAI's completions request. Those a base model cannot honour (penalties, logit_bias,
    best_of > n, suffix) are accepted at their no-op values and refused otherwise, naming the field."""

    model_config = ConfigDict(extra="forbid", strict=True)  # "5" is not 5, nor "yes" true: OpenAI refuses them too

    model: str | None = None
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: Annotated[int, Field(ge=0)] | None = 16  # 0 (with echo) scores the prompt only
    temperature: Annotated[float, Field(ge=0, le=2)] | None = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] | None = 1.0
    top_k: Annotated[int, Field(ge=0)] | None = None  # an extension: 0 or none is no cut
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = 1
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool | None = False
    best_of: Annotated[int, Field(ge=1)] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    user: str | None = None

    _check_text = field_validator("prompt", "stop", "suffix")(_no_lone_surrogates)

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) for the first field set to something this server cannot do."""
        n = self.n or 1
        if self.best_of not in (None, n):
            return "best_of", f"best_of {self.best_of} is not supported: completions are not ranked; leave it out or set it to n ({n})"
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                return name, f"{name} is not supported; leave it out or set it to 0"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported; leave it out or send {}"
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported by a left-to-right base model; leave it out"
        if self.max_tokens == 0 and not self.echo:
            return "max_tokens", "max_tokens 0 returns nothing; set echo to score the prompt, or ask for at least 1 token"
        return None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "5" is not 5, nor "yes" true: OpenAI refuses them too

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True  # BOS first, as a text prompt to /v1/completions gets

    _check_text = field_validator("prompt")(_no_lone_surrogates)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "5" is not 5, nor "yes" true: OpenAI refuses them too

    model: str | None = None
    tokens: list[StrictInt]


def token_text(tokenizer: Tokenizer, token: int) -> str:
    """A token as OpenAI's logprobs name it: its text, or "bytes:\\xNN" for one byte of a longer character. A byte
    token below 0x80 spells a whole character (a newline, a tab), so it is that character's text."""
    if tokenizer.is_byte(token):
        value = tokenizer.byte_value(token)
        return chr(value) if value < 0x80 else f"bytes:\\x{value:02x}"
    return tokenizer.id_to_piece(token).replace("\u2581", " ")


def logprobs_payload(tokenizer: Tokenizer, entries: list[TokenLogprobs], text_offsets: list[int]) -> dict[str, Any]:
    """OpenAI's legacy logprobs object: tokens, their log-probabilities, the top alternatives, text offsets."""
    top = []
    for entry in entries:
        if entry.logprob is None:
            top.append(None)
            continue
        alternatives: dict[str, float] = {}
        for token, logprob in entry.top:  # most likely first: a name two tokens share keeps the likelier
            alternatives.setdefault(token_text(tokenizer, token), logprob)
        top.append(alternatives)
    return {"tokens": [token_text(tokenizer, e.token) for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": top, "text_offset": text_offsets}


def text_offsets(tokenizer: Tokenizer, context: list[int], tokens: list[int], start: int) -> list[int]:
    """Where each of `tokens` starts in the text (decoded after `context`), counted from `start`."""
    return [text_offset(tokenizer, context, tokens[:i], start) for i in range(len(tokens))]


def text_offset(tokenizer: Tokenizer, context: list[int], before: list[int], start: int) -> int:
    """Where the token after `before` starts in the text decoded after `context`, counted from `start`."""
    return start + len(tokenizer.decode(context + before)) - len(tokenizer.decode(context))


def choice_logprobs(tokenizer: Tokenizer, completion: Completion, echo: bool, prompt_text: str) -> dict[str, Any]:
    """The logprobs of a finished choice: the prompt's first when echoed, then its own tokens."""
    prompt = list(completion.request.prompt)
    entries, offsets = [], []
    if echo and completion.prompt_logprobs is not None:
        entries += completion.prompt_logprobs
        offsets += text_offsets(tokenizer, [], prompt, 0)
    entries += completion.logprobs
    offsets += text_offsets(tokenizer, prompt, [e.token for e in completion.logprobs], len(prompt_text) if echo else 0)
    return logprobs_payload(tokenizer, entries, offsets)
