"""Subscribing to every replica's KV-event publisher (vLLM's ZMQ PUB socket), off the request path.

One thread polls a SUB socket per replica and applies each batch to the KvIndex in order. The
sequence number says what was missed:

* the next one: applied;
* a gap (messages lost: the PUB socket drops past its high-water mark, or the connection broke):
  replayed from the publisher's ROUTER socket when ``replay_endpoint`` is configured and its
  buffer still holds the missing batches; otherwise the replica's state is dropped and it is
  approximate until rebuilt (``warm_seconds``);
* 0 after a higher one: the model server restarted with an empty cache; its history starts anew.

The first message of a subscription asks for a replay from 0 too: if the publisher still holds
it, the index has the replica's whole history at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import zmq

from extproc.replicas.kvevents import END_SEQ, EventBatch, MalformedBatch, decode_batch, read_seq, seq_bytes
from extproc.replicas.kvindex import KvIndex

log = logging.getLogger("extproc.replicas")

_EVERYTHING = 1 << 62
LIVE_SECONDS = 2.0  # a batch younger than this is live (its stored runs count as load)


@dataclass(frozen=True, slots=True)
class Target:
    """Where one replica publishes: its PUB endpoint, its replay ROUTER (or None), the topic."""

    endpoint: str
    replay: str | None = None
    topic: str = ""
    model: str = ""  # for metrics


@dataclass(slots=True)
class _Subscription:
    target: Target
    socket: zmq.Socket
    last: int | None = None  # the last sequence number applied
    # Catch-up replays after subscribing: what is published between the first replay and the SUB
    # handshake is lost (ZMQ's slow joiner), and a replica that then goes quiet shows no gap.
    catch_ups: list[float] = field(default_factory=list)


# (model, what): "batch" | "gap_replayed" | "gap_resynced" | "restart" | "malformed"
Observer = Callable[[str, str], None]


class KvEventSubscriber:
    def __init__(
        self,
        index: KvIndex,
        *,
        replay_timeout: float = 1.0,
        on_event: Observer | None = None,
        on_lag: Callable[[str, float], None] | None = None,
    ) -> None:
        self.index = index
        self.replay_timeout = replay_timeout
        self._on_event = on_event or (lambda model, what: None)
        self._on_lag = on_lag or (lambda model, seconds: None)
        self._context = zmq.Context()
        self._wanted: dict[str, Target] = {}
        self._changed = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.last_batch: dict[str, float] = {}  # endpoint -> monotonic time of its last batch

    def set_targets(self, targets: Mapping[str, Target]) -> None:
        """Replica address -> where it publishes. Applied by the subscriber thread."""
        with self._lock:
            self._wanted = dict(targets)
        self._changed.set()
        if self._thread is None and targets:
            self._thread = threading.Thread(target=self._run, name="extproc-kv-events", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
        self._context.destroy(linger=0)

    # --- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        subscriptions: dict[str, _Subscription] = {}
        poller = zmq.Poller()
        by_socket: dict[zmq.Socket, str] = {}
        try:
            while not self._stopping.is_set():
                if self._changed.is_set():
                    self._changed.clear()
                    self._sync(subscriptions, poller, by_socket)
                self._catch_up(subscriptions)
                for socket, _ in poller.poll(100):
                    endpoint = by_socket.get(socket)
                    if endpoint is None:
                        continue
                    # Drain what is there, so one busy replica cannot starve the others' sockets.
                    for _ in range(256):
                        try:
                            frames = socket.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._receive(endpoint, subscriptions[endpoint], frames)
        except Exception:
            if not self._stopping.is_set():
                log.exception("KV event subscriber stopped; replicas fall back to the router's own index")
        finally:
            for subscription in subscriptions.values():
                subscription.socket.close(linger=0)

    def _sync(self, subscriptions: dict[str, _Subscription], poller: zmq.Poller, by_socket: dict) -> None:
        with self._lock:
            wanted = dict(self._wanted)
        for endpoint in [e for e, s in subscriptions.items() if wanted.get(e) != s.target]:
            subscription = subscriptions.pop(endpoint)
            poller.unregister(subscription.socket)
            by_socket.pop(subscription.socket, None)
            subscription.socket.close(linger=0)
        for endpoint, target in wanted.items():
            if endpoint in subscriptions:
                continue
            socket = self._context.socket(zmq.SUB)
            socket.setsockopt(zmq.RCVHWM, 100_000)
            socket.setsockopt(zmq.RECONNECT_IVL, 200)
            socket.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
            socket.setsockopt(zmq.SUBSCRIBE, target.topic.encode())
            socket.connect(target.endpoint)
            subscription = subscriptions[endpoint] = _Subscription(target, socket)
            poller.register(socket, zmq.POLLIN)
            by_socket[socket] = endpoint
            self.index.subscribe(endpoint)
            # An idle replica publishes nothing, so ask for its history now rather than at its
            # next batch. What is published meanwhile shows up as a gap, replayed in turn.
            self._replay(endpoint, subscription, 0, _EVERYTHING)
            now = time.monotonic()
            subscription.catch_ups = [now + 0.25, now + 1.0, now + 4.0]
        self.index.forget(wanted)

    def _catch_up(self, subscriptions: dict[str, _Subscription]) -> None:
        now = time.monotonic()
        for endpoint, subscription in subscriptions.items():
            if subscription.catch_ups and subscription.catch_ups[0] <= now:
                del subscription.catch_ups[0]
                start = 0 if subscription.last is None else subscription.last + 1
                self._replay(endpoint, subscription, start, _EVERYTHING)

    def _receive(self, endpoint: str, subscription: _Subscription, frames: list[bytes]) -> None:
        model = subscription.target.model
        try:
            if len(frames) != 3:
                raise MalformedBatch(f"{len(frames)} frames, not (topic, seq, payload)")
            seq = read_seq(frames[1])
            batch = decode_batch(frames[2])
        except MalformedBatch as exc:
            self._on_event(model, "malformed")
            log.warning("KV events from %s: %s; dropping the replica's state", endpoint, exc)
            self.index.reset(endpoint, complete=False)
            subscription.last = None
            return
        last = subscription.last
        if last is not None and seq <= last:
            if seq != 0:
                return  # already applied (a replay overlapped the live stream)
            self._on_event(model, "restart")
            self.index.reset(endpoint, complete=True)  # a new engine: its cache starts empty
        elif last is None or seq > last + 1:
            start = 0 if last is None else last + 1
            if not self._replay(endpoint, subscription, start, seq):
                if last is not None:
                    self._on_event(model, "gap_resynced")
                    log.info("KV events from %s: missed %d batches, no replay; resyncing", endpoint, seq - last - 1)
                    self.index.reset(endpoint, complete=False)
                elif seq == 0:
                    self.index.reset(endpoint, complete=True)
            elif last is not None:
                self._on_event(model, "gap_replayed")
            if subscription.last is not None and seq <= subscription.last:
                return  # the replay covered it
        self._apply(endpoint, subscription, seq, batch)

    def _apply(self, endpoint: str, subscription: _Subscription, seq: int, batch: EventBatch) -> None:
        lag = max(0.0, time.time() - batch.ts)
        # A batch published moments ago tells of requests starting now; replayed history does not.
        self.index.apply(endpoint, batch.events, live=lag < LIVE_SECONDS)
        subscription.last = seq
        self.last_batch[endpoint] = time.monotonic()
        model = subscription.target.model
        self._on_event(model, "batch")
        self._on_lag(model, lag)

    def _replay(self, endpoint: str, subscription: _Subscription, start: int, upto: int) -> bool:
        """Ask the publisher's ROUTER for batches start..upto-1 and apply them. True if it had
        them all (the first one it sends is start)."""
        target = subscription.target
        if target.replay is None:
            return False
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        try:
            socket.connect(target.replay)
            socket.send_multipart([b"", seq_bytes(start)])
            deadline = time.monotonic() + self.replay_timeout
            first = True
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not socket.poll(int(remaining * 1000)):
                    log.info("KV event replay from %s timed out", target.replay)
                    return False
                frames = socket.recv_multipart()
                if len(frames) != 3:
                    return False
                seq = read_seq(frames[1])
                if seq == END_SEQ:
                    if first and start == 0:
                        # Nothing buffered: a publisher that never published (its buffer only
                        # drops batches to make room for newer ones), so its cache is empty.
                        self.index.reset(endpoint, complete=True)
                        return True
                    return not first or start >= upto
                if first:
                    first = False
                    if seq != start:
                        return False  # its buffer no longer goes back that far
                    if start == 0:
                        self.index.reset(endpoint, complete=True)  # the whole history follows
                if seq >= upto:
                    continue  # the live stream brings it
                self._apply(endpoint, subscription, seq, decode_batch(frames[2]))
        except (zmq.ZMQError, MalformedBatch) as exc:
            log.info("KV event replay from %s failed: %s", target.replay, exc)
            return False
        finally:
            socket.close(linger=0)
