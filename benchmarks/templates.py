"""Templates built with the unmodified e2b SDK: build time of a small template (cold, cached with one
changed last step, skip_cache) and create → first command for it next to `base`, in one run.

    sudo .venv/bin/python benchmarks/templates.py [--n 20] [--rounds 3] [--write docs/benchmarks.md]

The template: `from_template("base")`, a RUN holding a nonce of the round (so no layer of it is cached
yet), a COPY of a few files, four more RUN steps doing small local work (no network) and a start command
gated by `wait_for_port`. Per round: a cold build, a rebuild with only the last RUN changed (the steps
before it come from the layer cache) and a `skip_cache` rebuild. Times are the SDK's `Template.build`
wall clock (upload, trigger, polling every 0.2 s); the server's log gives each step's and the
finalization's share.

Create → first command: `Sandbox.create(t)` until `commands.run("echo hi")` has returned, `base` and the
custom template interleaved, each killed after. First with no warm pool for either (CORRAL_POOL_SIZE=0:
both restore their memory checkpoint into a prepared container), then with a warm pool of both (the
server restarted with CORRAL_POOL_TEMPLATES=base,<template id>: a custom template is pooled by its id,
the name the orchestrator knows it by; each create waits until its template has one ready).

Floor, in the same run: a raw `runsc` boot on base's layers, one exec of `true` and a filesystem-only
checkpoint, which is what every RUN and COPY step costs before its command's own work.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.envd import pct
from benchmarks.report import targets_table, write_section
from tests.helpers.server import ServerProcess, host_resolver

BENCH_ROOT = Path("/var/tmp/corral-bench-templates")
NAME = "bench-small"
TARGETS = {"cached_ratio": 0.20, "create_ratio": 1.2}
POOL = 2

# A small app: the COPY brings it, the RUN steps byte-compile it, generate its data and commit it.
APP = {
    "main.py": "import json, pathlib\nCONFIG = json.loads(pathlib.Path(__file__).with_name('config.json')"
               ".read_text())\n\ndef greet(name):\n    return CONFIG['greeting'].format(name=name)\n",
    "util.py": "def chunks(items, size):\n    for i in range(0, len(items), size):\n        yield items[i:i + size]\n",
    "config.json": '{"greeting": "hello {name}", "rows": 20000}\n',
    "prepare.py": (
        "import json, pathlib, sqlite3, sys\n"
        "out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)\n"
        "rows = json.loads(pathlib.Path(__file__).with_name('config.json').read_text())['rows']\n"
        "db = sqlite3.connect(out / 'items.db')\n"
        "db.execute('create table items (id integer primary key, name text, score real)')\n"
        "db.executemany('insert into items values (?, ?, ?)', ((i, f'item-{i}', i * 0.5) for i in range(rows)))\n"
        "db.commit()\n"
        "for i in range(200):\n"
        "    (out / f'page-{i}.json').write_text(json.dumps({'page': i, 'ids': list(range(i * 100, i * 100 + 100))}))\n"
    ),
    "README.md": "# bench app\n\nA few files for the template benchmark.\n",
}


# --packages: a template as people write them, with packages from the registries (network), after the
# first step so that a cold round installs them and the cached rounds reuse them.
OPTIONS = {"packages": False}


def template(context: Path, nonce: str, last: str):
    from e2b import Template, wait_for_port

    t = (
        Template(file_context_path=str(context))
        .from_template("base")
        .run_cmd(f"mkdir -p /home/user/app /home/user/data && echo {nonce} > /home/user/.build-id")
    )
    if OPTIONS["packages"]:
        t = t.apt_install(["jq"], no_install_recommends=True).pip_install(["six==1.17.0"])
    return (
        t.copy("app", "app")
        .run_cmd("python3 -m compileall -q app")
        .run_cmd("python3 app/prepare.py data && ls data | wc -l")
        .run_cmd("git config --global user.email bench@corral.test && git config --global user.name bench && "
                 "git init -q app && git -C app add -A && git -C app commit -qm app")
        .run_cmd(f"echo {last} > app/VERSION")
        .set_start_cmd("python3 -m http.server 8080 --directory /home/user/app", wait_for_port(8080))
    )


@dataclass
class Build:
    seconds: float  # the SDK's Template.build, wall clock
    server_s: float = 0.0  # "Build finished in Xs"
    steps: dict[str, float] = field(default_factory=dict)  # step -> "[n] done in Xs"
    kinds: dict[str, str] = field(default_factory=dict)  # step -> RUN / COPY
    cached: int = 0
    finalize_start_s: float = 0.0  # boot with envd, setup, start command, ready check
    finalize_checkpoint_s: float = 0.0  # the memory checkpoint
    template_id: str = ""
    timeline: list[tuple[float, str]] = field(default_factory=list)  # the server's entries, s from its first


def build(opts: dict, context: Path, nonce: str, last: str, **kwargs) -> Build:
    from e2b import Template

    entries: list = []
    started = time.perf_counter()
    info = Template.build(template(context, nonce, last), NAME, on_build_logs=entries.append, **opts, **kwargs)
    result = Build(seconds=time.perf_counter() - started, template_id=info.template_id)
    at: dict[str, datetime] = {}
    first = next((e.timestamp for e in entries if e.timestamp.tzinfo is not None), None)
    for entry in entries:
        message = entry.message
        if first is not None and entry.timestamp.tzinfo is not None:
            result.timeline.append(((entry.timestamp - first).total_seconds(), message))
        if match := re.match(r"\[(\d+)\] (RUN|COPY) ", message):
            result.kinds[match[1]] = match[2]
        elif match := re.match(r"\[(\d+)\] done in ([\d.]+)s", message):
            result.steps[match[1]] = float(match[2])
        elif re.match(r"\[\d+\] CACHED ", message):
            result.cached += 1
        elif match := re.match(r"Build finished in ([\d.]+)s", message):
            result.server_s = float(match[1])
        for mark in ("Starting the template", "Template is ready", "Snapshotting the template", "Build finished"):
            # The server's entries only (the SDK adds some of its own, stamped with local naive times).
            if message.startswith(mark) and entry.timestamp.tzinfo is not None:
                at.setdefault(mark, entry.timestamp)
    if {"Starting the template", "Template is ready"} <= at.keys():
        result.finalize_start_s = (at["Template is ready"] - at["Starting the template"]).total_seconds()
    if {"Snapshotting the template", "Build finished"} <= at.keys():
        result.finalize_checkpoint_s = (at["Build finished"] - at["Snapshotting the template"]).total_seconds()
    return result


def describe(b: Build) -> str:
    steps = ", ".join(f"{b.kinds.get(n, '?')} {n} {s:.1f}" for n, s in sorted(b.steps.items(), key=lambda x: int(x[0])))
    return (f"{b.seconds:.1f} s (server {b.server_s:.1f} s; {b.cached} cached; steps: {steps or '-'}; finalize: "
            f"start + ready {b.finalize_start_s:.1f} s, memory checkpoint {b.finalize_checkpoint_s:.1f} s)")


def create_to_first_command(opts: dict, templates: list[str], n: int, server: ServerProcess | None = None,
                            pooled_as: dict[str, str] | None = None) -> dict[str, list[float]]:
    """`n` creates of each template, interleaved; with `server`, each waits for its template's pool first."""
    from e2b import Sandbox

    samples: dict[str, list[float]] = {t: [] for t in templates}
    for i in range(n + 2):
        for name in templates:
            if server is not None and pooled_as is not None:
                _wait_pooled(server, {pooled_as[name]: 1})
            else:
                time.sleep(0.2)  # lets the prepared containers be put back, as between a user's requests
            started = time.perf_counter()
            sbx = Sandbox.create(name, **opts)
            out = sbx.commands.run("echo hi")
            elapsed = (time.perf_counter() - started) * 1000
            assert out.stdout == "hi\n", out
            sbx.kill()
            if i >= 2:  # the first two of each warm the prepared containers and the SDK's connections
                samples[name].append(elapsed)
    return samples


def _wait_pooled(server: ServerProcess, wanted: dict[str, int], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        pooled = httpx.get(f"{server.url}/health").json()["pooled"]
        if all(pooled.get(t, 0) >= count for t, count in wanted.items()):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the pool did not fill: {pooled}, wanted {wanted}")
        time.sleep(0.1)


def step_floor(n: int) -> dict[str, list[float]]:
    """A raw `runsc` boot on base's layers, one exec of `true`, a filesystem-only checkpoint: what the
    builder does for every RUN step around the command, with no API, no build log, no layer bookkeeping."""
    from corral.config import Settings
    from corral.runtime.base import SandboxConfig
    from corral.runtime.gvisor import GVisorRuntime
    from corral.templates.store import TemplateStore

    settings = Settings(data_dir=BENCH_ROOT / "raw", run_dir=Path("/run/corral-bench-templates-raw"),
                        sandbox_network=ipaddress.IPv4Network("10.238.0.0/24"), instance="bF")
    out: dict[str, list[float]] = {"boot": [], "exec": [], "checkpoint": [], "total": []}

    async def run() -> None:
        runtime = GVisorRuntime(settings)
        await runtime.open()
        layers = list(runtime.open_snapshot(TemplateStore(settings).resolve("base")).layers)
        try:
            for i in range(n):
                t0 = time.perf_counter()
                sandbox = await runtime.boot(layers, ["/bin/sh", "-c", "exec sleep infinity"], SandboxConfig(),
                                             template="build")
                t1 = time.perf_counter()
                result = await runtime.exec(sandbox.id, ["/bin/sh", "-c", "true"], timeout=60)
                assert result.exit_code == 0
                t2 = time.perf_counter()
                await runtime.checkpoint(sandbox.id, BENCH_ROOT / "raw" / f"layer-{i}", leave_running=False,
                                         memory=False)
                t3 = time.perf_counter()
                for name, seconds in (("boot", t1 - t0), ("exec", t2 - t1), ("checkpoint", t3 - t2),
                                      ("total", t3 - t0)):
                    out[name].append(seconds * 1000)
        finally:
            await runtime.destroy_all()

    try:
        asyncio.run(run())
    finally:
        shutil.rmtree(BENCH_ROOT / "raw", ignore_errors=True)
    return out


def ms(samples: list[float]) -> str:
    return f"{pct(samples, 50):.0f} | {pct(samples, 90):.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="creates of each template per pass")
    parser.add_argument("--rounds", type=int, default=3, help="cold / cached / skip_cache build rounds")
    parser.add_argument("--floor", type=int, default=5, help="raw boot + exec + checkpoint repetitions")
    parser.add_argument("--write", type=Path)
    parser.add_argument("--packages", action="store_true",
                        help="add apt_install(jq) and pip_install(six) steps (reaches the package registries)")
    args = parser.parse_args()
    OPTIONS["packages"] = args.packages

    floor = step_floor(args.floor)
    print(f"floor per step (raw runsc, ms p50): boot {pct(floor['boot'], 50):.0f}, exec {pct(floor['exec'], 50):.0f}, "
          f"filesystem checkpoint {pct(floor['checkpoint'], 50):.0f}, total {pct(floor['total'], 50):.0f}", flush=True)

    context = Path(tempfile.mkdtemp(prefix="corral-bench-templates-"))
    (context / "app").mkdir()
    for name, text in APP.items():
        (context / "app" / name).write_text(text)

    server = ServerProcess("bM", "10.236.0.0/22", BENCH_ROOT / "server", dns_upstream=host_resolver(), pool_size=0,
                           extra_env={"CORRAL_METRICS_INTERVAL_S": "30"})
    rounds: list[tuple[Build, Build, Build]] = []
    template_id = ""
    try:
        server.start()
        key = server.cli("keys", "create", "--name", "bench").strip()
        opts = {"api_url": server.url, "sandbox_url": server.url, "api_key": key}
        for r in range(args.rounds):
            nonce = secrets.token_hex(8)
            cold = build(opts, context, nonce, "v1")
            print(f"round {r + 1} cold: {describe(cold)}", flush=True)
            cached = build(opts, context, nonce, "v2")
            print(f"round {r + 1} cached, last step changed: {describe(cached)}", flush=True)
            if r == 0:
                print("  its server log, s from the first entry:", flush=True)
                for offset, message in cached.timeline:
                    print(f"  {offset:6.2f}  {message[:100]}", flush=True)
            skipped = build(opts, context, nonce, "v2", skip_cache=True)
            print(f"round {r + 1} skip_cache: {describe(skipped)}", flush=True)
            expected = 7 if OPTIONS["packages"] else 5  # every RUN/COPY but the changed last one
            assert cold.cached == 0 and cached.cached == expected and skipped.cached == 0, (cold, cached, skipped)
            rounds.append((cold, cached, skipped))
            template_id = cold.template_id

        unpooled = create_to_first_command(opts, ["base", NAME], args.n)
        print(f"no pool, create → echo hi p50 | p90 ms: base {ms(unpooled['base'])}, {NAME} {ms(unpooled[NAME])}",
              flush=True)

        # The pool's templates are read when the server starts: restart it pooling both (same data).
        server.stop()
        server.env.update({"CORRAL_POOL_SIZE": str(POOL), "CORRAL_POOL_TEMPLATES": f"base,{template_id}"})
        server.start()
        _wait_pooled(server, {"base": POOL, template_id: POOL})
        pooled = create_to_first_command(opts, ["base", NAME], args.n, server, {"base": "base", NAME: template_id})
        print(f"pool of {POOL} each, create → echo hi p50 | p90 ms: base {ms(pooled['base'])}, "
              f"{NAME} {ms(pooled[NAME])}", flush=True)
        answer = httpx.delete(f"{server.url}/templates/{template_id}", headers={"X-API-Key": key})
        if answer.status_code != 204:
            print(f"could not delete the benchmark's template {template_id}: {answer.status_code} {answer.text}",
                  file=sys.stderr)
    finally:
        server.stop()
        server.destroy_everything()
        shutil.rmtree(context, ignore_errors=True)

    median = statistics.median
    cold_s = median(r[0].seconds for r in rounds)
    cached_s = median(r[1].seconds for r in rounds)
    skipped_s = median(r[2].seconds for r in rounds)
    ratio = cached_s / cold_s
    cold_steps = [s for r in rounds for s in r[0].steps.values()]
    finalize = median(r[0].finalize_start_s + r[0].finalize_checkpoint_s for r in rounds)
    create_ratio = pct(unpooled[NAME], 50) / pct(unpooled["base"], 50)
    pooled_ratio = pct(pooled[NAME], 50) / pct(pooled["base"], 50)

    def build_row(label: str, index: int) -> str:
        bs = [r[index] for r in rounds]
        return (f"| {label} | {' / '.join(f'{b.seconds:.1f}' for b in bs)} | {median(b.seconds for b in bs):.1f} | "
                f"{median(b.server_s for b in bs):.1f} | {median(b.cached for b in bs):.0f} | "
                f"{median(sum(b.steps.values()) for b in bs):.1f} | "
                f"{median(b.finalize_start_s for b in bs):.1f} + {median(b.finalize_checkpoint_s for b in bs):.1f} |")

    lines = [
        "The template: `from_template(\"base\")`, RUN (with a nonce per round) `mkdir`, COPY of 5 small files, RUN "
        "`compileall`, RUN a script writing a 20 000-row SQLite file and 200 JSON files, RUN `git init` + "
        "commit, RUN `echo vN > app/VERSION`, start command `python3 -m http.server 8080` with "
        "`wait_for_port(8080)`. No network.",
        "",
        "| build | each round s | median s (SDK wall clock) | server s | cached steps | steps run, sum s | "
        "finalize: start + ready, memory checkpoint s |", "|---|---|---|---|---|---|---|",
        build_row("cold (nothing cached)", 0),
        build_row("cached, last RUN changed", 1),
        build_row("`skip_cache=True`", 2),
        "",
        f"Where a cold build's time goes (medians): {len(cold_steps) // len(rounds)} RUN/COPY steps at "
        f"{median(cold_steps):.1f} s each (one sandbox boot, the command, a filesystem checkpoint), finalization "
        f"{finalize:.1f} s (boot with envd, start command, ready check, memory checkpoint). The floor of a step, "
        f"raw `runsc` in the same run (n={args.floor}, p50 ms): boot {pct(floor['boot'], 50):.0f}, exec of `true` "
        f"{pct(floor['exec'], 50):.0f}, filesystem checkpoint {pct(floor['checkpoint'], 50):.0f}; in all "
        f"{pct(floor['total'], 50):.0f} ms.",
        "",
        "| create → `commands.run(\"echo hi\")` | n | base p50 / p90 ms | custom p50 / p90 ms | custom / base (p50) |",
        "|---|---|---|---|---|",
        f"| no warm pool (CORRAL_POOL_SIZE=0; prepared containers for both) | {args.n} | "
        f"{ms(unpooled['base']).replace(' | ', ' / ')} | {ms(unpooled[NAME]).replace(' | ', ' / ')} | "
        f"{create_ratio:.2f}x |",
        f"| warm pool of {POOL} each (CORRAL_POOL_TEMPLATES=base,<template id>) | {args.n} | "
        f"{ms(pooled['base']).replace(' | ', ' / ')} | {ms(pooled[NAME]).replace(' | ', ' / ')} | "
        f"{pooled_ratio:.2f}x |",
        "",
        *targets_table([
            (f"cached rebuild, last step changed, <= {TARGETS['cached_ratio']:.0%} of the cold build",
             f"{cached_s:.1f} s / {cold_s:.1f} s = {ratio:.0%} (skip_cache {skipped_s:.1f} s)",
             ratio <= TARGETS["cached_ratio"]),
            (f"custom template create → first command within {TARGETS['create_ratio']}x of base, no pool",
             f"{create_ratio:.2f}x", create_ratio <= TARGETS["create_ratio"]),
            ("the same, both pooled", f"{pooled_ratio:.2f}x", pooled_ratio <= TARGETS["create_ratio"]),
        ]),
    ]
    report = "\n".join(lines)
    print(report)
    print(f"cached / cold: {ratio:.0%} -> {'PASS' if ratio <= TARGETS['cached_ratio'] else 'FAIL'}; "
          f"create custom / base: {create_ratio:.2f}x no pool, {pooled_ratio:.2f}x pooled -> "
          f"{'PASS' if max(create_ratio, pooled_ratio) <= TARGETS['create_ratio'] else 'FAIL'}")
    if args.write:
        write_section(args.write, "templates-benchmark", report, heading="Templates",
                      command=f"sudo .venv/bin/python benchmarks/templates.py --n {args.n} --rounds {args.rounds} "
                              f"--write {args.write}")


if __name__ == "__main__":
    main()
