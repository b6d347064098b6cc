"""An OpenAI-compatible completions API for a checkpoint, on FastAPI + uvicorn and the inference engine.

Endpoints: POST /v1/completions (streaming or not; logprobs and echo, token-id prompts as vLLM takes them),
GET /v1/models and /v1/models/{id}, POST /tokenize and /detokenize, GET /tokenizer_info, GET /metrics
(Prometheus), GET /health, GET / (a playground page). A base model has no chat template, so
/v1/chat/completions answers 400 saying so. Every error is OpenAI's error object.

Requests run on one engine thread (`worker.py`) with continuous batching: a request starts at the engine's
next step, whatever else runs. Before a request reaches it, the server checks the Host header (DNS rebinding),
reads at most `max_body_bytes` of the body whatever the transfer encoding, tokenizes off the event loop, and
refuses with 429 what the queue has no room for.
"""

from __future__ import annotations

import asyncio
import html
import ipaddress
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from minillama.errors import ArgumentError
from minillama.generate import document_end_ids
from minillama.inference.engine import Engine, Update, outside_vocabulary
from minillama.inference.engine import Request as EngineRequest
from minillama.inference.sampling import SamplingParams, nth_seed
from minillama.inference.text import MAX_STOP_STRINGS
from minillama.model import Transformer
from minillama.serve.metrics import Metrics
from minillama.serve.protocol import (
    CompletionRequest,
    DetokenizeRequest,
    ServerError,
    TokenizeRequest,
    choice_logprobs,
    error_response,
    logprobs_payload,
    text_offset,
    text_offsets,
)
from minillama.serve.worker import EngineWorker, Job
from minillama.tokenizer import Tokenizer

ACCESS_LOG = logging.getLogger("minillama.serve.access")  # one line per request; `serve` sends it to stderr
MAX_BODY_BYTES = 1 << 20
DRAIN_BYTES = 16 << 20  # a larger body is not even read
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@dataclass
class Serving:
    """What the routes serve from (app.state.serving)."""

    model: Transformer
    tokenizer: Tokenizer
    model_name: str
    worker: EngineWorker
    metrics: Metrics
    created: int
    start_prompt: str  # what the playground's prompt box holds at first


router = APIRouter()


def create_app(model: Transformer, tokenizer: Tokenizer, model_name: str, max_batch: int = 8, max_queued: int | None = None,
               max_queued_tokens: int | None = None, allowed_hosts: list[str] | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, on_stop: Callable[[str], None] = lambda reason: None,
               start_prompt: str = "") -> FastAPI:
    """The server for one loaded model: `max_batch` completions decode together; at most `max_queued`
    completions (default 32 x max_batch) and `max_queued_tokens` tokens (default 32 x max_batch x max_seq_len / 2)
    wait or run at once. `allowed_hosts` (default: the loopback names; ["*"]: any) are the Host headers served.
    The engine thread starts and stops with the app; `on_stop` hears if it ever stops by itself. The playground
    starts from `start_prompt`."""
    max_queued = max_queued or 32 * max_batch
    max_queued_tokens = max_queued_tokens or 32 * max_batch * model.config.max_seq_len // 2

    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics = Metrics()
        worker = EngineWorker(Engine(model, tokenizer, rows=max_batch), metrics, max_queued, max_queued_tokens, on_stop)
        app.state.serving = Serving(model, tokenizer, model_name, worker, metrics, int(time.time()), start_prompt)
        yield
        worker.close()  # after uvicorn has let in-flight requests finish (it drains on SIGTERM)

    app = FastAPI(title="Mini Llama", lifespan=asynccontextmanager(lifespan), docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(router)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(ServerError, _refused)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(RequestGuard, allowed_hosts=list(allowed_hosts or LOOPBACK_HOSTS), max_body_bytes=max_body_bytes)
    return app


class RequestGuard:
    """ASGI middleware run before routing: a Host header that is not allowed is refused (a web page could
    otherwise reach a local server by DNS rebinding), and the body is read here, at most `max_body_bytes` of
    it whatever the transfer encoding (chunked uploads declare no length), then handed on whole."""

    def __init__(self, app: Callable, allowed_hosts: list[str], max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.any_host = "*" in allowed_hosts
        self.allowed = {host.lower().strip("[]") for host in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.monotonic(), [0]

        async def send_noting_status(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_noting_status)
        finally:
            ACCESS_LOG.info(access_line(scope, status[0], time.monotonic() - started))

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        host = _hostname(headers.get("host", ""))
        if not self.any_host and host not in self.allowed:
            return await error_response(f"the Host header {headers.get('host', '')!r} is not one this server answers to "
                                        f"({', '.join(sorted(self.allowed))}); start it with --allowed-hosts to add it")(scope, receive, send)
        body, more, received = bytearray(), True, 0
        declared = int(headers.get("content-length") or 0) if (headers.get("content-length") or "0").isdigit() else 0
        while more and received <= DRAIN_BYTES:
            if declared > DRAIN_BYTES:
                break  # not worth reading: answer, and the connection closes
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            received += len(message.get("body", b""))
            more = message.get("more_body", False)
            if received <= self.max_body_bytes:
                body += message.get("body", b"")
        if received > self.max_body_bytes or more or declared > self.max_body_bytes:
            # Past the limit the rest is read and dropped (up to DRAIN_BYTES), so that the client reads the answer.
            return await error_response(f"the request body is larger than {self.max_body_bytes:,} bytes", None, 413)(scope, receive, send)
        if scope["method"] == "POST" and "json" not in headers.get("content-type", ""):
            # every body this API takes is JSON: read it as such whatever the header says (`curl -d` sends a form's type)
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
                     + [(b"content-type", b"application/json")]}
        delivered = False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: the disconnect a streaming response listens for

        return await self.app(scope, replay, send)


def access_line(scope: Scope, status: int, seconds: float) -> str:
    """One request as uvicorn's access log writes it, with the time it took and, for a completion, its tokens in and
    out (never the prompt's text): 127.0.0.1:50512 - "POST /v1/completions HTTP/1.1" 200 0.41 s, tokens 12 in 16 out."""
    client = scope.get("client") or ("-", 0)
    line = f'{client[0]}:{client[1]} - "{scope["method"]} {scope["path"]} HTTP/{scope.get("http_version", "1.1")}" {status} {seconds:.2f} s'
    usage = (scope.get("state") or {}).get("usage")
    if usage is not None:
        counted = usage()
        line += f", tokens {counted['prompt_tokens']} in {counted['completion_tokens']} out"
    return line


def _hostname(host_header: str) -> str:
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


# --- errors in OpenAI's shape ---------------------------------------------------------------------------------


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    problem = exc.errors()[0]
    where = [str(part) for part in problem.get("loc", ()) if part != "body"]
    field = where[0] if where else None
    if problem.get("type") == "json_invalid":
        return error_response(f"the body is not valid JSON ({problem.get('msg')})", None)
    if problem.get("type") == "extra_forbidden":
        return error_response(f"unknown field '{'.'.join(where)}'", field)
    return error_response(f"'{'.'.join(where)}': {problem.get('msg')}", field)


async def _refused(request: Request, exc: ServerError) -> JSONResponse:
    return error_response(exc.message, exc.param, exc.status, exc.code)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:  # 404, 405
    return error_response(f"{request.method} {request.url.path}: {exc.detail}", None, exc.status_code)


# --- routes ---------------------------------------------------------------------------------------------------


def _serving(request: Request) -> Serving:
    return request.app.state.serving


def _check_model(serving: Serving, name: str | None) -> None:
    if name is not None and name != serving.model_name:
        raise ServerError(f"The model '{name}' does not exist; this server serves '{serving.model_name}'", "model", 404,
                          "model_not_found")


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    error = _serving(request).worker.error
    if error is not None:
        return error_response(f"the engine has stopped ({error})", None, 503)
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(_serving(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(_serving(request))]}


@router.get("/v1/models/{name:path}")
async def model_card(name: str, request: Request) -> dict[str, Any]:
    serving = _serving(request)
    _check_model(serving, name)
    return _model_card(serving)


def _model_card(serving: Serving) -> dict[str, Any]:
    return {"id": serving.model_name, "object": "model", "created": serving.created, "owned_by": "minillama",
            "max_model_len": serving.model.config.max_seq_len}


@router.post("/v1/chat/completions")
async def chat(request: Request) -> JSONResponse:
    return error_response(f"{_serving(request).model_name} is a base model without a chat template; send text to continue to "
                          "/v1/completions", "messages")


@router.get("/", response_class=HTMLResponse)
async def playground(request: Request) -> str:
    serving = _serving(request)
    page = resources.files("minillama.serve").joinpath("playground.html").read_text()
    return page.replace("{{MODEL}}", html.escape(serving.model_name)).replace("{{PROMPT}}", html.escape(serving.start_prompt))


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    serving = _serving(request)
    _check_model(serving, body.model)
    tokens = await run_in_threadpool(serving.tokenizer.encode, body.prompt, body.add_special_tokens)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": serving.model.config.max_seq_len}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    serving = _serving(request)
    _check_model(serving, body.model)
    _check_token_ids(serving, body.tokens, "tokens")
    return {"prompt": await run_in_threadpool(serving.tokenizer.decode, body.tokens)}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict[str, Any]:
    tokenizer = _serving(request).tokenizer
    return {"tokenizer_class": "SentencePiece", "vocab_size": tokenizer.vocab_size, "bos_token_id": tokenizer.bos_id,
            "eos_token_id": tokenizer.eos_id, "model_max_length": _serving(request).model.config.max_seq_len}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    serving = _serving(request)
    _check_model(serving, body.model)
    problem = body.unsupported()
    if problem:
        raise ServerError(problem[1], problem[0])
    prompts, prompt_texts = await run_in_threadpool(_prompts, serving, body)
    job = Job([_engine_request(serving, body, ids, index) for index, ids in enumerate(prompts)], asyncio.get_running_loop())
    serving.worker.submit(job)
    reply = Reply(serving, body, job, prompt_texts)
    request.state.usage = reply.usage  # for the access log, read once the response is sent
    if body.stream:
        return StreamingResponse(reply.stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return JSONResponse(await reply.whole())


def _prompts(serving: Serving, body: CompletionRequest) -> tuple[list[list[int]], list[str]]:
    """The prompts as token ids (text gets BOS first; token ids are taken as they are, as vLLM takes them) and
    as text (for echo), checked against the model's vocabulary and context."""
    tokenizer, limit = serving.tokenizer, serving.model.config.max_seq_len
    prompt = body.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise ServerError("'prompt' is an empty list; send at least one prompt", "prompt")
    n = body.n or 1
    if len(prompt) * n > serving.worker.max_queued:
        raise ServerError(f"{len(prompt)} prompts x n={n} is {len(prompt) * n:,} completions; this server queues at most "
                          f"{serving.worker.max_queued:,} at once: send fewer per request", "prompt" if len(prompt) > 1 else "n")
    encoded, texts = [], []
    for item in prompt:
        if isinstance(item, str):
            encoded.append(tokenizer.encode(item, bos=True))
            texts.append(item)
        else:
            if not item:
                raise ServerError("a token-id prompt is empty; send at least one token (e.g. BOS)", "prompt")
            _check_token_ids(serving, item, "prompt")
            encoded.append(list(item))
            texts.append(tokenizer.decode(item))
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    for ids in encoded:
        if len(ids) + max_tokens > limit:
            fix = (f"at most {limit - len(ids)} fit: lower max_tokens" if len(ids) < limit else
                   f"the prompt alone fills it: shorten it by {len(ids) - limit + 1} tokens or more")
            raise ServerError(f"a prompt of {len(ids)} tokens plus max_tokens {max_tokens} exceeds the model's context of "
                              f"{limit} tokens; {fix}", "prompt" if len(ids) >= limit else "max_tokens")
    return encoded, texts


def _check_token_ids(serving: Serving, ids: list[int], field: str) -> None:
    vocab = serving.tokenizer.vocab_size
    bad = outside_vocabulary(ids, vocab)
    if bad is not None:
        raise ServerError(f"token id {bad} is outside the vocabulary (0 to {vocab - 1})", field)


def _engine_request(serving: Serving, body: CompletionRequest, prompt: list[int], index: int) -> EngineRequest:
    """The engine's request for one prompt; its completions are choices index * n + j, seeded seed + that."""
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOP_STRINGS or not all(stops):
        raise ServerError(f"'stop' takes up to {MAX_STOP_STRINGS} non-empty sequences", "stop")
    n = body.n or 1
    seed = nth_seed(body.seed, index * n)
    sampling = SamplingParams(1.0 if body.temperature is None else body.temperature, body.top_k or None,
                              body.top_p if body.top_p is not None and body.top_p < 1 else None, seed)
    logprobs = body.logprobs
    return EngineRequest(prompt, 16 if body.max_tokens is None else body.max_tokens, sampling, n=n, stop=tuple(stops),
                         stop_ids=frozenset(document_end_ids(serving.tokenizer)), logprobs=logprobs,
                         prompt_logprobs=logprobs if body.echo and logprobs is not None else None)


class Reply:
    """A completions response assembled from the engine's updates, whole or as Server-Sent Events."""

    def __init__(self, serving: Serving, body: CompletionRequest, job: Job, prompt_texts: list[str]):
        self.serving, self.body, self.job = serving, body, job
        self.n = body.n or 1
        self.prompt_texts = [text for text in prompt_texts for _ in range(self.n)]  # per choice
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.serving.model_name,
                "choices": choices, **extra}

    def usage(self) -> dict[str, int]:
        prompt_tokens = sum(len(r.prompt) for r in self.job.requests)  # each prompt once, however many completions it has
        completion_tokens = sum(len(c.tokens) for c in self.job.completions)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}

    async def _events(self) -> AsyncIterator[tuple[int, Update]]:
        """(choice index, update) until every choice has finished; an engine error raises as a ServerError."""
        finished = 0
        while finished < self.job.size:
            kind, *event = await self.job.events.get()
            if kind == "error":
                raise ServerError(event[0], None, event[1])
            index, update = event
            finished += update.finish_reason is not None
            yield index, update

    async def whole(self) -> dict[str, Any]:
        try:
            async for _ in self._events():
                pass
        finally:
            self.job.cancelled.set()  # frees the rows if the handler stopped early (no-op once finished)
        choices = []
        for index, completion in enumerate(self.job.completions):
            echoed = self.prompt_texts[index] if self.body.echo else ""
            logprobs = None
            if self.body.logprobs is not None:
                logprobs = choice_logprobs(self.serving.tokenizer, completion, bool(self.body.echo), self.prompt_texts[index])
            choices.append({"text": echoed + completion.text, "index": index, "logprobs": logprobs,
                            "finish_reason": completion.finish_reason})
        return self._chunk(choices, usage=self.usage())

    async def stream(self) -> AsyncIterator[str]:
        # As OpenAI: with include_usage every chunk says usage null, and one more chunk, without choices, has it.
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        per_chunk = {"usage": None} if include_usage else {}
        started: set[int] = set()
        try:
            async for index, update in self._events():
                choice = self._streamed_choice(index, update, index not in started)
                started.add(index)
                yield f"data: {json.dumps(self._chunk([choice], **per_chunk))}\n\n"
            if include_usage:
                yield f"data: {json.dumps(self._chunk([], usage=self.usage()))}\n\n"
            yield "data: [DONE]\n\n"
        except ServerError as exc:
            yield f"data: {json.dumps({'error': {'message': exc.message, 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
        finally:  # the client went away, or the stream ended: free the rows
            self.job.cancelled.set()

    def _streamed_choice(self, index: int, update: Update, first: bool) -> dict[str, Any]:
        completion, tokenizer = update.completion, self.serving.tokenizer
        text, entries, offsets = update.text, [], []
        echo = bool(self.body.echo) and first
        if echo:
            text = self.prompt_texts[index] + text
            entries += completion.prompt_logprobs or []
            offsets += text_offsets(tokenizer, [], list(completion.request.prompt), 0) if completion.prompt_logprobs else []
        if update.logprobs is not None:
            prompt = list(completion.request.prompt)
            start = len(self.prompt_texts[index]) if self.body.echo else 0
            entries.append(update.logprobs)
            offsets.append(text_offset(tokenizer, prompt, completion.tokens[: update.position], start))
        logprobs = logprobs_payload(tokenizer, entries, offsets) if self.body.logprobs is not None else None
        return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": update.finish_reason}


# --- the command ----------------------------------------------------------------------------------------------


def uvicorn_config(app: FastAPI, **options: Any) -> Any:
    """uvicorn's config for the app: its HTTP/1.1 protocol (h11) answers a request it cannot even parse (a garbage
    request line, a negative Content-Length) in OpenAI's error shape, as every other error, not in plain text."""
    import h11
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class JsonErrorsH11(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            body = error_response(f"the request is not valid HTTP ({msg})").body
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return uvicorn.Config(app, http=JsonErrorsH11, log_level="warning", **options)


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, device: str = "auto",
          dtype: str = "auto", tokenizer: str | None = None, model_name: str | None = None,
          allowed_hosts: list[str] | None = None, max_queue: int | None = None, threads: int | None = None) -> None:
    """Load a checkpoint (or a run directory's newest) and serve it until SIGTERM or Ctrl-C. The address is
    taken before the model loads, so a port in use is one line, not a server that announces itself and dies.
    On a CPU, PyTorch gets `threads` threads (default: all cores but one): the event loop needs a core of its own,
    and PyTorch's threads, which spin between operations, otherwise take it (a third of the throughput, measured)."""
    import uvicorn

    from minillama.checkpoint import load_for_inference

    if not 1 <= max_batch <= 256:
        raise ArgumentError("{max_batch} is {value}; expected an integer from 1 to 256", value=max_batch)
    if max_queue is not None and max_queue < max_batch:
        raise ArgumentError("{max_queue} is {value}; expected at least {max_batch} ({batch})", value=max_queue, batch=max_batch)
    if threads is not None and threads < 1:
        raise ArgumentError("{threads} is {value}; expected at least 1", value=threads)
    listening = bind(host, port)
    try:
        model, loaded_tokenizer, info = load_for_inference(checkpoint, device, dtype, tokenizer)
        if model.tok_embeddings.weight.device.type == "cpu":
            torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0)) - 1))
        name = model_name or str(info.metadata.get("model_preset") or info.path.name)
        if allowed_hosts is None:  # loopback only when bound to loopback; bound wider, it is meant to be reached by name
            allowed_hosts = list(LOOPBACK_HOSTS) if _is_loopback(host) else ["*"]
        stopped: list[str] = []
        server = uvicorn.Server(uvicorn_config(
            create_app(model, loaded_tokenizer, name, max_batch, max_queue, allowed_hosts=allowed_hosts,
                       on_stop=lambda reason: (stopped.append(reason), setattr(server, "should_exit", True)),
                       start_prompt=first_eval_prompt(info.metadata)),
            timeout_graceful_shutdown=60))
        _log_requests_to_stderr()
        shown = f"[{host}]" if ":" in host else host
        print(f"using {info.path}; serving {name} on http://{shown}:{listening.getsockname()[1]} (playground at /, API at "
              "/v1/completions, metrics at /metrics)", file=sys.stderr)
        # SIGTERM is how a server is stopped: uvicorn holds it while it drains the requests in flight, then raises it
        # again, and the command's own handler ends `minillama serve` with its one line and exit code 143.
        server.run(sockets=[listening])
    finally:
        listening.close()
    if stopped:
        raise SystemExit(f"minillama: the engine stopped ({stopped[0]}); the server exited")


def _log_requests_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    ACCESS_LOG.addHandler(handler)
    ACCESS_LOG.setLevel(logging.INFO)
    ACCESS_LOG.propagate = False


def first_eval_prompt(metadata: dict) -> str:
    """The first prompt the checkpoint's run sampled at each evaluation (a prompt of the kind of text it learned), or
    none for a checkpoint that does not say."""
    prompts = metadata.get("eval_prompts")
    return prompts[0] if isinstance(prompts, list) and prompts and isinstance(prompts[0], str) else ""


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one line saying why there cannot be one."""
    if not 0 <= port <= 65535:
        raise ArgumentError("{port} is {value}; expected a port number from 1 to 65535 (0: any free port)", value=port)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ArgumentError("{host} {value!r} does not resolve ({why}); pass an address such as 127.0.0.1", value=host,
                            why=exc.strerror) from None
    listening = socket.socket(family, kind, proto)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind(address)
        listening.listen(2048)
    except OSError as exc:
        listening.close()
        raise ArgumentError("cannot listen on {address} ({why}); is another server using it? Pass another {port}",
                            address=f"{host}:{port}", why=exc.strerror) from None
    listening.set_inheritable(True)
    return listening


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() == "localhost"
