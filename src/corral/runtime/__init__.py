"""Isolation backends behind one interface (`corral.runtime.base.Runtime`)."""

from corral.runtime.base import (
    Checkpoint,
    CheckpointInvalid,
    ExecResult,
    InsufficientResources,
    InvalidRequest,
    Resources,
    Runtime,
    Sandbox,
    SandboxConfig,
    SandboxFailed,
    SandboxNotFound,
    Stats,
    TemplateNotFound,
)

__all__ = [
    "Checkpoint", "CheckpointInvalid", "ExecResult", "InsufficientResources", "InvalidRequest", "Resources",
    "Runtime", "Sandbox", "SandboxConfig", "SandboxFailed", "SandboxNotFound", "Stats", "TemplateNotFound",
]
