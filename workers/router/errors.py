"""OpenAI-shaped API errors.

Every failure the router reports to a client is an `ApiError`: an HTTP status plus the body
OpenAI's API sends, `{"error": {"message", "type", "param", "code"}}`, so official clients
raise their usual exception classes (BadRequestError, NotFoundError, RateLimitError, ...).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web


class ApiError(Exception):
    """A client-visible error with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        close_connection: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        self.close_connection = close_connection  # the connection closes after the answer

    def __reduce__(self):
        # Picklable with its fields (request bodies are decoded in a child process too).
        return (_rebuild, (self.status, self.message, self.type, self.param, self.code,
                           self.headers, self.close_connection))

    def response(self) -> web.Response:
        response = web.json_response(self.body(), status=self.status, headers=self.headers)
        if self.close_connection:
            response.force_close()
        return response

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def _rebuild(status, message, type, param, code, headers, close_connection) -> ApiError:
    return ApiError(status, message, type=type, param=param, code=code, headers=headers,
                    close_connection=close_connection)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def invalid_type(name: str, value: Any, expected: str) -> ApiError:
    """400 for a field of the wrong type (the value shown cut short: it may be huge)."""
    return bad_request(f"{name}: expected {expected}, got {type(value).__name__} {value!r:.80}",
                       param=name, code="invalid_type")


def model_not_found(name: str) -> ApiError:
    return ApiError(
        404,
        f"The model {name!r} does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def invalid_api_key() -> ApiError:
    return ApiError(
        401,
        "Incorrect API key provided. Pass a valid key as 'Authorization: Bearer <key>'.",
        code="invalid_api_key",
    )


def queue_full(retry_after_s: int) -> ApiError:
    return ApiError(
        429,
        "The router's request queue is full; retry later.",
        type="rate_limit_exceeded",
        code="queue_full",
        headers={"Retry-After": str(retry_after_s)},
    )


def no_room_for_choices(n: int, retry_after_s: int) -> ApiError:
    return ApiError(
        429,
        f"The workers have no room for all {n} choices of this request (n and prompts); "
        "retry later or ask for fewer.",
        type="rate_limit_exceeded",
        code="no_room_for_choices",
        headers={"Retry-After": str(retry_after_s)},
    )


def no_ready_worker(role: str) -> ApiError:
    return ApiError(
        503,
        f"No {role} worker is ready to take requests.",
        type="service_unavailable",
        code="no_ready_worker",
    )


def deadline_exceeded(timeout_s: float) -> ApiError:
    return ApiError(
        504,
        f"The request did not finish within its deadline of {timeout_s:g} s.",
        type="timeout",
        code="deadline_exceeded",
    )


def backend_failure(message: str) -> ApiError:
    return ApiError(502, message, type="server_error", code="worker_failure")
