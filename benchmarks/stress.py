"""Stress run: many creates and kills through the unmodified e2b SDK at a fixed concurrency, while the CLI
commands that need a runtime (`corral template build`, `corral sandbox run`) run beside the server over
and over. Reports failures by status (there must be no 5xx), and what the server's instance holds on the
host before and after (containers, netns, links, mounts, directories, cgroups: nothing may be left).

    sudo .venv/bin/python benchmarks/stress.py [--creates 500] [--concurrency 8] [--write docs/benchmarks.md]

Needs the `base` template (`corral template build base`).
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import write_section
from corral.cli.local import side_settings
from tests.helpers.leaks import Footprint, footprint
from tests.helpers.server import CLI, ServerProcess, host_resolver

BENCH_ROOT = Path("/var/tmp/corral-bench-stress")


def cgroups(instance: str) -> int:
    """Sandbox cgroups of an instance, in any hierarchy."""
    root = Path("/sys/fs/cgroup")
    parents = [root / f"corral-{instance}", *(c / f"corral-{instance}" for c in root.iterdir() if c.is_dir())]
    return sum(1 for p in parents if p.is_dir() for child in p.iterdir() if child.is_dir())


def side_commands(env: dict[str, str], stop: threading.Event, log: list[tuple[str, int, str]]) -> None:
    """`corral template build base` and `corral sandbox run base -- true`, in turn, until told to stop."""
    commands = [["template", "build", "base"], ["sandbox", "run", "base", "--", "true"]]
    i = 0
    while not stop.is_set():
        argv = commands[i % len(commands)]
        done = subprocess.run([*CLI, *argv], env=env, capture_output=True, text=True)
        log.append((" ".join(argv), done.returncode, (done.stderr or done.stdout)[-300:]))
        i += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--creates", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--pool", type=int, default=2)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()

    from e2b import Sandbox
    from e2b.exceptions import SandboxException

    server = ServerProcess("bX", "10.217.0.0/20", BENCH_ROOT, dns_upstream=host_resolver(), pool_size=args.pool)
    settings = _settings(server)
    server.start(wait_pool=args.pool)
    side_log: list[tuple[str, int, str]] = []
    stop = threading.Event()
    outcomes: collections.Counter[str] = collections.Counter()
    errors: list[str] = []
    try:
        key = server.cli("keys", "create", "--name", "stress").strip()
        opts = {"api_url": server.url, "sandbox_url": server.url, "api_key": key}
        # Creates beyond the ready pool make the server keep prepared containers for the template too:
        # take the footprint to compare against once that stock has been made and has settled.
        before = _settled_stock(opts, settings, args.pool)
        # The CLI commands get the server's own instance, as a user's would (both on the defaults): they
        # must find it taken and run as a side instance, never reconcile the server's containers away.
        side = threading.Thread(target=side_commands, args=(server.env, stop, side_log), daemon=True)
        side.start()

        def one(_: int) -> None:
            try:
                sbx = Sandbox.create(**opts)
                assert sbx.commands.run("true").exit_code == 0
                sbx.kill()
                outcomes["ok"] += 1
            except SandboxException as e:
                outcomes[f"{type(e).__name__}"] += 1
                errors.append(str(e)[:300])
            except Exception as e:  # a client-side failure is still a failure to report
                outcomes[type(e).__name__] += 1
                errors.append(str(e)[:300])

        began = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.concurrency) as workers:
            list(workers.map(one, range(args.creates)))
        elapsed = time.perf_counter() - began
        stop.set()
        side.join(timeout=600)
        # Kills return before their teardown ends; what the pool refills is the same as before.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (footprint(settings), cgroups(settings.instance)) != before:
            time.sleep(0.5)
        after = footprint(settings), cgroups(settings.instance)
    finally:
        stop.set()
        server.stop()
        server.destroy_everything()
    final = footprint(settings), cgroups(settings.instance)
    side_left = [footprint(side_settings(settings, i)) for i in range(10)]
    side_left = [fp for fp in side_left if fp != Footprint(0, 0, 0, 0, 0, 0)]
    server_5xx = sum(1 for e in errors if any(f"{code}" in e for code in (500, 502, 503, 504)))
    side_failures = [entry for entry in side_log if entry[1] != 0]
    lines = [
        f"{args.creates} create + `commands.run('true')` + kill through the SDK at concurrency {args.concurrency} "
        f"in {elapsed:.1f} s ({args.creates / elapsed:.1f}/s), beside {len(side_log)} CLI runs "
        f"(`corral template build base`, `corral sandbox run base -- true`, alternating, with the server's "
        f"own instance settings, so each runs as a side instance).",
        "",
        "| measure | result |", "|---|---|",
        f"| outcomes | {dict(outcomes)} |",
        f"| errors mentioning a 5xx | {server_5xx} |",
        f"| CLI runs that failed | {len(side_failures)} of {len(side_log)} |",
        f"| server instance before, stock made and settled (footprint, cgroups) | {before} |",
        f"| after the run, pool refilled | {after} |",
        f"| after the server stopped and cleaned up | {final} |",
        f"| side instances (s0..s9) holding anything afterwards | {len(side_left)} {side_left or ''} |",
    ]
    report = "\n".join(lines)
    print(report)
    for entry in side_failures[:5]:
        print("side command failed:", entry, file=sys.stderr)
    for error in errors[:10]:
        print("error:", error, file=sys.stderr)
    if args.write:
        write_section(args.write, "stress", report, heading="Stress: creates and kills beside CLI commands",
                      command=f"sudo .venv/bin/python benchmarks/stress.py --creates {args.creates} "
                              f"--concurrency {args.concurrency} --write {args.write}")


def _settled_stock(opts: dict, settings, pool: int) -> tuple:
    """The instance's footprint once a few creates beyond the ready pool have made it stock the template
    and it has stopped changing for 3 s."""
    from e2b import Sandbox

    sandboxes = [Sandbox.create(**opts) for _ in range(pool + 2)]
    for sbx in sandboxes:
        sbx.kill()
    seen, since = None, time.monotonic()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = footprint(settings), cgroups(settings.instance)
        if now != seen:
            seen, since = now, time.monotonic()
        elif time.monotonic() - since >= 3:
            break
        time.sleep(0.25)
    return seen


def _settings(server: ServerProcess):
    import ipaddress

    from corral.config import Settings

    return Settings(data_dir=Path(server.env["CORRAL_DATA_DIR"]), run_dir=Path(server.env["CORRAL_RUN_DIR"]),
                    sandbox_network=ipaddress.IPv4Network(server.env["CORRAL_SANDBOX_NETWORK"]),
                    instance=server.env["CORRAL_INSTANCE"])


if __name__ == "__main__":
    main()
