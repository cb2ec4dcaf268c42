"""Time to interactive and request latency through a real `corral serve`, with the unmodified e2b SDK.

    sudo .venv/bin/python benchmarks/tti.py [--n 100] [--burst 100] [--pool 4] [--write docs/benchmarks.md]

Measures, each with p50/p95/p99 and success rate:
  - TTI, sequential: `Sandbox.create()` until the first `commands.run('node -v')` has returned (pool warm);
  - a burst of concurrent creates: failures, and creates/s once the pool is drained;
  - `commands.run('true')` on a running sandbox;
  - proxy overhead: envd's `GET /health` through the server vs straight to the sandbox's address.
Baseline in the same run: a raw runtime restore plus envd's /init and the same `node -v` sent straight
to the sandbox (no API, no proxy, no pool).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.envd import pct
from benchmarks.report import write_section
from tests.helpers.envd_client import init, sync_client
from tests.helpers.server import ServerProcess, host_resolver

BENCH_ROOT = Path("/var/tmp/corral-bench")
RAW_AT_ONCE = 20
TARGETS = {"tti_p50": 60.0, "tti_p99": 200.0, "burst_rate": 10.0, "run_true_p50": 25.0, "proxy_p50": 1.0}


def stats(samples: list[float]) -> str:
    if not samples:
        return "- | - | -"
    return f"{pct(samples, 50):.1f} | {pct(samples, 95):.1f} | {pct(samples, 99):.1f}"


def sequential_tti(opts: dict, n: int) -> tuple[list[float], int]:
    from e2b import Sandbox

    samples, failures = [], 0
    for _ in range(n):
        start = time.perf_counter()
        try:
            sbx = Sandbox.create(**opts)
            sbx.commands.run("node -v")
            samples.append((time.perf_counter() - start) * 1000)
            sbx.kill()
        except Exception as e:
            failures += 1
            print("TTI failure:", e, file=sys.stderr)
        time.sleep(0.2)  # a user's think time; lets the pool refill as it would between real requests
    return samples, failures


def burst(opts: dict, count: int, pool: int) -> tuple[int, float, float, list[float]]:
    from e2b import Sandbox

    finished: list[float] = []
    created = []
    failures = 0
    start = time.perf_counter()

    def one():
        sbx = Sandbox.create(**opts)
        finished.append(time.perf_counter() - start)
        return sbx

    with ThreadPoolExecutor(max_workers=count) as workers:
        futures = [workers.submit(one) for _ in range(count)]
        for future in futures:
            try:
                created.append(future.result())
            except Exception as e:
                failures += 1
                print("burst failure:", e, file=sys.stderr)
    total = time.perf_counter() - start
    finished.sort()
    drained = finished[pool:] if len(finished) > pool + 1 else finished
    rate = (len(drained) - 1) / (drained[-1] - drained[0]) if len(drained) > 1 else 0.0
    def kill(sbx) -> None:
        try:
            sbx.kill()
        except Exception as e:
            print("kill failed:", e, file=sys.stderr)

    with ThreadPoolExecutor(max_workers=16) as workers:
        list(workers.map(kill, created))
    return failures, total, rate, [f * 1000 for f in finished]


def run_latency(opts: dict, n: int, user: str | None = None) -> list[float]:
    from e2b import Sandbox

    sbx = Sandbox.create(**opts)
    kwargs = {"user": user} if user else {}
    try:
        for _ in range(5):
            sbx.commands.run("true", **kwargs)
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            sbx.commands.run("true", **kwargs)
            samples.append((time.perf_counter() - start) * 1000)
        return samples
    finally:
        sbx.kill()


def proxy_overhead(server: ServerProcess, opts: dict, n: int) -> tuple[list[float], list[float]]:
    from e2b import Sandbox

    sbx = Sandbox.create(**opts)
    try:
        address = _address(server, sbx.sandbox_id)
        headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983"}
        with httpx.Client(trust_env=False) as client:
            def timed(url: str, h: dict) -> list[float]:
                for _ in range(20):
                    client.get(url, headers=h)
                out = []
                for _ in range(n):
                    t = time.perf_counter()
                    assert client.get(url, headers=h).status_code == 204
                    out.append((time.perf_counter() - t) * 1000)
                return out

            direct = timed(f"http://{address}:49983/health", {})
            proxied = timed(f"{server.url}/health", headers)
        return direct, proxied
    finally:
        sbx.kill()


def _address(server: ServerProcess, sandbox_id: str) -> str:
    record = Path(server.env["CORRAL_DATA_DIR"]) / "sandboxes" / sandbox_id / "record.json"
    import ipaddress
    import json

    from corral.network.slots import Slot

    slot = json.loads(record.read_text())["slot"]
    network = ipaddress.IPv4Network(server.env["CORRAL_SANDBOX_NETWORK"])
    return str(Slot(slot, server.env["CORRAL_INSTANCE"], network).guest)


def raw_baseline(n: int, burst: int) -> tuple[list[float], float]:
    """Runtime restore (no pool) + /init + `node -v` straight to envd; and the rate of raw `runsc create` +
    `runsc restore` of `burst` containers at once, the floor of a burst's create rate."""
    import ipaddress

    from corral.config import Settings
    from corral.runtime.base import SandboxConfig
    from corral.runtime.gvisor import GVisorRuntime
    from corral.templates.store import TemplateStore

    settings = Settings(data_dir=BENCH_ROOT / "raw", run_dir=Path("/run/corral-bench-tti-raw"),
                        sandbox_network=ipaddress.IPv4Network("10.209.0.0/22"), instance="bT")

    async def run() -> tuple[list[float], float]:
        from benchmarks.runtime import raw_create_restore_rate

        runtime = GVisorRuntime(settings)
        await runtime.open()
        snapshot = runtime.open_snapshot(TemplateStore(settings).resolve("base"))
        samples = []
        try:
            for _ in range(n):
                start = time.perf_counter()
                (sb,) = await runtime.restore(snapshot, 1, SandboxConfig())
                url = f"http://{sb.address}:49983"
                for _ in range(200):
                    try:
                        if (await asyncio.to_thread(httpx.get, f"{url}/health", timeout=1)).status_code == 204:
                            break
                    except httpx.TransportError:
                        await asyncio.sleep(0.005)
                await asyncio.to_thread(init, url, accessToken="t", defaultUser="user")
                await asyncio.to_thread(sync_client(url, "t", sb.id).commands.run, "node -v")
                samples.append((time.perf_counter() - start) * 1000)
                # Kept until the end: a destroyed sandbox's address goes to the next one, and the SDK's
                # connection pool (keyed by URL) would reuse a connection to the dead one.
            for sb in runtime.list():
                await runtime.destroy(sb.id)
            # 20 at once, as benchmarks/runtime.py measures it: 100 restored sandboxes left running while
            # the rest restore burn both cores and measure thrashing, not runsc (seen: 30+ minutes).
            raw_rate = await raw_create_restore_rate(runtime, snapshot, min(burst, RAW_AT_ONCE)) if burst else 0.0
        finally:
            await runtime.destroy_all()
        return samples, raw_rate

    try:
        return asyncio.run(run())
    finally:
        shutil.rmtree(BENCH_ROOT / "raw", ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--burst", type=int, default=100)
    parser.add_argument("--pool", type=int, default=4)
    parser.add_argument("--write", type=Path)
    parser.add_argument("--burst-only", action="store_true", help="only the burst and its raw floor")
    parser.add_argument("--repeat", type=int, default=1, help="with --burst-only: bursts, each after its floor")
    parser.add_argument("--budget", type=int, help="the server's restore budget (CORRAL_RESTORE_BUDGET)")
    args = parser.parse_args()
    if args.burst_only:
        burst_only(args)
        return

    baseline, raw_rate = raw_baseline(max(10, args.n // 5), args.burst)
    server, opts = _started_server(args)
    try:
        tti, tti_failures = sequential_tti(opts, args.n)
        print(f"TTI p50/p95/p99 ms: {stats(tti)} ({tti_failures} failures)", flush=True)
        run_true = run_latency(opts, 200)
        print(f"commands.run('true') p50/p95/p99 ms: {stats(run_true)}", flush=True)
        run_root = run_latency(opts, 100, user="root")
        print(f"commands.run('true', user='root') p50/p95/p99 ms: {stats(run_root)}", flush=True)
        direct, proxied = proxy_overhead(server, opts, 500)
        print(f"envd /health direct {stats(direct)}, proxied {stats(proxied)}", flush=True)
        _wait_pool(server, args.pool)
        burst_failures, burst_total, burst_rate, burst_done = burst(opts, args.burst, args.pool)
    finally:
        server.stop()
        server.destroy_everything()

    proxy_added = pct(proxied, 50) - pct(direct, 50)
    verdict = {
        "tti_p50": pct(tti, 50) <= TARGETS["tti_p50"], "tti_p99": pct(tti, 99) <= TARGETS["tti_p99"],
        "burst": burst_failures == 0 and burst_rate >= TARGETS["burst_rate"],
        "run_true_p50": pct(run_true, 50) <= TARGETS["run_true_p50"],
        "proxy_p50": proxy_added <= TARGETS["proxy_p50"],
    }
    mark = {True: "met", False: "**NOT met**"}
    lines = [
        "| measure | n | success | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|---|---|",
        f"| TTI: create → first `commands.run('node -v')`, sequential, pool of {args.pool} | {len(tti) + tti_failures} "
        f"| {len(tti)}/{len(tti) + tti_failures} | {stats(tti)} |",
        f"| baseline: raw restore + /init + `node -v` straight to envd | {len(baseline)} "
        f"| {len(baseline)}/{len(baseline)} "
        f"| {stats(baseline)} |",
        f"| burst of {args.burst} concurrent creates (time to each create's answer) | {args.burst} "
        f"| {args.burst - burst_failures}/{args.burst} | {stats(burst_done)} |",
        f"| `commands.run('true')` | {len(run_true)} | {len(run_true)}/{len(run_true)} | {stats(run_true)} |",
        f"| `commands.run('true', user='root')` | {len(run_root)} | {len(run_root)}/{len(run_root)} | "
        f"{stats(run_root)} |",
        f"| envd `GET /health` straight to the sandbox | {len(direct)} | | {stats(direct)} |",
        f"| envd `GET /health` through the proxy | {len(proxied)} | | {stats(proxied)} |",
        "",
        f"Burst: {burst_failures} failures, {burst_total:.1f} s in all, {burst_rate:.1f} creates/s after the pool "
        f"of {args.pool} was drained; raw `runsc create` + `runsc restore` of "
        f"{min(args.burst, RAW_AT_ONCE)} at once in the same run: "
        f"{raw_rate:.1f}/s ({burst_rate / raw_rate:.2f}x).",
        "",
        f"Against the baseline in the same run (p50 over p50): TTI {pct(tti, 50) / pct(baseline, 50):.2f}x a raw "
        f"restore + /init + `node -v`; proxied `/health` {pct(proxied, 50) / pct(direct, 50):.2f}x a direct one.",
        "",
        "| target | measured | verdict |", "|---|---|---|",
        f"| TTI p50 <= {TARGETS['tti_p50']:.0f} ms | {pct(tti, 50):.1f} ms | {mark[verdict['tti_p50']]} |",
        f"| TTI p99 <= {TARGETS['tti_p99']:.0f} ms | {pct(tti, 99):.1f} ms | {mark[verdict['tti_p99']]} |",
        f"| burst: 0 failures, >= {TARGETS['burst_rate']:.0f} creates/s drained | {burst_failures} failures, "
        f"{burst_rate:.1f}/s | {mark[verdict['burst']]} |",
        f"| `commands.run('true')` p50 <= {TARGETS['run_true_p50']:.0f} ms | {pct(run_true, 50):.1f} ms "
        f"| {mark[verdict['run_true_p50']]} |",
        f"| proxy adds <= {TARGETS['proxy_p50']:.0f} ms p50 | {proxy_added:+.2f} ms | {mark[verdict['proxy_p50']]} |",
    ]
    report = "\n".join(lines)
    print(report)
    if args.write:
        write_section(args.write, "tti-benchmark", report,
                      heading="Time to interactive and request latency (platform)",
                      command=f"sudo .venv/bin/python benchmarks/tti.py --n {args.n} --burst {args.burst} "
                              f"--pool {args.pool} --write {args.write}")


def burst_only(args) -> None:
    """The burst against its raw floor alone, `--repeat` times, each burst right after its own floor
    measurement (the host's speed drifts: a floor from minutes before is not the same host)."""
    import statistics

    server, opts = _started_server(args)
    rows = []
    try:
        for i in range(args.repeat):
            _, raw_rate = raw_baseline(0, args.burst)
            _wait_pool(server, args.pool)
            failures, total, rate, _ = burst(opts, args.burst, args.pool)
            rows.append((raw_rate, rate, failures, total))
            print(f"run {i + 1}: burst of {args.burst}: {failures} failures, {total:.1f} s, {rate:.1f} creates/s "
                  f"drained; raw runsc create + restore {raw_rate:.1f}/s; {rate / raw_rate:.2f}x", flush=True)
    finally:
        server.stop()
        server.destroy_everything()
    ratios = [rate / raw for raw, rate, _, _ in rows]
    lines = ["| run | failures | burst total s | creates/s drained | raw create + restore /s | ratio |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {i + 1} | {f} | {t:.1f} | {rate:.1f} | {raw:.1f} | {rate / raw:.2f}x |"
              for i, (raw, rate, f, t) in enumerate(rows)]
    lines += ["", f"Median ratio {statistics.median(ratios):.2f}x over {len(rows)} runs (target >= 0.6x); "
              f"{sum(r[2] for r in rows)} failures; restore budget {args.budget or 'default'}, pool of {args.pool}."]
    report = "\n".join(lines)
    print(report)
    if args.write:
        write_section(args.write, "burst-benchmark", report, heading="Burst of creates against raw runsc",
                      command=f"sudo .venv/bin/python benchmarks/tti.py --burst-only --burst {args.burst} "
                              f"--pool {args.pool} --repeat {args.repeat} --write {args.write}")


def _started_server(args) -> tuple[ServerProcess, dict]:
    """A `corral serve` with its pool filled, and the SDK options for it."""
    env = {"CORRAL_METRICS_INTERVAL_S": "30"}
    if args.budget:
        env["CORRAL_RESTORE_BUDGET"] = str(args.budget)
    server = ServerProcess("bS", "10.205.0.0/20", BENCH_ROOT / "server", dns_upstream=host_resolver(),
                           pool_size=args.pool, extra_env=env)
    try:
        server.start(wait_pool=args.pool)
        key = server.cli("keys", "create", "--name", "bench").strip()
    except BaseException:
        server.stop()
        server.destroy_everything()
        raise
    return server, {"api_url": server.url, "sandbox_url": server.url, "api_key": key}


def _wait_pool(server: ServerProcess, size: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and httpx.get(f"{server.url}/health").json()["pooled"].get("base", 0) < size:
        time.sleep(0.2)


if __name__ == "__main__":
    main()
