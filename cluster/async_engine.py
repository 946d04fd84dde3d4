"""Drives an `Engine` from one background thread; asyncio callers stream their outputs."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from cluster.engine import Engine
from cluster.outputs import RequestOutput
from cluster.params import RequestError, SamplingParams

log = logging.getLogger(__name__)
Sink = Callable[[RequestOutput | BaseException], None]


class EngineStepError(RuntimeError):
    """The engine failed while this request was in flight (e.g. an expert shard died)."""


class AsyncEngine:
    """The engine's step loop in a thread. `on_idle` runs about every `idle_tick_s` seconds
    while no request is in flight; `on_failure` runs after a failed step (once the in-flight
    requests have been failed), e.g. to rebuild expert shards."""

    def __init__(
        self,
        engine: Engine,
        idle_tick_s: float = 1.0,
        on_idle: Callable[[], None] | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.engine = engine
        self.idle_tick_s, self.on_idle, self.on_failure = idle_tick_s, on_idle, on_failure
        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._wakeup = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)

    def start(self) -> AsyncEngine:
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 30.0) -> None:
        self._stopped.set()
        self._wakeup.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _submit(self, message: tuple[Any, ...]) -> None:
        self._inbox.put(message)
        self._wakeup.set()

    def abort(self, request_id: str) -> None:
        self._submit(("abort", request_id))

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs. Invalid requests raise RequestError before any work;
        leaving the iteration early (or being cancelled) aborts the request."""
        if not self.is_alive:
            raise EngineStepError("the engine loop is not running")
        self.engine.validate(prompt_ids, params)
        request_id = request_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._submit(
            (
                "add",
                request_id,
                list(prompt_ids),
                params,
                lambda item: loop.call_soon_threadsafe(outputs.put_nowait, item),
            )
        )
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def _drain(self) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if message[0] == "add":
                self._add(*message[1:])
            else:
                sink = self._sinks.pop(message[1], None)
                output = self.engine.abort(message[1])
                if sink and output:
                    sink(output)

    def _add(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, sink: Sink
    ) -> None:
        try:
            self.engine.add_request(request_id, prompt_ids, params)
        except RequestError as exc:
            sink(exc)
            return
        self._sinks[request_id] = sink

    def _loop(self) -> None:
        while not self._stopped.is_set():
            self._drain()
            try:
                if self.engine.has_unfinished:
                    self._step()
                else:
                    self._wakeup.wait(self.idle_tick_s)
                    self._wakeup.clear()
                    if self.on_idle and not self.engine.has_unfinished and self._inbox.empty():
                        self.on_idle()
            except Exception as exc:  # NOTE: fail what is in flight, then let the owner recover
                log.exception("engine step failed")
                self._fail_all(exc)
                self._recover(exc)
        self._fail_all(EngineStepError("the engine was shut down"))
        while not self._inbox.empty():
            message = self._inbox.get_nowait()
            if message[0] == "add":
                message[-1](EngineStepError("the engine was shut down"))

    def _recover(self, exc: BaseException) -> None:
        if self.on_failure is None:
            return
        try:
            self.on_failure(exc)
        except Exception:
            log.exception("recovery after a failed step failed; the next step will retry")

    def _step(self) -> None:
        for output in self.engine.step():
            sink = self._sinks.get(output.request_id)
            if output.finished:
                self._sinks.pop(output.request_id, None)
            if sink:
                sink(output)

    def _fail_all(self, exc: BaseException) -> None:
        error = exc if isinstance(exc, EngineStepError) else EngineStepError(str(exc))
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
        for sink in self._sinks.values():
            sink(error)
        self._sinks.clear()
