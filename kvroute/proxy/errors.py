"""Errors the proxy answers, in the shape of the API that was called.

OpenAI endpoints answer ``{"error": {"message", "type", "param", "code"}}``:
``type`` is OpenAI's (``invalid_request_error``, ``server_error``...),
``param`` names the bad field (or header) when one is to blame, else null,
and ``code`` is always a string: the proxy's own code where it has one
(``invalid_json``, ``missing_required_parameter``, ``invalid_value``,
``invalid_type``, ``model_not_found``, ``request_too_large``,
``no_worker_available``, ``upstream_error``, ``tokenizer_unavailable``), else
the HTTP status's name in snake case (``not_found``, ``bad_gateway``...).
A worker's own OpenAI-style error is passed on in the same shape
(:func:`openai_error`: its message, its ``param``, a string ``code``).
Anthropic endpoints (``/v1/messages``) answer
``{"type": "error", "error": {"type", "message"}}``. A :class:`ProxyError`
carries the status, message, code and param; :func:`error_body` renders it
for either API.

>>> err = error_body("openai", ProxyError(404, "no such model", code="model_not_found"))["error"]
>>> err["type"], err["code"], err["param"]
('invalid_request_error', 'model_not_found', None)
>>> error_body("openai", invalid("messages[0].role: Field required"))["error"]["param"]
'messages[0].role'
>>> error_body("openai", ProxyError(502, "down"))["error"]["code"]
'bad_gateway'
>>> error_body("anthropic", ProxyError(413, "too big"))
{'type': 'error', 'error': {'type': 'request_too_large', 'message': 'too big'}}
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any, Final

from .call import Api

__all__ = [
    "Api",
    "ProxyError",
    "anthropic_error_type",
    "error_body",
    "invalid",
    "lacks_endpoint",
    "openai_error",
    "openai_error_type",
    "status_code",
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
    :param code: OpenAI's machine-readable ``code`` (default: :func:`status_code`).
    :param param: the request field (or header) to blame, if one is.
    :param retry: False when retrying cannot help (answered with
        ``x-should-retry: false``, which the OpenAI and Anthropic SDKs obey
        before retrying a 5xx).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry: bool = True,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry = retry


# "<field path>: <problem>", the form of every field check's message.
_FIELD_MESSAGE: Final = re.compile(r"^([A-Za-z_][\w.\[\]-]*): ")


def invalid(message: str, *, code: str | None = None) -> ProxyError:
    """A 400 for a bad field, its message reading ``"<field path>: <problem>"``.

    The path becomes OpenAI's ``param``; the code is ``missing_required_parameter``
    when the problem is a missing field (the message says "Field required"),
    else ``invalid_value`` (unless ``code`` is given).

    >>> e = invalid("tools[0].name: Field required (a string)")
    >>> e.status, e.param, e.code
    (400, 'tools[0].name', 'missing_required_parameter')
    """
    m = _FIELD_MESSAGE.match(message)
    if code is None:
        code = "missing_required_parameter" if "Field required" in message else "invalid_value"
    return ProxyError(400, message, code=code, param=m.group(1) if m else None)


def status_code(status: int) -> str:
    """The default ``code`` of an error answered with HTTP ``status``: its name in snake case.

    >>> status_code(404), status_code(503), status_code(599)
    ('not_found', 'service_unavailable', 'http_599')
    """
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return f"http_{status}"
    return re.sub(r"[^a-z0-9]+", "_", phrase.lower()).strip("_")


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
            "param": error.param,
            "code": error.code if error.code is not None else status_code(error.status),
        }
    }


def openai_error(status: int, body: object, fallback: str = "") -> dict[str, Any]:
    """A worker's error answer in the proxy's OpenAI shape (see the module docstring).

    Its message and ``param`` are kept; ``type`` and ``code`` become the
    proxy's (vLLM answers ``"type": "BadRequestError", "code": 400``). A body
    that is not an OpenAI error (a gateway's page) keeps only its message,
    else ``fallback``, else the status.

    >>> openai_error(400, {"error": {"message": "max_tokens must be at least 1, got 0.",
    ...     "type": "BadRequestError", "param": "max_tokens", "code": 400}})["error"]
    {'message': 'max_tokens must be at least 1, got 0.', 'type': 'invalid_request_error', \
'param': 'max_tokens', 'code': 'bad_request'}
    """
    err = body.get("error") if isinstance(body, dict) else None
    param = err.get("param") if isinstance(err, dict) else None
    code = err.get("code") if isinstance(err, dict) else None
    message = upstream_message(body) or fallback or f"the worker answered {status}"
    return error_body(
        "openai",
        ProxyError(
            status,
            message,
            code=code if isinstance(code, str) and code else None,
            param=param if isinstance(param, str) else None,
        ),
    )


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
