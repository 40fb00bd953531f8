"""A check on ``Router.apply_stored``'s keys: do they start the prompts ``route()`` hashes?

``apply_stored`` takes kvroute's routing keys (``kvroute_block_hashes`` of
the stored tokens). An engine's own block hashes, which is what a KV event
carries, are the easy mistake: stored as keys they never match a request,
silently. A key is 64 opaque bits, so no single call can tell the two
apart. What can be told: with predict-on-route on (the default with KV
events), the router remembers for ``fresh_ttl`` seconds the first block of
every prompt it routed, and a worker stores a new prompt (a chain start:
``parent`` None) moments after the router sent it there. So when the router
routes a worker's traffic, stored chain starts are mostly first blocks of
recent decisions; when *none* of many is, the keys are not the router's
(engine hashes, or a tokenizer or template the router does not share with
the engine). :class:`StoredKeyCheck` counts both outcomes and, after
``threshold`` misses without a single hit, says so once in the log.

It is a warning, not an error: a router that sees events of traffic it did
not route (another router's, a warm-up script's) misses too, and then its
hits show it is not all wrong keys. With predict-on-route off, or without
KV events, nothing is counted.

>>> check = StoredKeyCheck(threshold=2)
>>> check.observe(False), check.observe(False) is not None, check.observe(False)
(None, True, None)
>>> check.counts()
{'stored_starts_routed': 0, 'stored_starts_unrouted': 3}
"""

from __future__ import annotations

__all__ = ["StoredKeyCheck"]

_WARNING = (
    "{misses} blocks stored with parent=None (prompt starts) began no prompt this router"
    " routed in the last moments, and none did: the keys given to apply_stored() look like"
    " the engine's own block hashes (or the router tokenizes differently from the engine)."
    " apply_stored() takes kvroute keys: kvroute_block_hashes(token_ids, block_size);"
    " to apply an engine's KV event, call Router.apply_event(worker, event), which keys"
    " its tokens itself. (Ignore this if the router does not route this worker's traffic.)"
)


class StoredKeyCheck:
    """Counts stored prompt starts that did / did not start a recent routing decision.

    Not thread-safe on its own: the router calls it under its lock.

    :param threshold: misses, without any hit, before the warning.
    """

    def __init__(self, threshold: int = 32) -> None:
        self.threshold = threshold
        self.hits = 0
        self.misses = 0
        self.warned = False

    def observe(self, routed: bool) -> str | None:
        """Count one stored chain start; the warning to log, the first time it is due."""
        if routed:
            self.hits += 1
            return None
        self.misses += 1
        if self.hits or self.warned or self.misses < self.threshold:
            return None
        self.warned = True
        return _WARNING.format(misses=self.misses)

    def counts(self) -> dict[str, int]:
        """The counts, as ``Router.stats()`` reports them."""
        return {"stored_starts_routed": self.hits, "stored_starts_unrouted": self.misses}
