"""A small typed client for Corral's checkpoint-tree extension of the E2B API (sync `Checkpoints` and async
`AsyncCheckpoints`). Everything E2B has an endpoint for (pause, snapshots, fork) is done with the official
SDK; this covers what it has not: node metadata (a score), the tree of a lineage, starting sandboxes from any
node, and deleting nodes or subtrees.

    from corral.client import Checkpoints
    tree = Checkpoints().tree(sandbox.sandbox_id)

URL and key default to E2B_API_URL and E2B_API_KEY, like the SDK.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import httpx


class CorralError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Node:
    id: str
    kind: str  # snapshot | pause | fork
    parent_id: str | None
    sandbox_id: str
    template: str
    name: str | None
    metadata: dict[str, Any]
    memory: bool
    size_bytes: int
    created_at: float
    sandboxes: list[dict] = field(default_factory=list)  # in a tree: sandboxes standing on this node
    children: list[Node] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict) -> Node:
        return cls(id=data["id"], kind=data["kind"], parent_id=data.get("parentID"), sandbox_id=data["sandboxID"],
                   template=data["template"], name=data.get("name"), metadata=data.get("metadata") or {},
                   memory=data["memory"], size_bytes=data["sizeBytes"], created_at=data["createdAt"],
                   sandboxes=data.get("sandboxes", []),
                   children=[cls.from_json(c) for c in data.get("children", [])])

    def walk(self):
        """This node and every node below it, depth first."""
        yield self
        for child in self.children:
            yield from child.walk()


@dataclass(frozen=True)
class Tree:
    roots: list[Node]
    total_bytes: int

    def nodes(self) -> list[Node]:
        return [n for root in self.roots for n in root.walk()]


@dataclass(frozen=True)
class Started:
    """One result of starting sandboxes from a node: a sandbox id (and its envd token) or an error."""

    sandbox_id: str | None
    envd_access_token: str | None
    error: CorralError | None


@dataclass(frozen=True)
class Deleted:
    deleted: list[str]
    reclaimed_bytes: int
    retained_bytes: int


def _settings(url: str | None, api_key: str | None) -> tuple[str, dict[str, str]]:
    url = (url or os.environ.get("E2B_API_URL") or "http://127.0.0.1:3000").rstrip("/")
    key = api_key or os.environ.get("E2B_API_KEY")
    if not key:
        raise CorralError(401, "no API key: pass api_key or set E2B_API_KEY")
    return url, {"X-API-KEY": key}


def _checked(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            message = response.json().get("message", response.text)
        except ValueError:
            message = response.text
        raise CorralError(response.status_code, message)
    return response.json()


def _started(items: list[dict]) -> list[Started]:
    return [Started(sandbox_id=i["sandbox"]["sandboxID"], envd_access_token=i["sandbox"].get("envdAccessToken"),
                    error=None) if "sandbox" in i else
            Started(sandbox_id=None, envd_access_token=None,
                    error=CorralError(i["error"]["code"], i["error"]["message"])) for i in items]


def _deleted(data: dict) -> Deleted:
    return Deleted(deleted=data["deleted"], reclaimed_bytes=data["reclaimedBytes"],
                   retained_bytes=data["retainedBytes"])


def _start_body(count: int, timeout: int | None, metadata: dict[str, str] | None,
                envs: dict[str, str] | None) -> dict:
    body: dict[str, Any] = {"count": count}
    if timeout is not None:
        body["timeout"] = timeout
    if metadata is not None:
        body["metadata"] = metadata
    if envs is not None:
        body["envVars"] = envs
    return body


class Checkpoints:
    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 300) -> None:
        base, headers = _settings(url, api_key)
        self._client = httpx.Client(base_url=base, headers=headers, timeout=timeout, trust_env=False)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def list(self, *, sandbox_id: str | None = None, kind: str | None = None) -> list[Node]:
        params = {k: v for k, v in {"sandboxID": sandbox_id, "kind": kind}.items() if v}
        return [Node.from_json(n) for n in _checked(self._client.get("/checkpoints", params=params))]

    def get(self, ref: str) -> Node:
        return Node.from_json(_checked(self._client.get(f"/checkpoints/{ref}")))

    def tree(self, ref: str) -> Tree:
        """The lineage of a node or a sandbox id."""
        data = _checked(self._client.get(f"/checkpoints/{ref}/tree"))
        return Tree(roots=[Node.from_json(r) for r in data["roots"]], total_bytes=data["totalBytes"])

    def set_metadata(self, ref: str, **metadata: Any) -> Node:
        """Merges into the node's metadata (e.g. score=0.8); None removes a key."""
        return Node.from_json(_checked(self._client.patch(f"/checkpoints/{ref}", json={"metadata": metadata})))

    def start(self, ref: str, count: int = 1, *, timeout: int | None = None, metadata: dict[str, str] | None = None,
              envs: dict[str, str] | None = None) -> list[Started]:
        """New sandboxes from a node (connect to them with `Sandbox.connect(sandbox_id)`)."""
        body = _start_body(count, timeout, metadata, envs)
        return _started(_checked(self._client.post(f"/checkpoints/{ref}/sandboxes", json=body)))

    def delete(self, ref: str, *, subtree: bool = False) -> Deleted:
        params = {"subtree": "true"} if subtree else {}
        return _deleted(_checked(self._client.delete(f"/checkpoints/{ref}", params=params)))


class AsyncCheckpoints:
    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 300) -> None:
        base, headers = _settings(url, api_key)
        self._client = httpx.AsyncClient(base_url=base, headers=headers, timeout=timeout, trust_env=False)

    async def close(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> AsyncCheckpoints:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def list(self, *, sandbox_id: str | None = None, kind: str | None = None) -> list[Node]:
        params = {k: v for k, v in {"sandboxID": sandbox_id, "kind": kind}.items() if v}
        return [Node.from_json(n) for n in _checked(await self._client.get("/checkpoints", params=params))]

    async def get(self, ref: str) -> Node:
        return Node.from_json(_checked(await self._client.get(f"/checkpoints/{ref}")))

    async def tree(self, ref: str) -> Tree:
        data = _checked(await self._client.get(f"/checkpoints/{ref}/tree"))
        return Tree(roots=[Node.from_json(r) for r in data["roots"]], total_bytes=data["totalBytes"])

    async def set_metadata(self, ref: str, **metadata: Any) -> Node:
        response = await self._client.patch(f"/checkpoints/{ref}", json={"metadata": metadata})
        return Node.from_json(_checked(response))

    async def start(self, ref: str, count: int = 1, *, timeout: int | None = None,
                    metadata: dict[str, str] | None = None, envs: dict[str, str] | None = None) -> list[Started]:
        body = _start_body(count, timeout, metadata, envs)
        return _started(_checked(await self._client.post(f"/checkpoints/{ref}/sandboxes", json=body)))

    async def delete(self, ref: str, *, subtree: bool = False) -> Deleted:
        params = {"subtree": "true"} if subtree else {}
        return _deleted(_checked(await self._client.delete(f"/checkpoints/{ref}", params=params)))
