"""Tool calls read out of a completion's text as it streams (modes: see deploy/structured.py).

A named function's arguments stream as they are generated; under "required" each call comes
whole once its JSON object is complete; under "auto" the Granite format
(`<|tool_call|>[{"name": ..., "arguments": {...}}]`) is read once the completion ends, and text
that does not start like a call streams as content.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass

from moe_serve.deploy.structured import ToolPlan

GRANITE_MARKERS = ("<|tool_call|>", "<tool_call>")  # NOTE: special token (3.0), text (3.1+)


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of one tool call: its first piece carries id and name; the arguments (JSON
    text) are the concatenation of the pieces'."""

    index: int  # the call's position among the completion's calls
    arguments: str
    id: str | None = None
    name: str | None = None


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _whole_call(index: int, name: str, arguments: dict) -> ToolCallDelta:
    return ToolCallDelta(index, json.dumps(arguments, ensure_ascii=False), new_call_id(), name)


class ArrayScanner:
    """Splits a JSON array of objects, fed in pieces, into its complete elements (JSON text)."""

    def __init__(self) -> None:
        self.depth, self.in_string, self.escaped = 0, False, False
        self.element: list[str] = []

    def feed(self, text: str) -> list[str]:
        done = []
        for ch in text:
            if self.depth >= 2:
                self.element.append(ch)
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "[{":
                self.depth += 1
                if self.depth == 2:
                    self.element = [ch]
            elif ch in "]}":
                self.depth -= 1
                if self.depth == 1:
                    done.append("".join(self.element))
        return done


def parse_granite(text: str, names: tuple[str, ...]) -> list[tuple[str, dict]] | None:
    """[(name, arguments)] when `text` is a Granite tool call of known functions, else None."""
    body = text.strip()
    for marker in GRANITE_MARKERS:
        body = body.removeprefix(marker).lstrip()
    try:
        calls = json.loads(body)
    except json.JSONDecodeError:
        return None
    calls = [calls] if isinstance(calls, dict) else calls
    if not isinstance(calls, list) or not calls:
        return None
    parsed = []
    for call in calls:
        if not isinstance(call, dict) or call.get("name") not in names:
            return None
        if not isinstance(call.get("arguments", {}), dict):
            return None
        parsed.append((call["name"], call.get("arguments", {})))
    return parsed


class ToolCallReader:
    """One completion's text, fed as it streams -> (content, tool-call deltas) per piece."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.num_calls = 0
        self.scanner = ArrayScanner()
        self.held = ""  # "auto": text that may still be the start of a call
        self.is_call = None  # "auto": undecided (None), a call (True) or text (False)

    def feed(self, text: str, is_final: bool) -> tuple[str, list[ToolCallDelta]]:
        mode = self.plan.mode
        if mode == "named":
            return "", self._named(text)
        if mode == "required":
            return "", [self._element(element) for element in self.scanner.feed(text)]
        if mode == "auto" and self.plan.parser is not None:
            return self._auto(text, is_final)
        return text, []

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and self.num_calls else reason

    def _named(self, text: str) -> list[ToolCallDelta]:
        if not text:
            return []
        if self.num_calls:
            return [ToolCallDelta(0, text)]
        self.num_calls = 1
        return [ToolCallDelta(0, text, new_call_id(), self.plan.name)]

    def _element(self, element: str) -> ToolCallDelta:
        call = json.loads(element)  # NOTE: the grammar made it {"name": ..., "arguments": {...}}
        self.num_calls += 1
        return _whole_call(self.num_calls - 1, call["name"], call["arguments"])

    def _auto(self, text: str, is_final: bool) -> tuple[str, list[ToolCallDelta]]:
        if self.is_call is False:
            return text, []
        self.held += text
        start = self.held.lstrip()
        if self.is_call is None and start:
            if start.startswith(("[", "{", *GRANITE_MARKERS)):
                self.is_call = True
            elif not any(marker.startswith(start) for marker in GRANITE_MARKERS):
                self.is_call = False
        if not is_final and self.is_call is not False:
            return "", []
        held, self.held = self.held, ""
        calls = parse_granite(held, self.plan.names) if self.is_call else None
        if calls is None:
            self.is_call = False
            return held, []
        self.num_calls = len(calls)
        return "", [_whole_call(i, name, args) for i, (name, args) in enumerate(calls)]


def merge_deltas(deltas: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """A completion's calls, each whole (id and name from its first piece), in order."""
    calls: dict[int, ToolCallDelta] = {}
    for delta in deltas:
        call = calls.get(delta.index)
        calls[delta.index] = (
            delta
            if call is None
            else dataclasses.replace(call, arguments=call.arguments + delta.arguments)
        )
    return [calls[i] for i in sorted(calls)]
