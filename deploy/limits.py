"""Bounds on what one request may ask for, checked at the gateway before any work (HTTP and
gRPC alike): each refusal is a 400 / INVALID_ARGUMENT naming the limit and its config key. The
`limits:` block of the serving config; the defaults are safe for any model.

Sizes of whole messages are bounded before parsing: the HTTP body by the gateway (413), a gRPC
message by Serve's proxy (`grpc.max_message_bytes`, RESOURCE_EXHAUSTED)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from moe_serve.cluster.params import RequestError, SamplingParams


class LimitsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_stop_token_ids: int = Field(64, ge=0)
    max_stop_strings: int = Field(16, ge=0)
    max_stop_string_chars: int = Field(256, ge=1)  # the longest stop string
    # prompts x n x max_tokens (unset: what each prompt leaves of max_model_len)
    max_completion_tokens_per_request: int = Field(262144, ge=1)
    max_health_watches: int = Field(64, ge=0)  # gRPC Health/Watch streams open at once
    # NOTE: a Watch stream ends (OK; clients watch again) after this long. Serve's gRPC proxy
    # never cancels a replica's stream whose client hung up while the proxy was writing to it
    # (its generators are dropped at a `yield`, nothing cancels the replica call): without an
    # end, such a stream would hold its slot for the gateway's lifetime.
    max_health_watch_s: float = Field(300.0, gt=0)

    def check(self, params: SamplingParams, max_tokens: list[int]) -> None:
        """`max_tokens`: each prompt's resolved max_tokens (RequestLimits.check)."""
        if len(params.stop_token_ids) > self.max_stop_token_ids:
            raise _refused(
                f"stop_token_ids has {len(params.stop_token_ids)} ids",
                self.max_stop_token_ids,
                "max_stop_token_ids",
            )
        if len(params.stop) > self.max_stop_strings:
            raise _refused(
                f"stop has {len(params.stop)} strings", self.max_stop_strings, "max_stop_strings"
            )
        longest = max(map(len, params.stop), default=0)
        if longest > self.max_stop_string_chars:
            raise _refused(
                f"a stop string has {longest} characters",
                self.max_stop_string_chars,
                "max_stop_string_chars",
            )
        total = params.n * sum(max_tokens)
        if total > self.max_completion_tokens_per_request:
            each = params.max_tokens or f"unset, up to {max(max_tokens)}"
            raise _refused(
                f"n ({params.n}) x max_tokens ({each}) x prompts ({len(max_tokens)}) asks for "
                f"{total} tokens",
                self.max_completion_tokens_per_request,
                "max_completion_tokens_per_request",
            )


def _refused(what: str, limit: int, key: str) -> RequestError:
    return RequestError(f"{what}; this server allows at most {limit} (limits.{key})")
