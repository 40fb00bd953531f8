"""Errors the proxy answers, in the shape of the API that was called.

OpenAI endpoints answer ``{"error": {"message", "type", "param", "code"}}``;
Anthropic endpoints (``/v1/messages``) answer
``{"type": "error", "error": {"type", "message"}}``. A :class:`ProxyError`
carries the status and message; :func:`error_body` renders it for either API.

>>> err = error_body("openai", ProxyError(404, "no such model", code="model_not_found"))["error"]
>>> err["type"], err["code"]
('invalid_request_error', 'model_not_found')
>>> error_body("anthropic", ProxyError(413, "too big"))
{'type': 'error', 'error': {'type': 'request_too_large', 'message': 'too big'}}
"""

from __future__ import annotations

from typing import Any, Final

from .call import Api

__all__ = [
    "Api",
    "ProxyError",
    "anthropic_error_type",
    "error_body",
    "lacks_endpoint",
    "openai_error_type",
    "upstream_message",
]

_OPENAI_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}

# Anthropic's documented error types, by HTTP status.
_ANTHROPIC_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


class ProxyError(Exception):
    """A request the proxy answers with an error.

    :param status: the HTTP status.
    :param message: a message for the client.
    :param code: OpenAI's machine-readable ``code`` (default: the status).
    :param retry: False when retrying cannot help (answered with
        ``x-should-retry: false``, which the OpenAI and Anthropic SDKs obey
        before retrying a 5xx).
    """

    def __init__(
        self, status: int, message: str, *, code: str | None = None, retry: bool = True
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.retry = retry


def openai_error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status."""
    return _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def anthropic_error_type(status: int) -> str:
    """Anthropic's error ``type`` for an HTTP status."""
    return _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(api: Api, error: ProxyError) -> dict[str, Any]:
    """The JSON body answering ``error`` on an ``api`` endpoint."""
    if api == "anthropic":
        return {
            "type": "error",
            "error": {"type": anthropic_error_type(error.status), "message": error.message},
        }
    return {
        "error": {
            "message": error.message,
            "type": openai_error_type(error.status),
            "param": None,
            "code": error.code if error.code is not None else error.status,
        }
    }


def upstream_message(body: object) -> str | None:
    """The message of an OpenAI- or Anthropic-shaped error body, if it is one.

    >>> upstream_message({"error": {"message": "bad"}})
    'bad'
    >>> upstream_message({"type": "error", "error": {"type": "x", "message": "worse"}})
    'worse'
    >>> upstream_message([1]) is None
    True
    """
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        if isinstance(body.get("message"), str):
            return str(body["message"])
        if isinstance(body.get("detail"), str):  # FastAPI's default error shape
            return str(body["detail"])
    return None


def lacks_endpoint(status: int, message: str | None) -> bool:
    """Whether a worker's error answer says it serves no such endpoint.

    A 404 or 405 whose message is not about the model: vLLM answers an
    unknown model with 404 too, and that one is the client's to hear.

    >>> lacks_endpoint(404, "Not Found"), lacks_endpoint(404, "The model `x` does not exist.")
    (True, False)
    """
    return status in (404, 405) and "model" not in (message or "").lower()
