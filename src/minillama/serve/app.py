"""An OpenAI-compatible completions API for a checkpoint, on FastAPI + uvicorn (the ASGI stack most Python model
servers use: request validation from type hints, Server-Sent Events, graceful shutdown on SIGTERM).

Endpoints: POST /v1/completions (streaming or not), GET /v1/models, GET /health, GET / (a playground page).
A base model has no chat template, so /v1/chat/completions answers 400 saying so.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from minillama.model import Transformer
from minillama.serve.batcher import Batcher, Row
from minillama.tokenizer import Tokenizer

MAX_BODY_BYTES = 1 << 20
DRAIN_BYTES = 64 << 20  # a larger body is not even read: the connection just closes
MAX_N = 16


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False  # a last chunk with usage and no choices, as OpenAI sends only when asked


class CompletionRequest(BaseModel):
    """The fields of OpenAI's completions request that a base model can honour (top_k is an extension)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | list[str]
    max_tokens: Annotated[int, Field(ge=1)] = 16
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class ServerError(Exception):
    """A request the server refuses: HTTP status, OpenAI-style message and the field it is about."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def error_response(message: str, param: str | None, status: int = 400, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def create_app(model: Transformer, tokenizer: Tokenizer, model_name: str, max_batch: int = 8) -> FastAPI:
    """The server for one loaded model; its decode engine starts and stops with the app."""
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state["batcher"] = Batcher(model, tokenizer, max_batch)
        yield
        state["batcher"].close()  # after uvicorn has let in-flight requests finish (it drains on SIGTERM)

    app = FastAPI(title="Mini Llama", lifespan=lifespan, docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        size = int(request.headers.get("content-length") or 0)
        if size > MAX_BODY_BYTES:
            if size <= DRAIN_BYTES:  # read and drop it, so that the client can read the answer before the close
                async for _ in request.stream():
                    pass
            return error_response(f"the request body is larger than {MAX_BODY_BYTES:,} bytes", None)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problem = exc.errors()[0]
        where = [str(part) for part in problem.get("loc", ()) if part != "body"]
        field = where[0] if where else None
        if problem.get("type") == "json_invalid":
            return error_response(f"the body is not valid JSON ({problem.get('msg')})", None)
        if problem.get("type") == "extra_forbidden":
            return error_response(f"unknown field '{field}'", field)
        return error_response(f"'{'.'.join(where)}': {problem.get('msg')}", field)

    @app.exception_handler(ServerError)
    async def refused(request: Request, exc: ServerError) -> JSONResponse:
        return error_response(exc.message, exc.param, exc.status, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:  # 404, 405 in OpenAI's shape
        return error_response(f"{request.method} {request.url.path}: {exc.detail}", None, exc.status_code)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    card = {"id": model_name, "object": "model", "created": created, "owned_by": "minillama"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name:path}")
    async def model_card(name: str) -> dict[str, Any]:
        check_model(name)
        return card

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise ServerError(f"The model '{name}' does not exist; this server serves '{model_name}'", "model", 404,
                              "model_not_found")

    @app.post("/v1/chat/completions")
    async def chat() -> JSONResponse:
        return error_response(f"{model_name} is a base model without a chat template; send text to continue to "
                              "/v1/completions", "messages")

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> str:
        return resources.files("minillama.serve").joinpath("playground.html").read_text().replace("{{MODEL}}", model_name)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ServerError("'prompt' is an empty list; send at least one prompt", "prompt")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or not all(stops):
            raise ServerError("'stop' takes up to 4 non-empty sequences", "stop")
        encoded = [tokenizer.encode(p, bos=True) for p in prompts]
        limit = model.config.max_seq_len
        for ids in encoded:
            if len(ids) + body.max_tokens > limit:
                raise ServerError(f"a prompt of {len(ids)} tokens plus max_tokens {body.max_tokens} exceeds the model's "
                                  f"context of {limit} tokens", "prompt" if len(ids) >= limit else "max_tokens")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, str, str | None]] = asyncio.Queue()
        rows = []
        for p, ids in enumerate(encoded):
            for j in range(body.n):
                index = p * body.n + j

                def emit(delta: str, reason: str | None, index: int = index) -> None:
                    loop.call_soon_threadsafe(events.put_nowait, (index, delta, reason))

                rows.append(Row(ids, body.max_tokens, body.temperature, body.top_p if body.top_p < 1 else None,
                                body.top_k or None, None if body.seed is None else body.seed + index, stops, emit))
        state["batcher"].submit(rows)
        completion_id, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_tokens = sum(len(ids) for ids in encoded)  # each prompt once, however many completions it has

        def usage() -> dict[str, int]:
            completion_tokens = sum(len(r.tokens) for r in rows)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens}

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            return {"id": completion_id, "object": "text_completion", "created": now, "model": model_name,
                    "choices": choices, **extra}

        if body.stream:
            # As OpenAI: with include_usage every chunk says usage null, and one more chunk, without choices, has it.
            per_chunk_usage = {"usage": None} if body.stream_options and body.stream_options.include_usage else {}

            async def stream() -> AsyncIterator[str]:
                done = 0
                try:
                    while done < len(rows):
                        index, delta, reason = await events.get()
                        if reason == "error":
                            yield f"data: {json.dumps({'error': {'message': delta, 'type': 'server_error'}})}\n\n"
                            return
                        done += reason is not None
                        yield "data: " + json.dumps(chunk([{"text": delta, "index": index, "logprobs": None,
                                                             "finish_reason": reason}], **per_chunk_usage)) + "\n\n"
                    if per_chunk_usage:
                        yield "data: " + json.dumps(chunk([], usage=usage())) + "\n\n"
                    yield "data: [DONE]\n\n"
                finally:  # the client went away, or the stream ended: free the rows
                    for row in rows:
                        row.cancelled.set()

            return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        texts, reasons = [""] * len(rows), [None] * len(rows)
        try:
            while sum(r is not None for r in reasons) < len(rows):
                index, delta, reason = await events.get()
                if reason == "error":
                    raise ServerError(f"generation failed: {delta}", None, 500)
                texts[index] += delta
                reasons[index] = reason
        finally:
            for row in rows:
                row.cancelled.set()
        return chunk([{"text": t, "index": i, "logprobs": None, "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))],
                     usage=usage())

    return app


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, device: str = "auto",
          dtype: str = "auto", tokenizer: str | None = None, model_name: str | None = None) -> None:
    """Load a checkpoint (or a run directory's newest) and serve it until SIGTERM or Ctrl-C."""
    import sys

    import uvicorn

    from minillama.checkpoint import load_for_inference
    from minillama.errors import MiniLlamaError

    if not 1 <= max_batch <= 256:
        raise MiniLlamaError(f"--max-batch is {max_batch}; expected an integer from 1 to 256")
    model, loaded_tokenizer, info = load_for_inference(checkpoint, device, dtype, tokenizer)
    name = model_name or str(info.metadata.get("model_preset") or info.path.name)
    print(f"using {info.path}; serving {name} on http://{host}:{port} (playground at /, API at /v1/completions)",
          file=sys.stderr)
    uvicorn.run(create_app(model, loaded_tokenizer, name, max_batch), host=host, port=port, log_level="warning",
                timeout_graceful_shutdown=60)
