"""Execution contexts: one Jupyter kernel each, with its language and working directory."""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass, field

from jupyter_client.kernelspec import NoSuchKernel
from jupyter_client.manager import AsyncKernelManager

from corral.interpreter.iopub import IOPub

# Language names the SDKs send -> Jupyter kernel names installed in the template. JavaScript and
# TypeScript share Deno's kernel (TypeScript runs as is, type annotations and all).
KERNELS = {"python": "python3", "bash": "bash", "javascript": "deno", "typescript": "deno"}
ALIASES = {"py": "python", "python3": "python", "sh": "bash", "shell": "bash", "js": "javascript",
           "node": "javascript", "ts": "typescript"}
# Kernels whose IOPub output may arrive after their `idle` status (Deno's does, by up to ~50 ms): an
# execution on them ends with a fence instead (see execute.py).
LATE_OUTPUT_KERNELS = {"deno"}


class UnknownLanguage(Exception):
    pass


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
    client: object  # AsyncKernelClient
    iopub: IOPub | None = None  # the client's IOPub messages (nothing else reads that socket)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    sandbox_env_applied: bool = False

    @property
    def kernel(self) -> str:
        return KERNELS[self.language]

    def public(self) -> dict:
        return {"id": self.id, "language": self.language, "cwd": self.cwd}

    async def start(self) -> None:
        env = {**os.environ, "PWD": self.cwd}
        await self.manager.start_kernel(cwd=self.cwd, env=env)
        await self._connect()

    async def _connect(self) -> None:
        self.client = self.manager.client()
        self.client.start_channels()
        await self.client.wait_for_ready(timeout=60)  # reads IOPub itself: the reader comes after
        self.iopub = IOPub(self.client)
        self.sandbox_env_applied = False

    def _disconnect(self) -> None:
        if self.iopub is not None:
            self.iopub.close()
            self.iopub = None
        self.client.stop_channels()

    async def stop(self) -> None:
        self._disconnect()
        await self.manager.shutdown_kernel(now=True)

    async def restart(self) -> None:
        self._disconnect()
        await self.manager.restart_kernel(now=True)
        await self._connect()


class ContextTable:
    def __init__(self, default_cwd: str) -> None:
        self.default_cwd = default_cwd
        self._contexts: dict[str, Context] = {}
        self._defaults: dict[str, str] = {}  # kernel name -> id of its default context

    async def create(self, language: str | None, cwd: str | None) -> Context:
        name = normalise(language)
        ctx = Context(id=str(uuid.uuid4()), language=name, cwd=cwd or self.default_cwd,
                      manager=AsyncKernelManager(kernel_name=KERNELS[name]), client=None)
        try:
            await ctx.start()
        except NoSuchKernel as e:
            raise UnknownLanguage(f"no {name} kernel is installed in this sandbox ({e})") from None
        self._contexts[ctx.id] = ctx
        return ctx

    async def default(self, language: str | None) -> Context:
        """The language's default context, created on first use (one per kernel: `js` and `ts` share)."""
        name = normalise(language)
        ctx_id = self._defaults.get(KERNELS[name])
        if ctx_id is None or ctx_id not in self._contexts:
            ctx = await self.create(name, None)
            self._defaults[KERNELS[name]] = ctx.id
            return ctx
        return self._contexts[ctx_id]

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
