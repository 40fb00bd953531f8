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
  HTTP calls are made by the app, this module builds and reads the bodies.

Local rendering is exact for text, tools and tool calls when the template
and tokenizer are the worker's; image and document parts become the
template's placeholder (the engine expands them to a model-specific number
of tokens), so routing sees a slightly different, but stable, prefix.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal, NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .anthropic import to_chat
from .errors import ProxyError

__all__ = [
    "RENDER_PATHS",
    "Kind",
    "LocalTokenizer",
    "local_tokens",
    "prompt_token_ids",
    "render_token_ids",
    "tokenize_body",
    "tokenize_token_ids",
]

#: The generation endpoints a prompt comes from.
Kind = Literal["completions", "chat", "messages"]

#: vLLM's render endpoint for each kind of request (same body, answers ``token_ids``).
RENDER_PATHS: Final[Mapping[str, str]] = {
    "completions": "/v1/completions/render",
    "chat": "/v1/chat/completions/render",
    "messages": "/v1/messages/render",
}

# A template that loops over a message's content takes OpenAI content parts;
# one that does not expects a string (vLLM's "auto" content format).
_LOOPS_OVER_CONTENT: Final = re.compile(
    r"for\s+\w+\s+in\s+\w+(\[\s*['\"]content['\"]\s*\]|\.content)\b"
)


def _raise(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Hugging Face's tojson: plain JSON, no HTML escaping.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _token_text(value: object) -> str:
    if isinstance(value, dict):
        return str(value.get("content") or "")
    return value if isinstance(value, str) else ""


class LocalTokenizer:
    """A Hugging Face tokenizer and chat template, loaded once, used from any thread.

    :param path: a ``tokenizer.json``, or a directory with ``tokenizer.json``
        and optionally ``tokenizer_config.json`` (``chat_template``,
        ``bos_token``, ``eos_token``) and ``chat_template.jinja``.
    :param chat_template: a Jinja template overriding the tokenizer's.
    :raises FileNotFoundError: no ``tokenizer.json`` at ``path``.
    :raises ValueError: no chat template anywhere (chat requests need one)
        is *not* raised here: :meth:`render_chat` raises it when used.
    :raises jinja2.TemplateSyntaxError: the template does not parse.
    """

    def __init__(self, path: str | os.PathLike[str], chat_template: str | None = None) -> None:
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
        self._template: jinja2.Template | None = None
        self._string_content = False
        if chat_template is not None:
            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = _strftime_now
            self._template = env.from_string(chat_template)
            self._string_content = not _LOOPS_OVER_CONTENT.search(chat_template)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. Runtime complexity: O(len(text))."""
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def _flatten(self, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for m in messages:
            m = dict(m)
            content = m.get("content")
            if self._string_content and isinstance(content, list):
                texts = [p.get("text", "") for p in content if p.get("type") == "text"]
                m["content"] = "\n".join(texts)
            out.append(m)
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

        :raises ProxyError: 400 if the template fails on these messages
            (``raise_exception``), 500 if there is no chat template.
        """
        if self._template is None:
            raise ProxyError(500, f"the tokenizer at {self.path} has no chat template")
        kwargs = dict(template_kwargs or {})
        kwargs.update(
            messages=self._flatten(messages),
            tools=list(tools) if tools else None,
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
        raise ProxyError(400, "prompt: token ids must be non-negative integers")
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
        raise ProxyError(400, "messages: must be a non-empty list")
    if not all(isinstance(m, dict) for m in messages):
        raise ProxyError(400, "messages: every message must be an object")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise ProxyError(400, "tools: must be a list")
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
    messages, tools = _chat_parts(body)
    return tok.render_chat(
        messages,
        tools=tools,
        add_generation_prompt=bool(body.get("add_generation_prompt", True)),
        template_kwargs=kwargs,
    )


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
    return out


def tokenize_token_ids(answer: object) -> list[int]:
    """The token ids in a ``/tokenize`` answer (``{"count", "tokens", ...}``).

    :raises ValueError: the answer has no ``tokens``.
    """
    ids = _ids(answer.get("tokens")) if isinstance(answer, dict) else None
    if ids is None:
        raise ValueError("the /tokenize answer has no tokens")
    return ids
