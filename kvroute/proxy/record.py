"""One API request as the access log, the metrics and the trace see it (:class:`RequestRecord`).

:class:`~kvroute.proxy.observe.Observer` makes one per API request and the
parts fill it in as the request goes (see :mod:`kvroute.proxy.observe`); it
is a leaf: it knows the core's types and the access log's JSON helpers, and
no other part, so every part can take one.

>>> record = RequestRecord("POST", "/v1/chat/completions", start=10.0)
>>> record.first, record.end = 10.25, 11.25
>>> record.output_tokens, record.stream = 11, True
>>> record.ttft, record.duration, record.inter_token
(0.25, 1.25, 0.1)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .access_log import json_string, utc_time

if TYPE_CHECKING:
    from ..request import Decision, Request
    from .call import Call
    from .hints import Usage

__all__ = ["RequestRecord"]


class RequestRecord:
    """One API request as the access log, the metrics and the trace see it.

    Times are ``time.perf_counter()`` readings; a figure not (yet) known is None
    (``worker`` is -1 until a worker is chosen).

    :param method: the HTTP method.
    :param path: the path called.
    :param start: when the request arrived.
    """

    __slots__ = (
        "attempts", "cached_tokens", "client", "decode_worker", "end", "first", "id",
        "matched_blocks",
        "method", "model", "outcome", "output_tokens", "path", "policy",
        "predicted_cached_tokens", "prompt_tokens", "session", "span", "start", "status",
        "stream", "tokenize_seconds", "worker",
    )  # fmt: skip

    def __init__(self, method: str, path: str, start: float) -> None:
        self.method = method
        self.path = path
        self.start = start
        self.first: float | None = None
        self.end = start
        self.id: str | None = None
        self.client: str | None = None
        self.model: str | None = None
        self.session: str | None = None
        self.stream = False
        self.worker = -1
        #: A disaggregated request's decode worker (``worker`` prefilled it).
        self.decode_worker: int | None = None
        self.policy: str | None = None
        self.matched_blocks = 0
        self.predicted_cached_tokens = 0
        self.prompt_tokens: int | None = None
        self.cached_tokens: int | None = None
        self.output_tokens: int | None = None
        self.tokenize_seconds: float | None = None
        self.attempts = 0
        self.status = 0
        self.outcome = "ok"
        self.span: Any = None

    # -- filled in by the parts ----------------------------------------------------------

    def prepared(self, call: Call, request: Request, tokenize_seconds: float | None) -> None:
        """What preparing the request found."""
        self.id = call.client_id
        model = call.body.get("model")
        self.model = model if isinstance(model, str) else None
        self.stream = call.stream
        self.session = request.session_id
        self.prompt_tokens = len(request.tokens) if request.tokens is not None else None
        self.tokenize_seconds = tokenize_seconds

    def routed(self, decision: Decision) -> None:
        """One routed attempt."""
        self.attempts += 1
        self.worker = decision.worker
        self.decode_worker = getattr(decision, "decode_worker", None)
        self.policy = decision.policy
        self.matched_blocks = decision.matched_blocks
        self.predicted_cached_tokens = decision.predicted_cached_tokens

    def relayed(self, usage: Usage | None, outcome: str) -> None:
        """What the worker's answer reported (its usage, if any), and how it ended."""
        if usage is not None:
            self.prompt_tokens = usage.prompt_tokens
            self.cached_tokens = usage.cached_tokens
            self.output_tokens = usage.output_tokens
        self.outcome = outcome

    # -- figures -------------------------------------------------------------------------

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first token (None: none came)."""
        return None if self.first is None else self.first - self.start

    @property
    def duration(self) -> float:
        """Seconds from arrival to the end."""
        return self.end - self.start

    @property
    def inter_token(self) -> float | None:
        """A stream's mean seconds between output tokens after the first (None: unknown)."""
        n = self.output_tokens
        if self.first is None or not self.stream or n is None or n < 2:
            return None
        return (self.end - self.first) / (n - 1)

    def json_line(self, label: str | None, now: float) -> str:
        """The access log's JSON line: :meth:`fields` as JSON, built in one f-string.

        >>> import json
        >>> r = RequestRecord("POST", "/v1/messages", start=1.0)
        >>> r.status, r.end = 400, 1.002
        >>> json.loads(r.json_line(None, 0.0)) == r.fields(None, 0.0)
        True
        """
        routed = self.worker >= 0
        first, tok = self.first, self.tokenize_seconds
        ms = 1000.0
        return (
            f'{{"time":"{utc_time(now)}","id":{_s(self.id)},"method":{json_string(self.method)},'
            f'"path":{json_string(self.path)},"status":{self.status},'
            f'"outcome":{json_string(self.outcome)},"model":{_s(self.model)},'
            f'"session":{_s(self.session)},"stream":{"true" if self.stream else "false"},'
            f'"worker":{self.worker if routed else "null"},"worker_label":{_s(label)},'
            f'"decode_worker":{_i(self.decode_worker)},'
            f'"policy":{_s(self.policy)},'
            f'"matched_blocks":{self.matched_blocks if routed else "null"},'
            f'"predicted_cached_tokens":{self.predicted_cached_tokens if routed else "null"},'
            f'"reported_cached_tokens":{_i(self.cached_tokens)},'
            f'"prompt_tokens":{_i(self.prompt_tokens)},"output_tokens":{_i(self.output_tokens)},'
            f'"ttft_ms":{"null" if first is None else f"{(first - self.start) * ms:.3f}"},'
            f'"duration_ms":{(self.end - self.start) * ms:.3f},'
            f'"tokenize_ms":{"null" if tok is None else f"{tok * ms:.3f}"},'
            f'"retries":{max(self.attempts - 1, 0) if routed else "null"},'
            f'"client":{_s(self.client)}}}\n'
        )

    def fields(self, label: str | None, now: float) -> dict[str, object]:
        """The access log's fields (see :data:`~kvroute.proxy.access_log.FIELDS`)."""
        routed = self.worker >= 0
        ttft = self.ttft
        tok = self.tokenize_seconds
        return {
            "time": utc_time(now),
            "id": self.id,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "outcome": self.outcome,
            "model": self.model,
            "session": self.session,
            "stream": self.stream,
            "worker": self.worker if routed else None,
            "worker_label": label,
            "decode_worker": self.decode_worker,
            "policy": self.policy,
            "matched_blocks": self.matched_blocks if routed else None,
            "predicted_cached_tokens": self.predicted_cached_tokens if routed else None,
            "reported_cached_tokens": self.cached_tokens,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "ttft_ms": None if ttft is None else _ms(ttft),
            "duration_ms": _ms(self.end - self.start),
            "tokenize_ms": None if tok is None else _ms(tok),
            "retries": max(self.attempts - 1, 0) if routed else None,
            "client": self.client,
        }


def _s(value: str | None) -> str:
    return "null" if value is None else json_string(value)


def _i(value: int | None) -> str:
    return "null" if value is None else str(value)


def _ms(seconds: float) -> float:
    # as json_line prints it: milliseconds to 3 decimals
    return float(f"{seconds * 1000.0:.3f}")
