"""The gVisor backend (runsc, systrap platform). See runtime.py for the layout on the host."""

from corral.runtime.gvisor.containers import new_sandbox_id
from corral.runtime.gvisor.runtime import GVisorRuntime

__all__ = ["GVisorRuntime", "new_sandbox_id"]
