"""Wires a runtime and template store together for CLI commands that work on this host directly."""

from __future__ import annotations

from contextlib import asynccontextmanager

from corral.config import Settings, load_settings
from corral.runtime.gvisor import GVisorRuntime
from corral.templates.store import TemplateStore


@asynccontextmanager
async def local_runtime(settings: Settings | None = None, pool_size: int = 0):
    settings = settings or load_settings()
    store = TemplateStore(settings)
    runtime = GVisorRuntime(settings, resolve_template=store.resolve, pool_size=pool_size)
    await runtime.start()
    try:
        yield runtime, store
    finally:
        await runtime.close()
