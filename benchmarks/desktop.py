"""Desktop sandboxes through a real `corral serve`, with the unmodified e2b-desktop SDK.

    .venv/bin/python benchmarks/desktop.py [--creates 10] [--screenshots 30] [--clicks 10] \
        [--idle-desktops 3] [--seconds 20] [--write docs/benchmarks.md]

Measures, each next to the same step run directly inside one running desktop sandbox (timed there, in
one `commands.run` of a bash loop), in the same run:
  - create `desktop` (`Sandbox.create()`, which runs the SDK's own start-up: Xvfb, xdpyinfo, startxfce4,
    pgrep) → first `screenshot()` returned, each sandbox killed after. Where the time goes: the API's
    create, each start-up command (and the same command inside a running desktop), the screenshot's
    calls; a `base` create → first command, interleaved. Baseline: `scrot` inside the sandbox.
  - `screenshot()` round trip (the SDK runs `scrot`, reads the file, removes it). Baseline: `scrot`.
  - a right click on the desktop → a screenshot that shows its menu (Pillow: at least CHANGED_PIXELS
    pixels differ). Baseline: `xdotool click 3`, then `scrot` until the file differs.
  - idle desktops: CPU of their host cgroups (gVisor's kernel, gofer, stubs) over a window, with the idle
    policy off (what a desktop itself costs) and on (the default: idle sandboxes are frozen), next to idle
    `base` sandboxes and to the desktop's programs as the sandbox's kernel counts them; memory per idle
    desktop (MemAvailable drop, as benchmarks/runtime.py), next to `base`. One more desktop, created with
    the plain e2b SDK (no start-up commands: the snapshot's session as restored), for comparison.

Builds the `desktop` template first when it is missing or its recipe changed (minutes). Everything it
makes (sandboxes, the servers and their directories) is removed when it ends, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import io
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx
from e2b import Sandbox as PlainSandbox
from e2b.sandbox_sync.commands.command import Commands
from e2b.sandbox_sync.filesystem.filesystem import Filesystem
from e2b_desktop import Sandbox
from PIL import Image, ImageChops

from benchmarks.envd import pct
from benchmarks.report import targets_table, write_section
from benchmarks.runtime import mem_available_mb
from corral.runtime.gvisor.cgroups import ROOT as CGROUP_ROOT
from corral.runtime.gvisor.cgroups import SandboxCgroup
from tests.helpers.server import ServerProcess, host_resolver

BENCH_ROOT = Path("/var/tmp/corral-bench-desktop")
INSTANCE, NETWORK = "bDk", "10.245.0.0/22"
TEMPLATE = "desktop"
TARGETS = {"create_first_screenshot_p50_ms": 1500.0, "screenshot_p50_ms": 150.0, "idle_cpu_pct": 5.0}
IDLE_S = 10.0  # the server's idle time before it freezes a sandbox (CORRAL_IDLE_FREEZE_S's default)
# An empty spot of the desktop: a right click there opens xfdesktop's menu. (A left click on the panel's
# applications button opens one too, but the button's tooltip comes up by itself while the pointer rests.)
DESKTOP_SPOT = (700, 500)
CHANGED_PIXELS = 5000  # the menu is ~200x300 pixels; the pointer changes a few hundred
# Between the top panel and the dock at the bottom, which redraw by themselves (the clock).
COMPARED_BOX = (0, 40, 1024, 700)
WARM_UP = 3
STEP_RUNS = 12

# The SDK's start-up commands and the screenshot's, and what they are made of, inside a running desktop.
IN_SANDBOX_STEPS = {
    "/bin/true": "/bin/true",
    "xdpyinfo": "xdpyinfo -display :0 >/dev/null",
    "pgrep": "pgrep -x xfce4-session >/dev/null && pgrep -x xfwm4 >/dev/null && pgrep -x xfdesktop >/dev/null",
    "scrot": "scrot --pointer -o /tmp/bench-step.png",
    "scrot to BMP (no PNG encoding)": "scrot -o /tmp/bench-step.bmp",
    "scrot of 100x100 pixels": "scrot -a 0,0,100,100 -o /tmp/bench-step.png",
}


# ------------------------------------------------------------------------ where the SDK's time goes


@dataclass
class Call:
    what: str  # the command, or "files.read" / "files.remove"
    start: float
    end: float

    @property
    def ms(self) -> float:
        return (self.end - self.start) * 1000

    @property
    def program(self) -> str:
        """`Xvfb`, `xdpyinfo`, `startxfce4`, `pgrep`, `scrot`, `files.read`..."""
        return self.what.split(maxsplit=1)[0] if self.what.strip() else self.what


@dataclass
class CallLog:
    """Every envd call the SDK makes, timed. The SDK is unmodified: its two classes' methods are wrapped in
    this process only, while `watching`."""
    calls: list[Call] = field(default_factory=list)

    @contextmanager
    def watching(self) -> Iterator[CallLog]:
        originals = Commands.run, Filesystem.read, Filesystem.remove

        def timed(label: Callable[[tuple, dict], str], method):
            def wrapper(owner, *args, **kwargs):
                start = time.perf_counter()
                try:
                    return method(owner, *args, **kwargs)
                finally:
                    self.calls.append(Call(label(args, kwargs), start, time.perf_counter()))
            return wrapper

        Commands.run = timed(lambda a, k: str(a[0] if a else k.get("cmd", "?")), originals[0])
        Filesystem.read = timed(lambda a, k: "files.read", originals[1])
        Filesystem.remove = timed(lambda a, k: "files.remove", originals[2])
        try:
            yield self
        finally:
            Commands.run, Filesystem.read, Filesystem.remove = originals

    def between(self, start: float, end: float) -> list[Call]:
        return [c for c in self.calls if c.start >= start and c.end <= end]


# ----------------------------------------------------------------------------------------- helpers


def stats(samples: list[float], sep: str = " | ") -> str:
    return f"{pct(samples, 50):.0f}{sep}{pct(samples, 99):.0f}" if samples else f"-{sep}-"


def median_of(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def mean_of(values: list[float]) -> float:
    return statistics.mean(values) if values else 0.0


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def image(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png)).convert("RGB")


def changed_pixels(before: Image.Image, after: Image.Image) -> int:
    difference = ImageChops.difference(before.crop(COMPARED_BOX), after.crop(COMPARED_BOX)).convert("L")
    return difference.point(lambda v: 255 if v > 16 else 0).histogram()[255]


def check_screenshot(png: bytes) -> None:
    if not png.startswith(b"\x89PNG\r\n\x1a\n") or Image.open(io.BytesIO(png)).size != (1024, 768):
        raise RuntimeError(f"the screenshot is not a 1024x768 PNG ({len(png)} bytes)")


def sessions(sbx) -> int:
    """XFCE sessions running: the SDK's `startxfce4` must find the snapshot's and start none."""
    return len(sbx.commands.run("pgrep -x xfce4-session || true").stdout.split())


def in_sandbox_rows(sbx, script: str, timeout: float = 600) -> list[list[float]]:
    """Runs a bash loop that prints a line of numbers per iteration (`$EPOCHREALTIME` reads the clock
    without starting a process)."""
    out = sbx.commands.run(script, timeout=timeout)
    return [[float(v) for v in line.split()] for line in out.stdout.splitlines() if line.strip()]


def in_sandbox_ms(sbx, command: str, n: int) -> list[float]:
    """`command` run n times (after WARM_UP more) in one bash loop inside the sandbox, each timed there."""
    rows = in_sandbox_rows(sbx, f"""
for i in $(seq {n + WARM_UP}); do
  s=$EPOCHREALTIME; {command}; e=$EPOCHREALTIME; echo "$s $e"
done
rm -f /tmp/bench-step.*""")
    return [(e - s) * 1000 for s, e in rows[WARM_UP:]]


class Sandboxes:
    """Every sandbox the benchmark made, so that all are killed however it ends."""

    def __init__(self) -> None:
        self.live: list = []

    def add(self, sbx):
        self.live.append(sbx)
        return sbx

    def kill(self, sbx) -> None:
        self.live.remove(sbx)
        sbx.kill()

    def kill_all(self) -> None:
        while self.live:
            sbx = self.live.pop()
            try:
                sbx.kill()
            except Exception as e:  # the server's teardown destroys it anyway
                print(f"killing {sbx.sandbox_id} failed: {e}", file=sys.stderr)


def make_server(name: str, idle_policy: bool, pool: int = 0) -> ServerProcess:
    """By default no warm pool: each create restores the template's snapshot into a prepared container. With
    `pool`, the server keeps that many desktops ready (CORRAL_POOL_TEMPLATES=desktop), restored and warmed up
    (the recipe's warm-up command) ahead."""
    env = {"CORRAL_METRICS_INTERVAL_S": "30", "CORRAL_IDLE_FREEZE_S": str(IDLE_S if idle_policy else 0)}
    if pool:
        env["CORRAL_POOL_TEMPLATES"] = TEMPLATE
    return ServerProcess(INSTANCE, NETWORK, BENCH_ROOT / name, dns_upstream=host_resolver(), pool_size=pool,
                         extra_env=env)


def wait_pooled(server: ServerProcess, size: int, timeout: float = 300) -> None:
    """Sequential creates measure the warm path: wait until the pool holds `size` desktops again."""
    deadline = time.monotonic() + timeout
    while httpx.get(f"{server.url}/health").json()["pooled"].get(TEMPLATE, 0) < size:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the {TEMPLATE} pool did not refill to {size} within {timeout:.0f} s")
        time.sleep(0.1)


@contextmanager
def serving(server: ServerProcess, sandboxes: Sandboxes) -> Iterator[dict]:
    """The server for the block, and the SDK's options for it. Afterwards (also after Ctrl-C or SIGTERM,
    both ignored while this cleans up) its sandboxes are killed, the server stopped and what it left
    destroyed."""
    try:
        try:  # nothing to do when it is built from the current recipe
            server.cli("template", "build", TEMPLATE)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"building the {TEMPLATE} template failed: {(e.stderr or e.stdout)[-3000:]}") from None
        server.start()
        key = server.cli("keys", "create", "--name", "bench").strip()
        yield {"api_url": server.url, "sandbox_url": server.url, "api_key": key, "domain": server.domain}
    finally:
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            sandboxes.kill_all()
            server.stop()
            server.destroy_everything()
            remove_empty_instance_dirs(server)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def remove_empty_instance_dirs(server: ServerProcess) -> None:
    """The runtime leaves its instance's run directory and parent cgroups behind, empty; and the
    benchmark's own directory, once both servers' are gone."""
    run_dir = Path(server.env["CORRAL_RUN_DIR"])
    for path in [*sorted(run_dir.rglob("*"), reverse=True), run_dir,
                 *CGROUP_ROOT.glob(f"*/corral-{INSTANCE}"), BENCH_ROOT]:
        with suppress(OSError):  # not empty, or gone
            path.rmdir()


# ------------------------------------------------------------------------------------ measurements


@dataclass
class CreateCycle:
    total_ms: float  # Sandbox.create() → screenshot() returned
    create_ms: float  # Sandbox.create(), the SDK's start-up included
    api_ms: float  # until the SDK's first command: the API's create (restore) and the SDK's set-up
    startup: list[Call]  # the SDK's start-up commands
    screenshot: list[Call]  # the first screenshot's calls
    sessions: int  # XFCE sessions after the SDK's start-up


def create_to_first_screenshot(opts: dict, sandboxes: Sandboxes, log: CallLog, n: int, ready: Callable[[], None]
                               ) -> tuple[list[CreateCycle], list[float]]:
    """`n` desktop creates (after one not counted) and, interleaved, `base` creates → first command; each
    desktop create once `ready` returns."""
    cycles: list[CreateCycle] = []
    base_ms: list[float] = []
    for i in range(n + 1):
        time.sleep(0.5)  # lets the server put a prepared container back, as between a user's creates
        ready()
        t0 = time.perf_counter()
        sbx = sandboxes.add(Sandbox.create(timeout=120, **opts))
        t1 = time.perf_counter()
        png = bytes(sbx.screenshot())
        t2 = time.perf_counter()
        check_screenshot(png)
        running = sessions(sbx)
        sandboxes.kill(sbx)
        calls = log.between(t0, t2)
        startup = [c for c in calls if c.end <= t1]
        if i > 0:
            cycles.append(CreateCycle(total_ms=(t2 - t0) * 1000, create_ms=(t1 - t0) * 1000,
                                      api_ms=((startup[0].start if startup else t1) - t0) * 1000,
                                      startup=startup, screenshot=[c for c in calls if c.start >= t1],
                                      sessions=running))
        time.sleep(0.5)
        b0 = time.perf_counter()
        plain = sandboxes.add(PlainSandbox.create("base", timeout=120, **opts))
        plain.commands.run("true")
        if i > 0:
            base_ms.append((time.perf_counter() - b0) * 1000)
        sandboxes.kill(plain)
        print(f"  create {i}: {(t2 - t0) * 1000:.0f} ms, {running} XFCE session(s)"
              f"{' (warm-up, not counted)' if i == 0 else ''}", flush=True)
    return cycles, base_ms


def screenshot_round_trips(sbx: Sandbox, log: CallLog, n: int) -> tuple[list[float], dict[str, list[float]]]:
    """`screenshot()` n times, and each of its envd calls."""
    for _ in range(WARM_UP):
        sbx.screenshot()
    samples: list[float] = []
    parts: dict[str, list[float]] = {}
    for _ in range(n):
        t0 = time.perf_counter()
        png = bytes(sbx.screenshot())
        t1 = time.perf_counter()
        samples.append((t1 - t0) * 1000)
        check_screenshot(png)
        for call in log.between(t0, t1):
            parts.setdefault(call.program, []).append(call.ms)
    return samples, parts


def command_round_trips(sbx: Sandbox, n: int) -> list[float]:
    """`commands.run('true')`: what each of the SDK's commands costs before its program's own work."""
    for _ in range(WARM_UP):
        sbx.commands.run("true")
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        sbx.commands.run("true")
        samples.append((time.perf_counter() - t0) * 1000)
    return samples


def wait_for_screen(sbx: Sandbox, done: Callable[[Image.Image], bool], timeout: float = 20) -> int:
    """Screenshots until `done` says so; how many were taken."""
    deadline = time.monotonic() + timeout
    count = 0
    while True:
        count += 1
        if done(image(bytes(sbx.screenshot()))):
            return count
        if time.monotonic() > deadline:
            raise RuntimeError(f"the screen did not change as expected within {timeout:.0f} s")


def close_menu(sbx: Sandbox) -> Image.Image:
    """Escape, then screenshots until two in a row are alike: the screen without the menu."""
    sbx.press("escape")
    shots: list[Image.Image] = []

    def still(shot: Image.Image) -> bool:
        shots.append(shot)
        return len(shots) > 1 and changed_pixels(shots[-2], shot) < CHANGED_PIXELS // 5

    wait_for_screen(sbx, still)
    return shots[-1]


def click_to_changed_screenshot(sbx: Sandbox, n: int) -> tuple[list[float], list[float], list[int]]:
    """A right click on the desktop (the pointer already there), then screenshots until one shows its
    menu: the time until that screenshot returned, the click's own call, screenshots taken."""
    sbx.move_mouse(*DESKTOP_SPOT)
    to_changed, click_ms, shots = [], [], []
    for i in range(n + 1):
        before = close_menu(sbx)
        t0 = time.perf_counter()
        sbx.right_click()
        t1 = time.perf_counter()
        count = wait_for_screen(sbx, lambda s, b=before: changed_pixels(b, s) >= CHANGED_PIXELS)
        t2 = time.perf_counter()
        if i > 0:
            to_changed.append((t2 - t0) * 1000)
            click_ms.append((t1 - t0) * 1000)
            shots.append(count)
    close_menu(sbx)
    return to_changed, click_ms, shots


def click_in_sandbox(sbx: Sandbox, n: int) -> tuple[list[float], list[int], int]:
    """The same inside the sandbox: `xdotool click 3`, then `scrot` until the file differs from the one
    taken before the click. The first differing screenshots are checked with Pillow afterwards: how many
    show the menu (at least CHANGED_PIXELS pixels differ) rather than something else that changed."""
    rows = in_sandbox_rows(sbx, f"""
xdotool mousemove --sync {DESKTOP_SPOT[0]} {DESKTOP_SPOT[1]}
for i in $(seq 0 {n}); do
  xdotool key Escape; sleep 1
  scrot --pointer -o /tmp/bench-before-$i.png
  s=$EPOCHREALTIME
  xdotool click 3
  shots=0
  while :; do
    scrot --pointer -o /tmp/bench-after-$i.png; shots=$((shots + 1))
    cmp -s /tmp/bench-before-$i.png /tmp/bench-after-$i.png || break
    [ $shots -ge 500 ] && break
  done
  e=$EPOCHREALTIME
  echo "$s $e $shots"
done
xdotool key Escape""")
    menus = 0
    for i in range(1, n + 1):
        before = image(bytes(sbx.files.read(f"/tmp/bench-before-{i}.png", format="bytes")))
        after = image(bytes(sbx.files.read(f"/tmp/bench-after-{i}.png", format="bytes")))
        menus += changed_pixels(before, after) >= CHANGED_PIXELS
    sbx.commands.run("rm -f /tmp/bench-before-*.png /tmp/bench-after-*.png")
    rows = rows[1:]
    return [(e - s) * 1000 for s, e, _ in rows], [int(k) for _, _, k in rows], menus


# An idle desktop's programs, as the sandbox's kernel counts them: % of a core per program name.
GUEST_CPU = r"""
import os, sys, time
def sample():
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            comm = open(f"/proc/{pid}/comm").read().strip()
        except OSError:
            continue
        out[(pid, comm)] = int(fields[11]) + int(fields[12])
    return out
seconds = float(sys.argv[1])
a = sample(); t = time.monotonic(); time.sleep(seconds); b = sample(); t = time.monotonic() - t
tick = os.sysconf("SC_CLK_TCK")
by_comm = {}
for key, ticks in b.items():
    by_comm[key[1]] = by_comm.get(key[1], 0) + (ticks - a.get(key, 0)) / tick / t * 100
for comm, used in sorted(by_comm.items(), key=lambda kv: -kv[1]):
    print(f"{used:.3f} {comm}")
"""


def cgroup_cpu_pct(ids: list[str], seconds: float) -> list[float]:
    """% of a core used by each sandbox's host cgroup over `seconds` (as benchmarks/idle.py)."""
    cgroups = [SandboxCgroup(f"/corral-{INSTANCE}/{i}") for i in ids]
    before = [c.cpu_seconds() for c in cgroups]
    if None in before:
        raise RuntimeError(f"no host cgroup found for some of {ids}")
    start = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - start
    return [(c.cpu_seconds() - b) / elapsed * 100 for c, b in zip(cgroups, before, strict=True)]


def cgroup_resident_mb(sandbox_id: str) -> float:
    """Anonymous and shared memory charged to the sandbox's host cgroup (gVisor's memory file is shared
    memory), without the page cache of the files it read."""
    path = CGROUP_ROOT / "memory" / f"corral-{INSTANCE}" / sandbox_id / "memory.stat"
    stat = dict(line.split() for line in path.read_text().splitlines())
    return (int(stat["rss"]) + int(stat["shmem"])) / 2**20


@dataclass
class IdleDesktop:
    how: str  # "SDK" (`e2b_desktop.Sandbox.create`) or "plain" (`e2b.Sandbox.create("desktop")`)
    sessions: int
    cpu_pct: float
    resident_mb: float


@dataclass
class Idle:
    desktops: list[IdleDesktop]
    base_pct: list[float]
    desktop_mb: float  # MemAvailable drop per SDK desktop
    base_mb: float
    guest: list[tuple[float, str]] = field(default_factory=list)  # one desktop's programs, % of a core
    guest_sessions: int = 0

    def sdk_pct(self) -> float:
        return mean_of([d.cpu_pct for d in self.desktops if d.how == "SDK"])


def idle_desktops(opts: dict, sandboxes: Sandboxes, count: int, seconds: float, guest: bool) -> Idle:
    """`count` SDK desktops, `count` base sandboxes and one plain-created desktop, idle since IDLE_S + 2 s:
    CPU of each over `seconds`; memory per sandbox from MemAvailable before and after each group."""
    time.sleep(3)
    start_mb = mem_available_mb()
    desktops = [sandboxes.add(Sandbox.create(timeout=600, **opts)) for _ in range(count)]
    for sbx in desktops:
        sbx.screenshot()
    time.sleep(3)
    desktops_mb = mem_available_mb()
    bases = [sandboxes.add(PlainSandbox.create("base", timeout=600, **opts)) for _ in range(count)]
    for sbx in bases:
        sbx.commands.run("true")
    time.sleep(3)
    bases_mb = mem_available_mb()
    plain = sandboxes.add(PlainSandbox.create(TEMPLATE, timeout=600, envs={"DISPLAY": ":0"}, **opts))
    plain.commands.run("scrot -o /tmp/first.png && rm /tmp/first.png")
    counted = [sessions(s) for s in [*desktops, plain]]
    time.sleep(IDLE_S + 2)
    used = cgroup_cpu_pct([s.sandbox_id for s in [*desktops, plain, *bases]], seconds)
    result = Idle(
        desktops=[IdleDesktop("SDK" if s is not plain else "plain", n, cpu, cgroup_resident_mb(s.sandbox_id))
                  for s, n, cpu in zip([*desktops, plain], counted, used[:count + 1], strict=True)],
        base_pct=used[count + 1:], desktop_mb=(start_mb - desktops_mb) / count,
        base_mb=(desktops_mb - bases_mb) / count)
    if guest:
        out = desktops[0].commands.run(f"python3 -c '{GUEST_CPU}' {seconds}", timeout=seconds + 60).stdout
        result.guest = [(float(v), name) for v, name in (line.split(maxsplit=1) for line in out.splitlines())]
        result.guest_sessions = counted[0]
    for sbx in [*desktops, plain, *bases]:
        sandboxes.kill(sbx)
    return result


# --------------------------------------------------------------------------------------------- main


@dataclass
class Results:
    cycles: list[CreateCycle]
    base_create_ms: list[float]
    shots: list[float]
    shot_parts: dict[str, list[float]]
    true_ms: list[float]
    scrot_ms: list[float]
    steps: dict[str, list[float]]
    clicks: list[float]
    click_call_ms: list[float]
    click_shots: list[int]
    base_clicks: list[float]
    base_click_shots: list[int]
    base_click_menus: int
    idle_on: Idle
    idle_off: Idle

    @property
    def total(self) -> list[float]:
        return [c.total_ms for c in self.cycles]


def interrupted(signum, frame) -> None:
    raise KeyboardInterrupt


def run(args) -> Results:
    sandboxes = Sandboxes()
    log = CallLog()
    with log.watching():
        print("server with the idle policy on (the default)", flush=True)
        server = make_server("policy-on", True, args.pool)
        with serving(server, sandboxes) as opts:
            cycles, base_create = create_to_first_screenshot(
                opts, sandboxes, log, args.creates, lambda: wait_pooled(server, args.pool) if args.pool else None)
            print(f"create → first screenshot p50 | p99 ms: {stats([c.total_ms for c in cycles])}", flush=True)
            sbx = sandboxes.add(Sandbox.create(timeout=1800, **opts))
            shots, shot_parts = screenshot_round_trips(sbx, log, args.screenshots)
            print(f"screenshot round trip p50 | p99 ms: {stats(shots)}", flush=True)
            true_ms = command_round_trips(sbx, args.screenshots)
            scrot_ms = in_sandbox_ms(sbx, IN_SANDBOX_STEPS["scrot"], args.screenshots)
            print(f"in-sandbox scrot p50 | p99 ms: {stats(scrot_ms)}", flush=True)
            steps = {name: in_sandbox_ms(sbx, command, STEP_RUNS) for name, command in IN_SANDBOX_STEPS.items()}
            clicks, click_call_ms, click_shots = click_to_changed_screenshot(sbx, args.clicks)
            print(f"click → changed screenshot p50 | p99 ms: {stats(clicks)}", flush=True)
            base_clicks, base_click_shots, base_click_menus = click_in_sandbox(sbx, args.clicks)
            print(f"in-sandbox click → changed scrot p50 | p99 ms: {stats(base_clicks)}", flush=True)
            sandboxes.kill(sbx)
            idle_on = idle_desktops(opts, sandboxes, args.idle_desktops, args.seconds, guest=False)
            print(f"idle desktop, policy on: {idle_on.sdk_pct():.2f} % of a core", flush=True)
        print("server with the idle policy off", flush=True)
        with serving(make_server("policy-off", False), sandboxes) as opts:
            idle_off = idle_desktops(opts, sandboxes, args.idle_desktops, args.seconds, guest=True)
            print(f"idle desktop, policy off: {idle_off.sdk_pct():.2f} % of a core", flush=True)
    return Results(cycles, base_create, shots, shot_parts, true_ms, scrot_ms, steps, clicks, click_call_ms,
                   click_shots, base_clicks, base_click_shots, base_click_menus, idle_on, idle_off)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--creates", type=int, default=10, help="create → first screenshot cycles")
    parser.add_argument("--screenshots", type=int, default=30, help="screenshot round trips")
    parser.add_argument("--clicks", type=int, default=10, help="click → changed screenshot cycles")
    parser.add_argument("--idle-desktops", type=int, default=3, help="idle desktops (and base sandboxes)")
    parser.add_argument("--seconds", type=float, default=20, help="idle CPU window")
    parser.add_argument("--pool", type=int, default=0,
                        help="keep this many desktops ready for the creates (restored and warmed up ahead)")
    parser.add_argument("--write", type=Path, help="write the results into this file's Desktop section")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, interrupted)  # ends the run like Ctrl-C, through every cleanup

    try:
        results = run(args)
    except KeyboardInterrupt:
        print("interrupted: the sandboxes and servers are gone", file=sys.stderr)
        sys.exit(130)
    report = render(args, results)
    print(report)
    create_p50, shot_p50, idle_pct = pct(results.total, 50), pct(results.shots, 50), results.idle_off.sdk_pct()
    create_target = TARGETS["create_first_screenshot_p50_ms"]
    print(f"create → first screenshot p50 {create_p50:.0f} ms, target {create_target:.0f}: "
          f"{verdict(create_p50 <= create_target)}")
    print(f"screenshot round trip p50 {shot_p50:.0f} ms, target {TARGETS['screenshot_p50_ms']:.0f}: "
          f"{verdict(shot_p50 <= TARGETS['screenshot_p50_ms'])}")
    print(f"idle desktop {idle_pct:.2f} % of a core with the idle policy off, target {TARGETS['idle_cpu_pct']:.0f} %: "
          f"{verdict(idle_pct <= TARGETS['idle_cpu_pct'])} (policy on: {results.idle_on.sdk_pct():.2f} %)")
    if args.write:
        write_section(args.write, "desktop-benchmark", report, heading="Desktop",
                      command=f".venv/bin/python benchmarks/desktop.py --creates {args.creates} "
                              f"--screenshots {args.screenshots} --clicks {args.clicks} "
                              f"--idle-desktops {args.idle_desktops} --seconds {args.seconds:.0f} "
                              f"{f'--pool {args.pool} ' if args.pool else ''}--write {args.write}")


def render(args, r: Results) -> str:
    cycles = r.cycles
    # The SDK's start-up by program: calls per create and their time, medians over the creates.
    startup_rows = []
    for program in dict.fromkeys(c.program for cycle in cycles for c in cycle.startup):
        counts = [sum(1 for c in cycle.startup if c.program == program) for cycle in cycles]
        spent = [sum(c.ms for c in cycle.startup if c.program == program) for cycle in cycles]
        warm = f"{pct(r.steps[program], 50):.0f}" if program in r.steps else ""
        startup_rows.append(f"| SDK start-up: `{program}` | {median_of(counts):.0f} | {median_of(spent):.0f} "
                            f"| {warm} |")
    waits = [c.create_ms - c.api_ms - sum(x.ms for x in c.startup) for c in cycles]
    first_shot = {name: [sum(x.ms for x in c.screenshot if x.program == name) for c in cycles]
                  for name in ("scrot", "files.read", "files.remove")}
    calls = [len(c.startup) + len(c.screenshot) for c in cycles]
    two_sessions = sum(1 for c in cycles if c.sessions > 1)

    def by_count(count: int) -> str:
        totals = [c.total_ms for c in cycles if c.sessions == count]
        name = "one" if count == 1 else "two"
        return f"{name}, {pct(totals, 50):.0f} ms (n={len(totals)})" if totals else f"{name}, none"
    create_p50, shot_p50 = pct(r.total, 50), pct(r.shots, 50)
    off, on = r.idle_off, r.idle_on
    steps = ", ".join(f"{name} {pct(ms, 50):.0f}" for name, ms in r.steps.items())
    guest_total = sum(v for v, _ in off.guest)
    guest_top = ", ".join(f"{name} {v:.2f}" for v, name in off.guest[:6])

    def by_sessions(idle: Idle, count: int) -> str:
        used = [d.cpu_pct for d in idle.desktops if d.how == "SDK" and d.sessions == count]
        return f"{mean_of(used):.2f} %" if used else "none"

    def idle_rows(policy: str, idle: Idle) -> list[str]:
        rows = [f"| {policy} | {'desktop, SDK create' if d.how == 'SDK' else 'desktop, plain e2b create'} | "
                f"{d.sessions} | {d.cpu_pct:.2f} | {d.resident_mb:.0f} |" for d in idle.desktops]
        return [*rows, f"| {policy} | `base` (mean of {len(idle.base_pct)}) | | {mean_of(idle.base_pct):.2f} | |"]

    lines = [
        "The unmodified `e2b-desktop` SDK (2.7.2) against `corral serve` "
        + ("with no warm pool: each create restores the `desktop` snapshot (X and the XFCE session running) into a "
           "prepared container." if not args.pool else
           f"with a warm pool of {args.pool} desktops (CORRAL_POOL_TEMPLATES=desktop: restored with the recipe's "
           "resources and warmed up ahead), each create waiting for a full pool.")
        + " Baselines: the same step inside one running desktop, timed there in one `commands.run` of a bash loop "
        "(`$EPOCHREALTIME`).",
        "",
        "| measure | n | p50 ms | p99 ms | baseline inside the sandbox, p50 / p99 ms |",
        "|---|---|---|---|---|",
        f"| create `desktop` (`Sandbox.create()`, the SDK's start-up included) → first `screenshot()` returned | "
        f"{len(r.total)} | {stats(r.total)} | `scrot` {stats(r.scrot_ms, ' / ')} |",
        f"| `screenshot()` round trip | {len(r.shots)} | {stats(r.shots)} | `scrot` {stats(r.scrot_ms, ' / ')} |",
        f"| right click on the desktop → a screenshot showing its menu (≥ {CHANGED_PIXELS} pixels differ) | "
        f"{len(r.clicks)} | {stats(r.clicks)} | `xdotool click 3`, `scrot` until the file differs "
        f"{stats(r.base_clicks, ' / ')} |",
        "",
        f"Where create → first screenshot goes, medians over {len(cycles)} creates ({median_of(calls):.0f} envd "
        "calls each), next to the same command run again and again inside a running desktop:",
        "",
        "| step | calls | ms at create | inside a running desktop, p50 ms |", "|---|---|---|---|",
        f"| API create (`POST /sandboxes`: restore, envd init) until the SDK's first command | | "
        f"{median_of([c.api_ms for c in cycles]):.0f} | |",
        *startup_rows,
        f"| SDK start-up: its sleeps between checks | | {median_of(waits):.0f} | |",
        f"| first `screenshot()`: `scrot` | 1 | {median_of(first_shot['scrot']):.0f} | "
        f"{pct(r.steps['scrot'], 50):.0f} |",
        f"| first `screenshot()`: `files.read`, `files.remove` | 2 | "
        f"{median_of(first_shot['files.read']):.0f}, {median_of(first_shot['files.remove']):.0f} | |",
        "| for comparison: create `base` → `commands.run('true')` (interleaved) | | "
        f"{median_of(r.base_create_ms):.0f} | |",
        "",
        f"After the SDK's start-up, {two_sessions} of {len(cycles)} desktops ran two XFCE sessions (the SDK's "
        f"`startxfce4` started a second one). Create → first screenshot p50 by sessions: {by_count(1)}; "
        f"{by_count(2)}.",
        "",
        "A warm `screenshot()` is three envd calls, medians: `scrot` "
        f"{median_of(r.shot_parts.get('scrot', [])):.0f} ms, "
        f"`files.read` {median_of(r.shot_parts.get('files.read', [])):.0f} ms, `files.remove` "
        f"{median_of(r.shot_parts.get('files.remove', [])):.0f} ms; `commands.run('true')` on the same sandbox "
        f"{stats(r.true_ms, ' / ')} ms (p50 / p99). Inside the sandbox, p50 ms ({STEP_RUNS} runs each): {steps}. "
        f"A click: `right_click()` {median_of(r.click_call_ms):.0f} ms, then {median_of(r.click_shots):.0f} "
        f"screenshot(s) (median) until the menu showed; inside, {median_of(r.base_click_shots):.0f} `scrot`(s) until "
        f"the file differed ({r.base_click_menus} of {len(r.base_clicks)} of those screenshots showed the menu).",
        "",
        f"Idle: {args.idle_desktops} desktops created with the SDK, one with the plain e2b SDK (the snapshot's "
        f"session as restored, no start-up commands) and {args.idle_desktops} `base` sandboxes; CPU of each one's "
        f"host cgroup over {args.seconds:.0f} s, starting {IDLE_S + 2:.0f} s after its last request; resident: "
        "rss + shmem of its memory cgroup.",
        "",
        "| idle policy | sandbox | XFCE sessions | CPU, % of a core | resident MiB |", "|---|---|---|---|---|",
        *idle_rows("off", off),
        *idle_rows(f"on (frozen after {IDLE_S:.0f} s)", on),
        "",
        f"Memory per idle sandbox (MemAvailable drop, policy off / on): SDK desktop {off.desktop_mb:.0f} / "
        f"{on.desktop_mb:.0f} MiB, `base` {off.base_mb:.0f} / {on.base_mb:.0f} MiB. Inside one idle SDK desktop "
        f"({off.guest_sessions} session(s), policy off, the sandbox's own accounting over {args.seconds:.0f} s) "
        f"its running programs used {guest_total:.2f} % of a core ({guest_top}; python3 is envd and the sampler; "
        "programs that ended within the window are not counted).",
        "",
        *targets_table([
            (f"create → first screenshot p50 <= {TARGETS['create_first_screenshot_p50_ms']:.0f} ms",
             f"{create_p50:.0f} ms", create_p50 <= TARGETS["create_first_screenshot_p50_ms"]),
            (f"screenshot round trip p50 <= {TARGETS['screenshot_p50_ms']:.0f} ms",
             f"{shot_p50:.0f} ms (`scrot` alone, inside: {pct(r.scrot_ms, 50):.0f} ms)",
             shot_p50 <= TARGETS["screenshot_p50_ms"]),
            (f"idle desktop <= {TARGETS['idle_cpu_pct']:.0f} % of a core",
             f"{off.sdk_pct():.2f} % with the idle policy off (one session {by_sessions(off, 1)}, two "
             f"{by_sessions(off, 2)}; `base` {mean_of(off.base_pct):.2f} %), {on.sdk_pct():.2f} % on (default)",
             off.sdk_pct() <= TARGETS["idle_cpu_pct"]),
        ]),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
