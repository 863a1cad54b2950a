"""Continuous (iteration-level) batching over an Engine's slots.

Requests wait in a bounded queue (a full queue refuses at once: `Overloaded`). Every iteration admits queued
requests into free slots (prefill, then insert), then runs one generate step for every slot; a request that
finishes (a stop token or string, its token budget) or is cancelled frees its slot at once, so the next
iteration can fill it. `batching="static"` is the baseline to compare with: it waits for a full batch (or
`static_wait` seconds), runs it until its longest request ends, and only then admits more.

Each request's events (new text and token ids, then how it finished) go to its `emit` callback, called on the
scheduler's thread. With a prefix cache, a prompt that starts with an already computed sequence (a shared
system prompt, the earlier turns of a chat) reuses that sequence's KV; finished sequences are kept too.

An exception inside the engine fails only the requests it touched: a prefill failure fails its request; an
insert or generate failure fails the running ones (the batch state is rebuilt). The loop keeps serving.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from infer.engine import Engine
from infer.generate import TextStream
from infer.metrics import ServingMetrics
from infer.prefix_cache import BLOCK, PrefixCache
from infer.sampling import InferenceError, SamplingParams, finish_reason

log = logging.getLogger("meshlm.serve")

BATCHING = ("continuous", "static")


class Overloaded(RuntimeError):
    """The request queue is full, or the scheduler is shutting down: try again later."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


@dataclasses.dataclass
class Event:
    """Part of a request's output. The last event of every request has a finish_reason."""

    text: str = ""  # new text (when the scheduler has a tokenizer)
    token_ids: list[int] = dataclasses.field(default_factory=list)  # new tokens (a final stop token left out)
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    error: str | None = None  # what went wrong (finish_reason "error")
    prompt_tokens: int = 0
    completion_tokens: int = 0  # tokens generated so far (a final stop token included)
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


@dataclasses.dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    # the scheduler's bookkeeping
    arrived: float = 0.0
    last_token_at: float | None = None
    generated: list[int] = dataclasses.field(default_factory=list)
    cached_tokens: int = 0
    text: TextStream | None = None
    cancelled: bool = False
    slot: int | None = None


class Scheduler:
    """Drives an Engine (or anything with its prefill / insert / generate / extract / init_state) from a queue."""

    def __init__(self, engine: Engine, tokenizer: Any = None, *, max_queue: int = 64, batching: str = "continuous",
                 prefix_cache_bytes: int = 0, static_wait: float = 1.0, stuck_after: float = 120.0,
                 metrics: ServingMetrics | None = None):
        if batching not in BATCHING:
            raise InferenceError(f"batching must be one of {', '.join(BATCHING)}, got {batching!r}")
        if not isinstance(max_queue, int) or max_queue < 0:
            raise InferenceError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        self.engine, self.tokenizer, self.batching = engine, tokenizer, batching
        self.max_queue, self.static_wait, self.stuck_after = max_queue, static_wait, stuck_after
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.metrics = metrics or ServingMetrics()
        self.metrics.slots_total.set(engine.slots)
        self.state = engine.init_state()
        self.slots: list[Request | None] = [None] * engine.slots
        self.queue: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._heartbeat = time.monotonic()
        self._requests: dict[str, Request] = {}  # queued or running, by id
        self.steps = 0  # generate steps run

    # ------------------------------------------------------------------ what clients call (any thread)

    def submit(self, request: Request) -> None:
        """Queue a request, or refuse it: InferenceError (it can never run), Overloaded (not now)."""
        request.prompt = self.engine.check(request.prompt, request.params)
        if request.params.stop and self.tokenizer is None:
            raise InferenceError("stop strings need a tokenizer; this scheduler has none (use stop_token_ids)")
        with self._cv:
            if self._closing:
                self.metrics.rejected.labels("shutting_down").inc()
                raise Overloaded("the server is shutting down", retry_after=5.0)
            if len(self.queue) >= self.max_queue:
                self.metrics.rejected.labels("queue_full").inc()
                raise Overloaded(f"the request queue is full ({self.max_queue} waiting)", retry_after=1.0)
            request.arrived = time.monotonic()
            if self.tokenizer is not None:
                request.text = TextStream(self.tokenizer, request.params.stop)
            self.queue.append(request)
            self._requests[request.id] = request
            self.metrics.queue_depth.set(len(self.queue))
            self._cv.notify_all()

    def cancel(self, request_id: str) -> None:
        """Stop a request (a client that went away): it is dropped from the queue, or its slot is freed at
        the next iteration. Its last event has finish_reason "cancelled". Unknown ids are ignored."""
        with self._cv:
            request = self._requests.get(request_id)
            if request is not None:
                request.cancelled = True
                self._cv.notify_all()

    def start(self) -> None:
        """Run the loop on a background thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="meshlm-scheduler", daemon=True)
            self._thread.start()

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; with `drain`, finish the queued and running ones first, else cancel them."""
        with self._cv:
            self._closing = True
            if not drain:
                for request in self._requests.values():
                    request.cancelled = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def health(self) -> tuple[bool, str]:
        """(ready, why not): not ready when shutting down, or when there is work and no iteration has
        finished for `stuck_after` seconds."""
        if self._thread is not None and not self._thread.is_alive():
            return False, "the scheduler thread has stopped"
        if self._closing:
            return False, "shutting down"
        waited = time.monotonic() - self._heartbeat
        if (self.queue or self.busy) and waited > self.stuck_after:
            return False, f"engine stuck: no progress for {waited:.0f} s"
        return True, "ok"

    @property
    def busy(self) -> int:
        """Slots holding a request."""
        return sum(r is not None for r in self.slots)

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self.queue and not self.busy and not self._closing:
                    self._cv.wait()
                if self._closing and not self.queue and not self.busy:
                    return
            try:
                worked = self.step()
            except Exception as error:  # a bug in the loop itself: fail what is running, keep serving
                log.exception("scheduler iteration failed")
                self._fail([r for r in self.slots if r is not None], error, reset=True)
                worked = True
            if not worked:  # static batching waiting for a fuller batch
                with self._cv:
                    self._cv.wait(0.005)

    def step(self) -> bool:
        """One iteration: free cancelled slots, admit queued requests into free slots, one generate step.
        False when there was nothing to do."""
        self._heartbeat = time.monotonic()
        for request in self.slots:
            if request is not None and request.cancelled:
                self._finish(request, "cancelled")
        admitted = 0
        while batch := self._admissions():  # again if a request ended at its first token and freed its slot
            for request, slot in batch:
                self._admit(request, slot)
            admitted += len(batch)
        running = [r for r in self.slots if r is not None]
        if running:
            longest = max(len(r.prompt) + len(r.generated) for r in running)  # with the token fed now
            try:
                self.state, step = self.engine.generate(self.state, longest)
            except Exception as error:
                log.exception("generate failed")
                self._fail([r for r in self.slots if r is not None], error, reset=True)
                return True
            self._heartbeat = time.monotonic()
            self.steps += 1
            self.metrics.steps.inc()
            for slot, request in enumerate(self.slots):
                if request is not None:
                    self._accept(request, int(step.tokens[slot]))
        return bool(admitted or running)

    def _admissions(self) -> list[tuple[Request, int]]:
        """Which queued requests go into which free slots this iteration."""
        with self._cv:
            for request in [r for r in self.queue if r.cancelled]:
                self.queue.remove(request)
                self._finish(request, "cancelled")
            free = [i for i, r in enumerate(self.slots) if r is None]
            if self.batching == "static":
                waited = time.monotonic() - self.queue[0].arrived if self.queue else 0.0
                full = len(self.queue) >= len(self.slots)
                if len(free) < len(self.slots) or not (full or waited >= self.static_wait or self._closing):
                    return []
            admitted = []
            while free and self.queue:
                admitted.append((self.queue.popleft(), free.pop(0)))
            self.metrics.queue_depth.set(len(self.queue))
            return admitted

    def _admit(self, request: Request, slot: int) -> None:
        hit = None
        if self.prefix_cache is not None:
            hit = self.prefix_cache.lookup(request.prompt)
            self.metrics.prefix_lookups.inc()
            if hit is not None:
                self.metrics.prefix_hits.inc()
                self.metrics.prefix_hit_tokens.inc(hit.length)
            self.metrics.prefix_hit_rate.set(self.prefix_cache.hits / self.prefix_cache.lookups)
        try:
            prefill = self.engine.prefill(request.prompt, request.params,
                                          reuse=(hit.entry.cache, hit.length) if hit else None)
        except Exception as error:
            log.exception("prefill failed")
            self._fail([request], error)
            return
        self._heartbeat = time.monotonic()
        self._keep(request.prompt, prefill.cache)
        try:
            self.state = self.engine.insert(prefill, self.state, slot)
        except Exception as error:
            log.exception("insert failed")
            self._fail([request, *(r for r in self.slots if r is not None)], error, reset=True)
            return
        request.slot, request.cached_tokens = slot, prefill.reused
        self.slots[slot] = request
        self.metrics.prompt_tokens.inc(len(request.prompt))
        self.metrics.slots_busy.set(self.busy)
        self._accept(request, prefill.token)

    def _accept(self, request: Request, token: int) -> None:
        """A request's next token: record it, emit what it shows, finish the request when it is done."""
        now = time.monotonic()
        if request.last_token_at is None:
            self.metrics.ttft.observe(now - request.arrived)
        else:
            self.metrics.itl.observe(now - request.last_token_at)
        request.last_token_at = now
        request.generated.append(token)
        self.metrics.generation_tokens.inc()
        reason = finish_reason(token, len(request.generated), request.params)
        new = [] if reason == "stop" else [token]  # a final stop id is not shown
        text = request.text.add(new) if request.text is not None else ""
        if request.text is not None and request.text.stopped:  # a stop string
            reason = "stop"
        if reason is not None and request.text is not None:
            text += request.text.finish()
        if reason is None:
            self._emit(request, Event(text=text, token_ids=new))
        else:
            self._finish(request, reason, text, new)

    def _finish(self, request: Request, reason: str, text: str = "", token_ids: list[int] | None = None,
                error: str | None = None) -> None:
        """The request's last event; its slot is freed (and its sequence kept in the prefix cache)."""
        self.metrics.requests.labels(reason).inc()  # before the slot is seen free
        self.metrics.e2e.observe(time.monotonic() - request.arrived)
        if request.slot is not None:
            if reason != "error" and len(request.generated) > 1:
                # the KV of the prompt and every generated token but the last (never fed) is in the slot
                sequence = request.prompt + request.generated[:-1]
                self._keep(sequence, lambda: self.engine.extract(self.state, request.slot, len(sequence)))
            self.slots[request.slot] = None
            request.slot = None
            self.metrics.slots_busy.set(self.busy)
        with self._cv:
            self._requests.pop(request.id, None)
        self._emit(request, Event(text=text, token_ids=token_ids or [], finish_reason=reason, error=error))

    def _fail(self, requests: list[Request], error: Exception, reset: bool = False) -> None:
        message = f"{type(error).__name__}: {error}"
        for request in requests:
            self._finish(request, "error", error=message)
        if reset:  # the batch state may be half-written (or donated): start from free slots
            for i in range(len(self.slots)):
                self.slots[i] = None
            self.metrics.slots_busy.set(0)
            self.state = self.engine.init_state()

    def _keep(self, tokens: list[int], cache: Any) -> None:
        """Offer a sequence's KV to the prefix cache (`cache` may be a function making it, called only for
        a sequence long enough to keep)."""
        if self.prefix_cache is None or len(tokens) < BLOCK:
            return
        if callable(cache):
            cache = cache()
        self.prefix_cache.add(tokens, cache, self.engine.cache_bytes(cache.length))
        self.metrics.prefix_bytes.set(self.prefix_cache.bytes)

    def _emit(self, request: Request, event: Event) -> None:
        event.prompt_tokens = len(request.prompt)
        event.completion_tokens = len(request.generated)
        event.cached_tokens = request.cached_tokens
        try:
            request.emit(event)
        except Exception:  # a client's callback failing must not stop the loop
            log.exception("emit failed for request %s; cancelling it", request.id)
            request.cancelled = True
