"""One execution: send code to a context's kernel and turn its IOPub messages into the NDJSON lines the
SDKs read (`number_of_executions`, `stdout`, `stderr`, `result`, `error`, `keepalive`, `end_of_execution`)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import queue
from collections.abc import AsyncIterator

from corral.interpreter.contexts import Context

KEEPALIVE_S = 5.0
# Jupyter MIME types -> the SDK's Result fields; anything else goes to `extra`.
MIME_FIELDS = {
    "text/plain": "text", "text/html": "html", "text/markdown": "markdown", "image/svg+xml": "svg",
    "image/png": "png", "image/jpeg": "jpeg", "application/pdf": "pdf", "text/latex": "latex",
    "application/json": "json", "application/javascript": "javascript", "e2b/data": "data", "e2b/chart": "chart",
}


def line(obj: dict) -> bytes:
    return (json.dumps({k: v for k, v in obj.items() if v is not None}) + "\n").encode()


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


def result_fields(data: dict, is_main: bool) -> dict:
    out: dict = {"type": "result", "is_main_result": is_main, "extra": {}}
    for mime, value in data.items():
        field = MIME_FIELDS.get(mime)
        if field is None:
            out["extra"][mime] = value
        elif field == "text":
            out["text"] = value
        else:
            out[field] = value
    return out


def env_prelude(language: str, env: dict[str, str], restore: bool = False) -> str:
    """Code that sets (or, with restore, puts back) environment variables in the kernel."""
    if language == "python":
        if restore:
            return ("import os as _corral_os\n"
                    "for _k, _v in _corral_saved_env.items():\n"
                    "    _corral_os.environ.pop(_k, None) if _v is None else _corral_os.environ.__setitem__(_k, _v)\n"
                    "del _corral_saved_env, _k, _v, _corral_os\n")
        return (f"import os as _corral_os\n_corral_env = {env!r}\n"
                "_corral_saved_env = {k: _corral_os.environ.get(k) for k in _corral_env}\n"
                "_corral_os.environ.update(_corral_env)\ndel _corral_env, _corral_os\n")
    if language == "bash":
        if restore:
            return "\n".join(f"if [ -n \"${{_CORRAL_SET_{i}+x}}\" ]; then export {k}=\"$_CORRAL_OLD_{i}\"; "
                             f"else unset {k}; fi; unset _CORRAL_SET_{i} _CORRAL_OLD_{i}"
                             for i, k in enumerate(env))
        parts = []
        for i, (k, v) in enumerate(env.items()):
            quoted = "'" + v.replace("'", "'\\''") + "'"
            parts.append(f"if [ -n \"${{{k}+x}}\" ]; then _CORRAL_SET_{i}=1; _CORRAL_OLD_{i}=\"${k}\"; fi; "
                         f"export {k}={quoted}")
        return "\n".join(parts)
    return ""


async def run_silently(ctx: Context, code: str) -> None:
    """Runs setup code and waits for it; output is discarded."""
    reply = await ctx.client.execute_interactive(code, silent=True, store_history=False, timeout=60,
                                                 output_hook=lambda msg: None)
    if reply["content"].get("status") == "error":
        raise RuntimeError(f"setup code failed: {reply['content'].get('ename')}: {reply['content'].get('evalue')}")


async def _next_iopub(ctx: Context, timeout: float) -> dict | None:
    try:
        return await ctx.client.get_iopub_msg(timeout=timeout)
    except (queue.Empty, TimeoutError):
        return None


async def execute(ctx: Context, code: str, state: dict) -> AsyncIterator[bytes]:
    """Streams one execution; the caller holds the context's lock. `state["msg_id"]` is set at once and
    `state["finished"]` at the end: a caller whose consumer went away earlier interrupts the kernel."""
    msg_id = state["msg_id"] = ctx.client.execute(code, store_history=True, allow_stdin=False, stop_on_error=True)
    while True:
        msg = await _next_iopub(ctx, KEEPALIVE_S)
        if msg is None:
            if not await ctx.manager.is_alive():
                yield line({"type": "error", "name": "KernelDied", "value": "the kernel died; restart the "
                            "context (POST /contexts/{id}/restart)", "traceback": ""})
                break
            yield line({"type": "keepalive"})
            continue
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "execute_input":
            yield line({"type": "number_of_executions", "execution_count": content.get("execution_count", 0)})
        elif kind == "stream":
            yield line({"type": "stdout" if content.get("name") == "stdout" else "stderr",
                        "text": content.get("text", ""), "timestamp": _now()})
        elif kind in ("execute_result", "display_data"):
            yield line(result_fields(content.get("data", {}), kind == "execute_result"))
        elif kind == "error":
            yield line({"type": "error", "name": content.get("ename", ""), "value": content.get("evalue", ""),
                        "traceback": "\n".join(content.get("traceback", []))})
        elif kind == "status" and content.get("execution_state") == "idle":
            break
    state["finished"] = True
    yield line({"type": "end_of_execution"})


async def interrupt_and_drain(ctx: Context, msg_id: str) -> None:
    await ctx.manager.interrupt_kernel()
    deadline = asyncio.get_running_loop().time() + 10
    while asyncio.get_running_loop().time() < deadline:
        msg = await _next_iopub(ctx, 1.0)
        if msg is None:
            if not await ctx.manager.is_alive():
                return
            continue
        if (msg.get("parent_header", {}).get("msg_id") == msg_id and msg["msg_type"] == "status"
                and msg["content"].get("execution_state") == "idle"):
            return
