"""Errors reach clients as `{code, message}` with the right status, through one mapping
(corral.control.errors.to_http), and never name the server's own files."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import httpx

from corral.config import Settings
from corral.control.api import create_api
from corral.control.errors import ApiError, HostPaths, to_http
from corral.control.keys import ApiKey
from corral.orchestrator.envd_link import EnvdUnavailable
from corral.runtime.base import SandboxFailed, TemplateNotFound

SETTINGS = Settings(data_dir=Path("/srv/corral data"), cache_dir=Path("/var/cache/corral"),
                    run_dir=Path("/run/corral"))
PATHS = HostPaths.of(SETTINGS)


def test_a_path_in_the_data_directory_is_described_not_named():
    error = SandboxFailed("restoring checkpoint failed: [Errno 2] No such file or directory: "
                          "'/srv/corral data/sandboxes/sb1/runsc.log'")
    assert to_http(error, PATHS) == (500, "restoring checkpoint failed: [Errno 2] No such file or directory: "
                                          "'a file in the server's data directory'")


def test_a_directory_named_like_a_known_one_is_not_taken_for_it():
    assert to_http(SandboxFailed("cannot remove /run/corral-test-x/runsc/sb1"), PATHS) == (
        500, "cannot remove a path on the server")


def test_any_other_absolute_path_is_hidden_too():
    status, message = to_http(OSError(13, "Permission denied", "/sys/fs/cgroup/corral/sb1"), PATHS)
    assert (status, message) == (500, "PermissionError: [Errno 13] Permission denied: 'a path on the server'")


def test_urls_endpoints_and_snapshot_names_stay():
    message = "envd at 10.1.0.2 refused /init: 502; see http://10.1.0.2:49983/health/x; snapshot 'my/snap'"
    assert to_http(ApiError(400, message), PATHS) == (400, message)


def test_each_kind_of_error_gets_its_status():
    assert to_http(ApiError(409, "sandbox s is already paused")) == (409, "sandbox s is already paused")
    assert to_http(TemplateNotFound("template nope not found")) == (404, "template nope not found")
    assert to_http(EnvdUnavailable("envd at 10.1.0.2 did not answer")) == (
        500, "the sandbox did not start: envd at 10.1.0.2 did not answer")
    assert to_http(KeyError("x")) == (500, "KeyError: 'x'")


class _Keys:
    async def verify(self, presented: str | None) -> ApiKey | None:
        return ApiKey(id="k1", name="test", prefix="e2b_", created_at=0.0, revoked_at=None) if presented else None


def _api_failing_with(error: BaseException):
    async def create(*args, **kwargs):
        raise error

    async def template_name(owner, template):
        return None

    plane = SimpleNamespace(sandboxes=SimpleNamespace(create=create, timeout_for=lambda t: t), templates=None,
                            template_name=template_name)
    return create_api(plane, _Keys(), PATHS)  # type: ignore[arg-type]


def _create(app) -> httpx.Response:
    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://corral") as client:
            return await client.post("/sandboxes", json={"templateID": "base"},
                                     headers={"X-API-KEY": "e2b_" + "0" * 40})

    return asyncio.run(call())


def _body_without_request_id(response: httpx.Response) -> dict:
    """The error body less its request id, which must be the one in the response's header."""
    body = response.json()
    assert body.pop("requestID") == response.headers["X-Request-ID"]
    return body


def test_the_api_answers_a_runtime_error_without_its_paths():
    response = _create(_api_failing_with(SandboxFailed("runsc restore failed, see /srv/corral data/sb1/runsc.log")))
    assert response.status_code == 500
    assert _body_without_request_id(response) == {"code": 500, "message": "runsc restore failed, see a file in "
                                                                          "the server's data directory"}


def test_the_api_answers_an_unexpected_error_in_the_same_shape():
    response = _create(_api_failing_with(ZeroDivisionError("division by zero")))
    assert response.status_code == 500
    assert _body_without_request_id(response) == {"code": 500, "message": "ZeroDivisionError: division by zero"}
