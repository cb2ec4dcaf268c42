"""Execution contexts: one Jupyter kernel each, with its language and working directory."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from dataclasses import dataclass, field

from jupyter_client.kernelspec import NoSuchKernel
from jupyter_client.manager import AsyncKernelManager

from corral.interpreter.iopub import IOPub

# Language names the SDKs send -> Jupyter kernel names installed in the template. JavaScript and
# TypeScript share Deno's kernel (TypeScript runs as is, type annotations and all). R is IRkernel (`ir`, as
# Debian installs it), Java is JJava (`java`).
KERNELS = {"python": "python3", "bash": "bash", "javascript": "deno", "typescript": "deno", "r": "ir",
           "java": "java"}
ALIASES = {"py": "python", "python3": "python", "sh": "bash", "shell": "bash", "js": "javascript",
           "node": "javascript", "ts": "typescript"}
# Languages whose default context exists from the start, as on E2B (listed at once; a kernel that is not
# running yet starts on first use, so only Python's is part of the template's snapshot).
DEFAULT_LANGUAGES = ("python", "javascript")
# Kernels whose IOPub output may arrive after their `idle` status (Deno's does, by up to ~50 ms): an
# execution on them ends with a fence instead (see execute.py).
LATE_OUTPUT_KERNELS = {"deno"}


class UnknownLanguage(Exception):
    pass


class KernelStartFailed(Exception):
    """A kernel that could not be run, exited, or did not answer while starting (the message says which)."""


KERNEL_READY_S = 60
# envd's OOM guard SIGKILLs the largest process when the sandbox runs out of memory; a kernel being started
# (a JVM especially, ~250 MB) is often that process when other kernels already hold the rest.
_OUT_OF_MEMORY_HINT = ("the likeliest cause is that the sandbox ran out of memory (envd's OOM guard kills "
                       "the largest process); kernels of other contexts hold memory while they run: remove "
                       "contexts no longer needed, then try again")


def normalise(language: str | None) -> str:
    name = (language or "python").strip().lower()
    name = ALIASES.get(name, name)
    if name not in KERNELS:
        raise UnknownLanguage(f"language {language!r} is not supported here; available: "
                              f"{', '.join(sorted(KERNELS))}")
    return name


@dataclass
class Context:
    id: str
    language: str
    cwd: str
    manager: AsyncKernelManager
    client: object | None  # AsyncKernelClient, while the kernel runs
    iopub: IOPub | None = None  # the client's IOPub messages (nothing else reads that socket)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one execution (or restart, removal) at a time
    start_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    prepared: bool = False  # the kernel's setup code and the sandbox's env vars have run in it

    @property
    def started(self) -> bool:
        return self.client is not None

    @property
    def kernel(self) -> str:
        return KERNELS[self.language]

    def public(self) -> dict:
        return {"id": self.id, "language": self.language, "cwd": self.cwd}

    async def start(self) -> None:
        """Starts the kernel unless it runs; UnknownLanguage if the template has no kernel for it."""
        async with self.start_lock:
            if not self.started:
                await self._start()

    async def _start(self) -> None:
        env = {**os.environ, "PWD": self.cwd}
        try:
            await self.manager.start_kernel(cwd=self.cwd, env=env)
        except NoSuchKernel as e:
            raise UnknownLanguage(f"no {self.language} kernel is installed in this sandbox ({e})") from None
        except OSError as e:  # its program cannot be run
            raise KernelStartFailed(f"the {self.language} kernel could not be started: {e}") from None
        await self._connect()

    async def _connect(self) -> None:
        client = self.manager.client()
        client.start_channels()
        try:
            await client.wait_for_ready(timeout=KERNEL_READY_S)  # reads IOPub itself: the reader comes after
        except RuntimeError:  # jupyter_client's for a kernel that died first or never answered
            client.stop_channels()
            raise KernelStartFailed(await self._start_failure()) from None
        self.iopub = IOPub(client)
        self.client = client
        self.prepared = False

    async def _start_failure(self) -> str:
        """Why the kernel being started is not ready, once it is stopped (what is left of it is cleaned up)."""
        provisioner = self.manager.provisioner
        status = await provisioner.poll() if provisioner is not None else None
        with contextlib.suppress(Exception):
            await self.manager.shutdown_kernel(now=True)
        what = f"the {self.language} kernel ({self.kernel})"
        if status is None:
            return f"{what} did not answer within {KERNEL_READY_S} s of starting and was stopped"
        if status == -signal.SIGKILL:
            return f"{what} was killed (SIGKILL) while starting: {_OUT_OF_MEMORY_HINT}"
        if status < 0:
            return f"{what} was killed by signal {-status} while starting"
        return f"{what} exited with status {status} while starting"

    def _disconnect(self) -> None:
        if self.iopub is not None:
            self.iopub.close()
            self.iopub = None
        if self.client is not None:
            self.client.stop_channels()
            self.client = None

    async def stop(self) -> None:
        async with self.start_lock:
            if self.started:
                self._disconnect()
                await self.manager.shutdown_kernel(now=True)

    async def restart(self) -> None:
        """A fresh kernel (started, if it never was)."""
        async with self.start_lock:
            if not self.started:
                await self._start()
                return
            self._disconnect()
            await self.manager.restart_kernel(now=True)
            await self._connect()


class ContextTable:
    def __init__(self, default_cwd: str) -> None:
        self.default_cwd = default_cwd
        self._contexts: dict[str, Context] = {}
        self._defaults: dict[str, str] = {}  # kernel name -> id of its default context
        for language in DEFAULT_LANGUAGES:
            self._default_context(language)

    def _new(self, language: str, cwd: str | None) -> Context:
        return Context(id=str(uuid.uuid4()), language=language, cwd=cwd or self.default_cwd,
                       manager=AsyncKernelManager(kernel_name=KERNELS[language]), client=None)

    async def create(self, language: str | None, cwd: str | None) -> Context:
        ctx = self._new(normalise(language), cwd)
        await ctx.start()
        self._contexts[ctx.id] = ctx
        return ctx

    def _default_context(self, language: str) -> Context:
        ctx_id = self._defaults.get(KERNELS[language])
        if ctx_id is None or ctx_id not in self._contexts:
            ctx = self._new(language, None)
            self._contexts[ctx.id] = ctx
            self._defaults[KERNELS[language]] = ctx.id
            return ctx
        return self._contexts[ctx_id]

    async def default(self, language: str | None) -> Context:
        """The language's default context, its kernel started (one per kernel: `js` and `ts` share)."""
        name = normalise(language)
        ctx = self._default_context(name)
        try:
            await ctx.start()
        except (UnknownLanguage, KernelStartFailed):
            if name not in DEFAULT_LANGUAGES:  # not listed then: it never existed
                self._contexts.pop(ctx.id, None)
                self._defaults.pop(KERNELS[name], None)
            raise
        return ctx

    def get(self, ctx_id: str) -> Context | None:
        if ctx_id == "default":
            ctx_id = self._defaults.get(KERNELS["python"], "")
        return self._contexts.get(ctx_id)

    def all(self) -> list[Context]:
        return list(self._contexts.values())

    async def remove(self, ctx_id: str) -> bool:
        ctx = self._contexts.pop(ctx_id, None)
        if ctx is None:
            return False
        self._defaults = {k: v for k, v in self._defaults.items() if v != ctx_id}
        await ctx.stop()
        return True
