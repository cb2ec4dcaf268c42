"""Branching benchmark: pause/resume, snapshot and fork through a real `corral serve` with the unmodified
e2b SDK, next to the raw runtime's checkpoint and restore measured in the same run.

    sudo .venv/bin/python benchmarks/branching.py [--cycles 20] [--write docs/benchmarks.md]

Needs the `base` template (`corral template build base`).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import shutil
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from e2b import Sandbox

from benchmarks.report import targets_table, write_section
from benchmarks.runtime import pct
from corral.config import Settings
from corral.runtime.base import SandboxConfig
from corral.runtime.gvisor import GVisorRuntime
from corral.templates.store import TemplateStore
from tests.helpers.server import ServerProcess, host_resolver

BENCH_ROOT = Path("/var/tmp/corral-bench-branching")
TARGETS = {"pause_p50": 300.0, "resume_p50": 150.0, "fork1_p50": 300.0, "fork10_p50": 2000.0}
BIG = ("nohup python3 -c \"import time; x = [str(i) * 10 for i in range(2_000_000)]; "
       "time.sleep(86400)\" >/dev/null 2>&1 &")


def stats(values: list[float]) -> str:
    return f"{pct(values, 50):.0f} | {pct(values, 95):.0f} | {pct(values, 99):.0f}"


def ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def raw_baseline(cycles: int) -> tuple[list[float], list[float], int]:
    """The runtime alone: checkpoint of an idle base sandbox (left running) and restore of it."""
    settings = Settings(data_dir=BENCH_ROOT / "raw", run_dir=Path("/run/corral-bench-raw"), instance="bR",
                        sandbox_network=ipaddress.IPv4Network("10.208.0.0/22"))
    store = TemplateStore(Settings())

    async def run() -> tuple[list[float], list[float], int]:
        runtime = GVisorRuntime(settings)
        await runtime.open()
        checkpoints, restores = [], []
        try:
            (source,) = await runtime.restore(runtime.open_snapshot(store.resolve("base")), 1, SandboxConfig())
            size = 0
            for i in range(cycles):
                start = time.perf_counter()
                ckpt = await runtime.checkpoint(source.id, BENCH_ROOT / "raw" / f"ck{i}")
                checkpoints.append(ms_since(start))
                size = ckpt.size_bytes
                start = time.perf_counter()
                (clone,) = await runtime.restore(ckpt, 1, SandboxConfig())
                restores.append(ms_since(start))
                await runtime.destroy(clone.id)
                shutil.rmtree(ckpt.path)
        finally:
            await runtime.destroy_all()
        return checkpoints, restores, size

    try:
        return asyncio.run(run())
    finally:
        shutil.rmtree(BENCH_ROOT / "raw", ignore_errors=True)


def pause_resume(opts: dict, cycles: int, setup: str | None = None,
                 prepared_on: ServerProcess | None = None) -> tuple[list[float], list[float], list[float]]:
    """Pause and resume (connect) one sandbox `cycles` times; resume-to-command is until a command ran.
    With `prepared_on`, each resume waits until that server reports the resume prepared (the pause is a
    few hundred ms old, docs/branching.md "Resume warmth"); without, it follows the pause at once."""
    sbx = Sandbox.create(timeout=3600, **opts)
    pauses, resumes, to_command = [], [], []
    try:
        if setup:
            sbx.commands.run(setup)
            time.sleep(8)  # let the objects get built
        for _ in range(cycles):
            start = time.perf_counter()
            assert sbx.pause() is True
            pauses.append(ms_since(start))
            if prepared_on is not None:
                _wait_resume_ready(prepared_on)
            start = time.perf_counter()
            sbx = Sandbox.connect(sbx.sandbox_id, **opts)
            resumes.append(ms_since(start))
            sbx.commands.run("true")
            to_command.append(ms_since(start))
    finally:
        sbx.kill()
    return pauses, resumes, to_command


def _wait_resume_ready(server: ServerProcess, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{server.url}/health", timeout=10).json().get("resumeReady", 0) < 1:
        if time.monotonic() > deadline:
            raise RuntimeError("the server never reported the resume prepared")
        time.sleep(0.02)


def snapshots(server: ServerProcess, key: str, opts: dict, n: int) -> tuple[list[float], list[int]]:
    sbx = Sandbox.create(timeout=600, **opts)
    times, sizes = [], []
    try:
        for i in range(n):
            sbx.files.write(f"/home/user/step{i}.txt", "x" * 100_000)
            start = time.perf_counter()
            snap = sbx.create_snapshot()
            times.append(ms_since(start))
            node = httpx.get(f"{server.url}/checkpoints/{snap.snapshot_id}", headers={"X-API-KEY": key}).json()
            sizes.append(node["sizeBytes"])
            Sandbox.delete_snapshot(snap.snapshot_id, **opts)
    finally:
        sbx.kill()
    return times, sizes


def forks(server: ServerProcess, key: str, opts: dict, count: int, rounds: int,
          measure_commands: bool = True) -> tuple[list[float], list[float], int]:
    """Wall time of a fork call (it answers when every fork has envd up and its identity) and of each fork's
    first command after that; failures counted."""
    source = Sandbox.create(timeout=600, **opts)
    walls, first_commands, failures = [], [], 0
    # One client for every call: making an httpx client builds an SSL context, ~20 ms here, which is not the
    # server's time (the SDK keeps its transport too).
    client = httpx.Client(base_url=server.url, headers={"X-API-KEY": key}, timeout=900)
    try:
        for _ in range(rounds):
            start = time.perf_counter()
            response = client.post(f"/sandboxes/{source.sandbox_id}/fork", json={"count": count, "timeout": 3600})
            walls.append(ms_since(start))
            results = response.json()
            ids = [r["sandbox"]["sandboxID"] for r in results if "sandbox" in r]
            failures += count - len(ids)
            for sandbox_id in ids[:10] if measure_commands else []:
                forked = Sandbox.connect(sandbox_id, **opts)
                start = time.perf_counter()
                forked.commands.run("true")
                first_commands.append(ms_since(start))
            _kill_all(server, key, ids)
    finally:
        client.close()
        source.kill()
    return walls, first_commands, failures


def _kill_all(server: ServerProcess, key: str, ids: list[str]) -> None:
    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.url, headers={"X-API-KEY": key}, timeout=600) as client:
            await asyncio.gather(*(client.delete(f"/sandboxes/{i}") for i in ids))

    asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--many", type=int, default=100, help="forks in the one big fork call")
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()

    raw_ckpt, raw_restore, raw_size = raw_baseline(args.cycles)
    print(f"raw checkpoint {stats(raw_ckpt)}, restore {stats(raw_restore)}", flush=True)
    server = ServerProcess("bB", "10.207.0.0/20", BENCH_ROOT / "server", dns_upstream=host_resolver(), pool_size=2,
                           extra_env={"CORRAL_METRICS_INTERVAL_S": "30"}, log_level="info")
    server.start(wait_pool=2)
    try:
        key = server.cli("keys", "create", "--name", "bench").strip()
        opts = {"api_url": server.url, "sandbox_url": server.url, "api_key": key}
        idle = pause_resume(opts, args.cycles, prepared_on=server)
        print(f"idle pause {stats(idle[0])}, resume (prepared) {stats(idle[1])}", flush=True)
        at_once = pause_resume(opts, args.cycles)
        print(f"idle pause {stats(at_once[0])}, resume right after {stats(at_once[1])}", flush=True)
        big = pause_resume(opts, max(3, args.cycles // 4), setup=BIG)
        print(f"200 MB pause {stats(big[0])}, resume {stats(big[1])}", flush=True)
        snap_times, snap_sizes = snapshots(server, key, opts, args.cycles // 2)
        print(f"snapshot {stats(snap_times)}", flush=True)
        fork1 = forks(server, key, opts, 1, args.cycles)
        print(f"fork x1 {stats(fork1[0])}", flush=True)
        fork10 = forks(server, key, opts, 10, 3)
        print(f"fork x10 {stats(fork10[0])}", flush=True)
        fork100 = forks(server, key, opts, args.many, 1, measure_commands=False)
        print(f"fork x{args.many} {fork100[0][0]:.0f} ms, {fork100[2]} failures", flush=True)
    finally:
        server.stop()
        server.destroy_everything(keep_log=BENCH_ROOT / "serve.log")

    mib = 1024 * 1024
    ckpt50, restore50 = pct(raw_ckpt, 50), pct(raw_restore, 50)

    def vs(values: list[float], baseline: float) -> str:
        return f"{pct(values, 50) / baseline:.2f}x"

    lines = [
        "| measure | n | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|---|",
        f"| baseline: raw runtime checkpoint (idle base, left running; returns while it resumes) | {len(raw_ckpt)} | "
        f"{stats(raw_ckpt)} |",
        f"| baseline: raw runtime restore of that checkpoint | {len(raw_restore)} | {stats(raw_restore)} |",
        f"| pause, idle `base` (`sbx.pause()`) | {len(idle[0])} | {stats(idle[0])} |",
        f"| resume, idle `base` (`Sandbox.connect`), container prepared after the pause | {len(idle[1])} | "
        f"{stats(idle[1])} |",
        f"| resume → first `commands.run('true')` done, idle, prepared | {len(idle[2])} | {stats(idle[2])} |",
        f"| resume, idle `base`, right after the pause (nothing prepared yet) | {len(at_once[1])} | "
        f"{stats(at_once[1])} |",
        f"| pause, holding ~200 MB of Python objects | {len(big[0])} | {stats(big[0])} |",
        f"| resume, holding ~200 MB of Python objects | {len(big[1])} | {stats(big[1])} |",
        f"| snapshot of a running sandbox (`create_snapshot`) | {len(snap_times)} | {stats(snap_times)} |",
        f"| fork x1: call until the fork is ready | {len(fork1[0])} | {stats(fork1[0])} |",
        f"| fork x10: call until all 10 are ready | {len(fork10[0])} | {stats(fork10[0])} |",
        f"| fork x{args.many}: call until all {args.many} are ready | 1 | {fork100[0][0]:.0f} | | |",
        f"| a fork's first `commands.run('true')` | {len(fork10[1])} | {stats(fork10[1])} |",
        "",
        "Against the raw runtime in the same run (p50 over p50): "
        f"pause {vs(idle[0], ckpt50)} a raw checkpoint, snapshot {vs(snap_times, ckpt50)} a raw checkpoint, "
        f"resume {vs(idle[1], restore50)} a raw restore, fork x1 {vs(fork1[0], ckpt50 + restore50)} a raw "
        "checkpoint plus restore.",
        "",
        f"Disk per snapshot (image + layer of an idle `base` sandbox with 100 KB written): "
        f"{pct(snap_sizes, 50) / mib:.1f} MiB; raw runtime checkpoint: {raw_size / mib:.1f} MiB. "
        f"Fork x{args.many}: {fork100[2]} failures.",
        "",
        *targets_table([
            (f"pause p50 <= {TARGETS['pause_p50']:.0f} ms (idle)", f"{pct(idle[0], 50):.0f} ms",
             pct(idle[0], 50) <= TARGETS["pause_p50"]),
            (f"resume p50 <= {TARGETS['resume_p50']:.0f} ms (idle, resume prepared)", f"{pct(idle[1], 50):.0f} ms",
             pct(idle[1], 50) <= TARGETS["resume_p50"]),
            (f"resume p50 <= {TARGETS['resume_p50']:.0f} ms (idle, right after the pause)",
             f"{pct(at_once[1], 50):.0f} ms", pct(at_once[1], 50) <= TARGETS["resume_p50"]),
            (f"fork x1 <= {TARGETS['fork1_p50']:.0f} ms", f"{pct(fork1[0], 50):.0f} ms",
             pct(fork1[0], 50) <= TARGETS["fork1_p50"]),
            (f"fork x10 <= {TARGETS['fork10_p50']:.0f} ms to all ready", f"{pct(fork10[0], 50):.0f} ms",
             pct(fork10[0], 50) <= TARGETS["fork10_p50"]),
            ("fork x100 completes with 0 failures", f"x{args.many}: {fork100[2]} failures",
             fork100[2] == 0 if args.many >= 100 else "**not run at 100**"),
        ]),
    ]
    report = "\n".join(lines)
    print(report)
    if args.write:
        write_section(args.write, "branching-benchmark", report, heading="Pause, resume, snapshot and fork",
                      command=f"sudo .venv/bin/python benchmarks/branching.py --cycles {args.cycles} "
                              f"--many {args.many} --write {args.write}")


if __name__ == "__main__":
    main()
