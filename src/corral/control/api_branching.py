"""Routes for pause, snapshots and fork (E2B's API) and for the checkpoint tree (Corral's extension,
under /checkpoints)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from corral.control import schemas
from corral.control.api_common import ERRORS, Key, page_offset, page_token, sandbox_answer
from corral.control.db import CheckpointRow
from corral.control.errors import HostPaths, to_http
from corral.control.keys import ApiKey
from corral.control.plane import ControlPlane
from corral.control.tree import node_view

_CONFLICT = {**ERRORS, 409: {"model": schemas.Error}, 507: {"model": schemas.Error}}


def _snapshot_info(node: CheckpointRow) -> schemas.SnapshotInfo:
    return schemas.SnapshotInfo(snapshotID=node.id, names=[node.name] if node.name else [])


def branching_routes(plane: ControlPlane, paths: HostPaths | None) -> APIRouter:
    router = APIRouter()

    def fork_results(results, key: ApiKey) -> list[schemas.ForkResult]:
        answers = []
        for r in results:
            if isinstance(r, BaseException):
                code, message = to_http(r, paths)
                answers.append(schemas.ForkResult(error=schemas.Error(code=code, message=message)))
            else:
                answers.append(schemas.ForkResult(sandbox=sandbox_answer(r, key, plane.public_domain)))
        return answers

    # --- E2B ---------------------------------------------------------------------------------------

    @router.post("/sandboxes/{sandbox_id}/pause", status_code=204, responses=_CONFLICT, tags=["sandboxes"])
    async def pause(sandbox_id: str, key: Key, body: schemas.PauseSandbox | None = None) -> Response:
        await plane.branching.pause(key.owner, sandbox_id, memory=not (body and body.memory is False))
        return Response(status_code=204)

    @router.post("/sandboxes/{sandbox_id}/snapshots", status_code=201, response_model=schemas.SnapshotInfo,
                 responses=_CONFLICT, tags=["snapshots"])
    async def create_snapshot(sandbox_id: str, key: Key,
                              body: schemas.SnapshotRequest | None = None) -> schemas.SnapshotInfo:
        body = body or schemas.SnapshotRequest()
        node = await plane.branching.snapshot(key.owner, sandbox_id, name=body.name, memory=body.memory is not False,
                                              metadata=body.metadata)
        return _snapshot_info(node)

    @router.get("/snapshots", response_model=list[schemas.SnapshotInfo], responses=ERRORS, tags=["snapshots"])
    async def list_snapshots(key: Key, response: Response, sandboxID: str | None = None, name: str | None = None,
                             limit: Annotated[int | None, Query(ge=1, le=100)] = None,
                             nextToken: str | None = None) -> list[schemas.SnapshotInfo]:
        nodes = await plane.tree.list_nodes(key.owner, sandbox_id=sandboxID, name=name, kinds={"snapshot"})
        offset = page_offset(nextToken)
        end = len(nodes) if limit is None else offset + limit
        if end < len(nodes):
            response.headers["X-Next-Token"] = page_token(end)
        return [_snapshot_info(n) for n in nodes[offset:end]]

    @router.delete("/templates/{snapshot_id:path}", status_code=204, responses=_CONFLICT, tags=["snapshots"])
    async def delete_snapshot(snapshot_id: str, key: Key) -> Response:
        # The SDK deletes templates and snapshots alike here (`delete_snapshot`); templates first.
        if plane.templates is not None and await plane.templates.delete(key.owner, snapshot_id, plane.template_in_use):
            return Response(status_code=204)
        await plane.tree.delete(key.owner, snapshot_id)
        return Response(status_code=204)

    # Each result carries either `sandbox` or `error`, never the other as null (the SDK parses a null error).
    @router.post("/sandboxes/{sandbox_id}/fork", status_code=201, response_model=list[schemas.ForkResult],
                 response_model_exclude_none=True, responses=_CONFLICT, tags=["sandboxes"])
    async def fork(sandbox_id: str, key: Key, body: schemas.ForkRequest | None = None) -> list[schemas.ForkResult]:
        body = body or schemas.ForkRequest()
        results = await plane.branching.fork(key.owner, sandbox_id, count=body.count, timeout=body.timeout)
        return fork_results(results, key)

    # --- the checkpoint tree (Corral) ----------------------------------------------------------------

    @router.get("/checkpoints", response_model=list[schemas.CheckpointNode], responses=ERRORS,
                tags=["checkpoint tree"])
    async def list_nodes(key: Key, sandboxID: str | None = None, name: str | None = None,
                         kind: str | None = None) -> list[dict]:
        kinds = set(kind.split(",")) if kind else None
        nodes = await plane.tree.list_nodes(key.owner, sandbox_id=sandboxID, name=name, kinds=kinds)
        return [node_view(n) for n in nodes]

    @router.get("/checkpoints/{ref}", response_model=schemas.CheckpointNode, responses=ERRORS,
                tags=["checkpoint tree"])
    async def get_node(ref: str, key: Key) -> dict:
        return node_view(await plane.tree.node(key.owner, ref))

    @router.get("/checkpoints/{ref}/tree", response_model=schemas.Tree, responses=ERRORS,
                tags=["checkpoint tree"])
    async def tree(ref: str, key: Key) -> dict:
        """The lineage of a checkpoint or a sandbox id, from its root."""
        return await plane.tree.tree(key.owner, ref)

    @router.patch("/checkpoints/{ref}", response_model=schemas.CheckpointNode, responses=ERRORS,
                  tags=["checkpoint tree"])
    async def set_metadata(ref: str, body: schemas.NodeMetadataPatch, key: Key) -> dict:
        return node_view(await plane.tree.set_metadata(key.owner, ref, body.metadata))

    @router.post("/checkpoints/{ref}/sandboxes", status_code=201, response_model=list[schemas.ForkResult],
                 response_model_exclude_none=True, responses=_CONFLICT, tags=["checkpoint tree"])
    async def start_from(ref: str, key: Key, body: schemas.StartFromCheckpoint | None = None):
        body = body or schemas.StartFromCheckpoint()
        results = await plane.branching.start_from_node(key.owner, ref, body.count, timeout=body.timeout,
                                                        metadata=body.metadata or {}, env_vars=body.envVars)
        return fork_results(results, key)

    @router.delete("/checkpoints/{ref}", response_model=schemas.DeletedNodes, responses=_CONFLICT,
                   tags=["checkpoint tree"])
    async def delete_node(ref: str, key: Key, subtree: bool = False) -> dict:
        """Deletes a node (its children move up to its parent) or, with subtree=true, the node and all below."""
        return await plane.tree.delete(key.owner, ref, subtree=subtree)

    return router
