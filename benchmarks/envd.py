"""envd round trips through the unmodified e2b Python SDK, next to what they cost without envd.

    sudo .venv/bin/python benchmarks/envd.py [--n 200] [--write docs/benchmarks.md] [--no-sandbox]

Part 1 (the issue's target) runs envd on the host and compares
  - `commands.run('true')` with `subprocess.run(['bash', '-l', '-c', 'true'])`,
  - `files.write` + `files.read` of 1 KiB and 10 MiB with writing and reading the same file directly.
Part 2 runs the same SDK calls against envd inside a gVisor sandbox restored from `base`, next to
`bash -l -c true` timed inside that sandbox, so the cost of the sandbox and of envd can be told apart.
Both baselines are measured in the same run as the figures they are compared with.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.report import write_section
from corral.envd.processes import DEFAULT_PATH
from corral.templates.envd_layer import START_COMMAND
from tests.helpers.envd_client import init, sync_client

TARGET_ADDED_P50_MS = 3.0
ENVD_COMMAND = " ".join(START_COMMAND)


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def timed(fn, n: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def row(name: str, samples: list[float], baseline: list[float] | None = None) -> str:
    p50, p99 = pct(samples, 50), pct(samples, 99)
    extra = ""
    if baseline is not None:
        b50 = pct(baseline, 50)
        extra = f" | {p50 - b50:+.2f} ms | {p50 / b50:.2f}x"
    else:
        extra = " | | "
    return f"| {name} | {len(samples)} | {p50:.2f} | {p99:.2f}{extra} |"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_part(n: int) -> tuple[list[str], float]:
    port = free_port()
    token = secrets.token_hex(16)
    server = subprocess.Popen([sys.executable, "-m", "corral.envd", "--host", "127.0.0.1", "--port", str(port),
                               "--workdir", "/root"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 204:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        assert init(url, accessToken=token).status_code == 204
        sbx = sync_client(url, token)
        rows = []
        # The same environment and directory envd gives the command, so only envd's own work differs.
        env = {"PATH": DEFAULT_PATH, "HOME": "/root", "USER": "root", "LOGNAME": "root"}
        baseline = timed(lambda: subprocess.run(["bash", "-l", "-c", "true"], check=True, env=env, cwd="/root"), n)
        through_envd = timed(lambda: sbx.commands.run("true"), n)
        rows.append(row("`subprocess.run(['bash','-l','-c','true'])` (baseline)", baseline))
        rows.append(row("`commands.run('true')` via envd", through_envd, baseline))
        added = pct(through_envd, 50) - pct(baseline, 50)
        scratch = Path(tempfile.mkdtemp(prefix="envd-bench-"))
        for label, size, count in (("1 KiB", 1024, n), ("10 MiB", 10 << 20, max(10, n // 10))):
            data = os.urandom(size)
            path = scratch / f"f{size}"

            def direct(data=data, path=path):
                path.write_bytes(data)
                assert path.read_bytes() == data

            def sdk(data=data, path=path):
                sbx.files.write(str(path), data)
                assert sbx.files.read(str(path), format="bytes") == data

            base = timed(direct, count)
            rows.append(row(f"write+read {label} directly (baseline)", base))
            rows.append(row(f"`files.write`+`files.read` {label} via envd", timed(sdk, count), base))
        subprocess.run(["rm", "-rf", str(scratch)], check=False)
        return rows, added
    finally:
        server.terminate()
        server.wait(10)


def sandbox_part(n: int) -> list[str]:
    from corral.cli.local import local_runtime, start_template
    from corral.runtime.base import SandboxConfig

    async def run() -> list[str]:
        async with local_runtime() as (runtime, store):
            sb = await start_template(runtime, store, "base", SandboxConfig())
            try:
                url = f"http://{sb.address}:49983"
                token = secrets.token_hex(16)
                assert init(url, accessToken=token, defaultUser="user").status_code == 204
                sbx = sync_client(url, token)
                sbx.files.list("/")
                rows_before = [await rss_row(runtime, sb.id, "envd idle RSS (after /init and one call)")]
                # Timed inside the sandbox, so it holds neither HTTP nor envd: the gVisor cost alone.
                loop = ("python3 -c \"import subprocess,time,json;r=[];"
                        "[(lambda t:(subprocess.run(['bash','-l','-c','true']),"
                        "r.append((time.perf_counter()-t)*1000)))"
                        f"(time.perf_counter()) for _ in range({n})];print(json.dumps(r))\"")
                inside = [float(x) for x in
                          __import__("json").loads((await asyncio.to_thread(sbx.commands.run, loop)).stdout)]
                rows = [*rows_before, row("`bash -l -c true` timed inside the sandbox (baseline)", inside)]
                rows.append(row("`commands.run('true')` via envd in gVisor",
                                await asyncio.to_thread(timed, lambda: sbx.commands.run("true"), n), inside))
                data = os.urandom(1024)

                def small():
                    sbx.files.write("/tmp/b.bin", data)
                    assert sbx.files.read("/tmp/b.bin", format="bytes") == data

                rows.append(row("`files.write`+`files.read` 1 KiB via envd in gVisor",
                                await asyncio.to_thread(timed, small, n)))
                big = os.urandom(10 << 20)

                def large():
                    sbx.files.write("/tmp/big.bin", big)
                    assert sbx.files.read("/tmp/big.bin", format="bytes") == big

                rows.append(row("`files.write`+`files.read` 10 MiB via envd in gVisor",
                                await asyncio.to_thread(timed, large, max(10, n // 10))))
                rows.append(await rss_row(runtime, sb.id, "envd RSS after the runs above"))
                rows.append(await rss_row(runtime, sb.id, "spawner (user) RSS", "spawner_child"))
                return rows
            finally:
                await runtime.destroy(sb.id)

    return asyncio.run(run())


async def rss_row(runtime, sandbox_id: str, label: str, pattern: str | None = None) -> str:
    pattern = pattern or f"^{ENVD_COMMAND}"
    probe = f"grep VmRSS /proc/$(pgrep -o -f '{pattern}')/status"
    result = await runtime.exec(sandbox_id, ["/bin/sh", "-c", probe])
    return f"| {label} | | {result.stdout.decode().split()[1]} kB | | | |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--write", type=Path, help="replace the envd section of this markdown file")
    parser.add_argument("--no-sandbox", action="store_true", help="only the host part")
    args = parser.parse_args()
    header = "| measure | n | p50 ms | p99 ms | p50 vs baseline | ratio |\n|---|---|---|---|---|---|"
    host_rows, added = host_part(args.n)
    verdict = "met" if added <= TARGET_ADDED_P50_MS else "NOT met"
    lines = ["### envd on the host", "", header, *host_rows, "",
             f"Target: envd adds <= {TARGET_ADDED_P50_MS:.0f} ms p50 to `bash -l -c true`: "
             f"measured {added:+.2f} ms, **{verdict}**.", ""]
    if not args.no_sandbox:
        lines += ["### envd inside a gVisor sandbox", "", header, *sandbox_part(args.n), ""]
    report = "\n".join(lines)
    print(report)
    if args.write:
        write_section(args.write, "envd-benchmark", report, heading="envd round trips",
                      command=f"sudo .venv/bin/python benchmarks/envd.py --n {args.n} --write {args.write}")


if __name__ == "__main__":
    main()
