"""The execution server's IOPub reader, contexts and kernel startup file against a real ipykernel on the host
(no sandbox needed; ipykernel comes with the dev extra)."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager

from corral.interpreter import iopub as iopub_module
from corral.interpreter.contexts import ContextTable
from corral.interpreter.iopub import IOPub


async def _kernel(env: dict[str, str] | None = None):
    manager = AsyncKernelManager(kernel_name="python3")
    await manager.start_kernel(env={**os.environ, **(env or {})})
    client = manager.client()
    client.start_channels()
    await client.wait_for_ready(timeout=60)
    return manager, client


async def _until_idle(reader: IOPub, msg_id: str, timeout: float = 30.0) -> list[dict]:
    seen = []
    while True:
        msg = await reader.next(timeout)
        assert msg is not None, "no idle status within the timeout"
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        seen.append(msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return seen


def test_messages_arrive_in_order_and_complete():
    async def run():
        manager, client = await _kernel()
        reader = IOPub(client)
        try:
            msg_id = client.execute("for i in range(300):\n    print(i, flush=True)\n'done'")
            seen = await _until_idle(reader, msg_id)
            kinds = [m["msg_type"] for m in seen]
            assert kinds[0] == "status" and kinds[1] == "execute_input"
            text = "".join(m["content"]["text"] for m in seen if m["msg_type"] == "stream")
            assert text.split() == [str(i) for i in range(300)]
            results = [m for m in seen if m["msg_type"] == "execute_result"]
            assert results[0]["content"]["data"]["text/plain"] == "'done'"
            assert await reader.next(0.2) is None  # nothing else was sent
        finally:
            reader.close()
            client.stop_channels()
            await manager.shutdown_kernel(now=True)

    asyncio.run(run())


def test_unread_output_is_bounded_and_reading_resumes(monkeypatch):
    monkeypatch.setattr(iopub_module, "QUEUE_MAX", 50)

    async def run():
        manager, client = await _kernel()
        reader = IOPub(client)
        try:
            # Far more messages than the queue may hold, while nobody reads.
            msg_id = client.execute("import sys\nfor i in range(400):\n    print(i, flush=True)")
            await asyncio.sleep(3)
            assert reader._queue.qsize() <= 50
            # Reading again drains the queue, takes up what the socket held meanwhile, and gets to the end.
            seen = await _until_idle(reader, msg_id)
            assert seen[-1]["msg_type"] == "status"
            # The next execution is read normally.
            msg_id = client.execute("1 + 1")
            seen = await _until_idle(reader, msg_id)
            assert any(m["msg_type"] == "execute_result" for m in seen)
        finally:
            reader.close()
            client.stop_channels()
            await manager.shutdown_kernel(now=True)

    asyncio.run(run())


def test_host_extra_pins_the_versions_the_sandbox_server_runs():
    """These tests run the server's code on the host: with the versions the envd layer installs."""
    import tomllib
    from pathlib import Path

    from corral.templates.envd_layer import INTERPRETER_REQUIREMENTS

    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    extra = set(pyproject["project"]["optional-dependencies"]["interpreter"])
    assert extra == {pin for pin in INTERPRETER_REQUIREMENTS if pin.split("==")[0] in ("jupyter_client", "pyzmq")}


def test_default_contexts_of_python_and_javascript_exist_before_their_kernels_start():
    table = ContextTable("/home/user")
    listed = [c.public() for c in table.all()]
    assert [(c["language"], c["cwd"]) for c in listed] == [("python", "/home/user"), ("javascript", "/home/user")]
    assert not any(c.started for c in table.all())  # a kernel starts on first use


def test_startup_file_shows_a_str_value_as_itself(tmp_path):
    startup = tmp_path / "profile_default" / "startup"
    startup.mkdir(parents=True)
    shutil.copy(Path(iopub_module.__file__).with_name("kernel_startup.py"), startup / "00-corral.py")

    async def run():
        manager, client = await _kernel({"IPYTHONDIR": str(tmp_path)})
        reader = IOPub(client)
        try:
            shown = {}
            for code in ("'value'", "\"it's\"", "['a']", "{'k': 'v'}", "7"):
                msg_id = client.execute(code)
                seen = await _until_idle(reader, msg_id)
                (result,) = [m for m in seen if m["msg_type"] == "execute_result"]
                shown[code] = result["content"]["data"]["text/plain"]
            assert shown == {"'value'": "value", "\"it's\"": "it's", "['a']": "['a']", "{'k': 'v'}": "{'k': 'v'}",
                             "7": "7"}
        finally:
            reader.close()
            client.stop_channels()
            await manager.shutdown_kernel(now=True)

    asyncio.run(run())
