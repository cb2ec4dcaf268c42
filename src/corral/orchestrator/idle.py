"""The idle policy: sandboxes nobody is using are frozen, so that they cost no CPU.

An idle gVisor (systrap) sandbox burns 3-6 % of a core on this runsc (docs/gvisor-notes §4), which caps
a 2-core host at a few dozen live sandboxes. A sandbox counts as idle when, for `idle_after_s`, no request
has reached it through the proxy, none is open (a streaming command, a WebSocket) and its host processes
used little CPU. It is then frozen (its host cgroup: no CPU at all, memory kept) and thawed the moment a
request for it arrives (about a millisecond) or any runtime operation needs it.

Frozen sandboxes breathe: every `breathe_every_s` they run for `breathe_for_s`, so background work with
timers (a `sleep 60 && curl` started earlier) still progresses, late by at most `breathe_every_s`; one
that uses CPU while breathing is active again and stays thawed. What cannot be told apart from idle is a
process that waits for the network with no CPU and no request through the proxy (an outgoing long poll):
it waits up to `breathe_every_s` longer. `CORRAL_IDLE_FREEZE_S=0` turns the policy off.

A sandbox created from a template that has had no request yet is frozen sooner, after `fresh_after_s`:
nothing of the user's runs in it that could be waiting, and while many are being created at once (a
burst of creates) those already made would otherwise burn the CPU the next ones need (100 creates took
36 s with the 10 s rule for them and 22 s with 1 s, docs/platform.md). Its first request thaws it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from corral.runtime.base import Runtime, RuntimeError_

log = logging.getLogger("corral.idle")

TICK_S = 0.5


@dataclass
class _Activity:
    last_active: float
    cpu_at: float = 0.0
    cpu_seconds: float | None = None
    frozen_at: float | None = None
    breathing_until: float | None = None
    fresh: bool = False  # made from a template and not used yet


class IdleFreezer:
    def __init__(self, runtime: Runtime, runtime_id: Callable[[str], str | None], *, idle_after_s: float,
                 fresh_after_s: float = 1.0, breathe_every_s: float = 10.0, breathe_for_s: float = 1.0,
                 busy_cpu: float = 0.25) -> None:
        self._runtime = runtime
        self._runtime_id = runtime_id  # API id -> runtime id (it changes when a sandbox is resumed)
        self.idle_after_s = idle_after_s
        # 0 (or more than the idle time): no separate rule for unused sandboxes.
        self.fresh_after_s = min(fresh_after_s, idle_after_s) if fresh_after_s > 0 else idle_after_s
        self.breathe_every_s = breathe_every_s
        self.breathe_for_s = breathe_for_s
        self.busy_cpu = busy_cpu  # fraction of a core above which a sandbox is working, not idle
        self._sandboxes: dict[str, _Activity] = {}
        # Open proxied requests per sandbox, kept apart: a request may start before its sandbox is live
        # (a paused one resumed by the request itself).
        self._in_flight: dict[str, int] = {}
        # Sandboxes with work the host started in them and waits for (a desktop recording), by API id: never
        # frozen, whatever their CPU, across pauses and resumes until let go.
        self._kept_awake: set[str] = set()
        self._task: asyncio.Task | None = None

    @property
    def enabled(self) -> bool:
        return self.idle_after_s > 0

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def track(self, sandbox_id: str, *, fresh: bool = False) -> None:
        """A sandbox became live (created, resumed, adopted): active now. `fresh`: created from a template,
        so nothing of the user's runs in it yet (resumed, forked and adopted sandboxes may have)."""
        self._sandboxes[sandbox_id] = _Activity(last_active=time.monotonic(), fresh=fresh)

    def forget(self, sandbox_id: str) -> None:
        self._sandboxes.pop(sandbox_id, None)

    def wake(self, sandbox_id: str) -> None:
        """Someone needs the sandbox now: thaw it and count this as activity."""
        activity = self._sandboxes.get(sandbox_id)
        if activity is None:
            return
        activity.last_active = time.monotonic()
        activity.fresh = False
        if activity.frozen_at is not None or activity.breathing_until is not None:
            self._thaw(sandbox_id, activity)

    def noticed(self, sandbox_id: str) -> None:
        """Its owner asked the API about it (info, metrics, timeout, connect). A sandbox nobody has used yet
        is then treated as used: thawed if the short rule for unused ones froze it, and given the whole idle
        time from now (its metrics, say, are being watched). For others this changes nothing."""
        activity = self._sandboxes.get(sandbox_id)
        if activity is not None and activity.fresh:
            self.wake(sandbox_id)

    def keep_awake(self, sandbox_id: str, awake: bool) -> None:
        if awake:
            self._kept_awake.add(sandbox_id)
            self.wake(sandbox_id)
        else:
            self._kept_awake.discard(sandbox_id)

    @contextlib.contextmanager
    def in_use(self, sandbox_id: str) -> Iterator[None]:
        """Around a proxied request: the sandbox stays thawed while it is open."""
        self.wake(sandbox_id)
        self._in_flight[sandbox_id] = self._in_flight.get(sandbox_id, 0) + 1
        try:
            yield
        finally:
            self._in_flight[sandbox_id] -= 1
            if not self._in_flight[sandbox_id]:
                del self._in_flight[sandbox_id]
            if (activity := self._sandboxes.get(sandbox_id)) is not None:
                activity.last_active = time.monotonic()

    def frozen(self, sandbox_id: str) -> bool:
        runtime_id = self._runtime_id(sandbox_id)
        return runtime_id is not None and self._runtime.is_frozen(runtime_id)

    # ---------------------------------------------------------------- the loop

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            for sandbox_id, activity in list(self._sandboxes.items()):
                try:
                    self._step(sandbox_id, activity, now)
                except (RuntimeError_, OSError) as e:  # gone meanwhile, or its cgroup is
                    log.debug("idle policy skipped %s: %s", sandbox_id, e)

    def _step(self, sandbox_id: str, activity: _Activity, now: float) -> None:
        runtime_id = self._runtime_id(sandbox_id)
        if runtime_id is None:
            return
        if activity.frozen_at is not None and not self._runtime.is_frozen(runtime_id):
            activity.frozen_at = None  # a runtime operation (exec, checkpoint) thawed it: it is in use
            activity.last_active = now
        if activity.frozen_at is not None:
            if now - activity.frozen_at >= self.breathe_every_s:
                self._runtime.thaw(runtime_id)
                activity.frozen_at = None
                activity.breathing_until = now + self.breathe_for_s
                self._sample_cpu(runtime_id, activity, now)
            return
        busy = self._sample_cpu(runtime_id, activity, now) > self.busy_cpu
        if sandbox_id in self._in_flight or sandbox_id in self._kept_awake or busy:
            activity.last_active = now
            activity.breathing_until = None
            return
        if activity.breathing_until is not None:
            if now >= activity.breathing_until:
                self._freeze(runtime_id, activity, now)
            return
        if now - activity.last_active >= (self.fresh_after_s if activity.fresh else self.idle_after_s):
            self._freeze(runtime_id, activity, now)

    def _sample_cpu(self, runtime_id: str, activity: _Activity, now: float) -> float:
        """CPU used since the previous sample, as a fraction of one core (0 for the first sample)."""
        seconds = self._runtime.host_cpu_seconds(runtime_id)
        previous, previous_at = activity.cpu_seconds, activity.cpu_at
        activity.cpu_seconds, activity.cpu_at = seconds, now
        if seconds is None or previous is None or now <= previous_at:
            return 0.0
        return (seconds - previous) / (now - previous_at)

    def _freeze(self, runtime_id: str, activity: _Activity, now: float) -> None:
        activity.breathing_until = None
        if self._runtime.freeze(runtime_id):
            activity.frozen_at = now

    def _thaw(self, sandbox_id: str, activity: _Activity) -> None:
        activity.frozen_at = None
        activity.breathing_until = None
        runtime_id = self._runtime_id(sandbox_id)
        if runtime_id is not None:
            with contextlib.suppress(RuntimeError_, OSError):
                self._runtime.thaw(runtime_id)
