"""Anthropic Messages requests (``/v1/messages``): checks, hints, chat form, usage, streams.

- :func:`validate_messages` refuses malformed bodies and unknown content
  block types before a worker sees them (Anthropic-shaped 400s).
- :func:`anthropic_hints`: the session is the configured header, else
  ``metadata.user_id``; every ``cache_control`` breakpoint (top level,
  ``system`` blocks, ``tools``, message content blocks and the blocks inside
  a ``tool_result``) is read and the longest TTL becomes the router's
  ``cache_control`` hint.
- :func:`to_chat` turns the request into OpenAI chat messages and tools the
  way vLLM does before applying the chat template, for local tokenization
  and for workers without ``/v1/messages/render``.
- :func:`fill_usage` and :class:`AnthropicStream` complete ``usage`` with
  what the router knows when a worker reports no cache figures: the reads it
  predicted, and as cache writes the prompt tokens not read.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

from .errors import ProxyError, invalid
from .hints import Hints, Usage, header_hints, parse_breakpoints
from .sse import SseSplitter, encode_event

__all__ = [
    "CONTENT_BLOCK_TYPES",
    "AnthropicStream",
    "anthropic_hints",
    "anthropic_usage",
    "fill_usage",
    "to_chat",
    "validate_messages",
]

log = logging.getLogger("kvroute.proxy")

#: Content block types accepted in messages and ``system``: those vLLM's Messages
#: API accepts (its ``AnthropicContentBlock``; no ``document``); anything else is a 400.
CONTENT_BLOCK_TYPES: Final = frozenset(
    {"text", "image", "tool_use", "tool_result", "tool_reference", "thinking", "redacted_thinking"}
)
# The roles vLLM accepts, and what it reads them as: Claude Code >= 2.1.154
# also sends "ctx" and "msg", which vLLM maps to "user" before converting.
_ROLES: Final = {"user": "user", "assistant": "assistant", "system": "system",
                 "ctx": "user", "msg": "user"}  # fmt: skip
# Optional block fields vLLM's model types, and the JSON type each must have when given.
_BLOCK_FIELDS: Final = (
    ("text", str), ("source", dict), ("id", str), ("name", str), ("input", dict),
    ("tool_use_id", str), ("tool_name", str), ("thinking", str), ("signature", str),
    ("data", str),
)  # fmt: skip
_JSON_TYPE: Final = {str: "a string", dict: "an object"}
_TOOL_CHOICES: Final = frozenset({"auto", "any", "tool", "none"})
# Claude Code puts a per-request attribution line in its system prompt; vLLM
# drops such text blocks because they would defeat prefix caching (a system
# prompt given as a plain string is kept whole), and so must the local render.
_BILLING_PREFIX: Final = "x-anthropic-billing-header"


def _bad(message: str) -> ProxyError:
    return invalid(message)


def _check_inner(content: object, where: str) -> None:
    """A block's ``content`` (a ``tool_result``'s): a string, or objects of any type.

    vLLM reads the ``text`` items, ``image`` items and ``tool_reference``
    items of the list and passes over the rest, so only those are checked.
    """
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise _bad(f"{where}: must be a string or a list of content blocks")
    for k, item in enumerate(content):
        iw = f"{where}[{k}]"
        if not isinstance(item, dict):
            raise _bad(f"{iw}: must be an object")
        kind = item.get("type")
        if kind == "text" and not isinstance(item.get("text", ""), str):
            raise _bad(f"{iw}.text: must be a string")
        if kind == "image" and not isinstance(item.get("source", {}), dict):
            raise _bad(f"{iw}.source: must be an object")
        if kind == "tool_reference":
            name = item.get("tool_name") or item.get("name")
            if name is not None and not isinstance(name, str):
                raise _bad(f"{iw}.tool_name: must be a string")


def _check_blocks(blocks: object, where: str) -> None:
    if isinstance(blocks, str):
        return
    if not isinstance(blocks, list):
        raise _bad(f"{where}: must be a string or a list of content blocks")
    for j, block in enumerate(blocks):
        bw = f"{where}[{j}]"
        if not isinstance(block, dict):
            raise _bad(f"{bw}: must be an object")
        kind = block.get("type")
        if not isinstance(kind, str) or kind not in CONTENT_BLOCK_TYPES:
            raise _bad(f"{bw}.type: unknown content block type {kind!r}")
        # vLLM's block model: every field optional, typed when given.
        for field, json_type in _BLOCK_FIELDS:
            value = block.get(field)
            if value is not None and not isinstance(value, json_type):
                raise _bad(f"{bw}.{field}: must be {_JSON_TYPE[json_type]}")
        _check_inner(block.get("content"), f"{bw}.content")


def validate_messages(body: Mapping[str, Any], *, count_tokens: bool = False) -> None:
    """Check a ``/v1/messages`` (or ``count_tokens``) body's structure.

    >>> validate_messages({"model": "m", "max_tokens": 8,
    ...                    "messages": [{"role": "user", "content": [{"type": "video"}]}]})
    Traceback (most recent call last):
    ...
    kvroute.proxy.errors.ProxyError: messages[0].content[0].type: unknown content block type 'video'

    :raises ProxyError: 400 naming the first bad field.
    """
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise _bad("model: Field required (a string)")
    if not count_tokens:
        mt = body.get("max_tokens")
        if mt is None:
            raise _bad("max_tokens: Field required (an integer >= 1)")
        if isinstance(mt, bool) or not isinstance(mt, int):
            raise _bad("max_tokens: must be an integer")
        if mt < 1:
            # vLLM's own answer (its sampling parameters refuse it)
            raise ProxyError(400, f"max_tokens must be at least 1, got {mt}.", param="max_tokens")
        if "stream" in body and not isinstance(body["stream"], bool):
            raise _bad("stream: must be a boolean")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages: Field required (a non-empty list)")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]: must be an object")
        if not isinstance(m.get("role"), str) or m["role"] not in _ROLES:
            raise _bad(f"messages[{i}].role: must be 'user', 'assistant' or 'system'")
        if "content" not in m:
            raise _bad(f"messages[{i}].content: Field required")
        _check_blocks(m["content"], f"messages[{i}].content")
    system = body.get("system")
    if system is not None:
        # Blocks of any accepted type, as vLLM takes them; only text is read.
        _check_blocks(system, "system")
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("tools: must be a list")
        for k, t in enumerate(tools):
            if not isinstance(t, dict) or not isinstance(t.get("name"), str):
                raise _bad(f"tools[{k}].name: Field required (a string)")
            if not isinstance(t.get("input_schema"), dict):
                raise _bad(f"tools[{k}].input_schema: Field required (an object)")
            if not isinstance(t.get("description", ""), str | None):
                raise _bad(f"tools[{k}].description: must be a string")
    choice = body.get("tool_choice")
    if choice is not None:
        kind = choice.get("type") if isinstance(choice, dict) else None
        if not isinstance(kind, str) or kind not in _TOOL_CHOICES:
            raise _bad("tool_choice.type: must be 'auto', 'any', 'tool' or 'none'")
        name = choice.get("name")
        if kind == "tool" and not (isinstance(name, str) and name):
            raise _bad("tool_choice.name: required (a string) when tool_choice.type is 'tool'")
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise _bad("metadata: must be an object")
        uid = metadata.get("user_id")
        if uid is not None and not isinstance(uid, str):
            raise _bad("metadata.user_id: must be a string")


#: Stands in for the conversation when a breakpoint's prefix ends before it.
_NO_MESSAGES: Final = ({"role": "user", "content": "."},)


def _breakpoints(body: Mapping[str, Any]) -> Iterator[tuple[object, dict[str, Any] | None]]:
    """Every ``cache_control`` value in the request with its prefix body, in prompt order.

    A breakpoint caches the prompt up to its block in Anthropic's order:
    tools, system, messages. Its prefix body is the request cut right after
    the block (None when nothing follows it); a cut before the first message
    keeps one stand-in message, as the API needs one.
    """
    if "cache_control" in body:
        yield body["cache_control"], None
    messages = body.get("messages")
    messages = messages if isinstance(messages, list) else []
    tools = body.get("tools")
    if isinstance(tools, list):
        for i, t in enumerate(tools):
            if isinstance(t, dict) and "cache_control" in t:
                cut = {k: v for k, v in body.items() if k != "system"}
                cut.update(tools=tools[: i + 1], messages=list(_NO_MESSAGES))
                yield t["cache_control"], cut
    system = body.get("system")
    if isinstance(system, list):
        for j, b in enumerate(system):
            if isinstance(b, dict) and "cache_control" in b:
                yield b["cache_control"], {
                    **body, "system": system[: j + 1], "messages": list(_NO_MESSAGES)
                }  # fmt: skip
    for m, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, list):
            continue
        last_message = m == len(messages) - 1
        for j, b in enumerate(content):
            if not isinstance(b, dict):
                continue
            closes = last_message and j == len(content) - 1
            # the conversation up to this message, which keeps its blocks before this one
            head = [*messages[:m], {**msg, "content": content[:j]}]
            if "cache_control" in b:
                yield b["cache_control"], None if closes else _ending(body, head, b)
            inner = b.get("content") if b.get("type") == "tool_result" else None
            if isinstance(inner, list):
                for k, ib in enumerate(inner):
                    if isinstance(ib, dict) and "cache_control" in ib:
                        cut = {**b, "content": inner[: k + 1]}
                        whole = closes and k == len(inner) - 1
                        yield ib["cache_control"], None if whole else _ending(body, head, cut)


def _ending(
    body: Mapping[str, Any], head: list[dict[str, Any]], block: dict[str, Any]
) -> dict[str, Any]:
    """``body`` whose conversation is ``head`` with ``block`` appended to its last message."""
    last = head[-1]
    return {**body, "messages": [*head[:-1], {**last, "content": [*last["content"], block]}]}


def anthropic_hints(
    body: Mapping[str, Any], headers: Mapping[str, str], session_header: str
) -> Hints:
    """The hints of a (validated) Messages request; headers take precedence.

    >>> h = anthropic_hints({"metadata": {"user_id": "u1"},
    ...     "system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}],
    ...     "messages": [{"role": "user", "content": [{"type": "text", "text": "x",
    ...         "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}]}, {}, "X-Session-Id")
    >>> h.session_id, [(b.ttl, b.prefix is None) for b in h.cache_control]
    ('u1', [(300.0, False), (3600.0, True)])

    :raises ProxyError: 400 for a malformed ``cache_control`` or header.
    """
    metadata = body.get("metadata")
    uid = metadata.get("user_id") if isinstance(metadata, dict) else None
    from_body = Hints(
        session_id=uid or None,
        cache_control=parse_breakpoints(_breakpoints(body), "cache_control"),
    )
    return from_body.merged(header_hints(headers, session_header))


# -- the chat form -----------------------------------------------------------------------


def _image_url(source: Mapping[str, Any]) -> str:
    if source.get("type") == "url":
        return str(source.get("url", ""))
    return f"data:{source.get('media_type', 'image/jpeg')};base64,{source.get('data', '')}"


def _text_blocks(blocks: object) -> list[str]:
    """The system texts of a list of blocks: non-empty text blocks but the billing line."""
    if not isinstance(blocks, list):
        return []
    return [
        b["text"]
        for b in blocks
        if b.get("type") == "text" and b.get("text") and not b["text"].startswith(_BILLING_PREFIX)
    ]


def _system_text(body: Mapping[str, Any]) -> str | None:
    """One system prompt: ``system`` then every system-role message's, joined with nothing.

    A string is taken whole (vLLM checks only blocks for the billing line);
    None when there is no system text at all.
    """
    sources = [body["system"]] if body.get("system") else []
    sources += [m["content"] for m in body.get("messages") or () if m.get("role") == "system"]
    parts: list[str] = []
    for source in sources:
        parts += [source] if isinstance(source, str) else _text_blocks(source)
    return "".join(parts) if parts else None


def _tool_result(block: Mapping[str, Any], out: list[dict[str, Any]]) -> None:
    """A user's ``tool_result``: a tool message, then its images, then its tool references."""
    content = block.get("content")
    text = content if isinstance(content, str) else ""
    images: list[dict[str, Any]] = []
    references: list[dict[str, Any]] = []
    if isinstance(content, list):
        texts: list[str] = []
        for item in content:
            kind = item.get("type")
            if kind == "text":
                texts.append(item.get("text", ""))
            elif kind == "image":
                url = _image_url(item.get("source") or {})
                if url:
                    images.append({"type": "image_url", "image_url": {"url": url}})
            elif kind == "tool_reference":
                name = item.get("tool_name") or item.get("name")
                if name:
                    references.append({"type": "tool_reference", "name": name})
        text = "\n".join(texts)
    tool_call_id = block.get("tool_use_id") or ""
    out.append({"role": "tool", "tool_call_id": tool_call_id, "content": text})
    # Chat messages cannot carry images in a tool message: vLLM adds a user turn.
    if images:
        out.append({"role": "user", "content": images})
    if references:
        out.append({"role": "tool", "tool_call_id": tool_call_id, "content": references})


def _chat_tool(tool: Mapping[str, Any]) -> dict[str, Any]:
    """An Anthropic tool as the template sees it: vLLM's dumped ``ChatCompletionToolsParam``."""
    schema = dict(tool["input_schema"])
    # vLLM's tool model sets a missing schema type, last in key order.
    schema.setdefault("type", "object")
    function = {
        "name": tool["name"],
        "description": tool.get("description"),
        "parameters": schema,
        "defer_loading": tool.get("defer_loading"),
    }
    return {"type": "function", "function": function}


def to_chat(body: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """OpenAI chat ``(messages, tools)`` for a validated Messages request, as vLLM builds them.

    The rules of vLLM's Anthropic serving (``vllm/entrypoints/anthropic/serving.py``):

    - one system message first: the ``system`` string, or its non-empty text
      blocks but the Claude Code billing line, then those of every
      system-role message, all joined with nothing;
    - ``ctx`` and ``msg`` roles are ``user``; a message given as a string is
      kept as is; of a block list, non-empty text blocks and images
      (``image_url`` parts) make the content, a single text part collapsing
      to a string; ``thinking`` blocks make ``reasoning``; ``tool_use``
      blocks make ``tool_calls`` (``json.dumps(input)``);
      ``redacted_thinking`` and ``tool_reference`` blocks add nothing;
    - a user's ``tool_result`` becomes a ``tool`` message (its text items
      joined with a newline) placed before the rest of the turn, followed by
      a user message with its images and a ``tool`` message with its tool
      references; an assistant's becomes the text ``Tool result: <content>``;
      a user message left without content is dropped;
    - tools become function tools with the template-visible fields vLLM
      dumps (``description`` may be None; ``parameters`` gets ``"type":
      "object"`` when its schema has no type; ``defer_loading``).

    >>> to_chat({"system": "be brief", "messages": [{"role": "user", "content": "hi"}]})
    ([{'role': 'system', 'content': 'be brief'}, {'role': 'user', 'content': 'hi'}], None)
    """
    out: list[dict[str, Any]] = []
    system = _system_text(body)
    if system is not None:
        out.append({"role": "system", "content": system})
    for m in body.get("messages") or ():
        role = _ROLES.get(m.get("role"), m.get("role"))
        if role == "system":
            continue
        content = m.get("content")
        msg: dict[str, Any] = {"role": role}
        if isinstance(content, str):
            msg["content"] = content
        else:
            parts: list[dict[str, Any]] = []
            calls: list[dict[str, Any]] = []
            reasoning: list[str] = []
            for b in content or ():
                kind = b.get("type")
                if kind == "text" and b.get("text"):
                    parts.append({"type": "text", "text": b["text"]})
                elif kind == "image" and b.get("source"):
                    url = _image_url(b["source"])
                    parts.append({"type": "image_url", "image_url": {"url": url}})
                elif kind == "thinking" and b.get("thinking") is not None:
                    reasoning.append(b["thinking"])
                elif kind == "tool_use":
                    calls.append({
                        # vLLM's own stand-in for a missing id (templates rarely print ids).
                        "id": b.get("id") or f"call_{int(time.time())}",
                        "type": "function",
                        "function": {"name": b.get("name") or "",
                                     "arguments": json.dumps(b.get("input") or {})},
                    })  # fmt: skip
                elif kind == "tool_result":
                    if role == "user":
                        _tool_result(b, out)
                    else:
                        # vLLM prints the content as Python does (a list as its repr).
                        inner = b.get("content")
                        text = f"Tool result: {str(inner) if inner else ''}"
                        parts.append({"type": "text", "text": text})
            if reasoning:
                msg["reasoning"] = "".join(reasoning)
            if calls:
                msg["tool_calls"] = calls
            if parts:
                single = len(parts) == 1 and parts[0]["type"] == "text"
                msg["content"] = parts[0]["text"] if single else parts
        if role == "user" and "content" not in msg:
            continue
        out.append(msg)
    tools = body.get("tools")
    return out, None if tools is None else [_chat_tool(t) for t in tools]


# -- usage --------------------------------------------------------------------------------


def _count(usage: Mapping[str, Any], key: str) -> int | None:
    v = usage.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def anthropic_usage(usage: object) -> Usage | None:
    """A :class:`Usage` from an Anthropic ``usage`` object (None if it is not one).

    ``input_tokens`` excludes cache reads and writes, so the prompt is their sum.

    >>> anthropic_usage({"input_tokens": 8, "output_tokens": 4,
    ...                  "cache_read_input_tokens": 32, "cache_creation_input_tokens": 0})
    Usage(prompt_tokens=40, cached_tokens=32, output_tokens=4)
    """
    if not isinstance(usage, dict):
        return None
    inp = _count(usage, "input_tokens")
    if inp is None:
        return None
    read = _count(usage, "cache_read_input_tokens")
    created = _count(usage, "cache_creation_input_tokens") or 0
    return Usage(inp + (read or 0) + created, read, _count(usage, "output_tokens") or 0)


def fill_usage(usage: dict[str, Any], predicted_cached_tokens: int) -> bool:
    """Complete a ``usage`` that lacks cache figures with what the router knows.

    Anthropic splits the prompt in three: ``cache_read_input_tokens`` (read
    from the prefix cache), ``cache_creation_input_tokens`` (written to it)
    and ``input_tokens`` (neither). A worker that reports no reads (vLLM's
    Messages API without ``--enable-prompt-tokens-details``) gives the whole
    prompt as ``input_tokens``: the router's predicted reads move out of it.
    A worker that reports no writes gets, as writes, the tokens not read:
    the engine computed them and keeps them in its prefix cache, and the
    proxy's ``kvroute_cache_creation_tokens_total`` counts the same; what
    is left in ``input_tokens`` is then 0. Figures the worker reported stay.

    >>> u = {"input_tokens": 40, "output_tokens": 2}
    >>> fill_usage(u, 32)
    True
    >>> u["input_tokens"], u["cache_read_input_tokens"], u["cache_creation_input_tokens"]
    (0, 32, 8)
    >>> fill_usage(u, 16)   # already there: left alone
    False
    >>> u = {"input_tokens": 5, "cache_read_input_tokens": 30}   # reads reported, no writes
    >>> fill_usage(u, 16), u["cache_read_input_tokens"], u["cache_creation_input_tokens"]
    (True, 30, 5)

    :returns: whether ``usage`` was changed.
    """
    changed = False
    inp = _count(usage, "input_tokens") or 0
    if _count(usage, "cache_read_input_tokens") is None:
        read = min(max(predicted_cached_tokens, 0), inp)
        inp -= read
        usage["input_tokens"] = inp
        usage["cache_read_input_tokens"] = read
        changed = True
    if _count(usage, "cache_creation_input_tokens") is None:
        usage["cache_creation_input_tokens"] = inp
        usage["input_tokens"] = 0
        changed = True
    return changed


class AnthropicStream:
    """Watch an Anthropic SSE stream going through; fill cache reads in if missing.

    Events pass byte for byte, except a ``message_start`` or ``message_delta``
    whose usage (with ``input_tokens``) lacks cache figures: it is re-encoded
    with them filled in (see :func:`fill_usage`); :attr:`predicted` says
    whether the reads passed on are the router's prediction.

    :param predicted_cached_tokens: the router's prediction for the request.
    :param on_event: called with each content event's JSON (``content_block_start``
        and ``_delta``), e.g. to rebuild the reply for a warm-up.
    """

    def __init__(
        self, predicted_cached_tokens: int, *, on_event: Callable[[object], None] | None = None
    ) -> None:
        self._split = SseSplitter()
        self._predicted_tokens = predicted_cached_tokens
        self._on_event = on_event
        #: The first ``content_block_delta`` has gone by.
        self.first_token = False
        #: The cache figures passed on are the router's prediction.
        self.predicted = False
        #: The usage reported so far (message_start, updated by message_delta).
        self.usage: Usage | None = None
        #: An ``error`` event's message, if one came.
        self.error: str | None = None
        #: ``message_stop`` arrived.
        self.done = False

    def _patch(self, usage: object) -> bool:
        if isinstance(usage, dict) and "input_tokens" in usage:
            return fill_usage(usage, self._predicted_tokens)
        return False

    def feed(self, chunk: bytes) -> bytes:
        """The bytes of ``chunk``'s complete events to pass on."""
        out: list[bytes] = []
        for ev in self._split.feed(chunk):
            kind = ev.event
            if self._on_event is not None and kind in (
                "content_block_start",
                "content_block_delta",
            ):
                self._on_event(ev.json())
            if kind == "content_block_delta":
                self.first_token = True
            elif kind == "message_stop":
                self.done = True
            elif kind in ("message_start", "message_delta", "error"):
                obj = ev.json()
                if not isinstance(obj, dict):
                    out.append(ev.raw)
                    continue
                if kind == "error":
                    err = obj.get("error")
                    self.error = str(err.get("message") if isinstance(err, dict) else err)
                else:
                    holder = obj.get("message") if kind == "message_start" else obj
                    usage = holder.get("usage") if isinstance(holder, dict) else None
                    reported = isinstance(usage, dict) and "cache_read_input_tokens" in usage
                    # a delta is completed when the start was, or when it
                    # carries the worker's own reads (its writes then filled)
                    patched = (
                        kind == "message_start" or self.predicted or reported
                    ) and self._patch(usage)
                    if reported:
                        # The worker's own reads (a vLLM with prompt token details
                        # reports them in message_delta only): they are the
                        # final usage the client keeps.
                        self.predicted = False
                    elif patched:
                        self.predicted = True
                    self._update_usage(usage)
                    if patched:
                        out.append(encode_event(obj, kind))
                        continue
            out.append(ev.raw)
        return b"".join(out)

    def _update_usage(self, usage: object) -> None:
        if not isinstance(usage, dict):
            return
        new = anthropic_usage(usage)
        if new is not None:
            self.usage = new
        elif self.usage is not None and _count(usage, "output_tokens") is not None:
            # Anthropic's own message_delta carries only output_tokens.
            u = self.usage
            self.usage = Usage(u.prompt_tokens, u.cached_tokens, usage["output_tokens"])

    def flush(self) -> bytes:
        """An unterminated last event, passed on as it is."""
        return self._split.flush()
