"""Stream events (deploy/openai_format.py) stay one line for every line reader a client may use."""

from __future__ import annotations

import json

import httpx
import pytest

from moe_serve.deploy.openai_format import sse

# every character str.splitlines (and httpx's iter_lines after it) ends a line on
LINE_ENDS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


@pytest.mark.parametrize("char", list(LINE_ENDS), ids=[f"U+{ord(c):04X}" for c in LINE_ENDS])
def test_an_event_whose_text_holds_a_line_end_is_still_one_line(char):
    text = f"a{char}b\\{char}é"
    event = sse({"choices": [{"text": text}]})
    as_read_by_httpx = list(httpx.Response(200, content=event.encode()).iter_lines())
    for lines in (event.splitlines(), as_read_by_httpx):
        assert lines[0].startswith("data: {") and lines[1:] == [""], lines
        assert json.loads(lines[0][6:]) == {"choices": [{"text": text}]}
    assert "é" in event  # non-ASCII text is sent as UTF-8, not escaped
