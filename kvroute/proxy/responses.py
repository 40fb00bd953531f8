"""OpenAI's Responses API (``/v1/responses``): its prompt, its answers, and where a response lives.

The proxy routes a Responses request like a chat request, by its rendered
prompt:

- :func:`responses_to_chat` gives the chat messages and tools vLLM renders
  for a request's own ``instructions`` and ``input`` (vLLM's
  ``construct_input_messages``), for local tokenization and for workers
  without ``/v1/responses/render`` (their ``/tokenize`` takes chat
  messages). The conversation behind a ``previous_response_id`` lives in
  the worker that produced it, so the proxy sees (and routes by) the new
  part only; the request goes to that worker anyway (below).
- :func:`responses_usage` reads a response's ``usage``;
  :class:`ResponsesStream` watches a stream going through (first output,
  the final usage, the response id, errors).

Where a response lives: vLLM keeps a stored response (``store`` true, the
server started with ``VLLM_ENABLE_RESPONSES_API_STORE=1``) in the memory of
the worker that produced it; any other worker answers 404 to a
``previous_response_id`` naming it. The proxy remembers which worker
produced each response id in a :class:`ResponseStore` and sends a request
continuing one there while that worker is healthy (else it is routed as
usual, and the worker says whether it knows the response). The store is a
Protocol: :class:`LocalResponseStore` keeps the ids in this process
(bounded, with a TTL); a fleet of proxies can share one behind the same
three methods.

>>> store = LocalResponseStore(max_entries=2, ttl=60.0, clock=lambda: 0.0)
>>> store.remember("resp_a", 1); store.remember("resp_b", 0); store.remember("resp_c", 1)
>>> store.worker_of("resp_a"), store.worker_of("resp_c"), len(store)
(None, 1, 2)
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol, runtime_checkable

from .errors import invalid
from .hints import Usage
from .sse import SseSplitter

__all__ = [
    "LocalResponseStore",
    "ResponseStore",
    "ResponsesStream",
    "check_responses",
    "response_id_of",
    "responses_to_chat",
    "responses_usage",
]

# Stream events that carry generated output.
_OUTPUT_DELTAS: Final = frozenset(
    {
        "response.output_text.delta",
        "response.function_call_arguments.delta",
        "response.reasoning_text.delta",
        "response.refusal.delta",
    }
)


@runtime_checkable
class ResponseStore(Protocol):
    """Which worker produced each response id: where a ``previous_response_id`` must go.

    Implementations must be safe to call from the proxy's event loop and
    never block it for long (a shared store answers from a local view).
    """

    def remember(self, response_id: str, worker: int) -> None:
        """Record that ``worker`` produced (and keeps) ``response_id``."""

    def worker_of(self, response_id: str) -> int | None:
        """The worker that produced ``response_id``, or None if unknown or expired."""

    async def aworker_of(self, response_id: str) -> int | None:
        """What the proxy asks: :meth:`worker_of`, or a shared store's own copy of it."""

    def forget_worker(self, worker: int) -> None:
        """Drop every response of ``worker`` (it left the fleet, or restarted empty)."""


class LocalResponseStore:
    """A :class:`ResponseStore` in this process: the newest ``max_entries`` ids, for ``ttl`` s.

    Runtime complexity: O(1) per call but :meth:`forget_worker` (O(entries)).

    :param max_entries: ids kept; the least recently used go first.
    :param ttl: seconds an id is kept after it was last remembered or looked up
        (a continuation refreshes it).
    :param clock: the time source (default :func:`time.monotonic`).
    :raises ValueError: ``max_entries`` < 1 or ``ttl`` <= 0.
    """

    def __init__(
        self,
        max_entries: int = 100_000,
        ttl: float = 86_400.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        if not ttl > 0:
            raise ValueError(f"ttl must be > 0, got {ttl}")
        self.max_entries = max_entries
        self.ttl = float(ttl)
        self._clock = clock
        self._entries: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, response_id: str, worker: int) -> None:
        """Record ``response_id`` as ``worker``'s (the oldest id goes when full)."""
        self._entries[response_id] = (worker, self._clock() + self.ttl)
        self._entries.move_to_end(response_id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def worker_of(self, response_id: str) -> int | None:
        """``response_id``'s worker (its TTL refreshed), or None."""
        entry = self._entries.get(response_id)
        if entry is None:
            return None
        now = self._clock()
        if entry[1] <= now:
            del self._entries[response_id]
            return None
        self._entries[response_id] = (entry[0], now + self.ttl)
        self._entries.move_to_end(response_id)
        return entry[0]

    async def aworker_of(self, response_id: str) -> int | None:
        """:meth:`worker_of`: this store has no copy elsewhere to ask."""
        return self.worker_of(response_id)

    def forget_worker(self, worker: int) -> None:
        """Drop ``worker``'s ids."""
        for rid in [r for r, (w, _) in self._entries.items() if w == worker]:
            del self._entries[rid]


def check_responses(body: Mapping[str, Any]) -> None:
    """Check what the proxy reads of a Responses request.

    :raises ProxyError: 400 naming the field: ``input`` missing or neither a
        string nor a list of objects; ``instructions`` or
        ``previous_response_id`` not a string; ``tools`` not a list.
    """
    if "input" not in body:
        raise invalid("input: Field required (a string or a list of items)")
    items = body["input"]
    if not isinstance(items, str):
        if not isinstance(items, list):
            raise invalid("input: must be a string or a list of items")
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise invalid(f"input[{i}]: must be an object")
    for field in ("instructions", "previous_response_id"):
        value = body.get(field)
        if value is not None and not isinstance(value, str):
            raise invalid(f"{field}: must be a string", code="invalid_type")
    tools = body.get("tools")
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(t, dict) for t in tools)
    ):
        raise invalid("tools: must be a list of objects")


def _first_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        first = content[0]
        if isinstance(first, dict) and isinstance(first.get("text"), str):
            return str(first["text"])
    return ""


def _reasoning(item: Mapping[str, Any]) -> str:
    content, summary = item.get("content"), item.get("summary")
    parts = content if content else summary
    if isinstance(parts, list) and parts:
        first = parts[0]
        return str(first.get("text", "")) if isinstance(first, dict) else str(first)
    return ""


def responses_to_chat(
    body: Mapping[str, Any],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Chat ``(messages, tools)`` for a (checked) Responses request's own prompt, as vLLM builds it.

    - ``instructions`` is a leading system message;
    - a string ``input`` is a user message; of a list, a ``function_call``
      item is a tool call of the assistant message just before (a new one if
      there is none), a ``function_call_output`` a tool message, a
      ``reasoning`` item the assistant's reasoning, an assistant message its
      first part's text (filling an assistant message that has none yet);
      any other item (user, system or developer messages with
      ``input_text`` parts) is passed on as it is;
    - function tools become chat tools (``name``, ``description``,
      ``parameters`` under ``function``); other tool types are not rendered.

    A ``previous_response_id``'s conversation is not here (the worker holds it).

    >>> responses_to_chat({"instructions": "be brief", "input": "hi",
    ...                    "tools": [{"type": "function", "name": "ls", "parameters": {}}]})
    ... # doctest: +NORMALIZE_WHITESPACE
    ([{'role': 'system', 'content': 'be brief'}, {'role': 'user', 'content': 'hi'}],
     [{'type': 'function', 'function': {'name': 'ls', 'parameters': {}}}])
    """
    messages: list[dict[str, Any]] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    for item in items if isinstance(items, list) else ():
        kind = item.get("type")
        prev = messages[-1] if messages and messages[-1]["role"] == "assistant" else None
        if kind == "function_call":
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments")},
            }
            if prev is None:
                messages.append({"role": "assistant", "tool_calls": [call]})
            else:
                prev["tool_calls"] = [*prev.get("tool_calls", ()), call]
        elif kind == "function_call_output":
            messages.append(
                {"role": "tool", "content": item.get("output"), "tool_call_id": item.get("call_id")}
            )
        elif kind == "reasoning":
            if prev is not None and prev.get("reasoning") is None:
                prev["reasoning"] = _reasoning(item)
            else:
                messages.append({"role": "assistant", "reasoning": _reasoning(item)})
        elif item.get("role") == "assistant":
            if prev is not None and prev.get("content") is None:
                prev["content"] = _first_text(item.get("content"))
            else:
                messages.append({"role": "assistant", "content": _first_text(item.get("content"))})
        else:
            messages.append(dict(item))
    tools = [
        {"type": "function", "function": {k: v for k, v in t.items() if k != "type"}}
        for t in body.get("tools") or ()
        if t.get("type") == "function"
    ]
    return messages, tools or None


def responses_usage(usage: object) -> Usage | None:
    """A :class:`Usage` from a response's ``usage`` (None if it is not one).

    >>> responses_usage({"input_tokens": 40, "input_tokens_details": {"cached_tokens": 32},
    ...                  "output_tokens": 5})
    Usage(prompt_tokens=40, cached_tokens=32, output_tokens=5)
    """
    if not isinstance(usage, dict) or not isinstance(usage.get("input_tokens"), int):
        return None
    details = usage.get("input_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    output = usage.get("output_tokens")
    return Usage(
        usage["input_tokens"],
        cached if isinstance(cached, int) else None,
        output if isinstance(output, int) else 0,
    )


def response_id_of(answer: object) -> str | None:
    """A response object's ``id`` (None if it has none).

    >>> response_id_of({"id": "resp_1", "object": "response"}), response_id_of([])
    ('resp_1', None)
    """
    if isinstance(answer, dict) and isinstance(answer.get("id"), str) and answer["id"]:
        return str(answer["id"])
    return None


class ResponsesStream:
    """Watch a Responses SSE stream going through, byte for byte.

    >>> s = ResponsesStream()
    >>> _ = s.feed(b'event: response.created\\ndata: {"type": "response.created", '
    ...            b'"response": {"id": "resp_9", "status": "in_progress"}}\\n\\n')
    >>> s.response_id, s.first_token
    ('resp_9', False)
    >>> _ = s.feed(b'event: response.output_text.delta\\ndata: {"type": '
    ...            b'"response.output_text.delta", "delta": "hi", "sequence_number": 4}\\n\\n')
    >>> s.first_token, s.sequence_number
    (True, 4)

    :param on_event: called with each event's JSON.
    """

    def __init__(self, *, on_event: Callable[[object], None] | None = None) -> None:
        self._split = SseSplitter()
        self._on_event = on_event
        #: Generated output has gone by.
        self.first_token = False
        #: Output deltas seen (a fallback count of output tokens).
        self.content_chunks = 0
        #: The final usage (``response.completed`` / ``response.incomplete``).
        self.usage: Usage | None = None
        #: The response's id, once ``response.created`` went by.
        self.response_id: str | None = None
        #: An ``error`` event's (or a failed response's) message, if any.
        self.error: str | None = None
        #: The last event's ``sequence_number`` (-1 before any).
        self.sequence_number = -1
        #: The response ended (completed, incomplete or failed).
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        """The bytes of ``chunk``'s complete events to pass on (unchanged)."""
        out: list[bytes] = []
        for ev in self._split.feed(chunk):
            out.append(ev.raw)
            obj = ev.json() if ev.data.startswith("{") else None
            if not isinstance(obj, dict):
                continue
            if self._on_event is not None:
                self._on_event(obj)
            kind = obj.get("type") or ev.event
            seq = obj.get("sequence_number")
            if isinstance(seq, int):
                self.sequence_number = seq
            if kind in _OUTPUT_DELTAS:
                self.first_token = True
                self.content_chunks += 1
            response = obj.get("response")
            if isinstance(response, dict):
                self.response_id = self.response_id or response_id_of(response)
                usage = responses_usage(response.get("usage"))
                if usage is not None:
                    self.usage = usage
            if kind == "error" or ("error" in obj and kind is None):
                err = obj.get("error") if "error" in obj else obj
                self.error = str(err.get("message") if isinstance(err, dict) else err)
            elif kind == "response.failed":
                failed = response.get("error") if isinstance(response, dict) else None
                self.error = str(failed.get("message") if isinstance(failed, dict) else failed)
            if kind in ("response.completed", "response.incomplete", "response.failed"):
                self.done = True
        return b"".join(out)

    def flush(self) -> bytes:
        """An unterminated last event, passed on as it is."""
        return self._split.flush()

    @property
    def output_tokens(self) -> int:
        """Output tokens: the worker's count, else the number of output deltas."""
        return self.usage.output_tokens if self.usage is not None else self.content_chunks
