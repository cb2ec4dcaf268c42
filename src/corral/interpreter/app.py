"""The HTTP surface of the code interpreter (port 49999), as `e2b-code-interpreter` calls it."""

from __future__ import annotations

import asyncio
import json
import logging
import os

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from corral.interpreter.contexts import Context, ContextTable, KernelStartFailed, UnknownLanguage, normalise
from corral.interpreter.execute import (
    KERNEL_SETUP,
    env_prelude,
    execute,
    interrupt_and_drain,
    line,
    run_silently,
)

log = logging.getLogger("corral.interpreter")
ENVD_ENVS = "http://127.0.0.1:49983/envs"


class Interpreter:
    def __init__(self, default_cwd: str = "/home/user") -> None:
        self.contexts = ContextTable(default_cwd)
        self._http = httpx.AsyncClient(timeout=5, trust_env=False)
        self._background: set[asyncio.Task] = set()

    async def _body(self, request: Request) -> dict:
        raw = await request.body()
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except ValueError:
            raise _Http(400, "the body is not JSON") from None
        if not isinstance(body, dict):
            raise _Http(400, "the body must be a JSON object")
        return body

    async def _sandbox_env(self, request: Request) -> dict[str, str]:
        """The sandbox's env vars (from create's envVars), from envd with the caller's access token."""
        headers = {}
        if token := request.headers.get("x-access-token"):
            headers["X-Access-Token"] = token
        try:
            response = await self._http.get(ENVD_ENVS, headers=headers)
            return response.json() if response.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            return {}

    async def health(self, request: Request) -> Response:
        return PlainTextResponse("OK")

    async def warm(self, request: Request) -> Response:
        """Corral's own (not in the E2B protocol): the warm pool calls it on a freshly restored sandbox so
        that the user's first run_code does not pay for faulting the kernel's pages back in (~100 ms).
        In every Python context it runs and displays a result like a user's cell would, but outside the
        history (the execution count does not move), then resets `_` to its initial value."""
        await self._sandbox_env(request)  # the envd connection, too
        for ctx in self.contexts.all():
            if ctx.language != "python" or not ctx.started:
                continue
            async with ctx.lock:
                if await ctx.manager.is_alive():
                    async for _ in execute(ctx, "1 + 1", {}, store_history=False):
                        pass
                    await run_silently(ctx, "get_ipython().displayhook.flush()")
        return Response(status_code=204)

    async def execute(self, request: Request) -> Response:
        body = await self._body(request)
        code = body.get("code")
        if not isinstance(code, str):
            return PlainTextResponse("code must be a string", status_code=400)
        context_id, language = body.get("context_id"), body.get("language")
        if context_id and language:
            return PlainTextResponse("Only one of context_id or language can be provided", status_code=400)
        env_vars = body.get("env_vars") or {}
        if not isinstance(env_vars, dict) or not all(isinstance(v, str) for v in env_vars.values()):
            return PlainTextResponse("env_vars must map names to strings", status_code=400)
        if context_id:
            ctx = self.contexts.get(context_id)
            if ctx is None:
                return PlainTextResponse(f"Context {context_id} not found", status_code=404)
        else:
            try:
                ctx = await self.contexts.default(language)
            except UnknownLanguage as e:
                return PlainTextResponse(str(e), status_code=400)
        await ctx.lock.acquire()
        try:
            try:
                await ctx.start()  # a default context's kernel starts on first use
            except UnknownLanguage as e:
                ctx.lock.release()
                return PlainTextResponse(str(e), status_code=400)
            if not await ctx.manager.is_alive():
                ctx.lock.release()
                return PlainTextResponse(f"the kernel of context {ctx.id} died; restart it with "
                                         f"POST /contexts/{ctx.id}/restart", status_code=500)
            if not ctx.prepared:
                if setup := KERNEL_SETUP.get(ctx.kernel):
                    await run_silently(ctx, setup)
                sandbox_env = await self._sandbox_env(request)
                if sandbox_env and (prelude := env_prelude(ctx.language, sandbox_env, save=False)):
                    await run_silently(ctx, prelude)
                ctx.prepared = True
            if env_vars:
                await run_silently(ctx, env_prelude(ctx.language, env_vars))
        except BaseException:
            ctx.lock.release()
            raise
        return StreamingResponse(self._stream(ctx, code, env_vars), media_type="application/x-ndjson")

    async def _stream(self, ctx: Context, code: str, env_vars: dict):
        state: dict = {"finished": False}
        try:
            async for chunk in execute(ctx, code, state):
                yield chunk
        except Exception as e:  # the stream has started: report in-band, as the SDK expects
            log.exception("execution failed")
            yield line({"type": "error", "name": type(e).__name__, "value": str(e), "traceback": ""})
            yield line({"type": "end_of_execution"})
        finally:
            # Not awaited here: a disconnected client's request is being cancelled.
            task = asyncio.get_running_loop().create_task(self._finish(ctx, state, env_vars))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _finish(self, ctx: Context, state: dict, env_vars: dict) -> None:
        try:
            if not state["finished"] and "msg_id" in state:
                await interrupt_and_drain(ctx, state["msg_id"])
            if env_vars and await ctx.manager.is_alive():
                await run_silently(ctx, env_prelude(ctx.language, env_vars, restore=True))
        except Exception:
            log.exception("cleaning up after an execution failed")
        finally:
            ctx.lock.release()

    async def create_context(self, request: Request) -> Response:
        body = await self._body(request)
        cwd = body.get("cwd")
        if cwd is not None and (not isinstance(cwd, str) or not os.path.isdir(cwd)):
            return PlainTextResponse(f"cwd {cwd!r} is not a directory", status_code=400)
        try:
            ctx = await self.contexts.create(body.get("language"), cwd)
        except UnknownLanguage as e:
            return PlainTextResponse(str(e), status_code=400)
        return JSONResponse(ctx.public())

    async def list_contexts(self, request: Request) -> Response:
        return JSONResponse([c.public() for c in self.contexts.all()])

    async def restart_context(self, request: Request) -> Response:
        ctx = self.contexts.get(request.path_params["context_id"])
        if ctx is None:
            return PlainTextResponse(f"Context {request.path_params['context_id']} not found", status_code=404)
        async with ctx.lock:
            await ctx.restart()
        return JSONResponse(None)

    async def remove_context(self, request: Request) -> Response:
        ctx = self.contexts.get(request.path_params["context_id"])
        if ctx is None:
            return PlainTextResponse(f"Context {request.path_params['context_id']} not found", status_code=404)
        async with ctx.lock:
            await self.contexts.remove(ctx.id)
        return JSONResponse(None)


class _Http(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def create_app(interpreter: Interpreter, lifespan=None) -> Starlette:
    async def http_error(request: Request, exc: _Http) -> Response:
        return PlainTextResponse(str(exc), status_code=exc.status)

    async def kernel_start_failed(request: Request, exc: KernelStartFailed) -> Response:
        # A 500 whose body the SDKs put in their exception's message (SandboxException in Python).
        return PlainTextResponse(str(exc), status_code=500)

    return Starlette(routes=[
        Route("/health", interpreter.health, methods=["GET"]),
        Route("/warm", interpreter.warm, methods=["POST"]),
        Route("/execute", interpreter.execute, methods=["POST"]),
        Route("/contexts", interpreter.create_context, methods=["POST"]),
        Route("/contexts", interpreter.list_contexts, methods=["GET"]),
        Route("/contexts/{context_id}/restart", interpreter.restart_context, methods=["POST"]),
        Route("/contexts/{context_id}", interpreter.remove_context, methods=["DELETE"]),
    ], exception_handlers={_Http: http_error, KernelStartFailed: kernel_start_failed}, lifespan=lifespan)


__all__ = ["Interpreter", "create_app", "normalise"]
