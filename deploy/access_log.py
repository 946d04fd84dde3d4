"""The access log: one line per user request (HTTP or gRPC), written by the gateway when the
request ends (a streamed one after its last chunk). Internal calls (the replicas' stats
reports, health checks, metric scrapes) are never logged here nor in Serve's access log."""

from __future__ import annotations

import logging
import re
import sys
import time
from dataclasses import dataclass, field

LOGGER_NAME = "moe_serve.access"
log = logging.getLogger(LOGGER_NAME)


def configure_access_log() -> None:
    """Access lines go to stdout as they are (Ray forwards a replica's stdout to the driver)."""
    if log.handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


@dataclass
class AccessRecord:
    """One user request, filled in while it runs."""

    method: str  # HTTP method, or "gRPC"
    path: str  # URL path, or the RPC's full method name
    model: str = "-"
    status: str = "200"  # HTTP status, or the gRPC code's name
    prompt_tokens: int = 0
    completion_tokens: int = 0
    start: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        path, model = _printable(self.path), _printable(self.model)
        return (
            f"{self.method} {path} model={model} status={self.status} "
            f"prompt_tokens={self.prompt_tokens} completion_tokens={self.completion_tokens} "
            f"latency={time.monotonic() - self.start:.3f}s"
        )

    def write(self) -> None:
        log.info("%s", self.line())


def _printable(text: str) -> str:
    """A client's text as one short token (no spaces or line breaks to forge a line with)."""
    return re.sub(r"[^!-~]", "?", text)[:200]
