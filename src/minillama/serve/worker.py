"""The one thread that drives the inference engine for the server.

Handlers hand it `Job`s (one HTTP request's prompts); it submits them to the engine between steps, steps while
there is work, and sends each update back to the handler's asyncio queue on the event loop. It also keeps the
queue bounded (admission control: a request that would overfill it is refused with 429 before it is queued),
drops the completions of clients that went away, and keeps the metrics.

A failure inside a step fails the completions of that step (500) and the engine goes on with the rest; if the
thread itself ever stops, every waiting handler is answered, /health says so, and `on_stop` is called (the
server then exits non-zero rather than hang).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from minillama.errors import MiniLlamaError
from minillama.inference.engine import Completion, Engine, Request, Update
from minillama.serve.metrics import Metrics
from minillama.serve.protocol import ServerError


@dataclass(eq=False)  # a job is itself: hashed by identity
class Job:
    """One HTTP request's completions: what to run, and the queue on the event loop its updates go to, as
    ("update", choice index, Update) or ("error", message, HTTP status)."""

    requests: list[Request]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)  # the client went away
    arrived: float = field(default_factory=time.monotonic)
    completions: list[Completion] = field(default_factory=list)  # in choice order, once started
    finished: int = 0  # completions whose last update was sent

    @property
    def size(self) -> int:
        return sum(r.n for r in self.requests)

    @property
    def tokens(self) -> int:
        return sum((len(r.prompt) + r.max_tokens) * r.n for r in self.requests)

    def send(self, *event: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def send_all(outbox: list[tuple[Job, tuple]]) -> None:
    """Hand a step's events to their jobs' queues with one wake-up of each event loop, not one per token: with
    many requests running, per-token wake-ups kept the loop and the engine thread fighting over the GIL."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, tuple]]] = {}
    for job, event in outbox:
        by_loop.setdefault(job.loop, []).append((job, event))
    for loop, events in by_loop.items():
        loop.call_soon_threadsafe(_put_all, events)


def _put_all(events: list[tuple[Job, tuple]]) -> None:
    for job, event in events:
        job.events.put_nowait(event)


class EngineWorker:
    """Runs `engine` on a thread of its own; at most `max_queued` completions and `max_queued_tokens` tokens
    (prompt plus max_tokens) are waiting or running at once."""

    def __init__(self, engine: Engine, metrics: Metrics, max_queued: int, max_queued_tokens: int,
                 on_stop: Callable[[str], None] = lambda reason: None):
        self.engine, self.metrics, self.on_stop = engine, metrics, on_stop
        self.max_queued, self.max_queued_tokens = max_queued, max_queued_tokens
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        self.lock = threading.Lock()
        self.queued = self.queued_tokens = 0  # what submitted jobs hold until their completions finish
        self.jobs: set[Job] = set()
        self.owner: dict[Completion, tuple[Job, int]] = {}
        self.last_token: dict[Completion, float] = {}
        self.outbox: list[tuple[Job, tuple]] = []  # this step's updates, sent together
        self.error: str | None = None  # why the thread stopped, once it has
        self.thread = threading.Thread(target=self._run, name="minillama-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job`, or refuse it: 503 when the engine has stopped, 429 when the queue has no room for it."""
        with self.lock:
            if self.error is not None:
                raise ServerError(f"the engine has stopped ({self.error}); restart the server", None, 503)
            if self.queued + job.size > self.max_queued or self.queued_tokens + job.tokens > self.max_queued_tokens:
                self.metrics.rejected.inc()
                raise ServerError(f"the server is busy: {self.queued:,} completions ({self.queued_tokens:,} tokens) are queued, "
                                  f"and this request would pass the limit of {self.max_queued:,} ({self.max_queued_tokens:,} "
                                  "tokens); retry later", None, 429, "rate_limit_exceeded")
            self.queued += job.size
            self.queued_tokens += job.tokens
        self.inbox.put(job)

    def close(self) -> None:
        """Finish what is queued, then stop the thread."""
        self.inbox.put(None)
        self.thread.join()

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # the thread is gone: nobody may wait for it
            with self.lock:
                self.error = f"{type(exc).__name__}: {exc}"
            for job in list(self.jobs) + self._drain_inbox():
                job.send("error", f"the engine stopped ({self.error})", 503)
            self.on_stop(self.error)
            raise

    def _serve(self) -> None:
        closing = False
        while True:
            try:
                while True:  # wait for work when idle; otherwise take what has arrived, then step
                    job = self.inbox.get(block=not (self.engine.busy or closing))
                    if job is None:
                        closing = True
                    else:
                        self._start(job)
            except queue.Empty:
                pass
            if closing and not self.engine.busy:
                return
            self._drop_abandoned()
            try:
                updates = self.engine.step()
            except Exception as exc:  # this step's completions fail; the others go on
                for completion in self.engine.fail_step():
                    self._fail(completion, f"generation failed ({type(exc).__name__}: {exc})")
                updates = []
            for update in updates:
                self._deliver(update)
            # The gauges first: a client that has its answer must not read a /metrics from before it.
            self.metrics.running.set(len(self.engine.running))
            self.metrics.waiting.set(sum(len(group) for group in self.engine.waiting))
            send_all(self.outbox)
            self.outbox = []

    def _start(self, job: Job) -> None:
        self.jobs.add(job)
        for request in job.requests:
            try:
                completions = self.engine.submit(request)
            except MiniLlamaError as exc:  # the handler checked it; still, one bad request fails alone
                job.send("error", str(exc), 400)
                self._end(job)
                return
            self.metrics.prompt_tokens.inc(len(request.prompt))
            job.completions += completions
        for index, completion in enumerate(job.completions):
            self.owner[completion] = (job, index)

    def _deliver(self, update: Update) -> None:
        completion = update.completion
        if completion not in self.owner:
            return
        job, index = self.owner[completion]
        now = time.monotonic()
        if update.token is not None:
            self.metrics.generation_tokens.inc()
            if completion in self.last_token:
                self.metrics.time_per_output_token.observe(now - self.last_token[completion])
            else:
                self.metrics.time_to_first_token.observe(now - job.arrived)
            self.last_token[completion] = now
        if update.finish_reason is not None:  # counted before the handler hears of it
            self.metrics.finished.labels(update.finish_reason).inc()
            self.metrics.request_latency.observe(now - job.arrived)
            job.finished += 1
            if job.finished == len(job.completions):
                self._end(job)
        self.outbox.append((job, ("update", index, update)))  # sent when the step's updates are all taken

    def _fail(self, completion: Completion, message: str) -> None:
        if completion in self.owner:
            job, _ = self.owner[completion]
            job.send("error", message, 500)
            self._end(job)

    def _drop_abandoned(self) -> None:
        for job in [j for j in self.jobs if j.cancelled.is_set()]:
            self._end(job)

    def _end(self, job: Job) -> None:
        """A job is over (finished, failed or abandoned): its completions stop, and its room in the queue frees."""
        self.jobs.discard(job)
        for completion in job.completions:
            completion.cancelled = completion.finish_reason is None  # frees its row at the next step
            self.owner.pop(completion, None)
            self.last_token.pop(completion, None)
        with self.lock:
            self.queued -= job.size
            self.queued_tokens -= job.tokens

    def _drain_inbox(self) -> list[Job]:
        jobs = []
        while True:
            try:
                job = self.inbox.get_nowait()
            except queue.Empty:
                return jobs
            if job is not None:
                jobs.append(job)
