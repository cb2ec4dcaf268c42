"""Code interpreter latency through a real `corral serve`, with the unmodified e2b-code-interpreter SDK.

    sudo .venv/bin/python benchmarks/interpreter.py [--n 200] [--charts 30] [--creates 30] [--pool 3] \
        [--write docs/benchmarks.md]

Measures, each with p50/p95/p99:
  - `run_code('1+1')` round trip on a running `code-interpreter-v1` sandbox;
  - a matplotlib chart round trip (PNG + `e2b/chart` data);
  - create `code-interpreter-v1` → first `run_code('1+1')` result, sequential, pool warm.
Baseline in the same run: the same code sent to a Python kernel with jupyter_client inside one sandbox
(same kernel, same IPython startup files; no HTTP, no proxy, no NDJSON), timed inside the sandbox.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.envd import pct
from benchmarks.report import targets_table, write_section
from tests.helpers.server import ServerProcess, host_resolver

BENCH_ROOT = Path("/var/tmp/corral-bench-interpreter")
TEMPLATE = "code-interpreter-v1"
TARGETS = {"one_plus_one_p50": 10.0, "create_first_result_p50": 60.0}
CHART_CODE = ("import matplotlib.pyplot as plt\nplt.figure()\nplt.plot([1, 2, 3, 4], [1, 4, 9, 16], label='sq')\n"
              "plt.title('squares')\nplt.show()")

# Runs inside the sandbox as the user: a fresh kernel driven by jupyter_client, timed there.
IN_SANDBOX = r'''
import json, sys, time
from jupyter_client.manager import start_new_kernel
n, chart_n, chart_code = int(sys.argv[1]), int(sys.argv[2]), open(sys.argv[3]).read()
km, kc = start_new_kernel(kernel_name="python3")
def timed(code, count):
    for _ in range(3):
        kc.execute_interactive(code, timeout=60, output_hook=lambda m: None)
    out = []
    for _ in range(count):
        t = time.perf_counter()
        reply = kc.execute_interactive(code, timeout=60, output_hook=lambda m: None)
        out.append((time.perf_counter() - t) * 1000)
        assert reply["content"]["status"] == "ok", reply["content"]
    return out
print(json.dumps({"one": timed("1+1", n), "chart": timed(chart_code, chart_n)}))
kc.stop_channels(); km.shutdown_kernel(now=True)
'''


def stats(samples: list[float]) -> str:
    if not samples:
        return "- | - | -"
    return f"{pct(samples, 50):.1f} | {pct(samples, 95):.1f} | {pct(samples, 99):.1f}"


def timed_runs(sbx, code: str, n: int, check) -> list[float]:
    for _ in range(3):
        sbx.run_code(code)
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        execution = sbx.run_code(code)
        samples.append((time.perf_counter() - start) * 1000)
        check(execution)
    return samples


def check_two(execution) -> None:
    assert execution.error is None and execution.text == "2", execution


def check_chart(execution) -> None:
    (figure,) = execution.results
    assert figure.png and figure.chart is not None and figure.chart.type.value == "line", execution


def create_to_first_result(opts: dict, n: int, server: ServerProcess, pool: int) -> tuple[list, list, int]:
    from e2b_code_interpreter import Sandbox

    to_result, create_only, failures = [], [], 0
    for _ in range(n):
        _wait_pool(server, pool)
        start = time.perf_counter()
        try:
            sbx = Sandbox.create(TEMPLATE, **opts)
            created = time.perf_counter()
            check_two(sbx.run_code("1+1"))
            done = time.perf_counter()
            to_result.append((done - start) * 1000)
            create_only.append((created - start) * 1000)
            sbx.kill()
        except Exception as e:
            failures += 1
            print("create failure:", e, file=sys.stderr)
    return to_result, create_only, failures


def in_sandbox_baseline(sbx, n: int, chart_n: int) -> dict:
    sbx.files.write("/tmp/bench_kernel.py", IN_SANDBOX)
    sbx.files.write("/tmp/bench_chart.py", CHART_CODE)
    result = sbx.commands.run(f"python3 /tmp/bench_kernel.py {n} {chart_n} /tmp/bench_chart.py", timeout=600)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _wait_pool(server: ServerProcess, size: int, timeout: float = 120) -> None:
    """Sequential creates measure the warm path: wait until the pool holds `size` sandboxes again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{server.url}/health").json()["pooled"].get(TEMPLATE, 0) >= size:
            return
        time.sleep(0.05)
    raise RuntimeError(f"the {TEMPLATE} pool did not refill to {size} within {timeout:.0f}s")


def main() -> None:
    from e2b_code_interpreter import Sandbox

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--charts", type=int, default=30)
    parser.add_argument("--creates", type=int, default=30)
    parser.add_argument("--pool", type=int, default=3)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()

    server = ServerProcess("bI", "10.214.0.0/22", BENCH_ROOT / "server", dns_upstream=host_resolver(),
                           pool_size=args.pool, extra_env={"CORRAL_POOL_TEMPLATES": TEMPLATE,
                                                           "CORRAL_METRICS_INTERVAL_S": "30"})
    server.start()
    try:
        key = server.cli("keys", "create", "--name", "bench").strip()
        opts = {"api_url": server.url, "sandbox_url": server.url, "api_key": key}
        _wait_pool(server, args.pool, timeout=600)
        sbx = Sandbox.create(TEMPLATE, timeout=1800, **opts)
        try:
            one = timed_runs(sbx, "1+1", args.n, check_two)
            print(f"run_code('1+1') p50/p95/p99 ms: {stats(one)}", flush=True)
            chart = timed_runs(sbx, CHART_CODE, args.charts, check_chart)
            print(f"chart round trip p50/p95/p99 ms: {stats(chart)}", flush=True)
            base = in_sandbox_baseline(sbx, args.n, args.charts)
            print(f"in-sandbox jupyter_client: 1+1 {stats(base['one'])}, chart {stats(base['chart'])}", flush=True)
        finally:
            sbx.kill()
        first, create_only, failures = create_to_first_result(opts, args.creates, server, args.pool)
        print(f"create -> first result p50/p95/p99 ms: {stats(first)} ({failures} failures)", flush=True)
    finally:
        server.stop()
        server.destroy_everything()

    ratio = pct(one, 50) / pct(base["one"], 50)
    chart_ratio = pct(chart, 50) / pct(base["chart"], 50)
    one_ok = pct(one, 50) <= TARGETS["one_plus_one_p50"]
    first_ok = bool(first) and failures == 0 and pct(first, 50) <= TARGETS["create_first_result_p50"]
    lines = [
        "| measure | n | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|---|",
        f"| `run_code('1+1')` through the SDK | {len(one)} | {stats(one)} |",
        f"| baseline: `1+1` via jupyter_client inside the sandbox | {len(base['one'])} | {stats(base['one'])} |",
        f"| matplotlib line chart (PNG + chart data) through the SDK | {len(chart)} | {stats(chart)} |",
        f"| baseline: the same chart via jupyter_client inside the sandbox | {len(base['chart'])} "
        f"| {stats(base['chart'])} |",
        f"| create `{TEMPLATE}` → first `run_code('1+1')` result, pool of {args.pool} | {len(first)} "
        f"| {stats(first)} |",
        f"| of which `Sandbox.create` | {len(create_only)} | {stats(create_only)} |",
        "",
        f"Against the in-sandbox baseline (p50 over p50): `1+1` {ratio:.2f}x, chart {chart_ratio:.2f}x. "
        f"Create failures: {failures} of {args.creates}.",
        "",
        *targets_table([
            (f"`run_code('1+1')` p50 <= {TARGETS['one_plus_one_p50']:.0f} ms", f"{pct(one, 50):.1f} ms", one_ok),
            (f"create → first result p50 <= {TARGETS['create_first_result_p50']:.0f} ms (warm pool)",
             f"{pct(first, 50) if first else float('nan'):.1f} ms", first_ok),
        ]),
    ]
    report = "\n".join(lines)
    print(report)
    if args.write:
        write_section(args.write, "interpreter-benchmark", report, heading="Code interpreter",
                      command=f"sudo .venv/bin/python benchmarks/interpreter.py --n {args.n} --charts {args.charts} "
                              f"--creates {args.creates} --pool {args.pool} --write {args.write}")


if __name__ == "__main__":
    main()
