"""One process owns an instance: a second InstanceLock on it is refused with a message naming the holder,
and the lock is free again once its holder lets go or dies. The lock file lives in a test directory, so
no root is needed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from corral.runtime.base import InstanceBusy
from corral.runtime.gvisor.host import InstanceLock


def test_second_lock_on_an_instance_is_refused_naming_the_holder(tmp_path):
    first = InstanceLock("ti", lock_dir=tmp_path)
    first.acquire()
    try:
        with pytest.raises(InstanceBusy, match=rf"'ti' is in use by process {os.getpid()} \(") as refused:
            InstanceLock("ti", lock_dir=tmp_path).acquire()
        assert "CORRAL_INSTANCE" in str(refused.value)  # says what to do instead
        assert refused.value.status == 503
    finally:
        first.release()


def test_lock_is_free_again_after_release(tmp_path):
    first = InstanceLock("ti", lock_dir=tmp_path)
    first.acquire()
    first.release()
    second = InstanceLock("ti", lock_dir=tmp_path)
    second.acquire()
    second.release()


def test_other_instances_are_not_locked(tmp_path):
    first = InstanceLock("ti", lock_dir=tmp_path)
    first.acquire()
    try:
        other = InstanceLock("tj", lock_dir=tmp_path)
        other.acquire()
        other.release()
    finally:
        first.release()


def test_lock_held_by_another_process_is_refused_and_freed_when_it_exits(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from pathlib import Path
            from corral.runtime.gvisor.host import InstanceLock
            InstanceLock("ti", lock_dir=Path({str(tmp_path)!r})).acquire()
            print("locked", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        lock = InstanceLock("ti", lock_dir=tmp_path)
        assert lock.held_by_other()
        with pytest.raises(InstanceBusy, match=rf"in use by process {holder.pid} \("):
            lock.acquire()
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    assert not lock.held_by_other()
    lock.acquire()
    lock.release()
