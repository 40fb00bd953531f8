"""The models the proxy serves: the names a request may give, what they become, and the list.

The served names are the configured ``models`` and ``lora_adapters``, or,
when no model is configured, the ids the workers list at ``/v1/models``
(unknown until a worker has answered: every name passes meanwhile). A
request's model goes through ``model_map`` first; a name not served is a
404. A name that selects a LoRA adapter (configured, or listed by a worker
with a ``parent``) is routed with the adapter's name, as the engines salt
its KV blocks with it.

``/v1/models`` lists the served models and each exact ``model_map`` alias
whose target is served, in OpenAI's shape, or in Anthropic's for a client
that sends ``anthropic-version``.

>>> from kvroute import Router
>>> from kvroute.proxy import ProxyConfig, parse_worker
>>> from kvroute.proxy.workers import WorkerPool
>>> config = ProxyConfig([parse_worker("http://w:8000")], models=["qwen"],
...                      model_map=[("claude-*", "qwen")], lora_adapters=["sql"])
>>> models = Models(config, WorkerPool(Router(block_size=16, workers=[0]), config))
>>> body = {"model": "claude-haiku"}
>>> models.resolve(body), body, models.lora_name("sql"), models.lora_name("qwen")
(True, {'model': 'qwen'}, 'sql', None)
>>> [(m["id"], m.get("parent")) for m in models.listing(anthropic=False)["data"]]
[('qwen', None), ('sql', 'qwen')]
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from typing import Any

from .config import ProxyConfig
from .errors import ProxyError
from .workers import WorkerPool

__all__ = ["Models"]


class Models:
    """The proxy's served model names, mapped and checked per request.

    :param config: ``models``, ``lora_adapters`` and ``model_map``.
    :param pool: what the workers list, when no model is configured.
    """

    def __init__(self, config: ProxyConfig, pool: WorkerPool) -> None:
        self.config = config
        self.pool = pool
        self._configured = frozenset((*config.models, *config.lora_adapters))

    def served(self) -> AbstractSet[str] | None:
        """The names a request may give (after mapping); None while unknown."""
        if self.config.models:
            return self._configured
        return self.pool.model_ids()

    def resolve(self, body: dict[str, Any]) -> bool:
        """Map the body's model in place. True if the body changed.

        :raises ProxyError: 400 if the model is not a string, 404 if it is not served.
        """
        model = body.get("model")
        if model is None:
            return False
        if not isinstance(model, str):
            raise ProxyError(400, "model must be a string", code="invalid_type", param="model")
        target = self.config.map_model(model)
        served = self.served()
        if served is not None and target not in served:
            shown = model if target == model else f"{model} (mapped to {target})"
            raise ProxyError(
                404, f"The model `{shown}` does not exist.", code="model_not_found", param="model"
            )
        if target != model:
            body["model"] = target
            return True
        return False

    def lora_name(self, model: object) -> str | None:
        """The LoRA adapter a (mapped) model name selects, or None for a base model."""
        if not isinstance(model, str):
            return None
        if model in self.config.lora_adapters or model in self.pool.lora_adapters():
            return model
        return None

    def listing(self, *, anthropic: bool) -> dict[str, Any]:
        """The ``/v1/models`` body: OpenAI's list, or Anthropic's with ``anthropic``."""
        entries: list[dict[str, Any]]
        if self.config.models:
            entries = [
                {"id": m, "object": "model", "created": 0, "owned_by": "kvroute"}
                for m in self.config.models
            ]
            # vLLM lists an adapter with its base model as parent (known when only one is)
            parent = self.config.models[0] if len(self.config.models) == 1 else None
            entries += [
                {"id": m, "object": "model", "created": 0, "owned_by": "kvroute", "parent": parent}
                for m in self.config.lora_adapters
                if m not in self.config.models
            ]
        else:
            entries = [dict(e) for e in self.pool.models()]
        served = {e["id"] for e in entries}
        for pattern, target in self.config.model_map:
            if not any(c in pattern for c in "*?[") and pattern not in served and target in served:
                entries.append({"id": pattern, "object": "model", "created": 0,
                                "owned_by": "kvroute", "root": target})  # fmt: skip
        if not anthropic:
            return {"object": "list", "data": entries}
        data = [
            {"type": "model", "id": e["id"], "display_name": e["id"],
             "created_at": "1970-01-01T00:00:00Z"}
            for e in entries
        ]  # fmt: skip
        return {
            "data": data, "has_more": False,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }  # fmt: skip
