"""Isolation backends behind one interface (`corral.runtime.base.Runtime`)."""

from corral.runtime.base import (
    CheckpointInvalid,
    ContainerState,
    ExecResult,
    InstanceBusy,
    InsufficientResources,
    InvalidRequest,
    Prepared,
    Resources,
    Runtime,
    Sandbox,
    SandboxConfig,
    SandboxFailed,
    SandboxNotFound,
    Snapshot,
    Stats,
    TemplateNotFound,
)

__all__ = [
    "CheckpointInvalid", "ContainerState", "ExecResult", "InstanceBusy", "InsufficientResources", "InvalidRequest",
    "Prepared", "Resources", "Runtime", "Sandbox", "SandboxConfig", "SandboxFailed", "SandboxNotFound", "Snapshot",
    "Stats", "TemplateNotFound",
]
