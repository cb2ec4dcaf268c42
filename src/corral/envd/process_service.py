"""The `process.Process` Connect service."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from protobuf import Oneof

from corral.envd.paths import resolve
from corral.envd.processes import (
    Exit,
    InvalidProcessRequest,
    ManagedProcess,
    Output,
    ProcessNotFound,
    ProcessTable,
    Spec,
)
from corral.envd.proto import process_pb as pr
from corral.envd.requests import request_user
from corral.envd.state import SandboxState
from corral.envd.users import User

DEFAULT_KEEPALIVE_S = 90.0
_SIGNALS = {pr.Signal.SIGKILL: signal.SIGKILL, pr.Signal.SIGTERM: signal.SIGTERM}


def keepalive_interval(ctx: RequestContext) -> float:
    raw = ctx.request_headers.get("keepalive-ping-interval")
    try:
        return max(1.0, float(raw)) if raw else DEFAULT_KEEPALIVE_S
    except ValueError:
        return DEFAULT_KEEPALIVE_S


def _event(**oneof) -> pr.ProcessEvent:
    (field, value), = oneof.items()
    return pr.ProcessEvent(event=Oneof(field, value))


def _end_event(exit: Exit) -> pr.ProcessEvent:
    return _event(end=pr.ProcessEvent.EndEvent(exit_code=exit.exit_code, exited=exit.exited,
                                               status=exit.status, error=exit.error))


def _selector(selector: pr.ProcessSelector | None) -> tuple[int | None, str | None]:
    match selector.selector if selector is not None else None:
        case Oneof(field="pid", value=pid):
            return pid, None
        case Oneof(field="tag", value=tag):
            return None, tag
    raise ConnectError(Code.INVALID_ARGUMENT, "a process selector (pid or tag) is required")


class ProcessService:
    def __init__(self, state: SandboxState, table: ProcessTable) -> None:
        self._state = state
        self._table = table

    def _find(self, selector: pr.ProcessSelector | None, *, include_exited: bool = False) -> ManagedProcess:
        pid, tag = _selector(selector)
        try:
            return self._table.find(pid, tag, include_exited=include_exited)
        except ProcessNotFound as e:
            raise ConnectError(Code.NOT_FOUND, str(e)) from None

    async def list(self, request: pr.ListRequest, ctx: RequestContext) -> pr.ListResponse:
        return pr.ListResponse(processes=[
            pr.ProcessInfo(pid=p.pid, tag=p.spec.tag,
                           config=pr.ProcessConfig(cmd=p.spec.cmd, args=p.spec.args, envs=p.spec.envs,
                                                   cwd=p.spec.cwd))
            for p in self._table.running()
        ])

    async def start(self, request: pr.StartRequest, ctx: RequestContext) -> AsyncIterator[pr.StartResponse]:
        config = request.process
        if config is None or not config.cmd:
            raise ConnectError(Code.INVALID_ARGUMENT, "process.cmd is required")
        user = request_user(ctx.request_headers.get("authorization"), self._state)
        cwd = self._working_directory(config.cwd, user)
        pty_size = None
        if request.pty is not None:
            size = request.pty.size
            pty_size = (size.cols or 80, size.rows or 24) if size is not None else (80, 24)
        spec = Spec(cmd=config.cmd, args=list(config.args), envs=dict(config.envs), cwd=config.cwd,
                    tag=request.tag, stdin=request.stdin if request.has_field("stdin") else True,
                    pty_size=pty_size)
        try:
            proc, queue = await self._table.spawn(spec, user, cwd)
        except (FileNotFoundError, PermissionError) as e:
            raise ConnectError(Code.INVALID_ARGUMENT, f"cannot start '{config.cmd}': {e.strerror}") from None
        except OSError as e:
            raise ConnectError(Code.INTERNAL, f"cannot start '{config.cmd}': {e}") from None
        # The deadline of a Start call is the command's timeout: the process dies with it.
        deadline = None
        if (remaining := ctx.timeout_ms) is not None:
            deadline = asyncio.get_running_loop().call_later(max(0.0, remaining / 1000), self._expire, proc)
        try:
            async for event in self._follow(proc, queue, ctx):
                if proc.expired and event.event is not None and event.event.field == "end":
                    # As in E2B: the caller sees its deadline, not an exit code.
                    raise ConnectError(Code.DEADLINE_EXCEEDED, "the command's timeout expired; it was killed")
                yield pr.StartResponse(event=event)
        finally:
            if deadline is not None and proc.exit is not None:
                deadline.cancel()

    def _expire(self, proc: ManagedProcess) -> None:
        if proc.exit is None:
            proc.expired = True
            self._table.signal(proc, signal.SIGKILL)

    def _working_directory(self, requested: str | None, user: User) -> str:
        if requested:
            cwd = resolve(requested, user)
            if not os.path.isdir(cwd):
                raise ConnectError(Code.INVALID_ARGUMENT, f"cwd '{cwd}' does not exist")
            return cwd
        workdir = self._state.default_workdir
        if workdir and os.path.isdir(workdir):
            return workdir
        return user.home if os.path.isdir(user.home) else "/"

    async def connect(self, request: pr.ConnectRequest, ctx: RequestContext
                      ) -> AsyncIterator[pr.ConnectResponse]:
        proc = self._find(request.process, include_exited=True)
        queue = proc.subscribe()
        async for event in self._follow(proc, queue, ctx):
            yield pr.ConnectResponse(event=event)

    async def _follow(self, proc: ManagedProcess, queue: asyncio.Queue, ctx: RequestContext
                      ) -> AsyncIterator[pr.ProcessEvent]:
        """start, then live output, then end; keepalives while quiet. Leaving early does not kill."""
        interval = keepalive_interval(ctx)
        try:
            yield _event(start=pr.ProcessEvent.StartEvent(pid=proc.pid))
            if proc.exit is not None:
                yield _end_event(proc.exit)
                return
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), interval)
                except TimeoutError:
                    yield _event(keepalive=pr.ProcessEvent.KeepAlive())
                    continue
                if isinstance(item, Exit):
                    yield _end_event(item)
                    return
                assert isinstance(item, Output)
                yield _event(data=pr.ProcessEvent.DataEvent(output=Oneof(item.kind, item.data)))
        finally:
            proc.unsubscribe(queue)

    async def update(self, request: pr.UpdateRequest, ctx: RequestContext) -> pr.UpdateResponse:
        proc = self._find(request.process)
        if request.pty is not None and request.pty.size is not None:
            with _as_connect_errors():
                self._table.resize(proc, request.pty.size.cols, request.pty.size.rows)
        return pr.UpdateResponse()

    async def send_input(self, request: pr.SendInputRequest, ctx: RequestContext) -> pr.SendInputResponse:
        proc = self._find(request.process)
        self._write(proc, request.input)
        return pr.SendInputResponse()

    async def stream_input(self, requests: AsyncIterator[pr.StreamInputRequest], ctx: RequestContext
                           ) -> pr.StreamInputResponse:
        proc = None
        async for message in requests:
            match message.event:
                case Oneof(field="start", value=start):
                    proc = self._find(start.process)
                case Oneof(field="data", value=data):
                    if proc is None:
                        raise ConnectError(Code.FAILED_PRECONDITION, "the first message must be `start`")
                    self._write(proc, data.input)
        return pr.StreamInputResponse()

    def _write(self, proc: ManagedProcess, message: pr.ProcessInput | None) -> None:
        match message.input if message is not None else None:
            case Oneof(field="stdin", value=data):
                stdin, pty = data, None
            case Oneof(field="pty", value=data):
                stdin, pty = None, data
            case _:
                raise ConnectError(Code.INVALID_ARGUMENT, "input.stdin or input.pty is required")
        with _as_connect_errors():
            self._table.write_input(proc, stdin, pty)

    async def send_signal(self, request: pr.SendSignalRequest, ctx: RequestContext
                          ) -> pr.SendSignalResponse:
        proc = self._find(request.process)
        signum = _SIGNALS.get(request.signal)
        if signum is None:
            raise ConnectError(Code.INVALID_ARGUMENT, f"unsupported signal {request.signal}")
        self._table.signal(proc, signum)
        return pr.SendSignalResponse()

    async def close_stdin(self, request: pr.CloseStdinRequest, ctx: RequestContext) -> pr.CloseStdinResponse:
        proc = self._find(request.process)
        with _as_connect_errors():
            self._table.close_stdin(proc)
        return pr.CloseStdinResponse()


@contextlib.contextmanager
def _as_connect_errors():
    try:
        yield
    except InvalidProcessRequest as e:
        raise ConnectError(Code.FAILED_PRECONDITION, str(e)) from None
    except OSError as e:
        raise ConnectError(Code.INTERNAL, str(e)) from None
