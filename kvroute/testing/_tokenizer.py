"""A small, deterministic tokenizer and chat template shared by the mock worker and tests.

By default nothing is loaded: text is UTF-8 and **token id = byte value + 16**
(:data:`BYTE_OFFSET`); ids 0..15 are special tokens, written in text as
``<|name|>`` (see :data:`SPECIAL_TOKENS`) and recognised wherever they appear,
like a Hugging Face tokenizer's added tokens. ``add_special_tokens`` adds
nothing (there is no BOS by default, as with many recent models).

The default chat template (:data:`DEFAULT_CHAT_TEMPLATE`, Jinja) renders::

    [<|tools|>{tools as JSON}<|end|>]
    <|{role}|>{content}{<|tool_call|>{name}{arguments as JSON}...}<|end|>   per message
    [<|assistant|>]                                   if add_generation_prompt

where content is a string or a list of parts: ``text`` parts are concatenated
and each image part becomes :data:`IMAGE_PLACEHOLDER_TOKENS` ``<|image|>``
tokens. Roles are written as they come (system, user, assistant, tool; any
other role's marker is plain text). The rendered text is then encoded without
special-token additions, which is what vLLM does for chat requests.

Chat messages reach the template the way vLLM's ``parse_chat_messages``
passes them (:meth:`MockTokenizer.template_messages`): a template that loops
over a message's content gets a list of parts (``{"type": "text", ...}``,
``{"type": "image"}``, tool references; a string becomes one text part), any
other template a string (the texts joined with newlines, each image's
:data:`IMAGE_PLACEHOLDER` on its own line in front); an assistant's tool-call
``arguments`` are parsed from JSON and its ``reasoning`` is also given as
``reasoning_content``. Tools are given as vLLM dumps them (a function's
``description`` and ``parameters`` are None when absent).

Anthropic Messages requests are first converted to that chat form
(:func:`anthropic_to_chat`) with the rules of vLLM's Anthropic serving: one
leading system message (``system``, then system-role messages; text blocks
starting with ``x-anthropic-billing-header`` dropped), ``tool_use`` blocks as
``tool_calls``, each user ``tool_result`` as a ``tool`` message placed before
the rest of its turn (then its images as a user message), ``thinking`` as
``reasoning``, images as ``image_url`` parts and ``tools`` as function tools.

With ``tokenizer=`` a Hugging Face ``tokenizer.json`` is used instead (through
the ``tokenizers`` library) together with ``chat_template`` (Jinja, rendered
with ``messages``, ``tools``, ``add_generation_prompt``, ``bos_token`` and
``eos_token``; the default template when omitted).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, Literal, NoReturn

import jinja2
import jinja2.nodes

from .._chat_template import chat_template_environment

__all__ = [
    "BYTE_OFFSET",
    "DEFAULT_CHAT_TEMPLATE",
    "IMAGE_PLACEHOLDER",
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
#: The text an image becomes in string content (the "model's" placeholder,
#: already expanded: vLLM's engine expands its one-token placeholder later).
IMAGE_PLACEHOLDER: Final = "<|image|>" * IMAGE_PLACEHOLDER_TOKENS

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
    "<|tool_call|>{{ call['function']['name'] }}{{ call['function']['arguments'] | tojson }}"
    "{%- endfor -%}"
    "<|end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)

_SPECIAL_RE: Final = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
_SPECIAL_IDS: Final = {t: i for i, t in enumerate(SPECIAL_TOKENS)}

# The Anthropic content block types vLLM's protocol accepts (no "document").
_BLOCK_TYPES: Final = (
    "text", "image", "tool_use", "tool_result", "tool_reference", "thinking", "redacted_thinking",
)  # fmt: skip
# Roles vLLM accepts in Messages requests, and what it reads them as.
_ROLE_MAP: Final = {
    "user": "user", "assistant": "assistant", "system": "system", "ctx": "user", "msg": "user",
}  # fmt: skip
_BILLING_HEADER: Final = "x-anthropic-billing-header"


class RequestError(ValueError):
    """A request the worker rejects; ``status`` is the HTTP status to answer with.

    ``param`` names the request field to blame, as vLLM's validation errors
    do; ``kind`` is the error's ``type`` where vLLM names one (default: from
    the status, e.g. ``BadRequestError``).
    """

    def __init__(
        self, message: str, status: int = 400, param: str | None = None, *, kind: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.kind = kind


def _fail(message: str) -> NoReturn:
    raise RequestError(message)


def _content_format(env: jinja2.Environment, source: str) -> Literal["string", "openai"]:
    """vLLM's "auto" content format: ``openai`` if the template loops over a message's content.

    Read from the template's syntax tree (any ``for`` over ``x['content']`` or
    ``x.content``); vLLM also follows the variables such a value is set to.
    Written apart from the proxy's (a regex over the source), which is tested
    against this one; only the Jinja environment is shared.
    """
    for loop in env.parse(source).find_all(jinja2.nodes.For):
        it = loop.iter
        if isinstance(it, jinja2.nodes.Getattr) and it.attr == "content":
            return "openai"
        if (
            isinstance(it, jinja2.nodes.Getitem)
            and isinstance(it.arg, jinja2.nodes.Const)
            and it.arg.value == "content"
        ):
            return "openai"
    return "string"


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
        env = chat_template_environment()
        self._template = env.from_string(self.chat_template)
        #: ``"openai"`` (content as a list of parts) or ``"string"``, as vLLM detects it.
        self.content_format = _content_format(env, self.chat_template)

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

    def template_messages(self, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """OpenAI chat messages as vLLM's ``parse_chat_messages`` hands them to the template.

        :raises RequestError: malformed messages.
        """
        if not isinstance(messages, list) or not messages:
            _fail("messages must be a non-empty list")
        conversation: list[dict[str, Any]] = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                _fail(f"messages[{i}] must be an object with a string 'role'")
            role = m["role"]
            out: dict[str, Any] = {"role": role, "content": self._content(m.get("content"), i)}
            if role == "assistant":
                tool_calls = m.get("tool_calls")
                if tool_calls:
                    out["tool_calls"] = [_call_with_parsed_arguments(c, i) for c in tool_calls]
                if m.get("reasoning") is not None:
                    out["reasoning"] = m["reasoning"]
                    out["reasoning_content"] = m["reasoning"]
            if role == "tool":
                if "tool_call_id" in m:
                    out["tool_call_id"] = m["tool_call_id"]
                content = out["content"]
                # Most templates want a tool result as a string: vLLM joins all-text parts.
                if isinstance(content, list) and all(p["type"] == "text" for p in content):
                    out["content"] = "\n".join(p["text"] for p in content)
            if isinstance(m.get("name"), str):
                out["name"] = m["name"]
            conversation.append(out)
        return conversation

    def _content(self, content: object, i: int) -> str | list[dict[str, Any]]:
        if content is None:
            content = []
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            _fail(f"messages[{i}].content must be a string or a list of parts")
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                _fail(f"messages[{i}].content[{j}] must be an object with a 'type'")
            kind = part["type"]
            if kind in ("text", "input_text", "output_text", "refusal", "thinking"):
                key = kind if kind in ("refusal", "thinking") else "text"
                if part.get(key) is None:
                    continue
                if not isinstance(part[key], str):
                    _fail(f"messages[{i}].content[{j}].{key} must be a string")
                parts.append({"type": "text", "text": part[key]})
            elif kind in ("image_url", "input_image"):
                parts.append({"type": "image"})
            elif kind == "tool_reference":
                parts.append({"type": "tool_reference", "name": part.get("name")})
            else:
                _fail(f"messages[{i}].content[{j}]: unsupported content part type {kind!r}")
        if self.content_format == "openai":
            return parts
        texts = []
        images = 0
        for p in parts:
            if p["type"] == "image":
                images += 1
            elif p["type"] == "text" and p["text"]:
                texts.append(p["text"])
            elif p["type"] == "tool_reference" and p["name"]:
                texts.append(str(p["name"]))
        text = "\n".join(texts)
        if images == 0:
            return text
        missing = images - text.count(IMAGE_PLACEHOLDER)
        if missing < 0:
            _fail(f"Found more '{IMAGE_PLACEHOLDER}' placeholders in input prompt than images.")
        lines = [IMAGE_PLACEHOLDER] * missing
        if text:
            lines.append(text)
        return "\n".join(lines)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """The chat template's text for OpenAI chat ``messages`` and ``tools``, as vLLM renders it.

        :raises RequestError: malformed messages or tools, or the template
            failed (e.g. ``raise_exception``).
        """
        conversation = self.template_messages(messages)
        tool_dicts = None
        if tools is not None:
            if not isinstance(tools, list):
                _fail("tools must be a list")
            tool_dicts = [_dumped_tool(t, k) for k, t in enumerate(tools)]
        try:
            return self._template.render(
                messages=conversation,
                tools=tool_dicts,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except (jinja2.TemplateError, TypeError, ValueError) as exc:
            raise RequestError(f"chat template failed: {exc}") from exc

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[int]:
        """Token ids of a chat-completion request's prompt.

        :param messages: OpenAI chat messages.
        :param tools: OpenAI tools, or ``None``.
        :param add_generation_prompt: end with the assistant's turn marker.
        :param continue_final_message: leave the last message open, for the
            model to continue (vLLM's option: the rendering is cut after the
            last occurrence of that message's text content).
        :raises RequestError: malformed messages, or both options.
        """
        if continue_final_message and add_generation_prompt:
            _fail("continue_final_message and add_generation_prompt cannot both be true")
        text = self.apply_chat_template(
            messages, tools=tools, add_generation_prompt=add_generation_prompt
        )
        if continue_final_message and messages:
            final = messages[-1].get("content")
            if isinstance(final, str) and final and (at := text.rfind(final)) >= 0:
                text = text[: at + len(final)]
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


def _call_with_parsed_arguments(call: object, i: int) -> dict[str, Any]:
    # Templates expect arguments as a mapping; vLLM parses the JSON ({} if it is not JSON).
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        _fail(f"messages[{i}].tool_calls: each call needs a 'function' object")
    function = dict(call["function"])
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            arguments = {}
    elif not isinstance(arguments, (dict, list)):
        arguments = {}
    function["arguments"] = arguments
    return {**call, "function": function}


def _dumped_tool(tool: object, k: int) -> dict[str, Any]:
    # What ``ChatCompletionToolsParam.model_dump()`` gives: declared fields, then extras.
    if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
        _fail(f"tools[{k}] must be an object with a 'function' object")
    function = tool["function"]
    if not isinstance(function.get("name"), str):
        _fail(f"tools[{k}].function.name must be a string")
    dumped_function = {
        "name": function["name"],
        "description": function.get("description"),
        "parameters": function.get("parameters"),
    }
    for key, value in function.items():
        dumped_function.setdefault(key, value)
    dumped: dict[str, Any] = {"type": tool.get("type", "function"), "function": dumped_function}
    for key, value in tool.items():
        dumped.setdefault(key, value)
    return dumped


# -- Anthropic Messages -> OpenAI chat, as vLLM's Anthropic serving converts --------------

_BLOCK_FIELD_TYPES: Final = {
    "text": str, "source": dict, "id": str, "name": str, "input": dict, "tool_use_id": str,
    "tool_name": str, "thinking": str, "signature": str, "data": str,
}  # fmt: skip


def _check_block(block: object, where: str) -> dict[str, Any]:
    """One content block, checked as vLLM's pydantic model checks it."""
    if not isinstance(block, dict):
        _fail(f"{where} must be a content block object")
    if block.get("type") not in _BLOCK_TYPES:
        _fail(f"{where}.type: unsupported content block type {block.get('type')!r}")
    for key, kind in _BLOCK_FIELD_TYPES.items():
        if block.get(key) is not None and not isinstance(block[key], kind):
            _fail(f"{where}.{key}: wrong type")
    content = block.get("content")
    if content is not None and not isinstance(content, str):
        if not isinstance(content, list) or not all(isinstance(x, dict) for x in content):
            _fail(f"{where}.content must be a string or a list of objects")
        for k, item in enumerate(content):
            if item.get("type") == "text" and not isinstance(item.get("text", ""), str):
                _fail(f"{where}.content[{k}].text must be a string")
            if item.get("type") == "image" and not isinstance(item.get("source", {}), dict):
                _fail(f"{where}.content[{k}].source must be an object")
    return block


def _blocks(content: object, where: str) -> list[dict[str, Any]] | str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        _fail(f"{where} must be a string or a list of content blocks")
    return [_check_block(b, f"{where}[{j}]") for j, b in enumerate(content)]


def _image_url(source: Mapping[str, Any]) -> str:
    if source.get("type") == "url":
        return str(source.get("url", ""))
    # vLLM treats any other source as base64 data.
    return f"data:{source.get('media_type', 'image/jpeg')};base64,{source.get('data', '')}"


def _system_texts(content: str | list[dict[str, Any]]) -> list[str]:
    if isinstance(content, str):
        return [content]  # a string is kept whole, billing line or not
    texts = []
    for block in content:
        text = block.get("text")
        if block["type"] == "text" and text and not text.startswith(_BILLING_HEADER):
            texts.append(text)
    return texts


def _user_tool_result(block: dict[str, Any], messages: list[dict[str, Any]]) -> None:
    content = block.get("content")
    texts: list[str] = []
    images: list[str] = []
    references: list[dict[str, Any]] = []
    if isinstance(content, list):
        for item in content:
            if item.get("type") == "text":
                texts.append(item.get("text", ""))
            elif item.get("type") == "image":
                url = _image_url(item.get("source") or {})
                if url:
                    images.append(url)
            elif item.get("type") == "tool_reference":
                name = item.get("tool_name") or item.get("name")
                if name:
                    references.append({"type": "tool_reference", "name": name})
        result = "\n".join(texts)
    else:
        result = content or ""
    tool_call_id = block.get("tool_use_id") or ""
    messages.append({"role": "tool", "tool_call_id": tool_call_id, "content": result})
    if images:
        parts = [{"type": "image_url", "image_url": {"url": url}} for url in images]
        messages.append({"role": "user", "content": parts})
    if references:
        messages.append({"role": "tool", "tool_call_id": tool_call_id, "content": references})


def _check_tools(body: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    raw = body.get("tools")
    if raw is not None:
        if not isinstance(raw, list):
            _fail("tools: must be a list")
        for k, tool in enumerate(raw):
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                _fail(f"tools[{k}].name: must be a string")
            if not isinstance(tool.get("input_schema"), dict):
                _fail(f"tools[{k}].input_schema: Field required")
    choice = body.get("tool_choice")
    if choice is not None:
        if not isinstance(choice, dict) or choice.get("type") not in (
            "auto",
            "any",
            "tool",
            "none",
        ):
            _fail("tool_choice.type must be one of 'auto', 'any', 'tool', 'none'")
        if choice["type"] == "tool":
            if not choice.get("name"):
                _fail("tool_choice.name is required when type is 'tool'")
            if choice["name"] not in [t["name"] for t in raw or ()]:
                _fail(f"Tool '{choice['name']}' has not been passed in `tools`.")
    return raw


def anthropic_to_chat(
    body: Mapping[str, Any],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Convert an Anthropic Messages request to OpenAI chat ``(messages, tools)``, as vLLM does.

    >>> anthropic_to_chat({"system": "be brief", "messages": [{"role": "user", "content": "hi"}]})
    ([{'role': 'system', 'content': 'be brief'}, {'role': 'user', 'content': 'hi'}], None)

    :raises RequestError: a request vLLM's Anthropic protocol rejects.
    """
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        _fail("messages: must be a non-empty list")
    turns: list[tuple[str, list[dict[str, Any]] | str]] = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            _fail(f"messages[{i}].role: must be 'user', 'assistant' or 'system'")
        if msg["role"] not in _ROLE_MAP:
            _fail(f"messages[{i}].role: must be 'user', 'assistant' or 'system'")
        turns.append(
            (_ROLE_MAP[msg["role"]], _blocks(msg.get("content"), f"messages[{i}].content"))
        )
    system = body.get("system")
    system_blocks = None if system is None else _blocks(system, "system")
    raw_tools = _check_tools(body)

    messages: list[dict[str, Any]] = []
    system_parts = _system_texts(system_blocks) if system_blocks else []
    for role, content in turns:
        if role == "system":
            system_parts += _system_texts(content)
    if system_parts:
        messages.append({"role": "system", "content": "".join(system_parts)})
    for role, content in turns:
        if role == "system":
            continue
        out: dict[str, Any] = {"role": role}
        if isinstance(content, str):
            out["content"] = content
            messages.append(out)
            continue
        parts: list[dict[str, Any]] = []
        tool_calls: list[dict[str, Any]] = []
        thinking: list[str] = []
        for block in content:
            kind = block["type"]
            if kind == "text" and block.get("text"):
                parts.append({"type": "text", "text": block["text"]})
            elif kind == "image" and block.get("source"):
                parts.append(
                    {"type": "image_url", "image_url": {"url": _image_url(block["source"])}}
                )
            elif kind == "thinking" and block.get("thinking") is not None:
                thinking.append(block["thinking"])
            elif kind == "tool_use":
                arguments = json.dumps(block.get("input") or {})
                tool_calls.append(
                    {
                        "id": block.get("id") or f"call_{int(time.time())}",
                        "type": "function",
                        "function": {"name": block.get("name") or "", "arguments": arguments},
                    }
                )
            elif kind == "tool_result" and role == "user":
                _user_tool_result(block, messages)
            elif kind == "tool_result":
                result = str(block["content"]) if block.get("content") else ""
                parts.append({"type": "text", "text": "Tool result: " + result})
            # redacted_thinking and tool_reference blocks are passed over.
        if thinking:
            out["reasoning"] = "".join(thinking)
        if tool_calls:
            out["tool_calls"] = tool_calls
        if len(parts) == 1 and parts[0]["type"] == "text":
            out["content"] = parts[0]["text"]
        elif parts:
            out["content"] = parts
        if role == "user" and "content" not in out:
            continue  # e.g. a turn of tool results only
        messages.append(out)
    tools = None
    if raw_tools is not None:
        tools = []
        for tool in raw_tools:
            schema = dict(tool["input_schema"])
            if "type" not in schema:
                schema["type"] = "object"
            function = {
                "name": tool["name"],
                "description": tool.get("description"),
                "parameters": schema,
                "defer_loading": tool.get("defer_loading"),
            }
            tools.append({"type": "function", "function": function})
    return messages, tools
