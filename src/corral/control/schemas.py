"""Request and response bodies of the E2B-compatible REST API (field names as the SDKs send and parse)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Error(BaseModel):
    code: int
    message: str


class AutoResume(BaseModel):
    enabled: bool = False


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


class ConnectSandbox(BaseModel):
    model_config = ConfigDict(extra="ignore")

    timeout: int | None = Field(default=None, ge=0)


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


class SandboxDetail(ListedSandbox):
    envdAccessToken: str | None = None
    allowInternetAccess: bool | None = None
    domain: str | None = None
    lifecycle: Lifecycle | None = None


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
