"""``MockWorkerProcess``: a :class:`~kvroute.testing.MockWorker` in a process of its own.

Faults a thread cannot fake need a process: ``SIGKILL`` drops every
connection mid-byte with no goodbye (a crashed engine), ``SIGSTOP`` freezes
it with its sockets open (a hung one), and its CPU work (parsing, hashing)
does not share the caller's GIL. The child runs ``python -m
kvroute.testing.process '<MockWorker keyword arguments as JSON>'``, prints
one ready line with its addresses, and stops cleanly on ``SIGTERM``.

    >>> with MockWorkerProcess(token_delay=0.01) as w:      # doctest: +SKIP
    ...     post(w.url + "/v1/completions", ...)
    ...     w.kill()                                        # SIGKILL, mid-stream
    ...     w.start()                                       # back, same ports

The worker's request log lives in the child; the parent sees only what it
serves over HTTP (``/metrics``, ``/health``) and ZMQ.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from types import TracebackType
from typing import Any, Final

__all__ = ["MockWorkerProcess", "main"]

_READY: Final = "kvroute-mock-worker-ready "


class MockWorkerProcess:
    """A MockWorker served by a child process, to be killed, stopped and restarted for real.

    :param fail_next: ``(n, status)``: the child calls
        :meth:`~kvroute.testing.MockWorker.fail_next` with them at each start
        (a worker answering every generation with an error, say).
    :param kwargs: :class:`~kvroute.testing.MockWorker` keyword arguments
        (JSON-serializable); ports given as 0 are chosen at the first start
        and kept across restarts.
    """

    def __init__(self, *, fail_next: tuple[int, int] | None = None, **kwargs: Any) -> None:
        json.dumps(kwargs)  # fail here, not in the child
        self.kwargs = dict(kwargs)
        #: ``(n, status)`` failures the child queues at each start, or None.
        self.fail_next = fail_next
        self._proc: subprocess.Popen[str] | None = None
        self._addresses: dict[str, Any] = {}
        self._stderr: list[str] = []

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> MockWorkerProcess:
        """Start the child; return once it listens (same ports as before on a restart).

        :raises RuntimeError: already running, or the child failed to start.
        """
        if self.running:
            raise RuntimeError("the worker process is already running")
        kwargs = dict(self.kwargs)
        for key in ("port", "events_port", "replay_port"):
            if self._addresses.get(key):
                kwargs[key] = self._addresses[key]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        spec = {"kwargs": kwargs, "fail_next": self.fail_next}
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvroute.testing.process", json.dumps(spec)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._proc = proc
        ready: list[str] = []

        def read_ready() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(_READY):
                    ready.append(line[len(_READY) :])
                    return

        reader = threading.Thread(target=read_ready, daemon=True)
        reader.start()
        reader.join(timeout)
        if not ready:
            proc.kill()
            _, err = proc.communicate()
            self._proc = None
            raise RuntimeError(f"the worker process did not start: {err[-2000:]}")
        self._addresses = json.loads(ready[0])
        # Keep draining its pipes, so a chatty child never blocks on a full one.
        threading.Thread(target=self._drain, args=(proc,), daemon=True).start()
        return self

    def _drain(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None and proc.stdout is not None
        for line in proc.stderr:
            self._stderr.append(line)
            del self._stderr[:-200]

    def stop(self, timeout: float = 30.0) -> None:
        """``SIGTERM``: the worker stops cleanly (running requests are aborted). Idempotent."""
        self._reap(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """``SIGKILL``: the worker dies at once, its connections cut. Idempotent."""
        self._reap(signal.SIGKILL)

    def pause(self, timeout: float = 5.0) -> None:
        """``SIGSTOP``: the worker freezes, its sockets open (nothing is answered).

        Returns once the child is stopped (where ``/proc`` tells).
        """
        self._signal(signal.SIGSTOP)
        self._await_state(stopped=True, timeout=timeout)

    def resume(self, timeout: float = 5.0) -> None:
        """``SIGCONT``: undo :meth:`pause` (returns once the child runs again)."""
        self._signal(signal.SIGCONT)
        self._await_state(stopped=False, timeout=timeout)

    def _await_state(self, *, stopped: bool, timeout: float) -> None:
        stat = f"/proc/{self.pid}/stat"
        if not os.path.exists(stat):
            return  # no /proc: the signal is all there is
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with open(stat) as f:
                # the state follows the command name, which is in parentheses
                state = f.read().rpartition(")")[2].split()[0]
            if (state == "T") == stopped:
                return
            time.sleep(0.005)

    def _signal(self, sig: signal.Signals) -> None:
        if not self.running:
            raise RuntimeError("the worker process is not running")
        assert self._proc is not None
        self._proc.send_signal(sig)

    def _reap(self, sig: signal.Signals, timeout: float = 30.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            if sig != signal.SIGKILL:
                proc.send_signal(signal.SIGCONT)  # a paused child cannot act on SIGTERM
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()

    @property
    def running(self) -> bool:
        """Whether the child is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        """The child's process id.

        :raises RuntimeError: not running.
        """
        if self._proc is None:
            raise RuntimeError("the worker process is not running")
        return self._proc.pid

    def __enter__(self) -> MockWorkerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- addresses ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` (known once started)."""
        return str(self._addresses["url"])

    @property
    def port(self) -> int:
        """The HTTP port (known once started)."""
        return int(self._addresses["port"])

    @property
    def events_endpoint(self) -> str | None:
        """The KV-event endpoint, or None when not publishing."""
        return self._addresses.get("events_endpoint")

    @property
    def replay_endpoint(self) -> str | None:
        """The replay endpoint, or None."""
        return self._addresses.get("replay_endpoint")


def main(argv: list[str] | None = None) -> int:
    """The child: serve a MockWorker until ``SIGTERM`` (or ``SIGINT``).

    :param argv: ``[spec_json]``: ``{"kwargs": {...}, "fail_next": [n, status] | null}``
        (default: ``sys.argv[1:]``).
    :returns: the exit status.
    """
    from .mock_worker import MockWorker

    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(args[0]) if args else {}
    kwargs = spec.get("kwargs") or {}
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker = MockWorker(**kwargs).start()
    if spec.get("fail_next"):
        worker.fail_next(*spec["fail_next"])
    try:
        addresses = {
            "url": worker.url,
            "port": worker.port,
            "events_port": worker.events_port,
            "replay_port": worker.replay_port,
            "events_endpoint": worker.events_endpoint,
            "replay_endpoint": worker.replay_endpoint,
        }
        print(_READY + json.dumps(addresses), flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        worker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
