"""Templates: cache keys follow their inputs, and a failed build leaves nothing registered."""

from __future__ import annotations

import dataclasses

import pytest
from helpers.leaks import footprint

from corral.templates.builtin import BASE
from corral.templates.recipe import ReadyCheck
from corral.templates.store import TemplateBuildFailed, TemplateStore


def test_snapshot_key_changes_with_start_command_but_rootfs_key_does_not():
    other = dataclasses.replace(BASE, start_command=("/bin/sleep", "1000"))
    assert other.rootfs_key() == BASE.rootfs_key()
    assert other.snapshot_key({"runtime": "x"}) != BASE.snapshot_key({"runtime": "x"})


def test_rootfs_key_changes_with_packages_and_setup():
    assert dataclasses.replace(BASE, packages=(*BASE.packages, "jq")).rootfs_key() != BASE.rootfs_key()
    assert dataclasses.replace(BASE, setup=(*BASE.setup, "true")).rootfs_key() != BASE.rootfs_key()


def test_snapshot_key_changes_with_runtime_compatibility():
    assert BASE.snapshot_key({"runtime": "gvisor a"}) != BASE.snapshot_key({"runtime": "gvisor b"})


def test_readiness_check_needs_a_command_or_port():
    with pytest.raises(ValueError):
        ReadyCheck()


def test_built_template_is_listed(runtime, store):
    names = {t.name for t in store.list()}
    assert "base" in names


def test_template_that_never_becomes_ready_fails_with_its_log_and_registers_nothing(harness, runtime, settings):
    never = dataclasses.replace(
        BASE, name="never-ready",
        start_command=("/bin/sh", "-c", "echo starting the never-ready service; exec sleep infinity"),
        ready=ReadyCheck(command=("/bin/false",), timeout_s=2))
    store = TemplateStore(settings, {"never-ready": never})
    before = footprint(settings)
    with pytest.raises(TemplateBuildFailed) as err:
        harness.run(store.build("never-ready", runtime))
    assert "never became ready" in str(err.value)
    assert "starting the never-ready service" in str(err.value)
    assert not (store.root / "templates" / "never-ready" / "current").exists()
    assert not list((store.root / "templates" / "never-ready").glob("*"))
    assert footprint(settings) == before


def test_unknown_recipe_is_refused(harness, runtime, store):
    from corral.runtime.base import TemplateNotFound

    with pytest.raises(TemplateNotFound, match="no recipe"):
        harness.run(store.build("does-not-exist", runtime))
