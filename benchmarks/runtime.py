"""Runtime benchmark: Corral's gVisor runtime next to raw runsc doing the same step, in the same run.

    sudo .venv/bin/python benchmarks/runtime.py [--restores 50] [--density 20] [--write docs/benchmarks.md]

Measures cold create, restore-to-running (direct and from the pre-created pool), restore throughput with
20 concurrent, checkpoint time and size, memory per idle sandbox (MemAvailable drop) and idle CPU per
sandbox for the systrap and ptrace platforms, and memory per pre-created (frozen) container. Needs the
`base` template (`corral template build base`).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import write_section
from corral.config import Settings
from corral.runtime.base import Resources, SandboxConfig
from corral.runtime.gvisor import GVisorRuntime
from corral.runtime.gvisor.snapshots import GVisorSnapshot
from corral.templates.store import TemplateStore

ROOT = Path("/var/tmp/corral-bench")
console = Console()


def settings_for(instance: str, network: str, platform: str = "systrap") -> Settings:
    return Settings(data_dir=ROOT / instance, run_dir=Path(f"/run/corral-bench-{instance}"),
                    sandbox_network=ipaddress.IPv4Network(network), instance=instance, platform=platform)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summary(values: list[float]) -> str:
    return f"{pct(values, 50):.0f} / {pct(values, 95):.0f} / {pct(values, 99):.0f}"


def mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return 0.0


def runsc_cpu_seconds(root: Path) -> float:
    """CPU time (user+sys) of every process belonging to one runsc state root."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if f"--root={root}".encode() not in cmdline:
                continue
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            continue
    return total


async def timed(coro) -> tuple[float, object]:
    start = time.perf_counter()
    result = await coro
    return (time.perf_counter() - start) * 1000, result


async def bench_restore(rt: GVisorRuntime, snapshot: GVisorSnapshot, n: int) -> dict:
    """Restore-to-running of the base snapshot: Corral (direct, and into a prepared container) vs raw
    `runsc restore` into the same kind of prepared container."""
    direct, raw, pooled = [], [], []
    for _ in range(n):
        ms, sb = await timed(rt.restore(snapshot, 1, SandboxConfig()))
        direct.append(ms)
        await rt.destroy(sb[0].id)
    for _ in range(n):
        # Raw runsc: the same prepared container and netns, only the `runsc restore` call is timed.
        c = await _raw_container(rt, await rt.prepare(snapshot, Resources()))
        ms, _ = await timed(rt.runsc.restore(c.id, c.bundle, snapshot.image, c.log))
        raw.append(ms)
        await rt._teardown(c)
    for _ in range(n):
        prepared = await rt.prepare(snapshot, Resources())  # what the capacity manager keeps ready
        ms, sb = await timed(rt.start(prepared, SandboxConfig()))
        pooled.append(ms)
        await rt.destroy(sb.id)
    return {"direct": direct, "raw": raw, "pooled": pooled}


async def _raw_container(rt: GVisorRuntime, prepared):
    """The prepared container behind a handle, thawed and with its address back in its netns, for runsc to
    be driven by hand."""
    from corral.network.slots import configure_guest

    c = rt.table.get(prepared.id)
    rt._cgroup(c.id).thaw()
    await configure_guest(c.slot)
    return c


async def bench_cold(rt: GVisorRuntime, layers: list[Path], n: int) -> dict:
    corral, raw = [], []
    for _ in range(n):
        ms, sb = await timed(rt.boot(layers, ["/bin/sleep", "infinity"], SandboxConfig()))
        corral.append(ms)
        await rt.destroy(sb.id)
    for _ in range(n):
        c = await _raw_container(rt, await rt.prepare_boot(layers, ["/bin/sleep", "infinity"], Resources()))
        start = time.perf_counter()
        await rt.runsc.start(c.id, c.log)
        raw.append((time.perf_counter() - start) * 1000)
        await rt._teardown(c)
    return {"corral": corral, "raw_start": raw}


async def bench_throughput(rt: GVisorRuntime, snapshot: GVisorSnapshot, count: int) -> tuple[float, float]:
    """Sandboxes/s for `count` restores at once: Corral's, and raw `runsc create` + `runsc restore` for the
    same number of containers whose network namespace, disk and root filesystem were made beforehand."""
    start = time.perf_counter()
    sandboxes = await rt.restore(snapshot, count, SandboxConfig())
    corral = count / (time.perf_counter() - start)
    for sb in sandboxes:
        await rt.destroy(sb.id)
    raw = await raw_create_restore_rate(rt, snapshot, count)
    return corral, raw


async def raw_create_restore_rate(rt: GVisorRuntime, snapshot: GVisorSnapshot, count: int) -> float:
    """Raw `runsc create` + `runsc restore` of `count` containers at once (their netns, disk and root made
    beforehand): the floor a create rate is compared with."""
    boxes = [await rt._prepare(snapshot.template, snapshot.layers, SandboxConfig(), ["/bin/true"], "/",
                               restores=snapshot, container=False) for _ in range(count)]

    async def raw_one(c) -> None:
        await rt.runsc.create(c.id, c.bundle, c.log)
        await rt.runsc.restore(c.id, c.bundle, snapshot.image, c.log)

    try:
        start = time.perf_counter()
        await asyncio.gather(*(raw_one(c) for c in boxes))
        return count / (time.perf_counter() - start)
    finally:
        for c in boxes:
            await rt._teardown(c)


async def bench_checkpoint(rt: GVisorRuntime, snapshot: GVisorSnapshot, n: int) -> dict:
    corral, raw, sizes = [], [], []
    for i in range(n):
        (sb,) = await rt.restore(snapshot, 1, SandboxConfig())
        target = ROOT / "ckpt" / f"c{i}"
        shutil.rmtree(target, ignore_errors=True)
        ms, ck = await timed(rt.checkpoint(sb.id, target, leave_running=True))
        corral.append(ms)
        sizes.append(ck.size_bytes / 2**20)
        c = rt.table.get(sb.id)
        await rt._settle(c)
        raw_dir = ROOT / "ckpt" / f"raw{i}"
        shutil.rmtree(raw_dir, ignore_errors=True)
        ms, _ = await timed(rt.runsc.checkpoint(c.id, raw_dir, c.log, leave_running=True))
        raw.append(ms)
        await rt.destroy(sb.id)
    shutil.rmtree(ROOT / "ckpt", ignore_errors=True)
    return {"corral": corral, "raw": raw, "size_mb": sizes}


async def bench_density(rt: GVisorRuntime, snapshot: GVisorSnapshot | None, layers: list[Path], count: int,
                        idle_s: float) -> dict:
    """MemAvailable drop and idle CPU per sandbox with `count` idle sandboxes."""
    await asyncio.sleep(2)
    before = mem_available_mb()
    if snapshot is not None:
        sandboxes = await rt.restore(snapshot, count, SandboxConfig())
    else:
        sandboxes = [await rt.boot(layers, ["/usr/bin/tini", "-s", "--", "/bin/sleep", "infinity"],
                                   SandboxConfig()) for _ in range(count)]
    await asyncio.sleep(3)
    after = mem_available_mb()
    cpu0 = runsc_cpu_seconds(rt.settings.runsc_root)
    await asyncio.sleep(idle_s)
    cpu1 = runsc_cpu_seconds(rt.settings.runsc_root)
    for sb in sandboxes:
        await rt.destroy(sb.id)
    return {"mem_mb_per_sandbox": (before - after) / count,
            "cpu_pct_per_sandbox": (cpu1 - cpu0) / idle_s / count * 100}


async def bench_prepared_memory(rt: GVisorRuntime, snapshot: GVisorSnapshot, count: int) -> float:
    """MemAvailable drop per pre-created, frozen container (what a template pool entry or a paused
    sandbox's prepared resume holds), over `count` of them."""
    await asyncio.sleep(2)
    before = mem_available_mb()
    held = [await rt.prepare(snapshot, Resources()) for _ in range(count)]
    await asyncio.sleep(3)
    after = mem_available_mb()
    for prepared in held:
        await rt.discard(prepared)
    return (before - after) / count


async def main(args) -> dict:
    settings = settings_for("b1", "10.210.0.0/22")
    store = TemplateStore(settings)
    rt = GVisorRuntime(settings)
    await rt.open()
    results: dict = {}
    try:
        await store.build("base", rt)
        snapshot = rt.open_snapshot(store.resolve("base"))
        layers = list(snapshot.lowers)
        with console.status("cold create"):
            results["cold"] = await bench_cold(rt, layers, args.cold)
        with console.status(f"restore x{args.restores}"):
            results["restore"] = await bench_restore(rt, snapshot, args.restores)
        with console.status("throughput"):
            results["throughput"] = await bench_throughput(rt, snapshot, args.density)
        with console.status("checkpoint"):
            results["checkpoint"] = await bench_checkpoint(rt, snapshot, 5)
        with console.status(f"density x{args.density} (systrap)"):
            results["density_systrap"] = await bench_density(rt, snapshot, layers, args.density, args.idle)
        with console.status(f"{args.density} pre-created containers"):
            results["prepared_mb"] = await bench_prepared_memory(rt, snapshot, args.density)
    finally:
        await rt.destroy_all()
    ptrace = GVisorRuntime(settings_for("b2", "10.211.0.0/22", platform="ptrace"))
    await ptrace.open()
    try:
        with console.status(f"density x{args.density} (ptrace)"):
            results["density_ptrace"] = await bench_density(ptrace, None, layers, args.density, args.idle)
    finally:
        await ptrace.destroy_all()
    shutil.rmtree(ROOT, ignore_errors=True)
    for rt_ in (rt, ptrace):
        shutil.rmtree(rt_.settings.run_dir, ignore_errors=True)
    return results


def render(results: dict, args) -> str:
    r, c, ck = results["restore"], results["cold"], results["checkpoint"]
    rate, raw_rate = results["throughput"]
    ds, dp = results["density_systrap"], results["density_ptrace"]
    rows = [
        ("cold create (boot from rootfs) p50/p95/p99 ms", summary(c["corral"]),
         f"raw `runsc start` {summary(c['raw_start'])}", f"{pct(c['corral'], 50) / pct(c['raw_start'], 50):.2f}x"),
        (f"restore to running, direct, p50/p95/p99 ms (n={len(r['direct'])})", summary(r["direct"]),
         f"raw `runsc restore` into pre-created {summary(r['raw'])}",
         f"{pct(r['direct'], 50) / pct(r['raw'], 50):.2f}x"),
        (f"restore to running, from pool, p50/p95/p99 ms (n={len(r['pooled'])})", summary(r["pooled"]),
         f"raw `runsc restore` into pre-created {summary(r['raw'])}",
         f"{pct(r['pooled'], 50) / pct(r['raw'], 50):.2f}x"),
        (f"restore throughput, {args.density} concurrent", f"{rate:.1f} sandboxes/s",
         f"raw `runsc create` + `runsc restore` {raw_rate:.1f}/s", f"{rate / raw_rate:.2f}x; target >= 10/s"),
        ("checkpoint (leave running) p50 ms", f"{pct(ck['corral'], 50):.0f}",
         f"raw `runsc checkpoint` {pct(ck['raw'], 50):.0f}", f"{pct(ck['corral'], 50) / pct(ck['raw'], 50):.2f}x"),
        ("checkpoint size MiB", f"{statistics.median(ck['size_mb']):.1f}", "", ""),
        (f"memory per idle sandbox (MemAvailable drop, {args.density} sandboxes) MiB",
         f"{ds['mem_mb_per_sandbox']:.1f}", f"ptrace {dp['mem_mb_per_sandbox']:.1f}", "target <= 30"),
        (f"memory per pre-created frozen container (MemAvailable drop, {args.density}) MiB",
         f"{results['prepared_mb']:.1f}", f"idle sandbox {ds['mem_mb_per_sandbox']:.1f}",
         f"{results['prepared_mb'] / ds['mem_mb_per_sandbox']:.2f}x"),
        (f"idle CPU per sandbox, systrap ({args.idle:.0f} s)", f"{ds['cpu_pct_per_sandbox']:.2f} %",
         f"ptrace {dp['cpu_pct_per_sandbox']:.2f} %",
         f"{ds['cpu_pct_per_sandbox'] / max(dp['cpu_pct_per_sandbox'], 0.001):.1f}x"),
    ]
    table = Table("measure", "corral", "baseline (same run)", "ratio / target")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    md = ["| measure | corral | baseline (same run) | ratio / target |", "|---|---|---|---|"]
    md += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(md)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--restores", type=int, default=50)
    parser.add_argument("--cold", type=int, default=5)
    parser.add_argument("--density", type=int, default=20)
    parser.add_argument("--idle", type=float, default=10.0)
    parser.add_argument("--write", type=Path, default=None, help="update this markdown file's runtime section")
    args = parser.parse_args()
    results = asyncio.run(main(args))
    body = render(results, args)
    (ROOT.parent / "corral-bench-runtime.json").write_text(json.dumps(results))
    if args.write:
        write_section(args.write, "runtime", body,
                      "sudo .venv/bin/python benchmarks/runtime.py --write docs/benchmarks.md")
