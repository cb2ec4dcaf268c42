"""The checkpoint tree page: the team's snapshots, pauses and fork points as a picture, lineage by lineage
(each root and everything descended from it), laid out here on the server: HTML cards for the nodes (their
time, size and the sandboxes running from them, buttons that are real buttons) over an SVG of the edges. From
any node a click starts sandboxes (`Branching.start_from_node`, what `POST /checkpoints/{ref}/sandboxes` calls,
with the same `sandboxes` scope and key limits)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import Response

from corral.control.db import CheckpointRow
from corral.control.errors import to_http
from corral.control.sandboxes import ListQuery
from corral.control.scopes import SANDBOXES
from corral.dashboard.web import Dashboard, Viewer, changing, signed_in

CARD_W, SLOT_H, GAP_X, PAD = 232, 178, 64, 8  # pixels: a node's card, the height each leaf gets, between depths
MAX_NODES = 400  # drawn at once (a team's newest lineages first)
MAX_START = 10  # sandboxes one click may start from a node
SHOWN_SANDBOXES = 6  # per node card; the rest are counted


@dataclass
class Placed:
    node: CheckpointRow
    depth: int
    x: float = 0.0
    y: float = 0.0
    sandboxes: list[tuple[str, str]] = field(default_factory=list)  # (id, state) at this node
    children: list[Placed] = field(default_factory=list)
    focused: bool = False  # the page's focus names it, or a sandbox at it


@dataclass
class Lineage:
    root: Placed
    nodes: list[Placed]
    edges: list[tuple[float, float, float, float]]  # x1 y1 x2 y2, from a parent's right to a child's left
    width: float
    height: float
    focused: bool


def lay_out(root: Placed) -> Lineage:
    """Depth left to right; leaves one under another; a parent level with the middle of its children."""
    nodes: list[Placed] = []
    edges = []
    next_leaf = 0

    def place(p: Placed) -> None:
        nonlocal next_leaf
        nodes.append(p)
        p.x = p.depth * (CARD_W + GAP_X) + PAD
        if not p.children:
            p.y = next_leaf * SLOT_H + PAD
            next_leaf += 1
            return
        for c in p.children:
            place(c)
        p.y = (p.children[0].y + p.children[-1].y) / 2

    place(root)
    for p in nodes:
        for c in p.children:
            edges.append((p.x + CARD_W, p.y + 28, c.x, c.y + 28))
    width = max(p.x for p in nodes) + CARD_W + PAD
    return Lineage(root, nodes, edges, width, next_leaf * SLOT_H + PAD, focused=False)


def tree_pages(dash: Dashboard) -> APIRouter:
    router = APIRouter()
    plane = dash.plane

    async def picture(viewer: Viewer, focus: str) -> dict:
        rows = list(reversed(await plane.tree.list_nodes(viewer.key.owner)))[-MAX_NODES:]  # oldest first
        sandboxes = await plane.sandboxes.list(viewer.key.owner, ListQuery(metadata={}, states={"running", "paused"}))
        at: dict[str, list[tuple[str, str]]] = {}
        for s in sandboxes:
            node = s.paused_node if s.state == "paused" else s.head
            if node:
                at.setdefault(node, []).append((s.id, s.state))
        placed = {n.id: Placed(n, 0, sandboxes=at.get(n.id, [])) for n in rows}
        roots = []
        for p in placed.values():
            parent = placed.get(p.node.parent_id) if p.node.parent_id else None
            (parent.children if parent else roots).append(p)

        def depth(p: Placed, d: int) -> None:
            p.depth = d
            for c in p.children:
                depth(c, d + 1)
        lineages = []
        for root in roots:
            depth(root, 0)
            lineage = lay_out(root)
            for p in lineage.nodes:
                p.focused = bool(focus) and (focus in (p.node.id, p.node.name)
                                             or any(focus == s for s, _ in p.sandboxes))
            lineage.focused = any(p.focused or focus == p.node.sandbox_id for p in lineage.nodes)
            lineages.append(lineage)
        # the focused lineage first, then the newest
        lineages.sort(key=lambda ln: (not ln.focused, -max(p.node.created_at for p in ln.nodes)))
        return dict(lineages=lineages, focus=focus, card_w=CARD_W, count=len(rows),
                    total=sum(n.size_bytes for n in rows), can_act=viewer.can(SANDBOXES), shown=SHOWN_SANDBOXES,
                    max_start=MAX_START, untracked=sum(1 for s in sandboxes if not (s.head or s.paused_node)))

    @router.get("/tree")
    async def page(request: Request, viewer: Viewer = Depends(signed_in), focus: str = "") -> Response:
        return dash.render(request, "tree.html", viewer, title="Checkpoint tree", **await picture(viewer, focus))

    @router.get("/tree/picture")
    async def part(request: Request, viewer: Viewer = Depends(signed_in), focus: str = "") -> Response:
        return dash.render(request, "_tree_picture.html", viewer, **await picture(viewer, focus))

    @router.post("/tree/{node_id}/start")
    async def start(request: Request, node_id: str, viewer: Viewer = Depends(changing(SANDBOXES)),
                    count: str = Form("")) -> Response:
        """`count` from the form, or from the answer to the Fork button's prompt (htmx's HX-Prompt header)."""
        try:
            raw = (count or request.headers.get("hx-prompt") or "1").strip()
            count = int(raw) if raw.isdigit() else 0
            if not 1 <= count <= MAX_START:
                raise ValueError(f"Start between 1 and {MAX_START} sandboxes at once.")
            results = await plane.branching.start_from_node(viewer.key.owner, node_id, count, timeout=None,
                                                            metadata={}, env_vars=None)
            started = [r.id for r in results if not isinstance(r, BaseException)]
            failed = next((r for r in results if isinstance(r, BaseException)), None)
            if failed is not None and not started:
                raise failed
            message = f"Started {', '.join(started)} from {node_id}."
            if failed is not None:
                message += f" {len(results) - len(started)} failed: {to_http(failed, dash.paths)[1]}"
            status, kind = 200, "ok"
        except ValueError as e:
            status, kind, message = 400, "error", str(e)
        except Exception as e:
            (status, message), kind = to_http(e, dash.paths), "error"
        return dash.render(request, "_flash.html", viewer, status=status, kind=kind, message=message,
                           headers={"hx-trigger": "tree-changed"} if kind == "ok" else None)

    return router
