"""`corral doctor` on a host set up by scripts/install.sh, and what it says when something is missing."""

from __future__ import annotations

import shutil
import subprocess
import sys

from corral.cli import doctor


def test_doctor_passes_on_a_host_set_up_by_the_install_script():
    result = subprocess.run([sys.executable, "-c", "from corral.cli.main import app; app()", "doctor"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("runsc", "tools", "cgroups", "nftables", "overlayfs", "netns workaround"):
        assert name in result.stdout


def test_a_missing_tool_is_named_with_its_fix(monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(doctor.shutil, "which", lambda tool: None if tool == "npm" else real_which(tool))
    check = doctor.check_tools()
    assert not check.ok
    assert check.detail == "missing: npm"
    assert check.fix == doctor.INSTALL
