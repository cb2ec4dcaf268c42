"""The committed OpenAPI document is the one the code serves."""

from __future__ import annotations

import json
from pathlib import Path

from corral.control.openapi import document

COMMITTED = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"


def test_committed_openapi_matches_the_code():
    assert json.loads(COMMITTED.read_text()) == json.loads(json.dumps(document())), (
        "docs/openapi.json is stale: regenerate it with `python -m corral.control.openapi > docs/openapi.json`")


def test_every_sdk_endpoint_is_documented():
    paths = document()["paths"]
    for path, method in [("/v2/sandboxes", "post"), ("/sandboxes", "post"), ("/v2/sandboxes", "get"),
                         ("/sandboxes/{sandbox_id}", "get"), ("/sandboxes/{sandbox_id}", "delete"),
                         ("/sandboxes/{sandbox_id}/timeout", "post"), ("/sandboxes/{sandbox_id}/metrics", "get"),
                         ("/v2/sandboxes/{sandbox_id}/connect", "post"), ("/health", "get")]:
        assert method in paths[path], f"{method.upper()} {path} missing"
    assert "201" in paths["/v2/sandboxes"]["post"]["responses"]
    assert "204" in paths["/sandboxes/{sandbox_id}"]["delete"]["responses"]
