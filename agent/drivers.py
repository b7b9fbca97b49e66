"""Drivers run the network I/O of ``Link``s: connect, read, write, keepalive, reconnect.

``SelectorDriver`` drives any number of links from one thread with ``selectors``
over the links' sockets and paho's ``loop_read``/``loop_write``/``loop_misc`` (a few
KB per link instead of a thread each): the fleet simulator and the benchmarks.
``ThreadDriver`` is the same engine with one link on its own thread: the daemon.

Every paho call on a link's socket happens on the driver's thread.  ``publish``,
``subscribe`` and ``close`` may be called from any thread: paho only queues the
packet (its register-write callback is set, so it never writes from the caller's
thread) and the driver is woken through a socketpair to write it.  Reconnects
are scheduled by deadline in a heap, each link with its own ``Backoff``; the loop
never sleeps.  TCP (and TLS) connects are paho's blocking ones, each bounded by
``BrokerConfig.connect_timeout``; between two rounds of I/O at most
``max_connects_per_tick`` start, and none after 0.2 s of connecting.  On a LAN
or localhost a connect takes well under a millisecond; against an unreachable
remote host each attempt can block the loop up to ``connect_timeout``.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from tinyfleet.agent.link import Link, LinkState

if TYPE_CHECKING:
    from paho.mqtt.client import SocketLike

__all__ = ["SelectorDriver", "ThreadDriver"]

_LOG = logging.getLogger("tinyfleet.agent.drivers")
_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
_MAX_FLUSH_ROUNDS = 4
_CONNECT_BUDGET_S = 0.2


class SelectorDriver:
    """Many links, one thread.  ``add``/``remove`` links, ``start``/``stop`` the thread."""

    def __init__(
        self,
        *,
        name: str = "tinyfleet-mqtt",
        logger: logging.Logger | None = None,
        tick: float = 1.0,
        max_connects_per_tick: int = 64,
    ) -> None:
        if tick <= 0 or max_connects_per_tick < 1:
            raise ValueError("tick must be > 0 and max_connects_per_tick >= 1")
        self.name = name
        self.tick = tick
        self.max_connects_per_tick = max_connects_per_tick
        self.errors = 0
        """Unexpected exceptions caught in the loop (each is logged)."""
        self._log = logger if logger is not None else _LOG
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, _READ, None)
        self._wake_pending = False
        self._links: set[Link] = set()
        self._heap: list[tuple[float, int, int, Link]] = []
        self._seq = itertools.count()
        self._calls: deque[Callable[[], None]] = deque()
        self._flushes: deque[Link] = deque()
        self._dirty: set[Link] = set()
        self._readable: set[Link] = set()
        self._thread: threading.Thread | None = None
        self._ident: int | None = None
        self._running = False
        self._stopping = False
        self._stop_deadline = 0.0
        self._next_sweep = 0.0

    # ------------------------------------------------------------------ public

    @property
    def running(self) -> bool:
        return self._running

    @property
    def links(self) -> tuple[Link, ...]:
        """The links this driver currently drives (a snapshot)."""
        return tuple(self._links)

    def __len__(self) -> int:
        return len(self._links)

    def add(self, link: Link) -> None:
        """Drive ``link`` from now on: it connects at once, then reconnects with its backoff."""
        if self._stopping:
            raise RuntimeError(f"driver {self.name} is stopping; cannot add {link!r}")
        link._attach(self)
        self._call(lambda: self._add(link))

    def remove(self, link: Link, timeout: float = 5.0) -> None:
        """Close ``link`` cleanly (DISCONNECT, no will) and stop driving it."""
        if link._driver is self:
            link.close(timeout)

    def start(self) -> None:
        """Start the driver's thread."""
        if self._thread is not None:
            raise RuntimeError(f"driver {self.name} was already started")
        self._running = True
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Close every link cleanly, then end the thread (waits up to about ``timeout``)."""
        thread = self._thread
        if thread is None:
            for link in list(self._links):
                self._finish_close(link)
            self._close_selector()
            return
        self._call(lambda: self._begin_stop(timeout))
        if threading.get_ident() != self._ident:
            thread.join(timeout + 2.0)

    # ------------------------------------------------------------------ called by links

    def _request_flush(self, link: Link) -> None:
        if threading.get_ident() == self._ident:
            self._dirty.add(link)
        elif self._running:
            self._flushes.append(link)
            self._wake()

    def _request_close(self, link: Link, timeout: float) -> None:
        if threading.get_ident() == self._ident or not self._running:
            self._begin_close(link, timeout)
            return
        closed = link._closed
        if closed is None:
            closed = link._closed = threading.Event()
        # _finish_close sets CLOSED before it looks for the event: one of the two sees the other.
        if link._state is LinkState.CLOSED:
            return
        self._call(lambda: self._begin_close(link, timeout))
        if not closed.wait(timeout + 1.0):
            self._log.warning("%s: close did not finish within %.1f s", link.client_id, timeout)

    def _socket_opened(self, link: Link, sock: SocketLike) -> None:
        self._unwatch(link)
        self._sel.register(sock, _READ, link)
        link._sock = sock
        link._mask = _READ

    def _socket_closing(self, link: Link, sock: SocketLike) -> None:
        self._unwatch(link)

    def _link_down(self, link: Link) -> None:
        if self._stopping:
            self._finish_close(link)
        else:
            self._schedule(link, link.backoff.next_delay())

    def _link_closed(self, link: Link) -> None:
        self._finish_close(link)

    # ------------------------------------------------------------------ thread plumbing

    def _call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the driver's thread (now, if that is this thread or none runs)."""
        if threading.get_ident() == self._ident or not self._running:
            fn()
        else:
            self._calls.append(fn)
            self._wake()

    def _wake(self) -> None:
        if not self._wake_pending:
            self._wake_pending = True
            # A full buffer means a wakeup is pending anyway.
            with contextlib.suppress(OSError):
                self._wake_w.send(b"\0")

    def _drain_wake(self) -> None:
        # Read first, then clear: clearing first let a wake-up sent in between be read
        # here while the flag stayed set, so later wake-ups were never sent.  A wake-up
        # that sees the flag still set now is safe: the loop processes the queues next.
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass
        self._wake_pending = False

    def _run(self) -> None:
        self._ident = threading.get_ident()
        self._next_sweep = time.monotonic() + self.tick
        try:
            while True:
                try:
                    if self._iterate():
                        break
                except Exception:
                    self.errors += 1
                    self._log.exception("driver %s: error in the I/O loop", self.name)
                    time.sleep(0.05)  # a repeating bug must not flood the log
        finally:
            self._shutdown()

    def _iterate(self) -> bool:
        """One round of the loop; True when the driver has stopped."""
        while self._calls:
            fn = self._calls.popleft()
            try:
                fn()
            except Exception:
                self.errors += 1
                self._log.exception("driver %s: error in a queued call", self.name)
        while self._flushes:
            link = self._flushes.popleft()
            if link._driver is self:
                self._dirty.add(link)
        now = time.monotonic()
        if self._stopping:
            if not self._links or now >= self._stop_deadline:
                return True
        else:
            self._connect_due(now)
        if now >= self._next_sweep:
            self._sweep(now)
            self._next_sweep = now + self.tick
        self._flush_dirty()
        if self._stopping and not self._links:
            return True

        if self._dirty or self._readable or self._calls or self._flushes:
            timeout = 0.0
        else:
            wake_at = self._next_sweep
            if self._heap and not self._stopping:
                wake_at = min(wake_at, self._heap[0][0])
            timeout = max(0.0, wake_at - time.monotonic())
        events = self._sel.select(timeout)
        for key, mask in events:
            link = key.data
            if link is None:
                self._drain_wake()
            else:
                self._service(link, mask)
        for link in list(self._readable):
            self._readable.discard(link)
            if link._sock is not None:
                self._service(link, _READ)
        return False

    def _shutdown(self) -> None:
        for link in list(self._links):
            if link._sock is not None:
                self._log.warning(
                    "%s: no clean DISCONNECT before the driver stopped", link.client_id
                )
            self._abort_socket(link)
            self._finish_close(link)
        self._running = False
        self._ident = None
        self._close_selector()

    def _close_selector(self) -> None:
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    # ------------------------------------------------------------------ link lifecycle

    def _add(self, link: Link) -> None:
        if self._stopping:
            self._finish_close(link)
            return
        self._links.add(link)
        link._state = LinkState.WAITING
        self._schedule(link, 0.0)

    def _schedule(self, link: Link, delay: float) -> None:
        link._gen += 1
        heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), link._gen, link))

    def _connect_due(self, now: float) -> None:
        heap = self._heap
        attempts = 0
        budget_end = now + _CONNECT_BUDGET_S
        while heap and heap[0][0] <= now and attempts < self.max_connects_per_tick:
            if attempts and time.monotonic() > budget_end:
                break  # slow connects: serve the connected links first
            _, _, gen, link = heapq.heappop(heap)
            if gen != link._gen or link._driver is not self or link._state is not LinkState.WAITING:
                continue
            attempts += 1
            if link._attempt_connect():
                link._deadline = time.monotonic() + link.config.connect_timeout
                self._dirty.add(link)
            elif link._state is LinkState.WAITING:
                self._abort_socket(link)
                self._schedule(link, link.backoff.next_delay())

    def _begin_stop(self, timeout: float) -> None:
        self._stopping = True
        self._stop_deadline = time.monotonic() + timeout
        for link in list(self._links):
            self._begin_close(link, timeout)

    def _begin_close(self, link: Link, timeout: float) -> None:
        if link._driver is not self or link._state in (LinkState.CLOSING, LinkState.CLOSED):
            return
        was_connected = link._state is LinkState.CONNECTED
        link._gen += 1  # cancels a scheduled connect
        if link._sock is None:
            self._finish_close(link)
            return
        link._state = LinkState.CLOSING
        link._deadline = time.monotonic() + timeout
        if was_connected:
            link._guard("on_disconnected", link.handler.on_disconnected, link, "closed")
        link._client.disconnect()  # queues DISCONNECT; paho closes the socket once it is written
        self._dirty.add(link)

    def _finish_close(self, link: Link) -> None:
        self._unwatch(link)
        link._gen += 1
        link._state = LinkState.CLOSED
        self._links.discard(link)
        self._dirty.discard(link)
        self._readable.discard(link)
        link._driver = None
        if link._closed is not None:
            link._closed.set()

    def _fail(self, link: Link, reason: str) -> None:
        """Drop a link's connection without DISCONNECT and treat it as lost."""
        state = link._state
        self._abort_socket(link)
        if state is LinkState.CLOSING:
            self._finish_close(link)
        else:
            link._on_down(reason)

    def _abort_socket(self, link: Link) -> None:
        self._unwatch(link)
        if link._client.socket() is not None:
            try:
                link._client._sock_close()  # paho has no public "close without DISCONNECT"
            except Exception:
                self._log.debug("%s: error closing the socket", link.client_id, exc_info=True)

    # ------------------------------------------------------------------ I/O

    def _unwatch(self, link: Link) -> None:
        sock = link._sock
        if sock is None:
            return
        link._sock = None
        link._mask = 0
        self._readable.discard(link)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(sock)

    def _service(self, link: Link, mask: int) -> None:
        client = link._client
        try:
            if mask & _READ:
                client.loop_read()
                sock = link._sock
                # TLS may hold decrypted bytes the selector cannot see.
                if isinstance(sock, ssl.SSLSocket) and sock.pending():
                    self._readable.add(link)
            if mask & _WRITE and link._sock is not None:
                client.loop_write()
        except Exception:
            self.errors += 1
            self._log.exception("%s: error in paho's network loop", link.client_id)
            self._fail(link, "internal error in the network loop")
            return
        if link._sock is not None:
            self._dirty.add(link)

    def _flush_dirty(self) -> None:
        for _ in range(_MAX_FLUSH_ROUNDS):
            if not self._dirty:
                return
            dirty, self._dirty = self._dirty, set()
            for link in dirty:
                self._sync(link)

    def _sync(self, link: Link) -> None:
        """Write what paho has queued for ``link``; watch for writability if some is left."""
        sock = link._sock
        if sock is None:
            return
        client = link._client
        if client.want_write():
            try:
                client.loop_write()
            except Exception:
                self.errors += 1
                self._log.exception("%s: error writing", link.client_id)
                self._fail(link, "internal error while writing")
                return
            sock = link._sock
            if sock is None:
                return
        want = _READ | _WRITE if client.want_write() else _READ
        if want != link._mask:
            self._sel.modify(sock, want, link)
            link._mask = want

    def _sweep(self, now: float) -> None:
        """Keepalive, CONNACK and close deadlines of every link (once per tick)."""
        for link in list(self._links):
            state = link._state
            if link._sock is None:
                continue
            if state is LinkState.CONNECTING and now >= link._deadline:
                self._fail(link, f"no CONNACK within {link.config.connect_timeout:g} s")
                continue
            if state is LinkState.CLOSING and now >= link._deadline:
                self._log.warning("%s: DISCONNECT not written in time", link.client_id)
                self._abort_socket(link)
                self._finish_close(link)
                continue
            try:
                link._client.loop_misc()
            except Exception:
                self.errors += 1
                self._log.exception("%s: error in keepalive", link.client_id)
                self._fail(link, "internal error in keepalive")
                continue
            if link._sock is not None and link._client.want_write():
                self._dirty.add(link)


class ThreadDriver:
    """One link on its own thread (the daemon): a ``SelectorDriver`` holding one link."""

    def __init__(
        self,
        link: Link,
        *,
        name: str | None = None,
        logger: logging.Logger | None = None,
        tick: float = 1.0,
    ) -> None:
        self.link = link
        self._driver = SelectorDriver(
            name=name or f"tinyfleet-mqtt-{link.client_id}", logger=logger, tick=tick
        )

    @property
    def running(self) -> bool:
        return self._driver.running

    @property
    def errors(self) -> int:
        return self._driver.errors

    def start(self) -> None:
        """Start the thread; the link connects at once and reconnects forever."""
        self._driver.add(self.link)
        self._driver.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Close the link cleanly (no will) and end the thread."""
        self._driver.stop(timeout)
