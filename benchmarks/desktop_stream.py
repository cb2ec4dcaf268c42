"""The desktop stream's VNC server: from its start to its first viewer's RFB greeting.

    .venv/bin/python benchmarks/desktop_stream.py [--rounds 10] [--hogs 0] [--write docs/benchmarks.md]

In one desktop sandbox of a real `corral serve`, alternately, `--rounds` times each:
  - the unmodified e2b-desktop SDK's `stream.start(require_auth=True)`, which runs `x11vnc -bg ...` by name
    (the template's /usr/local/bin/x11vnc: a soft open-file limit of 1024, then /usr/bin/x11vnc);
  - baseline: the SDK's own x11vnc command line with /usr/bin/x11vnc itself, under the sandbox's soft
    open-file limit (1048576), as the template had it before the wrapper.
Each is timed inside the sandbox from the moment its start returned (x11vnc's `-bg` returns once it
listens) until a client on 127.0.0.1:5900 has read the `RFB 003.008` greeting; x11vnc's CPU seconds are
read from /proc before it is stopped. `--hogs N` keeps N busy loops running on the host meanwhile (a loaded
host, as under two test workers); they are killed at the end.

Builds the `desktop` template first when it is missing or its recipe changed (minutes). Everything it
makes is removed when it ends, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from e2b_desktop import Sandbox

from benchmarks.desktop import Sandboxes, make_server, median_of, serving, stats
from benchmarks.report import write_section

VNC_PORT = 5900
# The e2b-desktop SDK's stream command line (e2b_desktop/main.py, `_VNCServer.start`), with the program named.
SDK_COMMAND = ("{program} -bg -display :0 -forever -wait 50 -shared -rfbport 5900 -usepw "
               "2>/tmp/x11vnc_stderr.log")
# Inside the sandbox: ms until the greeting (retrying the connection while x11vnc is not listening yet),
# then x11vnc's CPU seconds (utime + stime of the newest x11vnc).
GREETING_PROBE = r"""python3 - <<'EOF'
import os, socket, time
start = time.monotonic()
while True:
    try:
        conn = socket.create_connection(("127.0.0.1", 5900), timeout=300)
        break
    except OSError:
        time.sleep(0.005)
greeting = conn.recv(12)
elapsed = (time.monotonic() - start) * 1000
conn.close()
pid = os.popen("pgrep -n -x x11vnc").read().strip()
fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
print(f"{elapsed:.1f} {cpu:.2f} {greeting[:12].decode(errors='replace').strip()}")
EOF"""


def probe(sbx: Sandbox) -> tuple[float, float]:
    elapsed, cpu, greeting = sbx.commands.run(GREETING_PROBE, timeout=600).stdout.split(maxsplit=2)
    if greeting.strip() != "RFB 003.008":
        raise RuntimeError(f"x11vnc greeted with {greeting!r}")
    return float(elapsed), float(cpu)


def stop_x11vnc(sbx: Sandbox) -> None:
    sbx.commands.run("pkill -x x11vnc; while pgrep -x x11vnc >/dev/null; do sleep 0.05; done", timeout=60)


@contextlib.contextmanager
def host_hogs(count: int) -> Iterator[None]:
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def measure(opts: dict, sandboxes: Sandboxes, rounds: int, hogs: int) -> dict[str, list[tuple[float, float]]]:
    sbx = sandboxes.add(Sandbox.create(timeout=1800, **opts))
    results: dict[str, list[tuple[float, float]]] = {"wrapped": [], "plain": []}
    with host_hogs(hogs):
        for i in range(rounds):
            sbx.stream.start(require_auth=True)  # also writes ~/.vnc/passwd, which the baseline uses
            results["wrapped"].append(probe(sbx))
            sbx.stream.stop()
            stop_x11vnc(sbx)
            sbx.commands.run(SDK_COMMAND.format(program="/usr/bin/x11vnc"), timeout=120)
            results["plain"].append(probe(sbx))
            stop_x11vnc(sbx)
            print(f"  round {i + 1}: SDK stream {results['wrapped'][-1][0]:.0f} ms, "
                  f"plain x11vnc {results['plain'][-1][0]:.0f} ms", flush=True)
    sandboxes.kill(sbx)
    return results


def render(args, results: dict[str, list[tuple[float, float]]]) -> str:
    wrapped_ms, plain_ms = ([ms for ms, _ in results[k]] for k in ("wrapped", "plain"))
    wrapped_cpu, plain_cpu = ([cpu for _, cpu in results[k]] for k in ("wrapped", "plain"))
    ratio = median_of(plain_ms) / median_of(wrapped_ms)
    load = f"{args.hogs} busy loops on the host" if args.hogs else "an otherwise idle host"
    return "\n".join([
        f"One desktop sandbox, {load}; the two starts alternate, {args.rounds} rounds. Timed inside the "
        "sandbox from the start's return (x11vnc's `-bg` returns once it listens) to a client's reading the "
        "RFB greeting on 127.0.0.1:5900.",
        "",
        "| x11vnc started by | n | greeting p50 | p99 ms | x11vnc CPU s, median |",
        "|---|---|---|---|---|",
        f"| the SDK's `stream.start(require_auth=True)` (template wrapper: soft open-file limit 1024) | "
        f"{len(wrapped_ms)} | {stats(wrapped_ms)} | {median_of(wrapped_cpu):.2f} |",
        f"| baseline: the SDK's command line with /usr/bin/x11vnc (the sandbox's soft limit, 1048576) | "
        f"{len(plain_ms)} | {stats(plain_ms)} | {median_of(plain_cpu):.2f} |",
        "",
        f"The baseline takes {ratio:.1f}x as long to greet (p50). libvncserver calls fcntl() on every "
        "descriptor number below the soft limit before it accepts a viewer (docs/desktop.md, \"The live "
        "stream\").",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="starts of each kind")
    parser.add_argument("--hogs", type=int, default=0, help="busy loops on the host while measuring")
    parser.add_argument("--write", type=Path, help="write the results into this file's section")
    args = parser.parse_args()
    sandboxes = Sandboxes()
    with serving(make_server("stream", idle_policy=False), sandboxes) as opts:
        results = measure(opts, sandboxes, args.rounds, args.hogs)
    report = render(args, results)
    print(report)
    if args.write:
        name = f"desktop-stream-hogs{args.hogs}" if args.hogs else "desktop-stream"
        heading = f"Desktop stream, {args.hogs} busy loops on the host" if args.hogs else "Desktop stream"
        command = " ".join([".venv/bin/python benchmarks/desktop_stream.py", *sys.argv[1:]])
        write_section(args.write, name, report, command, heading=heading)


if __name__ == "__main__":
    main()
