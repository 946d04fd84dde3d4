"""The asyncio front: an engine that fails (in a step or while idle) fails every stream, once,
and the front then refuses new requests instead of looping."""

from __future__ import annotations

import asyncio

import pytest

from moe_serve.cluster.async_engine import AsyncEngine, EngineStepError
from moe_serve.cluster.outputs import CompletionDelta, RequestOutput
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


class ScriptedHandle(FailingHandle):
    """An engine handle whose every step gives each request one more token (its step number),
    finishing after `num_tokens`. The request `paced` gets its next token only once its reader
    has taken the previous one (`taken`)."""

    def __init__(self, num_tokens: int) -> None:
        super().__init__(fail_in="")
        self.num_tokens, self.num_emitted = num_tokens, {}
        self.all_done = asyncio.Event()
        self.taken = asyncio.Semaphore(0)

    async def step(self, message: StepInput) -> StepOutput:
        self.num_emitted |= {request.request_id: 0 for request in message.new}
        if 0 < self.num_emitted.get("paced", 0) < self.num_tokens:
            await self.taken.acquire()
        outputs = []
        for request_id, k in self.num_emitted.items():
            if k < self.num_tokens:
                self.num_emitted[request_id] = k + 1
                is_last = k + 1 == self.num_tokens
                delta = CompletionDelta(0, f"t{k} ", (k,), (), "length" if is_last else None)
                outputs.append(RequestOutput(request_id, (delta,), 3, k + 1, is_last))
        if all(k == self.num_tokens for k in self.num_emitted.values()):
            self.all_done.set()
        return StepOutput(outputs, {}, {}, has_unfinished=not self.all_done.is_set())


def test_a_reader_that_falls_behind_gets_one_merged_output_and_unary_gets_two():
    num_tokens = 6
    want_ids = tuple(range(num_tokens))
    want_text = "".join(f"t{k} " for k in want_ids)

    async def scenario():
        handle = ScriptedHandle(num_tokens)
        front = AsyncEngine(handle, RequestLimits(vocab_size=10, max_model_len=64))
        params = SamplingParams(max_tokens=num_tokens)
        paced = front.generate([1, 2, 3], params, "paced")
        slow = front.generate([1, 2, 3], params, "slow")
        unary = front.generate([1, 2, 3], params, "unary", is_streamed=False)
        # NOTE: started together, so that the first step has all three
        firsts = await asyncio.gather(*(anext(stream) for stream in (paced, slow, unary)))
        got = {"paced": [firsts[0]]}
        handle.taken.release()
        async for output in paced:  # NOTE: keeps up: one output per step
            got["paced"].append(output)
            handle.taken.release()
        await handle.all_done.wait()  # NOTE: the other two read only now: all is queued
        got["slow"] = [firsts[1]] + [output async for output in slow]
        got["unary"] = [firsts[2]] + [output async for output in unary]
        await front.shutdown()
        return got

    got = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert len(got["paced"]) == num_tokens
    assert len(got["slow"]) == 2  # the first, then everything queued behind it as one
    assert len(got["unary"]) == 2  # the first at once, the rest as one
    for outputs in got.values():
        assert tuple(t for o in outputs for t in o.deltas[0].token_ids) == want_ids
        assert "".join(o.deltas[0].text for o in outputs) == want_text
        assert outputs[-1].finished and outputs[-1].deltas[0].finish_reason == "length"
        assert outputs[-1].num_output_tokens == num_tokens
