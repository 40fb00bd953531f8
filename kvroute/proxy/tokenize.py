"""Token ids of a request's prompt, as the engine will see them, for routing.

Two ways, chosen by :attr:`ProxyConfig.tokenize_with`:

- **locally** (:class:`LocalTokenizer`): a Hugging Face ``tokenizer.json``
  and its Jinja chat template, applied as vLLM applies it: the template gets
  ``messages``, ``tools``, ``add_generation_prompt``, ``bos_token``,
  ``eos_token`` and the request's ``chat_template_kwargs``, and its text is
  encoded without adding special tokens. Anthropic requests are first turned
  into chat messages (:func:`kvroute.proxy.anthropic.to_chat`).
- **by a worker**: vLLM's GPU-less render endpoints
  (:data:`RENDER_PATHS`, answering ``token_ids``) or its ``/tokenize``; the
  calls are made by :mod:`~kvroute.proxy.prepare`, this module builds and
  reads the bodies.

Before the template, messages go through what vLLM's ``parse_chat_messages``
does to them (:meth:`LocalTokenizer.conversation`), and tools are dumped the
way vLLM dumps its tool model. Local rendering is exact for text, tools and
tool calls when the template and tokenizer are the worker's. An image is
whatever the template prints for an ``{"type": "image"}`` part, or, for a
template taking string content, the model's image placeholder put before the
text as vLLM puts it; the engine then expands it to a number of tokens that
depends on the image, so routing sees a shorter, but stable, prefix.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TypeAlias

import jinja2
import msgspec
import numpy as np
import numpy.typing as npt

from .._chat_template import chat_template_environment
from ..hashing import token_ids_array
from .anthropic import to_chat
from .call import Kind
from .errors import ProxyError, invalid
from .responses import responses_to_chat

__all__ = [
    "DEFAULT_IMAGE_PLACEHOLDER",
    "RENDER_PATHS",
    "LocalTokenizer",
    "TokenIdList",
    "answer_token_ids",
    "local_tokens",
    "prompt_token_ids",
    "render_token_ids",
    "tokenize_body",
    "tokenize_token_ids",
]

#: vLLM's render endpoint for each kind of request (same body, answers ``token_ids``).
RENDER_PATHS: Final[Mapping[str, str]] = {
    "completions": "/v1/completions/render",
    "chat": "/v1/chat/completions/render",
    "messages": "/v1/messages/render",
    # stateless: previous_response_id is refused there (the proxy leaves it out)
    "responses": "/v1/responses/render",
}

# A template that loops over a message's content takes OpenAI content parts;
# one that does not expects a string (vLLM's "auto" content format). Found
# apart from the mock worker's way, which is the reference this is tested against.
_LOOPS_OVER_CONTENT: Final = re.compile(
    r"for\s+\w+\s+in\s+\w+(?:\[\s*['\"]content['\"]\s*\]|\.content\b)"
)
# Content part types vLLM reads as text, and the field holding the text.
_TEXT_FIELD: Final = {
    "text": "text", "input_text": "text", "output_text": "text",
    "refusal": "refusal", "thinking": "thinking",
}  # fmt: skip
_IMAGE_PARTS: Final = frozenset({"image_url", "input_image"})
#: A prompt's token ids as the proxy passes them to the router: a list of ints,
#: or an integer numpy array (``uint32`` from a worker's answer, read by
#: :func:`answer_token_ids`; ``int64`` from a completions prompt of ids).
TokenIdList: TypeAlias = "list[int] | npt.NDArray[np.integer[Any]]"

#: The image placeholder used when the tokenizer's config names none.
DEFAULT_IMAGE_PLACEHOLDER: Final = "<image>"


def _bad(message: str) -> ProxyError:
    return invalid(message)


def _token_text(value: object) -> str:
    if isinstance(value, dict):
        return str(value.get("content") or "")
    return value if isinstance(value, str) else ""


class LocalTokenizer:
    """A Hugging Face tokenizer and chat template, loaded once, used from any thread.

    :param path: a ``tokenizer.json``, or a directory with ``tokenizer.json``
        and optionally ``tokenizer_config.json`` (``chat_template``,
        ``bos_token``, ``eos_token``, ``image_token``) and ``chat_template.jinja``.
    :param chat_template: a Jinja template overriding the tokenizer's.
    :param image_placeholder: the text an image becomes for a template that
        takes string content (vLLM's model-specific placeholder, e.g.
        ``<|image_pad|>``); default: the config's ``image_token``, else
        :data:`DEFAULT_IMAGE_PLACEHOLDER`.
    :raises FileNotFoundError: no ``tokenizer.json`` at ``path``.
    :raises ValueError: no chat template anywhere (chat requests need one)
        is *not* raised here: :meth:`render_chat` raises it when used.
    :raises jinja2.TemplateSyntaxError: the template does not parse.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        chat_template: str | None = None,
        *,
        image_placeholder: str | None = None,
    ) -> None:
        from tokenizers import Tokenizer

        p = Path(path)
        config: dict[str, Any] = {}
        if p.is_dir():
            cfg = p / "tokenizer_config.json"
            if cfg.is_file():
                config = json.loads(cfg.read_text(encoding="utf-8"))
            jinja_file = p / "chat_template.jinja"
            if chat_template is None and jinja_file.is_file():
                chat_template = jinja_file.read_text(encoding="utf-8")
            p = p / "tokenizer.json"
        if not p.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        self.path = str(p)
        self._tok: Any = Tokenizer.from_file(str(p))
        if chat_template is None:
            tpl = config.get("chat_template")
            if isinstance(tpl, list):  # named templates: use "default"
                named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
                tpl = named.get("default")
            chat_template = tpl if isinstance(tpl, str) else None
        #: The chat template's source, or None.
        self.chat_template = chat_template
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        if image_placeholder is None:
            image_placeholder = _token_text(config.get("image_token")) or DEFAULT_IMAGE_PLACEHOLDER
        #: What an image becomes in string content (see ``image_placeholder``).
        self.image_placeholder = image_placeholder
        self._template: jinja2.Template | None = None
        self._string_content = False
        if chat_template is not None:
            self._template = chat_template_environment().from_string(chat_template)
            self._string_content = not _LOOPS_OVER_CONTENT.search(chat_template)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. Runtime complexity: O(len(text))."""
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def _content(self, content: object, where: str) -> str | list[dict[str, Any]]:
        """One message's content as vLLM hands it to the template.

        A template looping over content gets a list of parts (text parts,
        ``{"type": "image"}``, tool references); any other gets a string: the
        texts joined with newlines, each image's placeholder in front.
        """
        if content is None:
            parts: list[Any] = []
        elif isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = content
        else:
            raise _bad(f"{where}: must be a string, a list of content parts or null")
        items: list[dict[str, Any]] = []
        texts: list[str] = []
        images = 0
        for j, part in enumerate(parts):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise _bad(f"{where}[{j}]: must be an object with a string 'type'")
            kind = part["type"]
            if kind in _TEXT_FIELD:
                text = part.get(_TEXT_FIELD[kind])
                if text is None:
                    continue  # vLLM skips an empty text part
                if not isinstance(text, str):
                    raise _bad(f"{where}[{j}].{_TEXT_FIELD[kind]}: must be a string")
                items.append({"type": "text", "text": text})
                if text:  # an empty string part is dropped from string content
                    texts.append(text)
            elif kind in _IMAGE_PARTS:
                items.append({"type": "image"})
                images += 1
            elif kind == "tool_reference":
                name = part.get("name")
                items.append({"type": "tool_reference", "name": name})
                if name:
                    texts.append(str(name))
            else:
                raise _bad(f"{where}[{j}].type: unsupported content part type {kind!r}")
        if not self._string_content:
            return items
        text = "\n".join(texts)
        if not images:
            return text
        # vLLM puts the placeholders missing from the text in front, one a line.
        missing = images - text.count(self.image_placeholder)
        if missing < 0:
            raise _bad(
                f"{where}: found more '{self.image_placeholder}' placeholders in the text"
                " than images"
            )
        return "\n".join([self.image_placeholder] * missing + ([text] if text else []))

    def conversation(self, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The messages as vLLM's ``parse_chat_messages`` gives them to the chat template.

        Content as :meth:`_content` makes it; an assistant's ``tool_calls``
        with their ``arguments`` parsed from JSON (``{}`` when they are not
        JSON; an empty list dropped) and its ``reasoning`` also as
        ``reasoning_content``; a tool message's ``tool_call_id``, and its
        all-text content as one string; ``name`` when a string. Other keys
        do not reach the template.

        :raises ProxyError: 400 for a malformed message.
        """
        out: list[dict[str, Any]] = []
        for i, m in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
                raise _bad(f"{where}: must be an object with a string 'role'")
            role = m["role"]
            msg: dict[str, Any] = {
                "role": role,
                "content": self._content(m.get("content"), f"{where}.content"),
            }
            if role == "assistant":
                calls = m.get("tool_calls")
                if calls is not None:
                    calls = _parsed_tool_calls(calls, f"{where}.tool_calls")
                    if calls:
                        msg["tool_calls"] = calls
                if m.get("reasoning") is not None:
                    msg["reasoning"] = msg["reasoning_content"] = m["reasoning"]
            elif role == "tool":
                if "tool_call_id" in m:
                    msg["tool_call_id"] = m["tool_call_id"]
                content = msg["content"]
                if isinstance(content, list) and all(p["type"] == "text" for p in content):
                    msg["content"] = "\n".join(p["text"] for p in content)
            if isinstance(m.get("name"), str):
                msg["name"] = m["name"]
            out.append(msg)
        return out

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """Token ids of a chat prompt: the template's text, encoded without special tokens.

        The template gets :meth:`conversation`'s messages and the tools as
        vLLM dumps them (``function`` with ``name``, ``description`` and
        ``parameters``, None when absent, then any other keys).

        :raises ProxyError: 400 for malformed messages or tools, or if the
            template fails on them (``raise_exception``); 500 if there is no
            chat template.
        """
        if self._template is None:
            raise ProxyError(500, f"the tokenizer at {self.path} has no chat template")
        kwargs = dict(template_kwargs or {})
        kwargs.update(
            messages=self.conversation(messages),
            tools=None if tools is None else [_tool_dict(t, k) for k, t in enumerate(tools)],
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )
        try:
            text = self._template.render(**kwargs)
        except jinja2.TemplateError as e:
            raise ProxyError(400, f"chat template failed: {e}") from None
        except (TypeError, KeyError, AttributeError, ValueError) as e:
            raise ProxyError(400, f"chat template failed on these messages: {e}") from None
        return self.encode(text, add_special_tokens=False)


def _parsed_tool_calls(calls: object, where: str) -> list[dict[str, Any]]:
    """Tool calls with JSON ``arguments`` parsed, as chat templates expect them (and vLLM does)."""
    if not isinstance(calls, list):
        raise _bad(f"{where}: must be a list")
    out = []
    for k, call in enumerate(calls):
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise _bad(f"{where}[{k}].function: must be an object")
        function = dict(call["function"])
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                function["arguments"] = json.loads(arguments)
            except ValueError:
                function["arguments"] = {}
        elif not isinstance(arguments, dict | list):
            function["arguments"] = {}
        out.append({**call, "function": function})
    return out


def _tool_dict(tool: object, k: int) -> dict[str, Any]:
    """A tool as vLLM's ``ChatCompletionToolsParam.model_dump()`` gives it to the template."""
    if not isinstance(tool, Mapping):
        raise _bad(f"tools[{k}]: must be an object")
    function = tool.get("function")
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise _bad(f"tools[{k}].function.name: Field required (a string)")
    dumped = {
        "name": function["name"],
        "description": function.get("description"),
        "parameters": function.get("parameters"),
    }
    dumped.update((key, v) for key, v in function.items() if key not in dumped)
    out: dict[str, Any] = {"type": tool.get("type", "function"), "function": dumped}
    out.update((key, v) for key, v in tool.items() if key not in out)
    return out


def prompt_token_ids(body: Mapping[str, Any]) -> list[int] | None:
    """A completions prompt given as token ids (the first one of a batch), else None.

    >>> prompt_token_ids({"prompt": [1, 2, 3]}), prompt_token_ids({"prompt": [[4], [5]]})
    ([1, 2, 3], [4])
    >>> prompt_token_ids({"prompt": "text"}) is None
    True
    """
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, int) and not isinstance(first, bool):
            ids = prompt
        elif isinstance(first, list):
            ids = first
        else:
            return None
        if all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            return list(ids)
        raise invalid("prompt: token ids must be non-negative integers")
    return None


def _first_text_prompt(body: Mapping[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ProxyError(
            400, "prompt: must be a string, a list of strings or a (list of) token id list(s)"
        )
    return prompt


def _chat_parts(body: Mapping[str, Any]) -> tuple[list[Any], list[Any] | None]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages: must be a non-empty list")
    if not all(isinstance(m, dict) for m in messages):
        raise invalid("messages: every message must be an object")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise invalid("tools: must be a list")
    return messages, tools


def local_tokens(tok: LocalTokenizer, kind: Kind, body: Mapping[str, Any]) -> list[int]:
    """Token ids of a request's prompt with a local tokenizer (routing by the first prompt).

    :raises ProxyError: 400 for a prompt that cannot be rendered.
    """
    if kind == "completions":
        ids = prompt_token_ids(body)
        if ids is not None:
            return ids
        add = body.get("add_special_tokens", True)
        return tok.encode(_first_text_prompt(body), add_special_tokens=bool(add))
    kwargs = body.get("chat_template_kwargs")
    kwargs = kwargs if isinstance(kwargs, dict) else None
    if kind == "messages":
        messages, tools = to_chat(body)
        return tok.render_chat(messages, tools=tools, template_kwargs=kwargs)
    if kind == "responses":
        messages, tools = responses_to_chat(body)
        return tok.render_chat(messages, tools=tools, template_kwargs=_reasoning_kwargs(body))
    messages, tools = _chat_parts(body)
    return tok.render_chat(
        messages,
        tools=tools,
        add_generation_prompt=bool(body.get("add_generation_prompt", True)),
        template_kwargs=kwargs,
    )


def _reasoning_kwargs(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The template keywords vLLM adds for a Responses request: its ``reasoning.effort``."""
    reasoning = body.get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
    return {"reasoning_effort": effort} if effort is not None else None


def _ids(value: object) -> list[int] | None:
    if isinstance(value, list) and all(isinstance(t, int) for t in value):
        return value
    return None


def render_token_ids(kind: Kind, answer: object) -> list[int]:
    """The prompt's token ids in a render endpoint's answer (the first prompt's for completions).

    :raises ValueError: the answer has no ``token_ids``.
    """
    if kind == "completions" and isinstance(answer, list) and answer:
        answer = answer[0]
    ids = _ids(answer.get("token_ids")) if isinstance(answer, dict) else None
    if ids is None:
        raise ValueError("the render answer has no token_ids")
    return ids


class _Rendered(msgspec.Struct):
    token_ids: msgspec.Raw


class _Tokenized(msgspec.Struct):
    tokens: msgspec.Raw


# A worker's answer holds the whole prompt as JSON ints. Its ids are kept as the
# JSON text (msgspec.Raw) and read by token_ids_array straight into the uint32
# array the hashing takes: at 4,000 ids about a quarter of msgspec's list[int]
# decode, with no Python int per id. An array it does not take (a negative or
# 64-bit id...) is decoded as a list, as before.
_RENDERED: Final = msgspec.json.Decoder(_Rendered)
_RENDERED_LIST: Final = msgspec.json.Decoder(list[_Rendered])
_TOKENIZED: Final = msgspec.json.Decoder(_Tokenized)
_IDS: Final = msgspec.json.Decoder(list[int])

# Before any of that, the ids are found without decoding the answer when its
# head is as vLLM writes it: members with plain values (strings without
# escapes, numbers, literals), then the ids' key. A string cannot hold an
# unescaped quote, so a key found there is at the top level. Any other shape
# (and a second such key further on) is msgspec's to read.
_WS = rb"[ \t\r\n]*"
_PLAIN = rb'(?:"[^"\\]*"|[-+.0-9eE]+|true|false|null)'


def _head(key: bytes) -> re.Pattern[bytes]:
    member = _WS + rb'"[^"\\]*"' + _WS + b":" + _WS + _PLAIN + _WS + b","
    return re.compile(_WS + rb"\{(?:" + member + b")*" + _WS + b'"' + key + b'"' + _WS + b":" + _WS)


_HEADS: Final = {key: _head(key) for key in (b"token_ids", b"tokens")}


def answer_token_ids(kind: Kind, render: bool, text: bytes) -> TokenIdList | None:
    """The prompt's token ids in a render (``render``) or ``/tokenize`` answer's JSON text.

    The fast path for a well-formed answer: a ``numpy.uint32`` array when
    every id fits in 32 bits (:func:`kvroute._hashing_py.token_ids_array`),
    else a list of ints; None when the answer does not have that shape (an
    error, an id past 64 bits), for the caller to read it the slow way with
    :func:`render_token_ids` / :func:`tokenize_token_ids`.

    >>> answer_token_ids("chat", True, b'{"request_id": "r", "token_ids": [1, 2, 3]}')
    array([1, 2, 3], dtype=uint32)
    >>> answer_token_ids("completions", True, b'[{"token_ids": [7]}, {"token_ids": [8]}]')
    array([7], dtype=uint32)
    >>> answer_token_ids("chat", True, b'{"token_ids": [-1, 2]}')
    [-1, 2]
    >>> answer_token_ids("chat", False, b'{"error": "no"}') is None
    True
    """
    ids = _headed_ids(text, b"token_ids" if render else b"tokens")
    if ids is not None:
        return ids
    try:
        if not render:
            raw = _TOKENIZED.decode(text).tokens
        elif kind == "completions" and text.lstrip()[:1] == b"[":
            answers = _RENDERED_LIST.decode(text)
            if not answers:
                return None
            raw = answers[0].token_ids
        else:
            raw = _RENDERED.decode(text).token_ids
        ids = token_ids_array(raw)
        # an odd array (or not one): exactly as msgspec reads a list of ints
        return ids if ids is not None else _IDS.decode(raw)
    except msgspec.DecodeError:  # ValidationError included: the shape is not this one
        return None


def _headed_ids(text: bytes, key: bytes) -> npt.NDArray[np.uint32] | None:
    """The ids under ``key`` of an answer headed as vLLM writes it (see ``_HEADS``), else None."""
    m = _HEADS[key].match(text)
    if m is None:
        return None
    start = m.end()
    end = text.find(b"]", start)  # ints only up to it, or token_ids_array refuses them
    if end < 0 or text.find(b'"' + key + b'"', end) >= 0:
        return None
    if text.rstrip(b" \t\r\n")[-1:] != b"}":
        return None
    return token_ids_array(memoryview(text)[start : end + 1])


def tokenize_body(kind: Kind, body: Mapping[str, Any]) -> dict[str, Any]:
    """The ``/tokenize`` request for a request's prompt.

    :raises ProxyError: 400 for a malformed prompt.
    """
    out: dict[str, Any] = {}
    if isinstance(body.get("model"), str):
        out["model"] = body["model"]
    if kind == "completions":
        out["prompt"] = _first_text_prompt(body)
        if "add_special_tokens" in body:
            out["add_special_tokens"] = bool(body["add_special_tokens"])
        return out
    if kind == "messages":
        messages, tools = to_chat(body)
        add_generation_prompt = True
    elif kind == "responses":
        messages, tools = responses_to_chat(body)
        add_generation_prompt = True
    else:
        messages, tools = _chat_parts(body)
        add_generation_prompt = bool(body.get("add_generation_prompt", True))
    out["messages"] = messages
    if tools:
        out["tools"] = tools
    out["add_generation_prompt"] = add_generation_prompt
    out["add_special_tokens"] = False
    if isinstance(body.get("chat_template_kwargs"), dict):
        out["chat_template_kwargs"] = body["chat_template_kwargs"]
    elif kind == "responses" and (kwargs := _reasoning_kwargs(body)):
        out["chat_template_kwargs"] = kwargs
    return out


def tokenize_token_ids(answer: object) -> list[int]:
    """The token ids in a ``/tokenize`` answer (``{"count", "tokens", ...}``).

    :raises ValueError: the answer has no ``tokens``.
    """
    ids = _ids(answer.get("tokens")) if isinstance(answer, dict) else None
    if ids is None:
        raise ValueError("the /tokenize answer has no tokens")
    return ids
