"""The workers file: a JSON or YAML list of workers, watched and reloaded when it changes.

The file holds a list whose entries are worker mappings
(:meth:`WorkerSpec.from_mapping <kvroute.fleet.spec.WorkerSpec.from_mapping>`:
``url``, ``events_endpoint`` / ``events``, ``replay_endpoint`` / ``replay``,
``events_format``, ``role``, ``bootstrap_port``, ``name``) or the command
line's ``URL[=EVENTS[,REPLAY]]`` strings; a mapping whose only key is
``workers`` holding that list works too (the config file's shape). A file
named ``*.json`` is read as JSON, any other as YAML (which reads JSON as
well; PyYAML is needed then).

:class:`WorkersFile` claims the file's workers in a
:class:`~kvroute.fleet.membership.Membership` under the source ``"file"``.
:meth:`WorkersFile.poll` looks at the file's modification time, size and
inode (cheap, and portable); when they change it reloads the file and
reports what changed since its last good read: new or changed entries are
claimed again, dropped ones have their claim taken back through
:meth:`~kvroute.fleet.membership.Membership.drain` (a worker no other source
names finishes its requests in flight, then leaves). A file that cannot be
read or parsed on reload is logged and changes nothing: the last good
workers stay. At start (:meth:`WorkersFile.load`) it is an error.

>>> import json, os, tempfile
>>> from kvroute.fleet.membership import Membership
>>> path = os.path.join(tempfile.mkdtemp(), "workers.json")
>>> with open(path, "w") as f:
...     json.dump([{"url": "http://10.0.0.7:8000", "events": "tcp://10.0.0.7:5557"}], f)
>>> m = Membership()
>>> [s.url for s in WorkersFile(path, m).load()], [w.source for w in m]
(['http://10.0.0.7:8000'], ['file'])
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from .membership import Membership
from .spec import WorkerSpec, parse_worker

__all__ = ["WorkersFile", "load_workers_file", "parse_workers"]

log = logging.getLogger("kvroute.fleet")


def parse_workers(data: object, *, where: str = "workers") -> list[WorkerSpec]:
    """Worker specs from a parsed file: a list (or ``{"workers": [...]}``) of workers.

    >>> [w.url for w in parse_workers(["h1:8000", {"url": "h2:8000", "role": "decode"}])]
    ['http://h1:8000', 'http://h2:8000']
    >>> parse_workers([{"url": "h1:8000"}, "h1:8000/"])
    Traceback (most recent call last):
    ...
    ValueError: workers[1]: http://h1:8000 is already workers[0]

    :param data: what the JSON or YAML parser returned.
    :param where: names the list in error messages.
    :raises ValueError: not a list, a bad entry (named by its index), a URL twice.
    """
    if isinstance(data, Mapping) and set(data) == {"workers"}:
        data = data["workers"]
    if data is None:
        data = []  # an empty YAML file: no workers
    if not isinstance(data, list):
        raise ValueError(f"{where}: expected a list of workers, got {type(data).__name__}")
    out: list[WorkerSpec] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(data):
        try:
            spec = parse_worker(entry) if isinstance(entry, str) else WorkerSpec.from_mapping(entry)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}[{i}]: {e}") from None
        if spec.url in seen:
            raise ValueError(f"{where}[{i}]: {spec.url} is already {where}[{seen[spec.url]}]")
        seen[spec.url] = i
        out.append(spec)
    return out


def load_workers_file(path: str | os.PathLike[str]) -> list[WorkerSpec]:
    """The workers a JSON or YAML workers file lists.

    :raises OSError: the file cannot be read.
    :raises ValueError: it does not parse, or holds a bad worker (the message
        names the file and the entry).
    :raises ImportError: a YAML file, and PyYAML is not installed.
    """
    name = os.fspath(path)
    with open(name, encoding="utf-8") as f:
        text = f.read()
    data: Any
    if name.endswith(".json"):
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{name}: not valid JSON: {e}") from None
    else:
        try:
            import yaml
        except ImportError:
            raise ImportError(f"{name}: reading YAML needs PyYAML (pip install pyyaml)") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{name}: not valid YAML: {e}") from None
    return parse_workers(data, where=name)


class WorkersFile:
    """A workers file whose workers a membership follows, under the source ``"file"``.

    Use from one thread (or one event loop) at a time.

    :param path: the file.
    :param membership: where its workers are claimed.
    :param interval: seconds between looks at the file in :meth:`run`.
    :raises ValueError: ``interval`` is not > 0.
    """

    def __init__(
        self, path: str | os.PathLike[str], membership: Membership, *, interval: float = 2.0
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0, got {interval!r}")
        self.path = os.fspath(path)
        self.membership = membership
        self.interval = float(interval)
        #: The workers of the last good read, by URL.
        self.workers: dict[str, WorkerSpec] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._failed_stamp: tuple[int, int, int] | None = None
        #: Reloads that changed the workers, and reloads refused (a bad file).
        self.reloads = 0
        self.errors = 0

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def load(self) -> list[WorkerSpec]:
        """Read the file and claim its workers (at start).

        :returns: the file's workers.
        :raises OSError, ValueError, ImportError: see :func:`load_workers_file`.
        """
        stamp = self._stat()
        specs = load_workers_file(self.path)
        self._stamp = stamp
        self._apply(specs)
        return specs

    def poll(self) -> bool:
        """Reload the file if it changed since the last look.

        :returns: True when it was reloaded (a bad file logs and returns False).
        """
        try:
            stamp = self._stat()
        except OSError as e:
            self._refuse(None, f"cannot read it: {e}")
            return False
        if stamp == self._stamp or stamp == self._failed_stamp:
            return False
        try:
            specs = load_workers_file(self.path)
        except (OSError, ValueError, ImportError) as e:
            self._refuse(stamp, str(e))
            return False
        self._stamp, self._failed_stamp = stamp, None
        self._apply(specs)
        self.reloads += 1
        return True

    def _refuse(self, stamp: tuple[int, int, int] | None, why: str) -> None:
        key = stamp if stamp is not None else (-1, -1, -1)  # (-1, -1, -1): unreadable
        if key == self._failed_stamp:
            return  # said once per bad version of the file
        self._failed_stamp = key
        self.errors += 1
        log.error("workers file %s not reloaded, its last good workers stay: %s", self.path, why)

    def _apply(self, specs: list[WorkerSpec]) -> None:
        new = {s.url: s for s in specs}
        m = self.membership
        for url, spec in new.items():
            if self.workers.get(url) != spec:
                try:
                    m.add(spec, source="file")
                except ValueError as e:  # pragma: no cover - a 52-bit id collision
                    log.error("workers file %s: %s", self.path, e)
        for url in self.workers.keys() - new.keys():
            member = m.by_url(url)
            if member is not None:
                m.drain(member.id, source="file")
        self.workers = new

    async def run(self) -> None:
        """Look at the file every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.poll()
            except Exception:  # a bug here must not stop the watching
                log.exception("workers file %s: reload failed", self.path)
