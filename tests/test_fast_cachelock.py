"""The template cache's lock between processes (corral/templates/cachelock.py): a second taker waits for the
first and is told so once; a holder killed with SIGKILL frees it; an entry is made once when two processes
ask for it together."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

from corral.templates.cachelock import cache_lock

HOLD = """
import asyncio, sys, time
from pathlib import Path
from corral.templates.cachelock import cache_lock

async def main():
    async with cache_lock(Path(sys.argv[1])):
        print("held", flush=True)
        await asyncio.sleep(float(sys.argv[2]))

asyncio.run(main())
"""

MAKE_ONCE = """
import asyncio, sys
from pathlib import Path
from corral.templates.cachelock import cache_lock

async def main():
    target = Path(sys.argv[1])
    async with cache_lock(target.with_suffix(".lock")):
        if not target.exists():
            await asyncio.sleep(0.5)  # the slow making of a cache entry
            with open(target.with_suffix(".makers"), "a") as makers:
                makers.write("made\\n")
            target.write_text("entry")

asyncio.run(main())
"""


def _holder(lock: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_second_taker_waits_for_the_first_and_is_told_once(tmp_path):
    lock = tmp_path / "locks" / "entry.lock"
    holder = _holder(lock, 1.0)
    waits: list[float] = []

    async def take() -> float:
        async with cache_lock(lock, lambda: waits.append(time.monotonic())):
            return time.monotonic()

    taken = asyncio.run(take())
    assert holder.wait(10) == 0
    assert len(waits) == 1 and taken > waits[0]


def test_a_holder_killed_with_sigkill_frees_the_lock(tmp_path):
    lock = tmp_path / "entry.lock"
    holder = _holder(lock, 600)
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)

    async def take() -> bool:
        async with asyncio.timeout(5), cache_lock(lock):
            return True

    assert asyncio.run(take())


def test_two_processes_asking_for_one_entry_make_it_once(tmp_path):
    target = tmp_path / "entry"
    makers = [subprocess.Popen([sys.executable, "-c", MAKE_ONCE, str(target)]) for _ in range(3)]
    assert [p.wait(30) for p in makers] == [0, 0, 0]
    assert target.read_text() == "entry"
    assert (tmp_path / "entry.makers").read_text() == "made\n"
