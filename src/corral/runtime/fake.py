"""An in-memory backend for tests of everything above the runtime: the capacity manager, the registry,
lifecycle and branching run against it without root, runsc or a network, in milliseconds.

`FakeRuntime` keeps the same discipline as a real backend: one table of containers with explicit states
(corral.runtime.containers), teardown exactly once (concurrent destroys wait for it), a cancelled or
failed prepare or start leaves nothing behind. What a container holds is an address (127.0.1.x, where
nothing listens): it is handed out at prepare and must be given back exactly once; a second release is
recorded as a violation, and `assert_clean()` fails on it, on containers left in any state and on
addresses still out.

Tests steer it per operation ("prepare", "start", "checkpoint", "teardown", "exec"; `FakeEnvd`: "init",
"wait_ready", ...):
    fake.delays["prepare"] = 0.05              every prepare takes 50 ms
    fake.fail_next("start", SandboxFailed("x")) the next start fails (after its delay)
    gate = fake.block("checkpoint")            checkpoints wait until gate.set()
    await fake.called("prepare", 3)            until the third prepare has begun
    fake.die(prepared.id)                      the container is dead: starting it fails
    fake.calls["start"], fake.peak["start"]    how many began; most running at once

Snapshots are directories with a small JSON file (and a `memory` file while they have memory), so
CheckpointFiles can size, copy and reclaim them; the format is this module's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import json
import shutil
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from pathlib import Path

from corral.orchestrator.envd_link import EnvdUnavailable
from corral.runtime.base import (
    CheckpointInvalid,
    ContainerState,
    ExecResult,
    InsufficientResources,
    Prepared,
    Resources,
    Runtime,
    Sandbox,
    SandboxConfig,
    SandboxFailed,
    SandboxNotFound,
    Snapshot,
    Stats,
    TemplateNotFound,
)
from corral.runtime.containers import ContainerTable
from corral.storage.disk import tree_size

S = ContainerState
META = "fake-snapshot.json"
MEMORY = "memory"
FIRST_ADDRESS = ipaddress.IPv4Address("127.0.1.1")


class Injectable:
    """Per-operation delays, gates, failures and counters shared by the fakes."""

    def __init__(self) -> None:
        self.delays: dict[str, float] = {}
        self.calls: Counter[str] = Counter()  # operations begun
        self.active: Counter[str] = Counter()  # under way right now
        self.peak: Counter[str] = Counter()  # most under way at once
        self._gates: dict[str, asyncio.Event] = {}
        self._failures: dict[str, deque[BaseException]] = {}
        self._waiters: list[tuple[str, int, asyncio.Future]] = []

    def fail_next(self, operation: str, error: BaseException, times: int = 1) -> None:
        """The next `times` calls of `operation` raise `error` (after their delay and gate)."""
        self._failures.setdefault(operation, deque()).extend([error] * times)

    def block(self, operation: str) -> asyncio.Event:
        """Calls of `operation` wait until the returned event is set."""
        gate = self._gates[operation] = asyncio.Event()
        return gate

    async def called(self, operation: str, times: int = 1) -> None:
        """Returns once `operation` has begun `times` times in all."""
        if self.calls[operation] >= times:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((operation, times, waiter))
        await waiter

    @contextlib.asynccontextmanager
    async def operation(self, name: str):
        self.calls[name] += 1
        for waiting in [w for w in self._waiters if w[0] == name and self.calls[name] >= w[1]]:
            self._waiters.remove(waiting)
            if not waiting[2].done():
                waiting[2].set_result(None)
        self.active[name] += 1
        self.peak[name] = max(self.peak[name], self.active[name])
        try:
            if delay := self.delays.get(name):
                await asyncio.sleep(delay)
            if (gate := self._gates.get(name)) is not None:
                await gate.wait()
            if failures := self._failures.get(name):
                raise failures.popleft()
            yield
        finally:
            self.active[name] -= 1


@dataclass(frozen=True, eq=False, repr=False)
class FakeSnapshot(Snapshot):
    path: Path
    template: str
    lowers: tuple[Path, ...]  # the snapshot directories it stands on, nearest first

    @property
    def has_memory(self) -> bool:
        return (self.path / MEMORY).is_file()

    @property
    def stands_on(self) -> frozenset[Path]:
        return frozenset(self.lowers)

    @property
    def layers(self) -> tuple[Path, ...]:
        """What a container started from it stands on: itself and what it stands on."""
        return (self.path, *self.lowers)

    @property
    def size_bytes(self) -> int:
        return tree_size(self.path) if self.path.is_dir() else 0

    def drop_memory(self) -> int:
        memory = self.path / MEMORY
        if not memory.is_file():
            return 0
        freed = memory.stat().st_size
        memory.unlink()
        return freed


def write_snapshot(path: Path, template: str, lowers: tuple[Path, ...], *, memory: bool = True) -> None:
    """Writes a snapshot directory, aside and renamed into place (it never looks complete half-way)."""
    staging = path.with_name(f".{path.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / META).write_text(json.dumps({"template": template, "lowers": [str(p) for p in lowers]}))
    if memory:
        (staging / MEMORY).write_bytes(b"\0" * 4096)
    if path.exists():
        path.rmdir()
    staging.rename(path)


@dataclass(eq=False)
class FakeContainer:
    id: str
    template: str
    address: str
    config: SandboxConfig
    stands_on: frozenset[Path]
    snapshot: Snapshot | None = None  # what a PREPARED container was made to restore
    started_from: FakeSnapshot | None = None
    created_at: float = field(default_factory=time.time)
    state: ContainerState = ContainerState.PREPARING
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    teardown: asyncio.Task | None = None
    dead: bool = False
    frozen: bool = False
    operations: int = 0
    cpu_seconds: float = 0.0
    connections: int = 0

    def public(self) -> Sandbox:
        return Sandbox(id=self.id, template=self.template, address=self.address, config=self.config,
                       created_at=self.created_at)


class FakeRuntime(Injectable, Runtime):
    name = "fake"

    def __init__(self, root: Path, *, max_containers: int | None = None) -> None:
        super().__init__()
        self.root = root
        self.max_containers = max_containers  # check_capacity refuses beyond this many containers
        self.table: ContainerTable[FakeContainer] = ContainerTable()
        self.exec_result = ExecResult(exit_code=0, stdout=b"", stderr=b"")
        self.opened = False
        self.teardowns: Counter[str] = Counter()  # container id -> teardowns run (must stay at 1)
        self.violations: list[str] = []  # double releases and the like: assert_clean() reports them
        self._handles: dict[str, Prepared] = {}
        self._addresses: set[int] = set()
        self._ids = itertools.count(1)

    # ---------------------------------------------------------------- for tests

    def make_template(self, name: str) -> FakeSnapshot:
        """A built template: a snapshot with memory under `<root>/templates/<name>`."""
        path = self.template_path(name, built=False)
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_snapshot(path, name, ())
        return self.open_snapshot(path)

    def template_path(self, name: str, *, built: bool = True) -> Path:
        """Where template `name`'s snapshot is (a `resolve_template` for the orchestrator)."""
        path = self.root / "templates" / name
        if built and not (path / META).is_file():
            raise TemplateNotFound(f"template {name} is not built")
        return path

    def die(self, container_id: str) -> None:
        """The container dies: starting it fails, its envd stops answering."""
        container = self.table.get(container_id)
        if container is None:
            raise SandboxNotFound(f"container {container_id} does not exist")
        container.dead = True

    def answers(self, address: str) -> bool:
        """Whether envd would answer at `address`: a live sandbox that is not dead or frozen has it."""
        return any(c.address == address and not c.dead and not c.frozen for c in self.table.in_state(S.LIVE))

    def containers(self, *states: ContainerState) -> list[FakeContainer]:
        return self.table.in_state(*states) if states else list(self.table)

    async def destroy_all(self) -> None:
        for container in self.table:
            await self._teardown(container)

    def assert_clean(self) -> None:
        """Nothing left: no container in any state, every address given back, nothing freed twice."""
        problems = list(self.violations)
        problems += [f"container {c.id} left {c.state.value}" for c in self.table]
        problems += [f"address {FIRST_ADDRESS + i} never released" for i in sorted(self._addresses)]
        if problems:
            raise AssertionError("the fake runtime is not clean: " + "; ".join(problems))

    # ---------------------------------------------------------------- the backend as a whole

    async def open(self) -> None:
        self.opened = True

    async def close(self) -> None:
        for container in self.table.in_state(S.PREPARING, S.PREPARED, S.STARTING):
            await self._teardown(container)
        self.opened = False

    async def snapshot_compat(self) -> str:
        return "fake 1"

    # ---------------------------------------------------------------- snapshots

    def open_snapshot(self, path: Path) -> FakeSnapshot:
        try:
            meta = json.loads((path / META).read_text())
            return FakeSnapshot(path=path, template=meta["template"], lowers=tuple(Path(p) for p in meta["lowers"]))
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointInvalid(f"{path} is not a snapshot: {exc}") from None

    def copy_snapshot(self, source: Snapshot, path: Path) -> FakeSnapshot:
        staging = path.with_name(f".{path.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source.path, staging)
        staging.rename(path)
        return self.open_snapshot(path)

    def check_capacity(self, resources: Resources, snapshot: Snapshot | None = None, count: int = 1) -> None:
        resources.validate()
        if self.max_containers is not None and len(self.table) + count > self.max_containers:
            raise InsufficientResources(f"{count} more container(s) do not fit: {len(self.table)} of "
                                        f"{self.max_containers} are in use")

    def in_use(self) -> frozenset[Path]:
        return frozenset(path for c in self.table for path in c.stands_on)

    # ---------------------------------------------------------------- containers

    async def prepare(self, snapshot: Snapshot, resources: Resources, *, cold: bool = False) -> Prepared:
        assert isinstance(snapshot, FakeSnapshot)
        restores = None if cold or not snapshot.has_memory else snapshot
        c = await self._prepare(snapshot.template, frozenset(snapshot.layers), resources, restores)
        c.started_from = snapshot
        return self._handle(c)

    async def prepare_boot(self, layers: list[Path], command: list[str], resources: Resources, *,
                           template: str = "", cwd: str = "/") -> Prepared:
        for layer in layers:
            if not layer.is_dir():
                raise TemplateNotFound(f"root filesystem layer {layer} does not exist")
        return self._handle(await self._prepare(template, frozenset(layers), resources, None))

    async def _prepare(self, template: str, stands_on: frozenset[Path], resources: Resources,
                       restores: Snapshot | None) -> FakeContainer:
        self.check_capacity(resources)
        c = self.table.add(FakeContainer(id=f"fake{next(self._ids):04d}", template=template,
                                         address=self._allocate_address(), config=SandboxConfig(resources=resources),
                                         stands_on=stands_on, snapshot=restores))
        try:
            async with self.operation("prepare"):
                pass
            _still(c, S.PREPARING)
        except BaseException:  # cancellation too: nothing half-made may stay behind
            await self._teardown(c)
            raise
        self.table.move(c, S.PREPARED)
        return c

    def _handle(self, c: FakeContainer) -> Prepared:
        handle = self._handles[c.id] = Prepared(c.id, c.snapshot, c.config.resources)
        return handle

    async def can_start(self, prepared: Prepared, snapshot: Snapshot) -> bool:
        """Prepared for `snapshot`, or for the snapshot a checkpoint was taken above (as gVisor adapts a
        container prepared for a template to a small snapshot of a sandbox of it)."""
        base = prepared.snapshot
        if base is None or not isinstance(snapshot, FakeSnapshot) or not snapshot.has_memory:
            return False
        assert isinstance(base, FakeSnapshot)
        return base == snapshot or snapshot.lowers == base.layers

    def prepared(self) -> list[Prepared]:
        return [self._handles[c.id] for c in self.table.in_state(S.PREPARED) if c.id in self._handles]

    async def discard(self, prepared: Prepared) -> None:
        self.calls["discard"] += 1
        container = self.table.get(prepared.id)
        if container is not None:
            await self._teardown(container)

    async def start(self, prepared: Prepared, config: SandboxConfig, snapshot: Snapshot | None = None) -> Sandbox:
        c = self.table.get(prepared.id)
        if c is None or c.state is not S.PREPARED:
            raise SandboxFailed(f"container {prepared.id} is not prepared (it was started or discarded)")
        self._handles.pop(c.id, None)
        self.table.move(c, S.STARTING)
        target = snapshot or c.snapshot
        try:
            async with self.operation("start"):
                if c.dead:
                    raise SandboxFailed(f"restoring checkpoint failed: container {c.id} is dead")
                if target is not None and not target.has_memory:
                    raise SandboxFailed(f"restoring checkpoint failed: {target.path} has no memory image")
            if isinstance(target, FakeSnapshot) and target != c.snapshot:
                c.stands_on |= frozenset(target.layers)
                c.started_from = target
            c.config = config
            _still(c, S.STARTING)
        except BaseException:
            await self._teardown(c)
            raise
        self.table.move(c, S.LIVE)
        return c.public()

    async def checkpoint(self, sandbox_id: str, directory: Path, *, leave_running: bool = True,
                         memory: bool = True) -> FakeSnapshot:
        c = self.table.live(sandbox_id)
        if directory.exists() and any(directory.iterdir()):
            raise CheckpointInvalid(f"checkpoint directory {directory} is not empty")
        c.frozen = False
        c.operations += 1
        try:
            self.table.move(c, S.CHECKPOINTING)
            try:
                async with self.operation("checkpoint"):
                    lowers = c.started_from.layers if c.started_from is not None else tuple(c.stands_on)
                    directory.parent.mkdir(parents=True, exist_ok=True)
                    write_snapshot(directory, c.template, lowers, memory=memory)
            finally:
                if c.state is S.CHECKPOINTING:
                    self.table.move(c, S.LIVE)
        finally:
            c.operations -= 1
        if not leave_running:
            await self._teardown(c)
        return self.open_snapshot(directory)

    async def destroy(self, sandbox_id: str) -> None:
        self.calls["destroy"] += 1
        c = self.table.get(sandbox_id)
        if c is None or c.state in (S.PREPARING, S.PREPARED):
            raise SandboxNotFound(f"sandbox {sandbox_id} does not exist")
        await self._teardown(c)

    async def _teardown(self, c: FakeContainer) -> None:
        """The first caller starts the one teardown as its own task (a cancelled caller does not interrupt
        it); every caller waits for it."""
        if c.state not in (S.TEARING_DOWN, S.GONE):
            self.table.move(c, S.TEARING_DOWN)
            self._handles.pop(c.id, None)
            c.teardown = asyncio.get_running_loop().create_task(self._free(c))
        if c.teardown is not None:
            await asyncio.shield(c.teardown)

    async def _free(self, c: FakeContainer) -> None:
        self.teardowns[c.id] += 1
        if self.teardowns[c.id] > 1:
            self.violations.append(f"container {c.id} torn down {self.teardowns[c.id]} times")
        try:
            async with self.operation("teardown"):
                pass
        finally:
            try:
                self._release_address(c.address)
            finally:
                self.table.move(c, S.GONE)

    def _allocate_address(self) -> str:
        index = next(i for i in itertools.count() if i not in self._addresses)
        self._addresses.add(index)
        return str(FIRST_ADDRESS + index)

    def _release_address(self, address: str) -> None:
        index = int(ipaddress.IPv4Address(address)) - int(FIRST_ADDRESS)
        if index not in self._addresses:
            self.violations.append(f"address {address} released twice")
            raise AssertionError(f"address {address} released twice")
        self._addresses.discard(index)

    # ---------------------------------------------------------------- running sandboxes

    def list(self) -> list[Sandbox]:
        return [c.public() for c in self.table.in_state(S.LIVE, S.CHECKPOINTING)]

    def state(self, sandbox_id: str) -> ContainerState:
        c = self.table.get(sandbox_id)
        return c.state if c is not None else S.GONE

    def address(self, sandbox_id: str, port: int) -> tuple[str, int]:
        return self.table.live(sandbox_id).address, port

    async def exec(self, sandbox_id: str, argv: list[str], *, env: dict[str, str] | None = None,
                   cwd: str | None = None, user: str | None = None, timeout: float = 60,
                   on_output=None) -> ExecResult:
        c = self.table.live(sandbox_id)
        c.frozen = False
        c.operations += 1
        try:
            async with self.operation("exec"):
                if c.dead:
                    raise SandboxFailed(f"sandbox {sandbox_id} is dead")
        finally:
            c.operations -= 1
        return self.exec_result

    def raise_priority(self, sandbox_id: str) -> None:
        c = self.table.live(sandbox_id)
        c.config = replace(c.config, low_priority=False)

    def freeze(self, sandbox_id: str) -> bool:
        c = self.table.live(sandbox_id)
        if c.operations or c.state is not S.LIVE:
            return False
        c.frozen = True
        return True

    def thaw(self, sandbox_id: str) -> None:
        self.table.live(sandbox_id).frozen = False

    def is_frozen(self, sandbox_id: str) -> bool:
        return self.table.live(sandbox_id).frozen

    def host_cpu_seconds(self, sandbox_id: str) -> float | None:
        return self.table.live(sandbox_id).cpu_seconds

    def host_connections(self, sandbox_id: str) -> int | None:
        return self.table.live(sandbox_id).connections

    async def set_internet(self, sandbox_id: str, enabled: bool) -> None:
        c = self.table.live(sandbox_id)
        c.config = replace(c.config, internet=enabled)

    async def attach_volumes(self, sandbox_id: str, volumes) -> None:
        c = self.table.live(sandbox_id)
        c.config = replace(c.config, volumes=(*c.config.volumes, *volumes))

    async def set_egress_rules(self, sandbox_id: str, allow: tuple[str, ...], deny: tuple[str, ...],
                               domains: tuple[str, ...] = (), rules: dict | None = None) -> None:
        c = self.table.live(sandbox_id)
        c.config = replace(c.config, egress_allow=tuple(allow), egress_deny=tuple(deny),
                           egress_domains=tuple(domains), egress_rules=dict(rules or {}))

    async def stats(self, sandbox_id: str) -> Stats:
        c = self.table.live(sandbox_id)
        return Stats(cpu_seconds=c.cpu_seconds, memory_bytes=0, disk_used_bytes=0,
                     disk_total_bytes=c.config.resources.disk_mb * 2**20)

    def log_tail(self, sandbox_id: str, lines: int = 20) -> str:
        if self.table.get(sandbox_id) is None:
            raise SandboxNotFound(f"sandbox {sandbox_id} does not exist")
        return ""


def _still(c: FakeContainer, state: ContainerState) -> None:
    if c.state is not state:
        raise SandboxFailed(f"container {c.id} was torn down while {state.value}")


class FakeEnvd(Injectable):
    """Stands in for the orchestrator's EnvdLink (no envd listens at a fake sandbox's address): answers
    for live sandboxes of `runtime` that are not dead or frozen, EnvdUnavailable otherwise."""

    def __init__(self, runtime: FakeRuntime) -> None:
        super().__init__()
        self._runtime = runtime
        self.tokens: dict[str, str] = {}  # address -> the token its last /init handed over
        self.volumes: dict[str, list[dict]] = {}  # address -> the volume mounts its last /init handed over
        # address -> what its OOM guard reports in /metrics (`oom_kills`, `oom_last`), set by tests
        self.oom: dict[str, dict] = {}

    async def _answer(self, operation: str, address: str) -> None:
        async with self.operation(operation):
            if not self._runtime.answers(address):
                raise EnvdUnavailable(f"envd at {address} does not answer")

    async def close(self) -> None:
        pass

    async def trust(self, address: str, token: str, pem: str) -> None:
        await self._answer("trust", address)

    async def wait_ready(self, address: str, timeout: float = 30.0) -> None:
        await self._answer("wait_ready", address)

    async def wait_listening(self, address: str, timeout: float = 30.0) -> None:
        await self._answer("wait_listening", address)

    async def warm(self, address: str, user: str, command: str = "true") -> None:
        await self._answer("warm", address)

    async def warm_service(self, address: str, port: int, path: str) -> None:
        await self._answer("warm_service", address)

    async def init(self, address: str, *, token: str, env_vars: dict[str, str], user: str | None = None,
                   workdir: str | None = None,
                   hostname: str | None = None, current_token: str | None = None,
                   trusted_certificates: str | None = None, volumes: tuple = ()) -> None:
        await self._answer("init", address)
        self.tokens[address] = token
        self.volumes[address] = [{"id": v.id, "path": v.path} for v in volumes]

    async def metrics(self, address: str, token: str) -> dict:
        await self._answer("metrics", address)
        return {"ts": time.time(), "cpu_count": 2, "cpu_used_pct": 0.0, "mem_used": 0, "mem_total": 2**29,
                "mem_cache": 0, "disk_used": 0, "disk_total": 2**31, **self.oom.get(address, {})}
