"""A small, deterministic tokenizer and chat template shared by the mock worker and tests.

By default nothing is loaded: text is UTF-8 and **token id = byte value + 16**
(:data:`BYTE_OFFSET`); ids 0..15 are special tokens, written in text as
``<|name|>`` (see :data:`SPECIAL_TOKENS`) and recognised wherever they appear,
like a Hugging Face tokenizer's added tokens. ``add_special_tokens`` adds
nothing (there is no BOS by default, as with many recent models).

The default chat template (:data:`DEFAULT_CHAT_TEMPLATE`, Jinja) renders::

    [<|tools|>{tools as JSON}<|end|>]
    <|{role}|>{content}{<|tool_call|>{name}{arguments JSON}...}<|end|>   per message
    [<|assistant|>]                                   if add_generation_prompt

where content is a string or a list of parts: ``text`` parts are concatenated
and each image part (``image_url``, ``image``, ``input_image``) becomes
:data:`IMAGE_PLACEHOLDER_TOKENS` ``<|image|>`` tokens. Roles are written as
they come (system, user, assistant, tool; any other role's marker is plain
text). The rendered text is then encoded without special-token additions,
which is what vLLM does for chat requests.

Anthropic Messages requests are first converted to that chat form
(:func:`anthropic_to_chat`), as vLLM converts them to a chat-completion
request: ``system`` becomes a system message, ``tool_use`` blocks become
``tool_calls`` (arguments = ``json.dumps(input)``), each ``tool_result``
becomes a ``tool`` message placed before the rest of its user turn, images
become ``image_url`` parts and ``tools`` become OpenAI function tools.

With ``tokenizer=`` a Hugging Face ``tokenizer.json`` is used instead (through
the ``tokenizers`` library) together with ``chat_template`` (Jinja, rendered
with ``messages``, ``tools``, ``add_generation_prompt``, ``bos_token`` and
``eos_token``; the default template when omitted).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "BYTE_OFFSET",
    "DEFAULT_CHAT_TEMPLATE",
    "IMAGE_PLACEHOLDER_TOKENS",
    "SPECIAL_TOKENS",
    "MockTokenizer",
    "RequestError",
    "anthropic_to_chat",
]

#: The default tokenizer's special tokens; a token's id is its index.
SPECIAL_TOKENS: Final[tuple[str, ...]] = (
    "<|pad|>",  # 0
    "<|bos|>",  # 1
    "<|eos|>",  # 2
    "<|system|>",  # 3
    "<|user|>",  # 4
    "<|assistant|>",  # 5
    "<|tool|>",  # 6
    "<|end|>",  # 7: end of a message
    "<|tool_call|>",  # 8
    "<|tools|>",  # 9: tool definitions header
    "<|image|>",  # 10: image placeholder
)
#: Byte ``b`` is token ``b + BYTE_OFFSET``; ids below it are special tokens.
BYTE_OFFSET: Final = 16
#: ``<|image|>`` tokens an image part renders to.
IMAGE_PLACEHOLDER_TOKENS: Final = 4

DEFAULT_CHAT_TEMPLATE: Final = (
    "{{- bos_token -}}"
    "{%- if tools -%}<|tools|>{{ tools | tojson }}<|end|>{%- endif -%}"
    "{%- for message in messages -%}"
    "<|{{ message['role'] }}|>"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- elif message['content'] -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- elif part['type'] in ['image_url', 'image', 'input_image'] -%}"
    "<|image|><|image|><|image|><|image|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- for call in message['tool_calls'] or [] -%}"
    "<|tool_call|>{{ call['function']['name'] }}{{ call['function']['arguments'] }}"
    "{%- endfor -%}"
    "<|end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)

_SPECIAL_RE: Final = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
_SPECIAL_IDS: Final = {t: i for i, t in enumerate(SPECIAL_TOKENS)}


class RequestError(ValueError):
    """A request the worker rejects; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _fail(message: str) -> NoReturn:
    raise RequestError(message)


def _tojson(value: object, indent: int | None = None) -> str:
    # Plain JSON (no HTML escaping), keys in insertion order: what chat templates expect.
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


class MockTokenizer:
    """Tokenizes text and renders chat / Anthropic requests to token ids.

    >>> tok = MockTokenizer()
    >>> tok.encode("hi")
    [120, 121]
    >>> tok.render_chat([{"role": "user", "content": "hi"}])
    [4, 120, 121, 7, 5]
    >>> tok.decode([4, 120, 121])
    '<|user|>hi'

    :param tokenizer: path to a Hugging Face ``tokenizer.json``, or ``None``
        for the built-in byte tokenizer.
    :param chat_template: a Jinja chat template, or ``None`` for
        :data:`DEFAULT_CHAT_TEMPLATE`.
    :param bos_token: the template's ``bos_token`` (default: ``""``).
    :param eos_token: the template's ``eos_token`` (default: ``"<|eos|>"``
        for the byte tokenizer, else ``""``).
    :raises jinja2.TemplateSyntaxError: the template does not parse.
    :raises Exception: ``tokenizers`` cannot load the file.
    """

    def __init__(
        self,
        tokenizer: str | os.PathLike[str] | None = None,
        chat_template: str | None = None,
        *,
        bos_token: str = "",
        eos_token: str | None = None,
    ) -> None:
        self._hf: Any = None
        if tokenizer is not None:
            from tokenizers import Tokenizer

            self._hf = Tokenizer.from_file(os.fspath(tokenizer))
        self.path = None if tokenizer is None else os.fspath(tokenizer)
        self.chat_template = DEFAULT_CHAT_TEMPLATE if chat_template is None else chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token if eos_token is not None else ("" if self._hf else "<|eos|>")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        self._template = env.from_string(self.chat_template)

    @property
    def vocab_size(self) -> int:
        """Number of token ids."""
        if self._hf is not None:
            return int(self._hf.get_vocab_size(with_added_tokens=True))
        return BYTE_OFFSET + 256

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``.

        Runtime complexity: O(len(text)).

        :param text: the text.
        :param add_special_tokens: passed to a Hugging Face tokenizer's
            post-processor; the byte tokenizer adds none either way.
        :raises TypeError: ``text`` is not a ``str``.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}")
        if self._hf is not None:
            return list(self._hf.encode(text, add_special_tokens=add_special_tokens).ids)
        ids: list[int] = []
        pos = 0
        for m in _SPECIAL_RE.finditer(text):
            ids.extend(b + BYTE_OFFSET for b in text[pos : m.start()].encode("utf-8"))
            ids.append(_SPECIAL_IDS[m.group()])
            pos = m.end()
        ids.extend(b + BYTE_OFFSET for b in text[pos:].encode("utf-8"))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids (special tokens written out; invalid UTF-8 replaced)."""
        ids = list(ids)
        if self._hf is not None:
            return str(self._hf.decode(ids, skip_special_tokens=False))
        out: list[str] = []
        run = bytearray()
        for i in ids:
            if BYTE_OFFSET <= i < BYTE_OFFSET + 256:
                run.append(i - BYTE_OFFSET)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run.clear()
            out.append(SPECIAL_TOKENS[i] if 0 <= i < len(SPECIAL_TOKENS) else f"<|{i}|>")
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """The chat template's text for ``messages``.

        :raises RequestError: the template failed (e.g. ``raise_exception``).
        """
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                tools=list(tools) if tools else None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.TemplateError as exc:
            raise RequestError(f"chat template failed: {exc}") from exc

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """Token ids of a chat-completion request's prompt.

        :param messages: OpenAI chat messages.
        :param tools: OpenAI tools, or ``None``.
        :param add_generation_prompt: end with the assistant's turn marker.
        :raises RequestError: malformed messages.
        """
        _check_messages(messages)
        text = self.apply_chat_template(
            messages, tools=tools, add_generation_prompt=add_generation_prompt
        )
        return self.encode(text, add_special_tokens=False)

    def render_anthropic(self, body: Mapping[str, Any]) -> list[int]:
        """Token ids of an Anthropic Messages request (``/v1/messages`` body).

        :raises RequestError: a malformed request.
        """
        messages, tools = anthropic_to_chat(body)
        return self.render_chat(messages, tools=tools)

    def render_prompt(self, prompt: object, *, add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of a completions ``prompt``: one list per prompt.

        Accepts a string, a list of strings, a list of token ids or a list of
        such lists, like vLLM.

        :raises RequestError: anything else, or an empty prompt.
        """
        if isinstance(prompt, str):
            return [self.encode(prompt, add_special_tokens=add_special_tokens)]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                return [self.encode(p, add_special_tokens=add_special_tokens) for p in prompt]
            if all(_is_token_id(t) for t in prompt):
                return [list(prompt)]
            if all(isinstance(p, list) and p and all(_is_token_id(t) for t in p) for p in prompt):
                return [list(p) for p in prompt]
        _fail("prompt must be a string, a list of strings or a (list of) token id list(s)")


def _is_token_id(value: object) -> bool:
    return type(value) is int and 0 <= value < 2**32


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        _fail("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            _fail(f"messages[{i}] must be an object with a string 'role'")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            _fail(f"messages[{i}].content must be a string or a list of parts")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                    _fail(f"messages[{i}].content[{j}] must be an object with a 'type'")


def _text_of(content: object, where: str) -> str:
    """The text of an Anthropic ``system`` / ``tool_result`` content (str or text blocks)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for i, block in enumerate(content):
            if not isinstance(block, dict):
                _fail(f"{where}[{i}] must be a content block")
            if block.get("type") == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif block.get("type") != "image":
                _fail(f"{where}[{i}]: unsupported block type {block.get('type')!r}")
        return "".join(texts)
    _fail(f"{where} must be a string or a list of text blocks")


def _image_part(block: Mapping[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    if not isinstance(source, dict):
        _fail(f"{where}.source must be an object")
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type', '')};base64,{source.get('data', '')}"
    elif source.get("type") == "url":
        url = str(source.get("url", ""))
    else:
        _fail(f"{where}.source.type must be 'base64' or 'url'")
    return {"type": "image_url", "image_url": {"url": url}}


def anthropic_to_chat(
    body: Mapping[str, Any],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Convert an Anthropic Messages request to OpenAI chat ``(messages, tools)``.

    >>> anthropic_to_chat({"system": "be brief", "messages": [{"role": "user", "content": "hi"}]})
    ([{'role': 'system', 'content': 'be brief'}, {'role': 'user', 'content': 'hi'}], None)

    :raises RequestError: a malformed request.
    """
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        messages.append({"role": "system", "content": _text_of(system, "system")})
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        _fail("messages: must be a non-empty list")
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(msg, dict) or msg.get("role") not in ("user", "assistant"):
            _fail(f"{where}.role: must be 'user' or 'assistant'")
        role = msg["role"]
        content = msg.get("content")
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            _fail(f"{where}.content: must be a string or a list of content blocks")
        parts: list[dict[str, Any]] = []
        tool_calls: list[dict[str, Any]] = []
        for j, block in enumerate(content):
            bwhere = f"{where}.content[{j}]"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                if not isinstance(block.get("text"), str):
                    _fail(f"{bwhere}.text: must be a string")
                parts.append({"type": "text", "text": block["text"]})
            elif kind == "image":
                parts.append(_image_part(block, bwhere))
            elif kind == "tool_use":
                if not isinstance(block.get("name"), str):
                    _fail(f"{bwhere}.name: must be a string")
                tool_calls.append(
                    {
                        "id": str(block.get("id", "")),
                        "type": "function",
                        "function": {
                            "name": block["name"],
                            "arguments": json.dumps(block.get("input", {}), ensure_ascii=False),
                        },
                    }
                )
            elif kind == "tool_result":
                messages.append(
                    {
                        "role": "tool",
                        "tool_call_id": str(block.get("tool_use_id", "")),
                        "content": _text_of(block.get("content"), f"{bwhere}.content"),
                    }
                )
            elif kind in ("thinking", "redacted_thinking"):
                continue  # not part of the prompt, as with vLLM
            else:
                _fail(f"{bwhere}.type: unsupported content block type {kind!r}")
        if parts or tool_calls:
            out: dict[str, Any] = {"role": role, "content": parts or None}
            if tool_calls:
                out["tool_calls"] = tool_calls
            messages.append(out)
    tools: list[dict[str, Any]] | None = None
    raw_tools = body.get("tools")
    if raw_tools:
        if not isinstance(raw_tools, list):
            _fail("tools: must be a list")
        tools = []
        for k, tool in enumerate(raw_tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                _fail(f"tools[{k}].name: must be a string")
            tools.append(
                {
                    "type": "function",
                    "function": {
                        "name": tool["name"],
                        "description": tool.get("description", ""),
                        "parameters": tool.get("input_schema", {}),
                    },
                }
            )
    return messages, tools
