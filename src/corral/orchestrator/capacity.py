"""The one capacity manager: every kind of pre-made sandbox on this node, one refill scheduler, one
restore budget and one priority rule.

Kinds of stock, cheapest to use first:
  ready      sandboxes of a pooled template already started, envd up and warmed, no identity yet
             (`ready_size` per template): a create is a claim plus /init.
  prepared   containers prepared for a snapshot (network, disk, root, `runsc create`; ~130 ms of setup
             done ahead), frozen, no CPU, ~10 MiB each:
             - for each template used (`prepared_size`), so a create that misses `ready` skips the setup;
               a small snapshot of a sandbox of that template can take one too (the runtime's can_start);
             - held for a paused sandbox's resume for `resume_keep_s` (at most `resume_most`);
             - made alongside a fork's checkpoint for its clones (`prepare_alongside`).

The priority rule: users go first. Restores and checkpoints someone waits for count as user work; the
refill scheduler starts nothing while any is under way, nor within REFILL_DELAY_S of a claim (the new
sandbox's first requests follow). One exception: a container a resume hold took from a template's stock
is put back at once (a loop of pauses and resumes would otherwise never leave a quiet moment for it).
The restore budget bounds how many starts run at once, users' and refills' together (default_budget).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from corral.orchestrator.envd_link import EnvdLink
from corral.runtime.base import (
    Prepared,
    Resources,
    Runtime,
    RuntimeError_,
    Sandbox,
    SandboxConfig,
    SandboxFailed,
    Snapshot,
    TemplateNotFound,
)

log = logging.getLogger("corral.capacity")

# After a failed refill (e.g. the host is out of memory) wait this long before trying it again.
RETRY_DELAY_S = 5.0
# A claim is followed by the new sandbox's first requests: refills wait this long after one.
REFILL_DELAY_S = 0.3
# Containers made while a fork's checkpoint is taken; fork x10 measured 1.80 s p50 with 2, 1.46 s with 4
# and 1.71 s with 8 (5 forks each on 2 cores).
PREPARE_ALONGSIDE = 4


def default_budget() -> int:
    """Starts at once, users' and refills' together: twice the cores, at least 4. A start waits on runsc's
    subprocesses and the kernel (mounts, netns) as much as it computes: a burst of 100 creates on 2 cores
    drained at 4.7-5.1/s with 2 at once, 5.1-5.8/s with 4, 4.8-6.3/s with 6 to 12 (docs/benchmarks.md)."""
    return max(4, 2 * (os.cpu_count() or 2))


@dataclass(frozen=True)
class WarmUp:
    """What the warm pool does in each sandbox it restores before handing it out, so that the pages it
    touches are faulted back in then rather than on the user's first requests (docs/platform.md)."""

    command: str = "true"  # run through a login shell as the SDK runs commands
    request: tuple[int, str] | None = None  # (port, path): an HTTP POST to the template's service


@dataclass
class _Hold:
    """Prepared containers kept for restores of one paused sandbox's snapshot."""

    snapshot: Snapshot
    done: asyncio.Event = field(default_factory=asyncio.Event)  # set to end the hold early
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # its preparation finished (or failed)
    task: asyncio.Task | None = None


class Capacity:
    def __init__(self, runtime: Runtime, envd: EnvdLink, template_snapshot: Callable[[str], Snapshot], *,
                 ready_templates: tuple[str, ...] = (), ready_size: int = 0, prepared_size: int = 0,
                 warm_ups: dict[str, WarmUp] | None = None, freeze_ready: bool = False,
                 warm_user: str = "user", resume_keep_s: float = 0.0, resume_most: int = 16,
                 budget: int | None = None, template_resources: dict[str, Resources] | None = None) -> None:
        self._runtime = runtime
        self._envd = envd
        self._template_snapshot = template_snapshot
        self._ready_templates = ready_templates
        self._ready_size = max(0, ready_size)
        self._prepared_size = max(0, prepared_size)
        self._warm_ups = warm_ups or {}
        self._freeze_ready = freeze_ready  # ready sandboxes wait frozen (no CPU) until claimed
        self._warm_user = warm_user
        # Templates whose sandboxes get other resources than the default: ready ones are started with them.
        self._template_resources = template_resources or {}
        self._resume_keep_s = resume_keep_s
        self._resume_most = resume_most
        self._budget = asyncio.Semaphore(budget or default_budget())
        self._ready: dict[str, deque[Sandbox]] = {}
        self._prepared: dict[Snapshot, list[Prepared]] = {}  # by the snapshot they restore
        self._stocked: set[Snapshot] = set()  # template snapshots kept at prepared_size
        self._replacing: Counter[Snapshot] = Counter()  # stock being put back outside the scheduler
        self._holds: OrderedDict[Snapshot, _Hold] = OrderedDict()  # paused sandboxes, oldest first
        self._tasks: set[asyncio.Task] = set()
        self._failed_at: dict[object, float] = {}  # refill target -> when it last failed
        self._user_work = 0
        self._quiet = asyncio.Event()  # set while no user work is under way
        self._quiet.set()
        self._last_claim = 0.0
        self._wake = asyncio.Event()
        self._retry: asyncio.TimerHandle | None = None  # wakes the scheduler when failed refills are due
        self._scheduler: asyncio.Task | None = None
        self._closed = False
        # Failed starts from a memory snapshot, by the container they were tried in: "prepared" (made ahead;
        # a new one is tried next) or "new" (the start failed). Read by /metrics; counts only grow.
        self.restore_failures: Counter[str] = Counter()

    # --- life ------------------------------------------------------------------------------------

    def open(self) -> None:
        self._scheduler = asyncio.get_running_loop().create_task(self._refill_forever())
        self._wake.set()

    async def close(self) -> None:
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        for hold in self._holds.values():
            hold.done.set()
        tasks = [t for t in (self._scheduler, *self._tasks) if t is not None]
        if self._scheduler is not None:
            self._scheduler.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for queue in self._ready.values():
            while queue:
                with contextlib.suppress(RuntimeError_):
                    await self._runtime.destroy(queue.popleft().id)
        for handles in self._prepared.values():
            while handles:
                await self._runtime.discard(handles.pop())

    # --- what is in stock --------------------------------------------------------------------------

    @property
    def ready_templates(self) -> tuple[str, ...]:
        return self._ready_templates

    def ready(self, template: str) -> int:
        return len(self._ready.get(template, ()))

    def ready_ids(self) -> set[str]:
        return {sb.id for queue in self._ready.values() for sb in queue}

    def prepared(self, snapshot: Snapshot) -> int:
        return len(self._prepared.get(snapshot, ()))

    def resume_ready(self) -> int:
        """Paused sandboxes whose resume is prepared right now."""
        return sum(1 for snapshot in self._holds if self._prepared.get(snapshot))

    # --- the priority rule ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def user_work(self):
        """Around work someone waits for (a restore, a checkpoint): refills wait until none is left."""
        self._user_work += 1
        self._quiet.clear()
        try:
            yield
        finally:
            self._user_work -= 1
            if not self._user_work:
                self._quiet.set()
                self._wake.set()

    # --- taking stock --------------------------------------------------------------------------------

    def claim_ready(self, template: str) -> Sandbox | None:
        """A ready sandbox, or None. A claimed sandbox belongs to the caller alone."""
        queue = self._ready.get(template)
        while queue:
            sandbox = queue.popleft()
            try:
                self._runtime.thaw(sandbox.id)
                self._runtime.raise_priority(sandbox.id)
            except (RuntimeError_, OSError) as exc:  # it died while it waited (e.g. destroyed from outside)
                log.warning("ready sandbox %s of %s is gone (%s); skipping it", sandbox.id, template, exc)
                self.spawn(self._destroy_quietly(sandbox.id))
                self._wake.set()
                continue
            self._claimed()
            return sandbox
        return None

    async def _destroy_quietly(self, sandbox_id: str) -> None:
        with contextlib.suppress(RuntimeError_):
            await self._runtime.destroy(sandbox_id)

    def _claimed(self) -> None:
        self._last_claim = time.monotonic()
        self._wake.set()

    async def start(self, snapshot: Snapshot, config: SandboxConfig, *, memory: bool = True,
                    stock: bool = False) -> Sandbox:
        """A sandbox started from `snapshot` for a user: in a container prepared for it (or one it can be
        adapted to), else in a new one. `stock` keeps containers prepared for later starts of this
        snapshot (worth it for templates, not for one-off snapshots)."""
        memory = memory and snapshot.has_memory  # a filesystem-only snapshot can only be cold-booted
        with self.user_work():
            taken = await self._take_prepared(snapshot, config.resources) if memory else None
            sandbox = await self._start(snapshot, config, taken, memory=memory)
        if stock and memory and snapshot.has_memory and config.resources == Resources():
            if snapshot not in self._stocked:
                self._stocked.add(snapshot)
            self._wake.set()
        return sandbox

    async def _start(self, snapshot: Snapshot, config: SandboxConfig, taken: Prepared | None, *,
                     memory: bool = True) -> Sandbox:
        """Starts `taken` (a container from stock) or, when there is none or it fails to start, a new one;
        under the budget. `taken` is discarded if this is cancelled before it starts."""
        try:
            async with self._budget:
                if taken is not None:
                    prepared, taken = taken, None  # start() owns it now: it tears it down if it fails
                    try:
                        return await self._runtime.start(prepared, config, snapshot)
                    except SandboxFailed as exc:
                        self.restore_failures["prepared"] += 1
                        # Made ahead, it can have died meanwhile (its host state removed from outside): the
                        # start then takes the ordinary way, once.
                        log.warning("container %s prepared for %s did not start (%s); starting a new one",
                                    prepared.id, snapshot.path.name, exc)
                self._runtime.check_capacity(config.resources, snapshot if memory else None)
                prepared = await self._runtime.prepare(snapshot, config.resources, cold=not memory)
                try:
                    return await self._runtime.start(prepared, config, snapshot if memory else None)
                except Exception:
                    if memory:
                        self.restore_failures["new"] += 1
                    raise
        finally:
            if taken is not None:  # cancelled while it waited for the budget
                await self._runtime.discard(taken)

    def prepared_ids(self) -> set[str]:
        """Ids of the prepared containers in stock (for every kind of stock)."""
        return {p.id for handles in self._prepared.values() for p in handles}

    async def _take_prepared(self, snapshot: Snapshot, resources: Resources, *,
                             claim: bool = True) -> Prepared | None:
        handles = self._prepared.get(snapshot)
        if handles and (found := _pop_fitting(handles, resources)) is not None:
            if claim:
                self._claimed()
            return found
        for base, handles in list(self._prepared.items()):
            if base in self._stocked and handles:
                candidate = next((h for h in handles if h.resources == resources), None)
                fits = candidate is not None and await self._runtime.can_start(candidate, snapshot)
                if fits and candidate in handles:  # not taken while can_start looked
                    handles.remove(candidate)
                    if claim:
                        self._claimed()
                    return candidate
        return None

    # --- paused sandboxes ------------------------------------------------------------------------------

    def hold_for_resume(self, snapshot: Snapshot, resources: Resources) -> None:
        """Prepares a resume from `snapshot` in the background and keeps it for resume_keep_s: a resume
        then skips ~130 ms of setup. The oldest hold beyond resume_most is released."""
        if self._closed or self._resume_keep_s <= 0 or self._resume_most <= 0 or snapshot in self._holds:
            return
        if not snapshot.has_memory:
            return  # a filesystem-only snapshot cold-boots: nothing to prepare
        while len(self._holds) >= self._resume_most:
            _, oldest = self._holds.popitem(last=False)
            oldest.done.set()
        hold = self._holds[snapshot] = _Hold(snapshot)
        hold.task = self.spawn(self._hold(hold, resources))

    async def _hold(self, hold: _Hold, resources: Resources) -> None:
        try:
            try:
                # A container stocked for the paused sandbox's template takes a small snapshot's layer in a
                # few ms (can_start): the resume is ready at once, even right after the pause. Its stock
                # is refilled later, when no user waits.
                prepared = await self._take_prepared(hold.snapshot, resources, claim=False)
                if prepared is None:
                    prepared = await self._runtime.prepare(hold.snapshot, resources)
                elif prepared.snapshot in self._stocked and prepared.snapshot != hold.snapshot:
                    self.spawn(self._replace_stock(prepared.snapshot))
            except Exception as exc:  # an optimisation only: the resume then does the whole restore
                log.info("could not prepare the resume from %s: %s", hold.snapshot.path.name, exc)
                return
            self._prepared.setdefault(hold.snapshot, []).append(prepared)
            hold.settled.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hold.done.wait(), self._resume_keep_s)
        finally:
            hold.settled.set()
            if self._holds.get(hold.snapshot) is hold:
                del self._holds[hold.snapshot]
            await self._drop(hold.snapshot)

    async def _replace_stock(self, snapshot: Snapshot) -> None:
        """Puts back the container a hold took from a template's stock, now rather than in a quiet moment:
        pause, resume and pause again leave none, and a loop of them would otherwise empty the stock."""
        self._replacing[snapshot] += 1
        try:
            await self._make_prepared(snapshot)
        except Exception as exc:  # the refill scheduler makes it up later
            log.info("could not replace a container of %s's stock: %s", snapshot.path.name, exc)
        finally:
            self._replacing[snapshot] -= 1
            self._wake.set()

    async def settled(self, snapshot: Snapshot, timeout: float = 5.0) -> None:
        """Waits while the resume from `snapshot` is being prepared: a resume right after its pause then
        takes the container being made instead of making a second one next to it."""
        hold = self._holds.get(snapshot)
        if hold is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hold.settled.wait(), timeout)

    def used(self, snapshot: Snapshot) -> None:
        """A start from `snapshot` took (or did without) what was held: stop holding it."""
        if (hold := self._holds.get(snapshot)) is not None:
            hold.done.set()

    async def release(self, directory: Path) -> None:
        """Frees everything prepared for the snapshot in `directory` (its paused sandbox was killed, its
        node deleted)."""
        snapshot = next((s for s in [*self._holds, *self._prepared, *self._stocked] if s.path == directory), None)
        if snapshot is None:
            return
        hold = self._holds.get(snapshot)
        if hold is not None:
            hold.done.set()
            if hold.task is not None:
                with contextlib.suppress(Exception):
                    await hold.task
        self._stocked.discard(snapshot)
        await self._drop(snapshot)

    async def _drop(self, snapshot: Snapshot) -> None:
        for prepared in self._prepared.pop(snapshot, []):
            await self._runtime.discard(prepared)

    # --- forks -----------------------------------------------------------------------------------------

    async def prepare_alongside(self, template: str, lowers_of: Sandbox, count: int) -> None:
        """Prepares up to `count` containers that starts from a checkpoint of sandbox `lowers_of` can take,
        while that checkpoint is being taken (a fork). Only for sandboxes of a stocked template, whose
        small checkpoints fit its containers; others stack their layer on new containers anyway."""
        base = next((s for s in self._stocked if s.template == template), None)
        if base is None or lowers_of.config.resources != Resources():
            return
        handles = self._prepared.setdefault(base, [])
        gate = asyncio.Semaphore(2)

        async def one() -> None:
            async with gate:
                prepared = await self._runtime.prepare(base, Resources())
            if self._closed or base not in self._stocked:  # released meanwhile (template rebuilt, closing)
                await self._runtime.discard(prepared)
            else:
                self._prepared.setdefault(base, []).append(prepared)

        # Only as many as can be made while the checkpoint is taken (~150 ms, two at a time): more would
        # hold up the restores that wait for this, and be left over if they fail.
        wanted = min(count, len(handles) + PREPARE_ALONGSIDE) - len(handles)
        results = await asyncio.gather(*(one() for _ in range(max(0, wanted))), return_exceptions=True)
        for failure in (r for r in results if isinstance(r, BaseException)):
            log.info("preparing containers for clones of %s: %s", lowers_of.id, failure)

    # --- the refill scheduler ----------------------------------------------------------------------------

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _next_refill(self) -> tuple[str, object] | None:
        """The most useful thing to make next: a ready sandbox, then a prepared container."""
        now = time.monotonic()

        def due(target: object) -> bool:
            return now - self._failed_at.get(target, -RETRY_DELAY_S) >= RETRY_DELAY_S

        for template in self._ready_templates:
            if self._ready_size and len(self._ready.setdefault(template, deque())) < self._ready_size \
                    and due(template):
                return "ready", template
        for snapshot in list(self._stocked):
            stock = len(self._prepared.get(snapshot, ())) + self._replacing[snapshot]
            if stock < self._prepared_size and due(snapshot):
                return "prepared", snapshot
        return None

    async def _refill_forever(self) -> None:
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            while not self._closed and (job := self._next_refill()) is not None:
                await self._quiet.wait()
                pause = self._last_claim + REFILL_DELAY_S - time.monotonic()
                if pause > 0:
                    await asyncio.sleep(pause)
                    continue  # someone may have claimed or started meanwhile: look again
                kind, target = job
                try:
                    if kind == "ready":
                        await self._make_ready(target)  # type: ignore[arg-type]
                    else:
                        await self._make_prepared(target)  # type: ignore[arg-type]
                except asyncio.CancelledError:
                    raise
                except TemplateNotFound as exc:
                    log.warning("not pooling %s: %s", target, exc)
                    self._failed_at[target] = float("inf")
                except Exception as exc:
                    log.warning("refilling %s %s failed: %s", kind, target, exc)
                    self._failed_at[target] = time.monotonic()
                    if self._retry is not None:
                        self._retry.cancel()
                    self._retry = asyncio.get_running_loop().call_later(RETRY_DELAY_S, self._wake.set)

    async def _make_prepared(self, snapshot: Snapshot) -> None:
        async with self._budget:
            prepared = await self._runtime.prepare(snapshot, Resources())
        if self._closed or snapshot not in self._stocked:
            await self._runtime.discard(prepared)
            return
        self._prepared.setdefault(snapshot, []).append(prepared)

    async def _make_ready(self, template: str) -> None:
        snapshot = self._template_snapshot(template)
        resources = self._template_resources.get(template, Resources())
        taken = await self._take_prepared(snapshot, resources, claim=False)
        sandbox = await self._start(snapshot, SandboxConfig(low_priority=True, resources=resources), taken,
                                    memory=snapshot.has_memory)
        self._stocked.add(snapshot)
        try:
            await self._envd.wait_ready(sandbox.address)
            warm_up = self._warm_ups.get(template, WarmUp())
            await self._envd.warm(sandbox.address, self._warm_user, warm_up.command)
            if warm_up.request:
                await self._envd.warm_service(sandbox.address, *warm_up.request)
            if self._closed:
                raise asyncio.CancelledError
        except BaseException:
            with contextlib.suppress(RuntimeError_):
                await self._runtime.destroy(sandbox.id)
            raise
        if self._freeze_ready:
            self._runtime.freeze(sandbox.id)
        self._ready[template].append(sandbox)


def _pop_fitting(handles: list[Prepared], resources: Resources) -> Prepared | None:
    for i, handle in enumerate(handles):
        if handle.resources == resources:
            return handles.pop(i)
    return None
