"""One execution: send code to a context's kernel and turn its IOPub messages into the NDJSON lines the
SDKs read (`number_of_executions`, `stdout`, `stderr`, `result`, `error`, `keepalive`, `end_of_execution`)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import queue
import uuid
from collections.abc import AsyncIterator

from corral.interpreter.contexts import LATE_OUTPUT_KERNELS, Context

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


def env_prelude(language: str, env: dict[str, str], *, restore: bool = False, save: bool = True) -> str:
    """Code that sets environment variables in the kernel, remembering their old values when `save`
    (per-run env vars), or, with `restore`, puts the remembered values back."""
    if language == "python":
        if restore:
            return ("import os as _corral_os\n"
                    "for _k, _v in _corral_saved_env.items():\n"
                    "    _corral_os.environ.pop(_k, None) if _v is None else _corral_os.environ.__setitem__(_k, _v)\n"
                    "del _corral_saved_env, _k, _v, _corral_os\n")
        return (f"import os as _corral_os\n_corral_env = {env!r}\n"
                + ("_corral_saved_env = {k: _corral_os.environ.get(k) for k in _corral_env}\n" if save else "")
                + "_corral_os.environ.update(_corral_env)\ndel _corral_env, _corral_os\n")
    if language == "bash":
        if restore:
            return "\n".join(f"if [ -n \"${{_CORRAL_SET_{i}+x}}\" ]; then export {k}=\"$_CORRAL_OLD_{i}\"; "
                             f"else unset {k}; fi; unset _CORRAL_SET_{i} _CORRAL_OLD_{i}"
                             for i, k in enumerate(env))
        parts = []
        for i, (k, v) in enumerate(env.items()):
            quoted = "'" + v.replace("'", "'\\''") + "'"
            if save:
                parts.append(f"if [ -n \"${{{k}+x}}\" ]; then _CORRAL_SET_{i}=1; _CORRAL_OLD_{i}=\"${k}\"; fi")
            parts.append(f"export {k}={quoted}")
        return "\n".join(parts)
    if language in ("javascript", "typescript"):
        # Deno's process.env is a view of Deno.env, so both see the change.
        if restore:
            return ("for (const [k, v] of Object.entries(globalThis.__corral_saved_env ?? {})) "
                    "{ v === null ? Deno.env.delete(k) : Deno.env.set(k, v); }\n"
                    "delete globalThis.__corral_saved_env;\n")
        remember = "globalThis.__corral_saved_env[k] = Deno.env.get(k) ?? null; " if save else ""
        return (("globalThis.__corral_saved_env = {};\n" if save else "")
                + f"for (const [k, v] of Object.entries({json.dumps(env)})) {{ {remember}Deno.env.set(k, v); }}\n")
    if language == "r":
        return _r_env_prelude(env, restore=restore, save=save)
    if language == "java":
        return _java_env_prelude(env, restore=restore, save=save)
    return ""


def _r_env_prelude(env: dict[str, str], *, restore: bool, save: bool) -> str:
    # JSON strings are R string literals too (R reads the same escapes); names starting with a dot are
    # left out of `ls()`.
    if restore:
        return ("for (.corral_k in names(.corral_saved_env)) { .corral_v <- .corral_saved_env[[.corral_k]]; "
                "if (is.na(.corral_v)) Sys.unsetenv(.corral_k) "
                "else do.call(Sys.setenv, setNames(list(.corral_v), .corral_k)) }\n"
                "rm(.corral_saved_env, .corral_k, .corral_v)\n")
    names = ", ".join(_json(k) for k in env)
    values = ", ".join(f"{_json(k)} = {_json(v)}" for k, v in env.items())
    return ((f".corral_saved_env <- Sys.getenv(c({names}), unset = NA, names = TRUE)\n" if save else "")
            + f"Sys.setenv({values})\n")


def _java_env_prelude(env: dict[str, str], *, restore: bool, save: bool) -> str:
    # System.getenv reads a map the JVM fills once; corralEnvironment() (KERNEL_SETUP) opens it.
    if restore:
        return ("{ var e = corralEnvironment(); corralSavedEnv.forEach((k, v) -> { if (v == null) e.remove(k); "
                "else e.put(k, v); }); corralSavedEnv.clear(); }")
    parts = ["var e = corralEnvironment();"]
    for k, v in env.items():
        if save:
            parts.append(f"corralSavedEnv.put({_json(k)}, e.get({_json(k)}));")
        parts.append(f"e.put({_json(k)}, {_json(v)});")
    return "{ " + " ".join(parts) + " }"


def _json(value: str) -> str:
    """A JSON string literal, which R and Java read as the same string. Non-ASCII stays as is: Java would
    turn a \\u escape into source text before it reads the literal."""
    return json.dumps(value, ensure_ascii=False)


# Code run once in each new kernel of these kinds, before anything else.
KERNEL_SETUP = {
    # A string result shows as itself (text/plain `/home/user`, not `"/home/user"`), as E2B's does. Deno
    # formats an execution's value in `broadcastResult` of its Jupyter internals, looked up for each result:
    # strings now go straight out, everything else as before.
    "deno": """{
  const jupyter = Deno[Deno.internal]?.jupyter;
  const broadcastResult = jupyter?.broadcastResult;
  if (typeof broadcastResult === "function") {
    jupyter.broadcastResult = (count, value) => typeof value === "string"
      ? Deno.jupyter.broadcast("execute_result",
                               {execution_count: count, data: {"text/plain": value}, metadata: {}, transient: {}})
      : broadcastResult(count, value);
  }
}""",
    # The JVM's environment map behind System.getenv, made writable (the kernel runs with java.util and
    # java.lang opened to it) for the sandbox's and each execution's env vars.
    "java": """@SuppressWarnings("unchecked") java.util.Map<String, String> corralEnvironment() throws Exception {
  var outer = Class.forName("java.lang.ProcessEnvironment").getDeclaredField("theUnmodifiableEnvironment");
  outer.setAccessible(true);
  var inner = Class.forName("java.util.Collections$UnmodifiableMap").getDeclaredField("m");
  inner.setAccessible(true);
  return (java.util.Map<String, String>) inner.get(outer.get(null));
}
java.util.Map<String, String> corralSavedEnv = new java.util.HashMap<>();
""",
}


FENCE_MIME = "application/x-corral-fence"
FENCE_GRACE_S = 1.0  # how long to wait for the fence's display once the fence itself went idle


def fence_code(token: str) -> str:
    """Code whose only output is a display of FENCE_MIME: it leaves the kernel after all earlier output."""
    return f"await Deno.jupyter.display({{{json.dumps(FENCE_MIME)}: {json.dumps(token)}}}, {{raw: true}});"


async def run_silently(ctx: Context, code: str, timeout: float = 60.0) -> None:
    """Runs setup code and waits for it; output is discarded, an error raises RuntimeError."""
    msg_id = ctx.client.execute(code, silent=True, store_history=False, allow_stdin=False, stop_on_error=False)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        msg = await _next_iopub(ctx, max(0.0, deadline - loop.time()))
        if msg is None:
            raise RuntimeError(f"setup code did not finish within {timeout:.0f}s")
        if (msg.get("parent_header", {}).get("msg_id") == msg_id and msg["msg_type"] == "status"
                and msg["content"].get("execution_state") == "idle"):
            break
    # The verdict is in the reply. Replies to earlier executions (nobody waits for those) come first.
    while True:
        try:
            reply = await ctx.client.get_shell_msg(timeout=max(0.1, deadline - loop.time()))
        except (queue.Empty, TimeoutError):
            raise RuntimeError("setup code sent no reply") from None
        if reply.get("parent_header", {}).get("msg_id") == msg_id:
            break
    if reply["content"].get("status") == "error":
        raise RuntimeError(f"setup code failed: {reply['content'].get('ename')}: {reply['content'].get('evalue')}")


async def _next_iopub(ctx: Context, timeout: float) -> dict | None:
    if ctx.iopub is None:
        raise RuntimeError(f"context {ctx.id} is not connected to its kernel")
    return await ctx.iopub.next(timeout)


async def execute(ctx: Context, code: str, state: dict, *, store_history: bool = True) -> AsyncIterator[bytes]:
    """Streams one execution; the caller holds the context's lock. `state["msg_id"]` is set at once and
    `state["finished"]` at the end: a caller whose consumer went away earlier interrupts the kernel.
    Without `store_history` the execution count and history stay as they were."""
    msg_id = state["msg_id"] = ctx.client.execute(code, store_history=store_history, allow_stdin=False,
                                                  stop_on_error=True)
    fence_id: str | None = None
    fence_token = uuid.uuid4().hex
    fence_deadline: float | None = None  # set when the fence went idle without its display yet
    loop = asyncio.get_running_loop()
    while True:
        wait = KEEPALIVE_S if fence_deadline is None else max(0.0, fence_deadline - loop.time())
        msg = await _next_iopub(ctx, wait)
        if msg is None and fence_deadline is not None and loop.time() >= fence_deadline:
            break
        if msg is None:
            if not await ctx.manager.is_alive():
                yield line({"type": "error", "name": "KernelDied", "value": "the kernel died; restart the "
                            "context (POST /contexts/{id}/restart)", "traceback": ""})
                break
            yield line({"type": "keepalive"})
            continue
        parent = msg.get("parent_header", {}).get("msg_id")
        if fence_id is not None and parent == fence_id:
            if msg["msg_type"] == "display_data" and msg["content"].get("data", {}).get(FENCE_MIME) == fence_token:
                break
            if msg["msg_type"] == "error":  # the fence itself failed: nothing more will come
                break
            if msg["msg_type"] == "status" and msg["content"].get("execution_state") == "idle":
                fence_deadline = fence_deadline or loop.time() + FENCE_GRACE_S
            continue
        if parent != msg_id:
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
            if ctx.kernel not in LATE_OUTPUT_KERNELS:
                break
            if fence_id is None:
                # Output the kernel sent before the fence's display reaches us before it does.
                fence_id = ctx.client.execute(fence_code(fence_token), silent=False, store_history=False,
                                              allow_stdin=False, stop_on_error=False)
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
