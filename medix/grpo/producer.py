"""Asynchronous rollouts (`rollout.max_staleness` = k >= 1): a thread samples and scores the batches of the next GRPO
steps while the trainer updates, at most k steps ahead, and the trainer never trains on a batch sampled more than k
policy versions ago (verl's fully-async staleness threshold, TRL's AsyncGRPO `max_staleness`)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)


RESAMPLED = 1 << 16  # attempts from here on: a batch sampled again after it went stale (below: DAPO refills)


def position_seed(seed: int, position: int, attempt: int = 0) -> int:
    """The sampling seed of GRPO step `position`'s `attempt`-th batch (0: its own prompts; 1, 2, ...: DAPO refills;
    RESAMPLED + n: the n-th resample of a stale batch): the same whichever thread draws it and whenever, so a resumed
    run samples what the killed one would."""
    return int(np.random.SeedSequence([seed, position, attempt]).generate_state(1)[0] & 0x7FFFFFFF)


@dataclass
class Produced:
    """A batch as the trainer takes it: what `produce` returned (a scored rollout, `.rollout.policy_version` the
    version it was sampled with), and how many policy versions old it is now."""

    position: int
    batch: Any
    staleness: int


class IdleClock:
    """How long a resource sat idle: its work runs inside `busy()` (from any thread); `idle_s()` is the idle time
    since its previous call."""

    def __init__(self):
        self._lock = threading.Lock()
        self._busy = 0
        self._idle = 0.0
        self._since = time.perf_counter()

    @contextmanager
    def busy(self):
        with self._lock:
            if self._busy == 0:
                self._idle += time.perf_counter() - self._since
            self._busy += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1
                if self._busy == 0:
                    self._since = time.perf_counter()

    def idle_s(self) -> float:
        with self._lock:
            now = time.perf_counter()
            idle = self._idle + (now - self._since if self._busy == 0 else 0.0)
            self._idle, self._since = 0.0, now
            return idle


class RolloutProducer:
    """Runs `produce(position, attempt)` in a background thread for positions start, start+1, ...: position q once
    the trainer has taken q - max_staleness, so a batch is sampled at most `max_staleness` syncs before the step that
    trains on it. `take(p)` hands position p's batch to the trainer; one sampled more than `max_staleness` versions
    before `engine.version` (an engine that synced more often than the steps, a batch kept across a gap) is dropped and
    sampled again, counted in `stale_dropped` (rows). `run(fn)` runs `fn` in the thread before any further sampling
    (DAPO's refills). An exception in the thread is raised in the trainer by the next `take`/`run` that needs it.
    `close()` stops and joins the thread (the request in flight finishes first)."""

    def __init__(self, produce: Callable[[int, int], Any], engine, max_staleness: int, start: int = 0):
        if not isinstance(max_staleness, int) or max_staleness < 1:
            raise ValueError(f"max_staleness={max_staleness!r}; a producer samples ahead by at least 1 step")
        self.produce = produce
        self.engine = engine
        self.max_staleness = max_staleness
        self.engine_clock = IdleClock()
        self._cond = threading.Condition()
        self._ready: dict[int, Any] = {}
        self._next = start  # the next position the thread samples
        self._taken = start  # positions before it are the trainer's
        self._jobs: deque[tuple[Callable[[], Any], Future]] = deque()
        self._error: BaseException | None = None
        self._stopping = False
        self._wait_s = 0.0
        self._dropped = 0
        self._thread = threading.Thread(target=self._loop, name="medix-rollout-producer", daemon=True)
        self._thread.start()

    # ---- the thread ---------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._stopping or self._jobs or self._next < self._taken + self.max_staleness):
                        self._cond.wait()
                    if self._stopping:
                        return
                    job = self._jobs.popleft() if self._jobs else None
                    position = None
                    if job is None:
                        position, self._next = self._next, self._next + 1
                if job is not None:
                    fn, future = job
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn())
                        except BaseException as error:  # the trainer gets it from the future
                            future.set_exception(error)
                    continue
                batch = self.produce(position, 0)
                with self._cond:
                    self._ready[position] = batch
                    self._cond.notify_all()
        except BaseException as error:
            log.debug("rollout producer stopped on %r", error)
            with self._cond:
                self._error = error
                self._cond.notify_all()
        finally:
            with self._cond:
                while self._jobs:
                    _, future = self._jobs.popleft()
                    if future.set_running_or_notify_cancel():
                        future.set_exception(self._error or RuntimeError("the rollout producer was closed"))
                self._cond.notify_all()

    # ---- the trainer's side -------------------------------------------------------------------------------------
    def take(self, position: int) -> Produced:
        """Position `position`'s batch (positions are taken in order), at most `max_staleness` versions old."""
        started = time.perf_counter()
        with self._cond:
            if position != self._taken:
                raise ValueError(f"take({position}): the next position to take is {self._taken}")
            self._taken = position + 1  # the thread may now sample position + max_staleness
            self._cond.notify_all()
            while position not in self._ready:
                self._raise_if_stopped()
                self._cond.wait()
            batch = self._ready.pop(position)
        self._wait_s += time.perf_counter() - started
        attempt = RESAMPLED - 1
        while self.staleness(batch) > self.max_staleness:  # too old to train on: sampled again from the current policy
            self._dropped += len(batch.rollout)
            attempt += 1
            log.info("GRPO step %d: its batch is %d policy versions old (rollout.max_staleness=%d); sampling it again",
                     position + 1, self.staleness(batch), self.max_staleness)
            batch = self.run(lambda: self.produce(position, attempt))
        return Produced(position, batch, self.staleness(batch))

    def run(self, fn: Callable[[], Any]) -> Any:
        """`fn()` run in the producer's thread next (before it samples further ahead); the trainer waits for it."""
        started = time.perf_counter()
        future: Future = Future()
        with self._cond:
            self._raise_if_stopped()
            self._jobs.append((fn, future))
            self._cond.notify_all()
        try:
            return future.result()
        finally:
            self._wait_s += time.perf_counter() - started

    def staleness(self, batch) -> int:
        return int(self.engine.version) - int(batch.rollout.policy_version)

    def queue_depth(self) -> int:
        """Batches sampled ahead and not taken yet."""
        with self._cond:
            return len(self._ready)

    def wait_s(self) -> float:
        """Seconds the trainer waited in `take` and `run` since the previous call."""
        waited, self._wait_s = self._wait_s, 0.0
        return waited

    def stale_dropped(self) -> int:
        """Rows dropped for staleness since the previous call."""
        dropped, self._dropped = self._dropped, 0
        return dropped

    def engine_idle_s(self) -> float:
        return self.engine_clock.idle_s()

    def _raise_if_stopped(self) -> None:
        if self._error is not None:
            raise self._error
        if self._stopping or not self._thread.is_alive():
            raise RuntimeError("the rollout producer is closed")

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float | None = None) -> None:
        """Stop sampling ahead and join the thread (after the request in flight)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
