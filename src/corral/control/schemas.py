"""Request and response bodies of the E2B-compatible REST API (field names as the SDKs send and parse)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Error(BaseModel):
    code: int
    message: str
    requestID: str | None = Field(default=None, description="The request's id, as in its X-Request-ID header: "
                                                            "the server's log lines about it carry it too")


class AutoResume(BaseModel):
    enabled: bool = False


class VolumeMountRequest(BaseModel):
    name: str = Field(description="the volume's name")
    path: str = Field(description="absolute path in the sandbox it is mounted at")


class NewSandbox(BaseModel):
    """`POST /v2/sandboxes` (and legacy `POST /sandboxes`, which adds `secure`)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    templateID: str = Field(min_length=1, max_length=200)
    timeout: int | None = Field(default=None, ge=0, description="seconds; 300 when absent")
    metadata: dict[str, str] | None = None
    envVars: dict[str, str] | None = None
    allow_internet_access: bool | None = None
    autoPause: bool | None = None
    autoPauseMemory: bool | None = None
    autoResume: AutoResume | None = None
    secure: bool | None = None
    network: dict | None = None
    iam: dict | None = None
    volumeMounts: list[VolumeMountRequest] | None = Field(default=None, max_length=16)


class ConnectSandbox(BaseModel):
    model_config = ConfigDict(extra="ignore")

    timeout: int | None = Field(default=None, ge=0)
    memory: bool | None = Field(default=None, description="false: resume a paused sandbox by cold-booting its "
                                                           "filesystem instead of restoring its memory")


class PauseSandbox(BaseModel):
    model_config = ConfigDict(extra="ignore")

    memory: bool | None = Field(default=None, description="false: keep only the filesystem (processes restart "
                                                           "on resume)")
    requireHealthyGuest: bool | None = None


class SnapshotRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str | None = Field(default=None, min_length=1, max_length=128)
    memory: bool | None = None
    metadata: dict | None = Field(default=None, description="Corral extension: metadata of the checkpoint node")


class SnapshotInfo(BaseModel):
    snapshotID: str
    names: list[str]


class ForkRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    timeout: int | None = Field(default=None, ge=0)
    count: int = Field(default=1, ge=1, le=100)


class ForkResult(BaseModel):
    sandbox: Sandbox | None = None
    error: Error | None = None


class CheckpointNode(BaseModel):
    """A node of the checkpoint tree (Corral extension)."""

    id: str
    kind: Literal["snapshot", "pause", "fork"]
    parentID: str | None
    sandboxID: str = Field(description="the sandbox it was taken of")
    template: str
    name: str | None
    metadata: dict
    memory: bool = Field(description="false: filesystem only; sandboxes started from it cold-boot")
    sizeBytes: int = Field(description="disk used by this node's own files (image and layer)")
    createdAt: float


class NodeSandbox(BaseModel):
    sandboxID: str
    state: str


class TreeNode(CheckpointNode):
    sandboxes: list[NodeSandbox] = Field(description="sandboxes standing on this node (running from it, or "
                                                     "paused in it)")
    children: list[TreeNode]


class Tree(BaseModel):
    roots: list[TreeNode]
    totalBytes: int


class NodeMetadataPatch(BaseModel):
    metadata: dict = Field(description="merged into the node's metadata; a null value removes that key")


class StartFromCheckpoint(BaseModel):
    model_config = ConfigDict(extra="ignore")

    count: int = Field(default=1, ge=1, le=100)
    timeout: int | None = Field(default=None, ge=0)
    metadata: dict[str, str] | None = None
    envVars: dict[str, str] | None = None


class DeletedNodes(BaseModel):
    deleted: list[str]
    reclaimedBytes: int = Field(description="disk space freed by this deletion")
    retainedBytes: int = Field(description="space of deleted nodes still used by running sandboxes or other "
                                           "nodes; freed when they go")


class SetTimeout(BaseModel):
    timeout: int = Field(ge=0)


class Sandbox(BaseModel):
    """Answer to create and connect."""

    templateID: str
    sandboxID: str
    alias: str | None = None
    clientID: str
    envdVersion: str
    envdAccessToken: str | None = None
    trafficAccessToken: str | None = None
    domain: str | None = None


class Lifecycle(BaseModel):
    autoResume: bool = False
    onTimeout: Literal["kill", "pause"] = "kill"


class ListedSandbox(BaseModel):
    templateID: str
    alias: str | None = None
    sandboxID: str
    clientID: str
    startedAt: str
    endAt: str
    cpuCount: int
    memoryMB: int
    diskSizeMB: int
    metadata: dict[str, str] | None = None
    state: Literal["running", "paused"]
    envdVersion: str
    volumeMounts: list[VolumeMountRequest] | None = None


class SandboxDetail(ListedSandbox):
    envdAccessToken: str | None = None
    allowInternetAccess: bool | None = None
    domain: str | None = None
    # The network options as given at create, in the same keys (never the traffic token).
    network: dict | None = None
    lifecycle: Lifecycle | None = None
    pauseMode: Literal["full", "filesystem"] | None = None


class SandboxMetric(BaseModel):
    timestamp: str
    timestampUnix: int
    cpuCount: int
    cpuUsedPct: float
    memUsed: int
    memTotal: int
    memCache: int
    diskUsed: int
    diskTotal: int


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    sandboxes: int
    pooled: dict[str, int]
    # Paused sandboxes whose resume is prepared (CORRAL_RESUME_WARM_S).
    resumeReady: int = 0
