"""Idle CPU per sandbox under `corral serve`, with the idle policy on (the default) and off, in one run.

    sudo .venv/bin/python benchmarks/idle.py [--sandboxes 10] [--seconds 30] [--write docs/benchmarks.md]

For each setting: create N `base` sandboxes with the unmodified e2b SDK, leave them idle past the
policy's idle time, then sum the CPU time of their host cgroups (gVisor kernel, gofer, stubs) over a
window. Also the cost of waking: the first `commands.run('true')` on an idle sandbox (frozen with the
policy on) next to one on a sandbox that just ran a command.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.envd import pct
from benchmarks.report import targets_table, write_section
from corral.runtime.gvisor.cgroups import SandboxCgroup
from tests.helpers.server import ServerProcess, host_resolver

BENCH_ROOT = Path("/var/tmp/corral-bench-idle")
INSTANCE, NETWORK = "bD", "10.216.0.0/22"
IDLE_S, BREATHE_S = 10.0, 10.0
TARGET_PCT = 1.0


def measure(policy_on: bool, sandboxes: int, seconds: float, wakes: int) -> dict:
    from e2b import Sandbox

    env = {"CORRAL_IDLE_FREEZE_S": str(IDLE_S if policy_on else 0), "CORRAL_IDLE_BREATHE_S": str(BREATHE_S),
           "CORRAL_METRICS_INTERVAL_S": "5"}
    server = ServerProcess(INSTANCE, NETWORK, BENCH_ROOT / ("on" if policy_on else "off"),
                           dns_upstream=host_resolver(), pool_size=0, extra_env=env)
    server.start()
    made = []
    try:
        key = server.cli("keys", "create", "--name", "bench").strip()
        opts = {"api_url": server.url, "sandbox_url": server.url, "api_key": key}
        made = [Sandbox.create(timeout=600, **opts) for _ in range(sandboxes)]
        for sbx in made:
            sbx.commands.run("true")
        time.sleep(IDLE_S + 2)
        cgroups = [SandboxCgroup(f"/corral-{INSTANCE}/{sbx.sandbox_id}") for sbx in made]
        before = sum(c.cpu_seconds() or 0 for c in cgroups)
        start = time.monotonic()
        time.sleep(seconds)
        used = sum(c.cpu_seconds() or 0 for c in cgroups) - before
        per_sandbox_pct = used / (time.monotonic() - start) / len(made) * 100
        # Waking: the first command after idling (frozen when the policy is on), then one right after.
        idle_first, awake = [], []
        for sbx in made[:wakes]:
            t = time.perf_counter()
            sbx.commands.run("true")
            idle_first.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            sbx.commands.run("true")
            awake.append((time.perf_counter() - t) * 1000)
        return {"pct": per_sandbox_pct, "idle_first": idle_first, "awake": awake}
    finally:
        for sbx in made:
            try:
                sbx.kill()
            except Exception as e:
                print("kill failed:", e, file=sys.stderr)
        server.stop()
        server.destroy_everything()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sandboxes", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()

    wakes = min(args.sandboxes, 10)
    off = measure(False, args.sandboxes, args.seconds, wakes)
    print(f"policy off: {off['pct']:.2f} % of a core per idle sandbox", flush=True)
    on = measure(True, args.sandboxes, args.seconds, wakes)
    print(f"policy on: {on['pct']:.2f} % of a core per idle sandbox", flush=True)

    def ms(samples: list[float]) -> str:
        return f"{pct(samples, 50):.1f} / {max(samples):.1f}"

    lines = [
        f"{args.sandboxes} idle `base` sandboxes under `corral serve`, CPU of their host cgroups summed over "
        f"{args.seconds:.0f} s, starting {IDLE_S + 2:.0f} s after their last command.",
        "",
        "| measure | idle policy off (baseline) | idle policy on (default) | ratio |",
        "|---|---|---|---|",
        f"| CPU per idle sandbox, % of one core | {off['pct']:.2f} | {on['pct']:.2f} "
        f"| {on['pct'] / off['pct'] if off['pct'] else float('nan'):.2f}x |",
        "| first `commands.run('true')` after idling (p50 / max ms, n=" f"{wakes}) | {ms(off['idle_first'])} "
        f"| {ms(on['idle_first'])} | |",
        f"| the next one, sandbox awake (p50 / max ms) | {ms(off['awake'])} | {ms(on['awake'])} | |",
        "",
        *targets_table([(f"idle CPU per sandbox <= {TARGET_PCT:.0f} % of a core",
                          f"{on['pct']:.2f} % (policy on; {off['pct']:.2f} % off)", on["pct"] <= TARGET_PCT)]),
    ]
    report = "\n".join(lines)
    print(report)
    if args.write:
        write_section(args.write, "idle-benchmark", report, heading="Idle CPU and the idle policy",
                      command=f"sudo .venv/bin/python benchmarks/idle.py --sandboxes {args.sandboxes} "
                              f"--seconds {args.seconds:.0f} --write {args.write}")


if __name__ == "__main__":
    main()
