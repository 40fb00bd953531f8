"""Anthropic requests tokenize locally exactly as the engine renders them.

The proxy turns a Messages request into chat messages (``to_chat``) and
renders them with the model's chat template (``LocalTokenizer``); a vLLM
worker does the same with its own conversion, and the router's block hashes
only match the worker's cache if both give the same token ids. The
:class:`~kvroute.testing.MockWorker` follows vLLM's conversion rules
(``vllm/entrypoints/anthropic/serving.py``, ``vllm/entrypoints/chat_utils.py``)
in code written apart from the proxy's, so each rule is a case here: the same
body goes to the worker's ``/v1/messages/render`` and ``/tokenize`` and
through the proxy's local tokenizer, under a template that takes content
parts and one that takes strings. The ids must be equal, and the rendered
text must show the rule, so that both sides dropping the same thing fails too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("jinja2")
pytest.importorskip("prometheus_client")
pytest.importorskip("tokenizers")

from test_proxy_support import fleet, post

from kvroute.proxy import ProxyError
from kvroute.proxy.anthropic import validate_messages
from kvroute.proxy.tokenize import LocalTokenizer, local_tokens, tokenize_body
from kvroute.testing import IMAGE_PLACEHOLDER, MockWorker

MODEL = "mock-model"

# Takes content as parts (vLLM's "openai" content format): one <|image|> per image.
PARTS_TEMPLATE = (
    "{%- if tools %}<|tools|>{{ tools | tojson }}<|end|>{% endif %}"
    "{%- for m in messages %}<|{{ m['role'] }}|>"
    "{%- if m['reasoning_content'] %}<think>{{ m['reasoning_content'] }}</think>{% endif %}"
    "{%- if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{%- for p in m['content'] %}"
    "{%- if p['type'] == 'text' %}{{ p['text'] }}"
    "{%- elif p['type'] == 'image' %}<|image|>"
    "{%- elif p['type'] == 'tool_reference' %}[ref {{ p['name'] }}]{% endif %}"
    "{%- endfor %}{% endif %}"
    "{%- for c in m['tool_calls'] or [] %}"
    "<|tool_call|>{{ c['function']['name'] }}{{ c['function']['arguments'] | tojson }}"
    "{%- endfor %}<|end|>{% endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Prints content as a string (vLLM's "string" format): images become the placeholder.
STRING_TEMPLATE = (
    "{%- if tools %}<|tools|>{{ tools | tojson }}<|end|>{% endif %}"
    "{%- for m in messages %}<|{{ m.role }}|>"
    "{%- if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}"
    "{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}"
    "<|tool_call|>{{ c.function.name }}{{ c.function.arguments | tojson }}"
    "{%- endfor %}<|end|>{% endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>{% endif %}"
)
TEMPLATES = {"parts": PARTS_TEMPLATE, "string": STRING_TEMPLATE}

PNG = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
PH = IMAGE_PLACEHOLDER


def _user(*blocks: dict[str, Any]) -> dict[str, Any]:
    return {"role": "user", "content": list(blocks)}


def _assistant(*blocks: dict[str, Any]) -> dict[str, Any]:
    return {"role": "assistant", "content": list(blocks)}


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


# (name, body fields, texts the render must contain, texts it must not). A
# pair is (parts template, string template).
Expect = str | tuple[str, str]
CASES: list[tuple[str, dict[str, Any], list[Expect], list[str]]] = [
    ("plain_text",
     {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                   _user(_text("go"))]},
     ["<|user|>hi<|end|><|assistant|>yo<|end|><|user|>go<|end|><|assistant|>"], []),
    ("multi_text_assistant_turn",
     {"messages": [_user(_text("q")), _assistant(_text("a"), _text(""), _text("b")),
                   _user(_text("go"))]},
     [("<|assistant|>ab<|end|>", "<|assistant|>a\nb<|end|>")], []),
    ("thinking_is_reasoning",
     {"messages": [_user(_text("q")),
                   _assistant({"type": "thinking", "thinking": "hmm", "signature": "s"},
                              {"type": "redacted_thinking", "data": "OPAQUE"}, _text("ok")),
                   _user({"type": "thinking", "thinking": "user-side", "signature": "s"},
                         _text("go"))]},
     ["<|assistant|><think>hmm</think>ok<|end|><|user|>go<|end|>"], ["OPAQUE", "user-side"]),
    ("tool_use_and_tool_result",
     {"messages": [_user(_text("find it")),
                   _assistant(_text("Searching."),
                              {"type": "tool_use", "id": "t1", "name": "grep",
                               "input": {"q": "TODO", "n": 3}},
                              {"type": "tool_use", "id": "t2", "name": "ls"}),
                   _user({"type": "tool_result", "tool_use_id": "t1", "content": "a.py:3"},
                         {"type": "tool_result", "tool_use_id": "t2",
                          "content": [_text("x"), _text("y")]},
                         _text("and?"))]},
     ['Searching.<|tool_call|>grep{"q": "TODO", "n": 3}<|tool_call|>ls{}<|end|>'
      "<|tool|>a.py:3<|end|><|tool|>x\ny<|end|><|user|>and?<|end|>"], []),
    ("tool_result_only_turn",
     {"messages": [_user(_text("q")),
                   _assistant({"type": "tool_use", "id": "t1", "name": "ls", "input": {}}),
                   _user({"type": "tool_result", "tool_use_id": "t1", "content": "ok"})]},
     ["<|tool|>ok<|end|><|assistant|>"], []),
    ("tool_result_with_images_and_references",
     {"messages": [_user(_text("q")),
                   _assistant({"type": "tool_use", "id": "t1", "name": "shot", "input": {}}),
                   _user({"type": "tool_result", "tool_use_id": "t1", "content": [
                       _text("r1"), {"type": "image", "source": PNG}, _text("r2"),
                       {"type": "tool_reference", "tool_name": "Read"},
                       {"type": "search_result", "title": "ignored"}]})]},
     [("<|tool|>r1\nr2<|end|><|user|><|image|><|end|><|tool|>[ref Read]<|end|>",
       f"<|tool|>r1\nr2<|end|><|user|>{PH}<|end|><|tool|>Read<|end|>")], ["ignored"]),
    ("assistant_tool_result_is_text",
     {"messages": [_user(_text("q")),
                   _assistant({"type": "tool_result", "tool_use_id": "t",
                               "content": [_text("x")]})]},
     ["<|assistant|>Tool result: [{'type': 'text', 'text': 'x'}]<|end|>"], []),
    ("images",
     {"messages": [_user({"type": "image", "source": PNG}, _text("what?"),
                         {"type": "image", "source": {"type": "url", "url": "http://x/a.png"}},
                         {"type": "image", "source": {}})]},
     [("<|user|><|image|>what?<|image|><|end|>", f"<|user|>{PH}\n{PH}\nwhat?<|end|>")], []),
    ("billing_header_block_dropped",
     {"system": [_text("x-anthropic-billing-header: cc_version=2.1; cch=1;"), _text("Be careful.")],
      "messages": [{"role": "user", "content": "hi"}]},
     ["<|system|>Be careful.<|end|><|user|>hi"], ["billing"]),
    ("billing_header_string_kept",
     {"system": "x-anthropic-billing-header: cc=1; Be careful.",
      "messages": [{"role": "user", "content": "hi"}]},
     ["<|system|>x-anthropic-billing-header: cc=1; Be careful.<|end|>"], []),
    ("system_blocks_and_system_messages",
     {"system": [_text("A "), _text(""), {"type": "image", "source": PNG}, _text("B.")],
      "messages": [{"role": "system", "content": "C"}, {"role": "user", "content": "hi"},
                   {"role": "system", "content": [_text("D")]}]},
     ["<|system|>A B.CD<|end|><|user|>hi<|end|><|assistant|>"], ["<|image|>"]),
    ("ctx_and_msg_roles_are_user",
     {"messages": [{"role": "ctx", "content": "c"}, {"role": "msg", "content": [_text("m")]}]},
     ["<|user|>c<|end|><|user|>m<|end|>"], []),
    ("tool_reference_block_passed_over",
     {"messages": [_user({"type": "tool_reference", "tool_name": "Read"}, _text("x"))]},
     ["<|user|>x<|end|>"], ["Read"]),
    ("tools",
     {"tools": [{"name": "grep", "description": "Search.",
                 "input_schema": {"properties": {"q": {"type": "string"}}}},
                {"name": "ls", "input_schema": {"type": "object"}, "defer_loading": True,
                 "cache_control": {"type": "ephemeral"}}],
      "messages": [{"role": "user", "content": "hi"}]},
     ['{"type": "function", "function": {"name": "grep", "description": "Search.", '
      '"parameters": {"properties": {"q": {"type": "string"}}, "type": "object"}, '
      '"defer_loading": null}}',
      '{"name": "ls", "description": null, "parameters": {"type": "object"}, '
      '"defer_loading": true}'], ["ephemeral"]),
]  # fmt: skip


@pytest.fixture(scope="module")
def engines(tokenizer_json: Path) -> Iterator[dict[str, tuple[MockWorker, LocalTokenizer]]]:
    """Per template: a worker and the proxy's local tokenizer, with the same files."""
    workers = {
        name: MockWorker(tokenizer=tokenizer_json, chat_template=tpl, publish_events=False)
        for name, tpl in TEMPLATES.items()
    }
    try:
        for w in workers.values():
            w.start()
        yield {
            name: (w, LocalTokenizer(tokenizer_json, TEMPLATES[name], image_placeholder=PH))
            for name, w in workers.items()
        }
    finally:
        for w in workers.values():
            w.stop()


def _post(worker: MockWorker, path: str, body: Any) -> tuple[int, Any]:
    status, _, raw = post(worker.url + path, body)
    return status, json.loads(raw)


@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize(("fields", "must", "must_not"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_local_tokens_equal_the_workers_render(
    engines: dict[str, tuple[MockWorker, LocalTokenizer]],
    template: str,
    fields: dict[str, Any],
    must: list[Expect],
    must_not: list[str],
) -> None:
    worker, tok = engines[template]
    body = {"model": MODEL, "max_tokens": 4, **fields}
    validate_messages(body)
    status, rendered = _post(worker, "/v1/messages/render", body)
    assert status == 200, rendered
    ids = rendered["token_ids"]
    assert local_tokens(tok, "messages", body) == ids
    # The proxy's /tokenize fallback sends the converted chat form: same ids.
    status, tokenized = _post(worker, "/tokenize", tokenize_body("messages", body))
    assert status == 200 and tokenized["tokens"] == ids
    text = worker.tokenizer.decode(ids)
    for expected in must:
        if isinstance(expected, tuple):
            expected = expected[template == "string"]
        assert expected in text
    for absent in must_not:
        assert absent not in text


# (body fields, whether vLLM's Messages API takes them): the proxy's checks
# must agree with the worker's.
VALIDITY: list[tuple[str, dict[str, Any], bool, str]] = [
    ("tool_reference_block",
     {"messages": [_user({"type": "tool_reference", "tool_name": "Read"}, _text("x"))]}, True, ""),
    ("ctx_role", {"messages": [{"role": "ctx", "content": "x"}]}, True, ""),
    ("system_role", {"messages": [{"role": "system", "content": "s"},
                                  {"role": "user", "content": "x"}]}, True, ""),
    ("non_text_system_block", {"system": [{"type": "image", "source": PNG}]}, True, ""),
    ("unknown_type_inside_tool_result",
     {"messages": [_user({"type": "tool_result", "tool_use_id": "t",
                          "content": [{"type": "search_result"}]})]}, True, ""),
    ("text_block_without_text", {"messages": [_user({"type": "text"}, _text("x"))]}, True, ""),
    ("document_block",
     {"messages": [_user({"type": "document", "source": {"type": "text", "data": "d"}})]},
     False, "unknown content block type 'document'"),
    ("unknown_role", {"messages": [{"role": "robot", "content": "x"}]},
     False, "must be 'user', 'assistant' or 'system'"),
    # Regression: an unhashable role or type was a 500 (a set lookup raised TypeError).
    ("role_not_a_string", {"messages": [{"role": ["user"], "content": "x"}]},
     False, "must be 'user', 'assistant' or 'system'"),
    ("type_not_a_string", {"messages": [_user({"type": ["text"]})]},
     False, "unknown content block type"),
    ("text_not_a_string", {"messages": [_user({"type": "text", "text": 5})]},
     False, "text: must be a string"),
    ("tool_input_not_an_object",
     {"messages": [_assistant({"type": "tool_use", "id": "t", "name": "f", "input": [1]})]},
     False, "input: must be an object"),
    ("tool_without_input_schema", {"tools": [{"name": "f"}]}, False, "input_schema"),
    ("tool_choice_type", {"tool_choice": {"type": "some"}}, False, "tool_choice.type"),
    ("tool_choice_without_name", {"tool_choice": {"type": "tool"}}, False, "tool_choice.name"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "ok", "words"), [v[1:] for v in VALIDITY],
                         ids=[v[0] for v in VALIDITY])  # fmt: skip
def test_the_proxy_accepts_what_the_engine_accepts(
    engines: dict[str, tuple[MockWorker, LocalTokenizer]],
    fields: dict[str, Any],
    ok: bool,
    words: str,
) -> None:
    body = {"model": MODEL, "max_tokens": 4,
            "messages": [{"role": "user", "content": "hi"}], **fields}  # fmt: skip
    worker, tok = engines["parts"]
    status, answer = _post(worker, "/v1/messages/render", body)
    assert (status == 200) == ok, answer
    if ok:
        validate_messages(body)
        assert local_tokens(tok, "messages", body) == answer["token_ids"]
    else:
        with pytest.raises(ProxyError, match=words) as info:
            validate_messages(body)
        assert info.value.status == 400


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (["a bare string"], r"messages\[0\]\.content\[0\]: must be an object"),
        ([{"type": "text", "text": 5}], r"messages\[0\]\.content\[0\]\.text: must be a string"),
        ([{"type": "video_clip"}], "unsupported content part type 'video_clip'"),
        (7, r"messages\[0\]\.content: must be a string, a list"),
    ],
)
def test_malformed_chat_content_is_a_400_when_tokenizing_locally(
    tokenizer_json: Path, content: object, words: str
) -> None:
    tok = LocalTokenizer(tokenizer_json, PARTS_TEMPLATE)
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    with pytest.raises(ProxyError, match=words) as info:
        local_tokens(tok, "chat", body)
    assert info.value.status == 400


def test_the_proxy_answers_400_for_malformed_content_in_every_mode(tokenizer_json: Path) -> None:
    bad = {"model": MODEL, "max_tokens": 1,
           "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}  # fmt: skip
    for kw in (
        {
            "tokenize_with": "local",
            "tokenizer": str(tokenizer_json),
            "chat_template": PARTS_TEMPLATE,
        },
        {"tokenize_with": "render"},
    ):
        with fleet(1, worker_kw={"tokenizer": tokenizer_json}, **kw) as (proxy, workers):
            status, _, raw = post(proxy.url + "/v1/chat/completions", bad)
            assert status == 400, raw
            assert "must be a string" in json.loads(raw)["error"]["message"]
            assert not workers[0].requests()


def test_string_content_placeholders_follow_vllm(tokenizer_json: Path, tmp_path: Path) -> None:
    tok = LocalTokenizer(tokenizer_json, STRING_TEMPLATE, image_placeholder="<img>")
    image = {"type": "image_url", "image_url": {"url": "x"}}
    (msg,) = tok.conversation([{"role": "user", "content": [image, _text("a"), image]}])
    assert msg["content"] == "<img>\n<img>\na"
    # A placeholder the text already holds stands for one of the images.
    (msg,) = tok.conversation([{"role": "user", "content": [_text("see <img>"), image, image]}])
    assert msg["content"] == "<img>\nsee <img>"
    (msg,) = tok.conversation([{"role": "user", "content": [image]}])
    assert msg["content"] == "<img>"
    with pytest.raises(ProxyError, match="more '<img>' placeholders"):
        tok.conversation([{"role": "user", "content": [_text("<img><img>"), image]}])
    # By default: the config's image_token, else "<image>".
    assert LocalTokenizer(tokenizer_json).image_placeholder == "<image>"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    (model_dir / "tokenizer_config.json").write_text('{"image_token": "<|image_pad|>"}')
    assert LocalTokenizer(model_dir).image_placeholder == "<|image_pad|>"


def test_tool_use_through_the_proxy() -> None:
    anthropic = pytest.importorskip("anthropic")
    tools = [
        {
            "name": "read",
            "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
        }
    ]
    with (
        fleet(1) as (proxy, workers),
        anthropic.Anthropic(base_url=proxy.url, api_key="x", max_retries=0) as client,
    ):
        kwargs: dict[str, Any] = {
            "model": MODEL, "max_tokens": 8, "tools": tools, "tool_choice": {"type": "any"},
            "messages": [{"role": "user", "content": "read the config"}],
        }  # fmt: skip
        created = client.messages.create(**kwargs)
        with client.messages.stream(**kwargs) as stream:
            final = stream.get_final_message()
        for msg in (created, final):
            assert msg.stop_reason == "tool_use"
            (block,) = msg.content
            assert block.type == "tool_use" and block.name == "read"
            assert isinstance(block.input["path"], str)
        # The next turn sends the call and its result back, and renders like the worker.
        follow = client.messages.create(**{**kwargs, "tool_choice": {"type": "auto"},
            "messages": [*kwargs["messages"],
                         {"role": "assistant", "content": [final.content[0].model_dump()]},
                         {"role": "user", "content": [{"type": "tool_result",
                          "tool_use_id": final.content[0].id, "content": "x=1"}]}]})  # fmt: skip
        assert follow.content[0].type == "text"
        assert len(workers[0].requests()) == 3
