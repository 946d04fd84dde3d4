"""API errors: one exception type carrying the HTTP status, OpenAI error type and gRPC code."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from moe_serve.cluster.async_engine import EngineStepError
from moe_serve.cluster.params import RequestError
from moe_serve.models.tokenizer import ChatTemplateError

log = logging.getLogger(__name__)

GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    500: grpc.StatusCode.INTERNAL,
}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    500: "internal_server_error",
}


@dataclass
class ApiError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict:
        """OpenAI's error shape."""
        return {
            "error": {
                "message": self.message,
                "type": ERROR_TYPES.get(self.status, "error"),
                "param": self.param,
                "code": self.code,
            }
        }

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return GRPC_CODES.get(self.status, grpc.StatusCode.UNKNOWN)


def as_api_error(exc: BaseException) -> ApiError:
    """Any failure of a request -> the error a client sees (never a stack trace)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestError | ChatTemplateError):
        return ApiError(400, str(exc))
    if isinstance(exc, BackPressureError):
        return ApiError(
            429, "too many requests are queued for this model; retry later", code="queue_full"
        )
    if isinstance(exc, EngineStepError):
        return ApiError(503, f"the model replica failed: {exc}", code="replica_failed")
    if isinstance(exc, RayActorError):
        return ApiError(
            503, "the model replica is unavailable; retry shortly", code="replica_unavailable"
        )
    log.error("unexpected error serving a request", exc_info=exc)
    return ApiError(500, "internal error; see the server log")
