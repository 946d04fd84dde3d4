"""The asyncio front: an engine that fails (in a step or while idle) fails every stream, once,
and the front then refuses new requests instead of looping."""

from __future__ import annotations

import asyncio

import pytest

from moe_serve.cluster.async_engine import AsyncEngine, EngineStepError
from moe_serve.cluster.params import RequestLimits, SamplingParams
from moe_serve.cluster.replica_engine import StepInput, StepOutput


class FailingHandle:
    """An engine handle whose steps or idle calls raise."""

    def __init__(self, fail_in: str) -> None:
        self.fail_in = fail_in
        self.calls = {"step": 0, "idle": 0}
        self.failed = asyncio.Event()

    async def _call(self, kind: str) -> None:
        self.calls[kind] += 1
        if kind == self.fail_in:
            self.failed.set()
            raise ConnectionError(f"the core died during {kind}")

    async def step(self, message: StepInput) -> StepOutput:
        await self._call("step")
        return StepOutput([], {}, {}, has_unfinished=bool(message.new) or self.calls["step"] > 0)

    async def idle(self) -> None:
        await self._call("idle")

    async def stats(self) -> dict:
        return {}

    async def shutdown(self) -> None:
        pass


async def _consume(front: AsyncEngine) -> None:
    async for _ in front.generate([1, 2, 3], SamplingParams(max_tokens=4)):
        pass


@pytest.mark.parametrize("fail_in", ["step", "idle"])
def test_a_failed_core_fails_streams_and_stops_the_driver(fail_in):
    async def scenario():
        handle = FailingHandle(fail_in)
        front = AsyncEngine(
            handle, RequestLimits(vocab_size=10, max_model_len=64), idle_tick_s=0.01
        )
        if fail_in == "step":
            with pytest.raises(EngineStepError, match="the core died during step"):
                await asyncio.wait_for(_consume(front), 10)
        else:
            front.start()
            await asyncio.wait_for(handle.failed.wait(), 10)
        await asyncio.wait({front._task}, timeout=10)
        assert front._task.done(), "the driver kept going after its engine failed"
        assert isinstance(front.error, ConnectionError)
        with pytest.raises(EngineStepError, match="the engine core is down"):
            await _consume(front)

    asyncio.run(scenario())
