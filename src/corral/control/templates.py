"""Templates users build (E2B's Build System 2.0): names and tags, uploaded files, the build queue and logs.

A template has an id, a `[namespace/]name` unique for its owner, and builds (UUIDs). Tags point at ready
builds; `default` is the one a bare name starts. On disk (cache directory, beside the built-in templates):

  templates/<id>/<build>/        the finished build's checkpoint (templates/builder.py)
  templates/<id>/<build>.etc/    its DNS and trust-store layer
  templates/<id>/current         symlink to the `default` tag's build; tag-<tag> for every other tag

The sandbox API names such a template to the orchestrator as `<id>` or `<id>:<tag>`, which the template
store resolves through those links. Uploaded COPY archives live in `<data>/template-files/<id>/<hash>`,
reached through a self-authorising URL (an HMAC of template, hash and expiry); build logs are JSON lines
in `<data>/template-builds/<build>.log`, appended as the build runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from corral.control import events
from corral.control.db import Database, TemplateBuildRow, TemplateRow, TemplateTagRow
from corral.control.errors import ApiError
from corral.control.keys import Owner
from corral.observability.metrics import UNSCRAPED, ServerMetrics
from corral.runtime.base import Resources, Runtime, TemplateNotFound
from corral.templates import prune
from corral.templates.builder import Builder, BuildFailed, BuildPlan, BuildStep, evict_layers

log = logging.getLogger(__name__)

_IDENTIFIER = re.compile(r"^[a-z0-9_-]{1,64}$")
_TAG = re.compile(r"^[a-z0-9_.-]{1,64}$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)
_HASH = re.compile(r"^[0-9a-f]{64}$")
_STEP_KINDS = ("RUN", "COPY", "ENV", "WORKDIR", "USER")
DEFAULT_TAG = "default"
LEVELS = ("debug", "info", "warn", "error")


@dataclass(frozen=True)
class BuildLimits:
    max_concurrent: int = 2
    timeout_s: float = 3600.0
    upload_max_bytes: int = 2 * 1024**3
    upload_url_ttl_s: int = 3600
    max_steps: int = 500
    # The step-layer cache (build-layers/): past this, layers nothing uses are evicted, oldest use first.
    layer_cache_bytes: int = 50 * 1024**3


@dataclass(frozen=True)
class TemplateName:
    name: str  # `[namespace/]identifier`
    tag: str | None

    def __str__(self) -> str:
        return self.name + (f":{self.tag}" if self.tag else "")


def parse_name(raw: str, *, what: str = "template name") -> TemplateName:
    """`[namespace/]name[:tag]` by E2B's rules: lower-case letters, digits, `-` and `_`; tags also `.`, and
    not a UUID (those name builds)."""
    if not isinstance(raw, str) or not raw:
        raise ApiError(400, f"{what} must not be empty")
    name, colon, tag = raw.partition(":")
    parts = name.split("/")
    if len(parts) > 2 or not all(_IDENTIFIER.match(p) for p in parts):
        raise ApiError(400, f"{what} {raw!r} is invalid: use [namespace/]name of lower-case letters, digits, "
                            "'-' and '_' (at most 64 each), optionally followed by :tag")
    if colon:
        check_tag(tag)
    return TemplateName(name, tag or None)


def check_tag(tag: str) -> str:
    if not _TAG.match(tag or ""):
        raise ApiError(400, f"tag {tag!r} is invalid: use 1-64 lower-case letters, digits, '-', '_' and '.'")
    if _UUID.match(tag):
        raise ApiError(400, f"tag {tag!r} is invalid: a tag may not be a UUID (UUIDs name builds)")
    return tag


class BuildLogs:
    """A build's log: append-only, indexed by position (the SDK pages through it with `logsOffset`)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._live: dict[str, list[dict]] = {}

    def start(self, build_id: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._live[build_id] = []
        (self.directory / f"{build_id}.log").write_text("")

    def add(self, build_id: str, level: str, message: str, step: str | None = None) -> None:
        entry = {"timestamp": time.time(), "level": level if level in LEVELS else "info", "message": message}
        if step is not None:
            entry["step"] = step
        entries = self._live.setdefault(build_id, [])
        entries.append(entry)
        with contextlib.suppress(OSError), open(self.directory / f"{build_id}.log", "a") as f:
            f.write(json.dumps(entry) + "\n")

    def finish(self, build_id: str) -> None:
        self._live.pop(build_id, None)

    def entries(self, build_id: str) -> list[dict]:
        live = self._live.get(build_id)
        if live is not None:
            return live
        try:
            lines = (self.directory / f"{build_id}.log").read_text().splitlines()
        except OSError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def remove(self, build_id: str) -> None:
        self._live.pop(build_id, None)
        (self.directory / f"{build_id}.log").unlink(missing_ok=True)


@dataclass(frozen=True)
class BaseImage:
    """What a build starts from, resolved: its layers (top first) and a key naming exactly them."""

    layers: tuple[Path, ...]
    key: str


class Templates:
    def __init__(self, database: Database, runtime: Runtime, *, cache_dir: Path, data_dir: Path,
                 builder: Builder, builtin: Callable[[], set[str]],
                 resolve_snapshot: Callable[[str], Path], limits: BuildLimits | None = None,
                 pull_image: Callable[..., Awaitable[BaseImage]] | None = None) -> None:
        """`builtin()`: the names of the templates Corral ships (every owner may start and build from
        them); `resolve_snapshot(runtime key)`: the checkpoint directory behind a template name;
        `pull_image(reference, credentials, log)`: the base of a `fromImage` build."""
        self._db = database
        self.runtime = runtime
        self.cache_dir = cache_dir
        self.data_dir = data_dir
        self.files_dir = data_dir / "template-files"
        self.logs = BuildLogs(data_dir / "template-builds")
        self.builder = builder
        self.builtin = builtin
        self.resolve_snapshot = resolve_snapshot
        self.limits = limits or BuildLimits()
        self.pull_image = pull_image
        self._slots = asyncio.Semaphore(self.limits.max_concurrent)
        self._tasks: dict[str, asyncio.Task] = {}
        self._admitted = 0  # builds triggered and not finished
        self.events: events.Events | None = None  # build finished/failed events, set by the server
        self._eviction: asyncio.Task | None = None  # of the step-layer cache, after a build
        self._upload_key = _load_key(data_dir / "template-uploads.key")
        self.metrics: ServerMetrics = UNSCRAPED  # the server's, handed in by server.py

    async def start(self) -> None:
        """Builds the last server left unfinished failed: their sandboxes are gone with it."""
        def fail_unfinished(session) -> None:
            for row in session.scalars(select(TemplateBuildRow).where(
                    TemplateBuildRow.status.in_(("waiting", "building")))):
                row.status = "error"
                row.reason = {"message": "the server stopped while this build ran; start it again"}
                row.finished_at = time.time()
        await self._db.write(fail_unfinished)

    async def close(self) -> None:
        if self._eviction is not None:
            with contextlib.suppress(Exception):
                await self._eviction  # a thread: it cannot be cancelled, and it is bounded
        for task in list(self._tasks.values()):
            task.cancel()
        for task in list(self._tasks.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # --- names ------------------------------------------------------------------------------------

    async def _find(self, owner: Owner, ref: str) -> TemplateRow | None:
        """The owner's template `ref` names (an id or a `[namespace/]name`), or a public one; None otherwise
        (another team's id reads as no template at all: 404, as for its sandboxes)."""
        def find(session) -> TemplateRow | None:
            row = session.get(TemplateRow, ref)
            if row is None:
                row = session.scalar(select(TemplateRow).where(TemplateRow.team_id == owner.team_id,
                                                               TemplateRow.name == ref))
            return row
        row = await self._db.read(find)
        if row is not None and row.team_id != owner.team_id and not row.public:
            return None
        return row

    async def name_of(self, owner: Owner, ref: str) -> str | None:
        """The name of the owner's (or a public) built template `ref` (an id or a name, its tag aside); None
        for a built-in or no template."""
        name = ref.partition(":")[0]
        if name in self.builtin():
            return None
        row = await self._find(owner, name)
        return row.name if row is not None else None

    async def get(self, owner: Owner, ref: str) -> TemplateRow:
        name = ref.partition(":")[0]
        row = await self._find(owner, name)
        if row is None:
            raise ApiError(404, f"template {name!r} not found")
        return row

    async def exists(self, owner: Owner, raw: str) -> TemplateRow | None:
        """For `GET /templates/aliases/{alias}`: the row, None for a built-in, ApiError 404/403 otherwise."""
        name = raw.partition(":")[0]
        if name in self.builtin():
            return None
        row = await self._find(owner, name)
        if row is None:
            def other(session) -> bool:
                return session.scalar(select(TemplateRow.id).where(TemplateRow.name == name)) is not None
            if await self._db.read(other):
                raise ApiError(403, f"template {name!r} exists but belongs to another team")
            raise ApiError(404, f"template {name!r} not found")
        return row

    async def runtime_key(self, owner: Owner, ref: str) -> str | None:
        """What the orchestrator calls the template `ref` names (`<id>` or `<id>:<tag>`); None when `ref`
        is not a built template of this owner (a built-in, or nothing: the caller decides)."""
        name, _, tag = ref.partition(":")
        if name in self.builtin():
            return None
        if not (_IDENTIFIER.match(name.split("/")[-1]) and name.count("/") <= 1):
            return None
        row = await self._find(owner, name)
        if row is None:
            return None
        tag = tag or DEFAULT_TAG

        def tagged(session) -> str | None:
            return session.scalar(select(TemplateTagRow.build_id).where(
                TemplateTagRow.template_id == row.id, TemplateTagRow.tag == tag))
        if await self._db.read(tagged) is None:
            raise ApiError(404, f"template {name!r} has no ready build tagged {tag!r}"
                           + (" (its first build has not finished)" if tag == DEFAULT_TAG else ""))
        return row.id if tag == DEFAULT_TAG else f"{row.id}:{tag}"

    # --- requesting a build ---------------------------------------------------------------------------

    async def request(self, owner: Owner, raw_name: str, tags: list[str] | None, *, cpu_count: int | None,
                      memory_mb: int | None) -> tuple[TemplateRow, TemplateBuildRow]:
        parsed = parse_name(raw_name)
        if parsed.name in self.builtin():
            raise ApiError(409, f"{parsed.name!r} is a built-in template; choose another name")
        wanted = [check_tag(t) for t in (tags or [])]
        if parsed.tag and parsed.tag not in wanted:
            wanted.insert(0, parsed.tag)
        wanted = wanted or [DEFAULT_TAG]
        resources = Resources(vcpus=cpu_count or 2, memory_mb=memory_mb or 1024)
        try:
            resources.validate()
        except Exception as e:
            raise ApiError(400, str(e)) from None
        now = time.time()

        def create(session) -> tuple[TemplateRow, TemplateBuildRow]:
            row = session.scalar(select(TemplateRow).where(TemplateRow.team_id == owner.team_id,
                                                           TemplateRow.name == parsed.name))
            if row is None:
                row = TemplateRow(id=_template_id(), key_id=owner.key_id, team_id=owner.team_id,
                                  name=parsed.name, public=False,
                                  created_at=now, updated_at=now)
                session.add(row)
                session.flush()  # no relationship() tells the unit of work to insert the template first
            build = TemplateBuildRow(id=str(uuid.uuid4()), template_id=row.id, status="waiting", tags=wanted,
                                     cpu_count=int(resources.vcpus), memory_mb=resources.memory_mb, created_at=now)
            session.add(build)
            row.updated_at = now
            session.flush()
            return row, build
        return await self._db.write(create)

    async def build_row(self, owner: Owner, template_id: str, build_id: str) -> TemplateBuildRow:
        row = await self.get(owner, template_id)

        def find(session) -> TemplateBuildRow | None:
            build = session.get(TemplateBuildRow, build_id)
            return build if build is not None and build.template_id == row.id else None
        build = await self._db.read(find) if _UUID.match(build_id) else None
        if build is None:
            raise ApiError(404, f"build {build_id!r} of template {template_id!r} not found")
        return build

    # --- uploaded files ---------------------------------------------------------------------------------

    def _archive_path(self, template_id: str, files_hash: str) -> Path:
        return self.files_dir / template_id / files_hash

    async def upload_slot(self, owner: Owner, template_id: str, files_hash: str, base_url: str) -> dict:
        row = await self.get(owner, template_id)
        if not _HASH.match(files_hash):
            raise ApiError(400, f"files hash {files_hash!r} must be 64 lower-case hex digits (a SHA-256)")
        present = self._archive_path(row.id, files_hash).is_file()
        expires = int(time.time()) + self.limits.upload_url_ttl_s
        signature = self._sign(row.id, files_hash, expires)
        url = (f"{base_url.rstrip('/')}/templates/{row.id}/files/{files_hash}/upload"
               f"?expires={expires}&signature={signature}")
        return {"present": present, "url": url}

    def _sign(self, template_id: str, files_hash: str, expires: int) -> str:
        message = f"{template_id}\n{files_hash}\n{expires}".encode()
        return hmac.new(self._upload_key, message, hashlib.sha256).hexdigest()

    async def receive_upload(self, template_id: str, files_hash: str, expires: str, signature: str,
                             chunks) -> None:
        """Stores an upload that came with a signature this server made and that has not expired."""
        try:
            deadline = int(expires)
        except (TypeError, ValueError):
            raise ApiError(403, "the upload URL is not one this server issued") from None
        if not (_HASH.match(files_hash) and signature
                and hmac.compare_digest(self._sign(template_id, files_hash, deadline), signature)):
            raise ApiError(403, "the upload URL is not one this server issued (bad signature)")
        if deadline < time.time():
            raise ApiError(403, "the upload URL has expired; ask for a new one (GET /templates/{id}/files/{hash})")
        target = self._archive_path(template_id, files_hash)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{files_hash}.{secrets.token_hex(4)}.partial")
        size = 0
        try:
            with open(partial, "wb") as f:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self.limits.upload_max_bytes:
                        raise ApiError(413, f"the upload is larger than this server's limit of "
                                            f"{self.limits.upload_max_bytes // 1024**2} MiB")
                    await asyncio.to_thread(f.write, chunk)
            partial.rename(target)
        finally:
            partial.unlink(missing_ok=True)

    # --- running a build --------------------------------------------------------------------------------

    async def trigger(self, owner: Owner, template_id: str, build_id: str, body: dict, *,
                      client: str = "") -> None:
        """`client`: the request's User-Agent. The JS SDK's filesHash also covers directories' sizes, which
        an archive does not record: its uploads cannot be checked against it (their layers are still keyed
        by the content the server hashes)."""
        row = await self.get(owner, template_id)
        build = await self.build_row(owner, row.id, build_id)
        if build.status != "waiting" or build.id in self._tasks or build.started_at is not None:
            raise ApiError(409, f"build {build_id} was already started")
        plan_inputs = self._validate(body)
        plan_inputs["verify_files_hash"] = not client.startswith("e2b-js-sdk/")
        credentials = body.get("fromImageRegistry")
        stored = {k: v for k, v in body.items() if k != "fromImageRegistry"}
        if credentials:
            stored["fromImageRegistry"] = {"type": credentials.get("type"), "username": "(not stored)"}

        # Building at once when a slot is free (the SDK expects "building" right after the trigger), else
        # waiting for one; counted here, before the task runs, so back-to-back triggers see each other.
        self._admitted += 1
        status = "building" if self._admitted <= self.limits.max_concurrent else "waiting"

        def mark(session) -> None:
            found = session.get(TemplateBuildRow, build.id)
            found.spec = stored
            found.started_at = time.time()
            found.status = status
        try:
            await self._db.write(mark)
        except BaseException:
            self._admitted -= 1
            raise
        self.logs.start(build.id)
        task = asyncio.create_task(self._run(owner, row, build, plan_inputs, credentials))
        self._tasks[build.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(build.id, None))

    def _validate(self, body: dict) -> dict:
        from_image, from_template = body.get("fromImage"), body.get("fromTemplate")
        if bool(from_image) == bool(from_template):
            raise ApiError(400, "give exactly one of fromImage and fromTemplate")
        steps = body.get("steps") or []
        if not isinstance(steps, list) or len(steps) > self.limits.max_steps:
            raise ApiError(400, f"steps must be a list of at most {self.limits.max_steps} steps")
        parsed = []
        for number, step in enumerate(steps, 1):
            if not isinstance(step, dict) or step.get("type") not in _STEP_KINDS:
                raise ApiError(400, f"step {number}: type must be one of {', '.join(_STEP_KINDS)}")
            args = step.get("args") or []
            if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
                raise ApiError(400, f"step {number}: args must be a list of strings")
            files_hash = step.get("filesHash")
            if step["type"] == "COPY" and not (isinstance(files_hash, str) and _HASH.match(files_hash)):
                raise ApiError(400, f"step {number}: COPY needs filesHash (64 hex digits)")
            parsed.append(BuildStep(number=number, kind=step["type"], args=tuple(args),
                                    force=bool(step.get("force")), files_hash=files_hash))
        for field_name in ("startCmd", "readyCmd"):
            if body.get(field_name) is not None and not isinstance(body[field_name], str):
                raise ApiError(400, f"{field_name} must be a string")
        return {"from_image": from_image, "from_template": from_template, "steps": tuple(parsed),
                "start": body.get("startCmd") or None, "ready": body.get("readyCmd") or None,
                "force": bool(body.get("force"))}

    async def _set(self, build_id: str, **values) -> None:
        def update(session) -> None:
            found = session.get(TemplateBuildRow, build_id)
            for name, value in values.items():
                setattr(found, name, value)
        await self._db.write(update)

    async def _run(self, owner: Owner, row: TemplateRow, build: TemplateBuildRow, inputs: dict,
                   credentials: dict | None) -> None:
        logs, bid = self.logs, build.id

        def say(level: str, message: str, step: str | None = None) -> None:
            logs.add(bid, level, message, step)

        target = self.cache_dir / "templates" / row.id / bid
        work = self.cache_dir / "build-work" / bid
        status, reason, began = "error", None, None
        try:
            if self._slots.locked():
                say("info", "Waiting for a free build slot")
            async with self._slots:
                began = time.monotonic()
                await self._set(bid, status="building")
                say("info", f"Building template {row.name} ({row.id}), build {bid}")
                async with asyncio.timeout(self.limits.timeout_s):
                    base = await self._base(owner, inputs, credentials, say)
                    plan = BuildPlan(base_layers=base.layers, base_key=base.key, steps=inputs["steps"],
                                     start_cmd=inputs["start"], ready_cmd=inputs["ready"], force=inputs["force"],
                                     resources=Resources(vcpus=build.cpu_count, memory_mb=build.memory_mb),
                                     verify_files_hash=inputs["verify_files_hash"])
                    started = time.monotonic()
                    # Only this template's uploads: a build cannot reach another's files by hash.
                    await self.builder.build(plan, target, work, say, archive=lambda h: (
                        p if (p := self._archive_path(row.id, h)).is_file() else None))
                await self._publish(row, build)
                status = "ready"
                say("info", f"Build finished in {time.monotonic() - started:.1f}s")
        except TimeoutError:
            reason = {"message": f"the build took longer than this server's limit of {self.limits.timeout_s:.0f}s"}
        except BuildFailed as e:
            reason = {"message": e.message, **({"step": e.step} if e.step else {})}
        except ApiError as e:
            reason = {"message": e.message, "step": "base"}
        except asyncio.CancelledError:
            reason = {"message": "the build was cancelled (the server is stopping)"}
        except Exception as e:  # a bug or a host failure: say so rather than hang at "building"
            log.exception("build %s failed", bid)
            reason = {"message": f"the build failed: {e}"}
        finally:
            if status != "ready":
                say("error", reason["message"] if reason else "the build failed", (reason or {}).get("step"))
                shutil.rmtree(target, ignore_errors=True)
                shutil.rmtree(target.with_name(f"{target.name}.etc"), ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
            with contextlib.suppress(Exception):
                await asyncio.shield(self._set(bid, status=status, reason=reason, finished_at=time.time()))
            logs.finish(bid)
            if began is not None:
                self.metrics.build_finished(status == "ready", time.monotonic() - began)
            if self.events is not None:
                await self.events.emit_quietly(
                    owner.team_id, events.BUILD_FINISHED if status == "ready" else events.BUILD_FAILED,
                    data={"templateID": row.id, "name": row.name, "buildID": bid,
                          **({"reason": reason} if reason else {})})
            self._admitted -= 1
            self._tasks.pop(bid, None)  # finished as far as anyone asks (deleting the template, say)
            if self._eviction is None or self._eviction.done():
                self._eviction = asyncio.create_task(asyncio.to_thread(self._evict_layers))

    def _evict_layers(self) -> None:
        """(In a thread.) A failure is logged: the next build tries again."""
        try:
            self._evict_unused_layers()
        except Exception:
            log.exception("evicting unused build layers failed")

    def _evict_unused_layers(self) -> None:
        layers = self.cache_dir / "build-layers"
        # A layer used within a build's time limit may belong to a build still running.
        unused = [e.path for e in prune.unused_builds(self.cache_dir, [self.data_dir],
                                                      min_age_s=self.limits.timeout_s)
                  if e.path.parent == layers]
        freed = evict_layers(layers, self.limits.layer_cache_bytes, unused)
        if freed:
            log.info("evicted %d MiB of unused build layers", freed // 1024**2)

    async def _base(self, owner: Owner, inputs: dict, credentials: dict | None, say) -> BaseImage:
        if inputs["from_template"]:
            ref = inputs["from_template"]
            key = await self.runtime_key(owner, ref)
            if key is None and ref.partition(":")[0] not in self.builtin():
                raise ApiError(404, f"base template {ref!r} not found")
            try:
                path = self.resolve_snapshot(key or ref.partition(":")[0])
            except TemplateNotFound as e:
                raise ApiError(404, f"base template {ref!r} is not built: {e}") from None
            snapshot = self.runtime.open_snapshot(path)
            layers = tuple(p for p in snapshot.layers if not self._is_support_layer(p))
            say("info", f"FROM template {ref}", "base")
            return BaseImage(layers, f"template:{path}")
        reference = inputs["from_image"]
        if self.pull_image is None:
            raise ApiError(400, "this server cannot pull images")
        say("info", f"FROM image {reference}", "base")
        return await self.pull_image(reference, credentials, lambda line: say("info", line, "base"))

    def _is_support_layer(self, layer: Path) -> bool:
        """The envd and DNS/trust layers of a base: every build puts current ones on top instead."""
        return layer.name.endswith(".etc") or layer.is_relative_to(self.cache_dir / "envd")

    async def _publish(self, row: TemplateRow, build: TemplateBuildRow) -> None:
        now = time.time()

        def tag(session) -> None:
            for name in build.tags or [DEFAULT_TAG]:
                existing = session.scalar(select(TemplateTagRow).where(TemplateTagRow.template_id == row.id,
                                                                       TemplateTagRow.tag == name))
                if existing is None:
                    session.add(TemplateTagRow(template_id=row.id, tag=name, build_id=build.id, created_at=now))
                else:
                    existing.build_id, existing.created_at = build.id, now
        await self._db.write(tag)
        for name in build.tags or [DEFAULT_TAG]:
            self._link(row.id, name, build.id)

    def _link(self, template_id: str, tag: str, build_id: str) -> None:
        directory = self.cache_dir / "templates" / template_id
        link = directory / ("current" if tag == DEFAULT_TAG else f"tag-{tag}")
        tmp = directory / f".{link.name}.{secrets.token_hex(4)}"
        tmp.symlink_to(build_id)
        tmp.rename(link)

    def status(self, build: TemplateBuildRow, offset: int, limit: int, level: str | None) -> dict:
        entries = self.logs.entries(build.id)
        page = entries[max(0, offset):max(0, offset) + limit]
        if level in LEVELS:
            floor = LEVELS.index(level)
            page = [e for e in page if LEVELS.index(e["level"]) >= floor]
        answer = {"templateID": build.template_id, "buildID": build.id, "status": build.status,
                  "logs": [e["message"] for e in page], "logEntries": page}
        if build.status == "error":
            answer["reason"] = {"message": (build.reason or {}).get("message") or "Build failed",
                                **({"step": build.reason["step"]} if (build.reason or {}).get("step") else {})}
        return answer

    # --- tags, listing, deleting ----------------------------------------------------------------------

    async def assign_tags(self, owner: Owner, target: str, tags: list[str]) -> tuple[list[str], str]:
        parsed = parse_name(target, what="target")
        row = await self.get(owner, parsed.name)
        wanted = [check_tag(t) for t in tags]
        if not wanted:
            raise ApiError(400, "give at least one tag")
        source = parsed.tag or DEFAULT_TAG
        now = time.time()

        def assign(session) -> str:
            build_id = session.scalar(select(TemplateTagRow.build_id).where(
                TemplateTagRow.template_id == row.id, TemplateTagRow.tag == source))
            if build_id is None:
                raise ApiError(404, f"template {parsed.name!r} has no build tagged {source!r}")
            for name in wanted:
                existing = session.scalar(select(TemplateTagRow).where(TemplateTagRow.template_id == row.id,
                                                                       TemplateTagRow.tag == name))
                if existing is None:
                    session.add(TemplateTagRow(template_id=row.id, tag=name, build_id=build_id, created_at=now))
                else:
                    existing.build_id, existing.created_at = build_id, now
            return build_id
        build_id = await self._db.write(assign)
        for name in wanted:
            self._link(row.id, name, build_id)
        return wanted, build_id

    async def remove_tags(self, owner: Owner, name: str, tags: list[str]) -> None:
        if ":" in (name or ""):
            raise ApiError(400, f"name {name!r} must not carry a tag; list the tags to remove in `tags`")
        row = await self.get(owner, parse_name(name).name)
        if not tags:
            raise ApiError(400, "give at least one tag to remove")
        if DEFAULT_TAG in tags:
            raise ApiError(400, "the default tag cannot be removed")

        def remove(session) -> None:
            for tag in tags:
                found = session.scalar(select(TemplateTagRow).where(TemplateTagRow.template_id == row.id,
                                                                    TemplateTagRow.tag == tag))
                if found is None:
                    raise ApiError(404, f"template {row.name!r} has no tag {tag!r}")
                session.delete(found)
        await self._db.write(remove)
        for tag in tags:
            (self.cache_dir / "templates" / row.id / f"tag-{tag}").unlink(missing_ok=True)

    async def tags(self, owner: Owner, ref: str) -> list[TemplateTagRow]:
        row = await self.get(owner, ref)
        return await self._db.read(lambda s: list(s.scalars(
            select(TemplateTagRow).where(TemplateTagRow.template_id == row.id).order_by(TemplateTagRow.created_at))))

    async def list(self, owner: Owner) -> list[tuple[TemplateRow, list[TemplateBuildRow], list[TemplateTagRow]]]:
        def read(session):
            out = []
            for row in session.scalars(select(TemplateRow).where(TemplateRow.team_id == owner.team_id)
                                       .order_by(TemplateRow.created_at)):
                builds = list(session.scalars(select(TemplateBuildRow).where(TemplateBuildRow.template_id == row.id)
                                              .order_by(TemplateBuildRow.created_at)))
                tags = list(session.scalars(select(TemplateTagRow).where(TemplateTagRow.template_id == row.id)))
                out.append((row, builds, tags))
            return out
        return await self._db.read(read)

    async def delete(self, owner: Owner, ref: str, in_use: Callable[[str], Awaitable[bool]]) -> bool:
        """Deletes the template `ref` names (False when it names none of the owner's). Refused (409) while
        a build runs or a sandbox runs from it."""
        row = await self._find(owner, ref.partition(":")[0])
        if row is None:
            return False
        if row.team_id != owner.team_id:
            raise ApiError(403, f"template {ref!r} belongs to another team")
        builds = await self._db.read(lambda s: list(s.scalars(
            select(TemplateBuildRow).where(TemplateBuildRow.template_id == row.id))))
        if any(b.id in self._tasks for b in builds):
            raise ApiError(409, f"template {row.name!r} has a build in progress")
        if await in_use(row.id):
            raise ApiError(409, f"sandboxes are running from template {row.name!r}; kill them first")

        def remove(session) -> None:
            for model in (TemplateTagRow, TemplateBuildRow):
                for found in session.scalars(select(model).where(model.template_id == row.id)):
                    session.delete(found)
            session.delete(session.get(TemplateRow, row.id))
        await self._db.write(remove)
        shutil.rmtree(self.cache_dir / "templates" / row.id, ignore_errors=True)
        shutil.rmtree(self.files_dir / row.id, ignore_errors=True)
        for build in builds:
            self.logs.remove(build.id)
        return True


def _template_id() -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(20))


def _load_key(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_bytes(32)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(key)
        tmp.chmod(0o600)
        tmp.rename(path)
        return key
