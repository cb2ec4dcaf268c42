"""Wires a runtime and template store together for CLI commands that work on this host directly.

Only one process may own an instance (runtime/gvisor/host.py). When `corral serve` owns it, these
commands run as a short-lived side instance instead: its own instance tag, sandbox network, data and run
directories, sharing only the template cache (whose builds are written aside and renamed into place, so
a server never sees half a build). Side instances are removed when the command ends.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import shutil
import sys
from contextlib import asynccontextmanager
from pathlib import Path

from corral.config import Settings, load_settings
from corral.runtime.base import InstanceBusy, Sandbox, SandboxConfig
from corral.runtime.gvisor import GVisorRuntime
from corral.templates.store import TemplateStore

# Side instances: s0..s9, each with a /22 out of this network (well away from the default 10.201.0.0/16).
SIDE_NETWORK = ipaddress.IPv4Network("10.240.0.0/16")
SIDE_SLOTS = 10


def side_settings(settings: Settings, index: int) -> Settings:
    instance = f"s{index}"
    network = ipaddress.IPv4Network((int(SIDE_NETWORK.network_address) + index * 1024, 22))
    return dataclasses.replace(settings, instance=instance, sandbox_network=network,
                               data_dir=settings.data_dir / "side" / instance,
                               run_dir=Path(f"{settings.run_dir}-{instance}"),
                               service_address=None, public_urls=False)  # no server of its own


@asynccontextmanager
async def local_runtime(settings: Settings | None = None):
    settings = settings or load_settings()
    store = TemplateStore(settings)
    runtime = GVisorRuntime(settings)
    side = False
    try:
        await runtime.open()
    except InstanceBusy as busy:
        runtime, side = await _open_side_instance(settings, busy), True
    try:
        yield runtime, store
    finally:
        if side:
            await runtime.destroy_all()
            shutil.rmtree(runtime.settings.data_dir, ignore_errors=True)
            shutil.rmtree(runtime.settings.run_dir, ignore_errors=True)
        else:
            await runtime.close()


async def _open_side_instance(settings: Settings, busy: InstanceBusy) -> GVisorRuntime:
    for index in range(SIDE_SLOTS):
        runtime = GVisorRuntime(side_settings(settings, index))
        try:
            await runtime.open()
        except InstanceBusy:
            continue
        holder = GVisorRuntime(settings).lock.holder()
        who = f"process {holder['pid']}" if holder else "another process"
        print(f"instance {settings.instance!r} is owned by {who}; running as side instance "
              f"{runtime.settings.instance!r} ({runtime.settings.sandbox_network})", file=sys.stderr)
        return runtime
    raise busy


async def start_template(runtime: GVisorRuntime, store: TemplateStore, template: str,
                         config: SandboxConfig) -> Sandbox:
    """One sandbox from a template's snapshot (no pools: a CLI command starts one and goes)."""
    snapshot = runtime.open_snapshot(store.resolve(template))
    (sandbox,) = await runtime.restore(snapshot, 1, config)
    return sandbox
