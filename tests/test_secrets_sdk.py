"""Secrets through the unmodified SDK (`from e2b import Secret`): create, update, read, list, delete, with
E2B's rules for names and metadata; values write-only and sealed at rest with the installation's key."""

from __future__ import annotations

import stat
from pathlib import Path

import httpx
import pytest
from conftest import DNS_HOST_ADDRESS, TEST_ROOT
from e2b import Secret, SecretException, SecretNotFoundException

from tests.helpers.server import ServerProcess

INSTANCE, NETWORK = "t11", "10.223.0.0/22"
VALUE = "sk-live-0123456789abcdef-never-in-a-sandbox"


@pytest.fixture(scope="module")
def server(harness, runtime, store):
    proc = ServerProcess(INSTANCE, NETWORK, TEST_ROOT / INSTANCE, dns_upstream=DNS_HOST_ADDRESS, pool_size=0)
    with proc.serving(keep_log=TEST_ROOT / f"{INSTANCE}-serve.log"):
        yield proc


@pytest.fixture(scope="module")
def opts(server) -> dict:
    return {"api_url": server.url, "api_key": server.cli("keys", "create", "--name", "secrets").strip()}


@pytest.fixture()
def made(opts):
    names: list[str] = []
    yield names
    for name in names:
        Secret.destroy(name, **opts)


def test_create_read_and_find_by_id_or_name(opts, made):
    made.append("openai-key")
    info = Secret.create("OpenAI-Key", VALUE, metadata={"team": "research"}, **opts)
    assert info.secret_id.startswith("sec_")
    assert (info.name, info.version, info.metadata) == ("openai-key", 1, {"team": "research"})
    for ref in (info.secret_id, "openai-key", "OPENAI-KEY"):
        assert Secret.get_info(ref, **opts).secret_id == info.secret_id
    assert Secret.exists("openai-key", **opts) is True
    assert Secret.exists("nope", **opts) is False
    assert Secret.fill("openai-key") == "${e2b.secrets.openai-key}"


def test_update_makes_a_new_version_and_metadata_is_kept_unless_given(opts, made):
    made.append("rotating")
    Secret.create("rotating", "v1", metadata={"a": "1"}, **opts)
    updated = Secret.update("rotating", "v2", **opts)
    assert (updated.version, updated.metadata) == (2, {"a": "1"})
    cleared = Secret.update("rotating", "v3", metadata={}, **opts)
    assert (cleared.version, cleared.metadata) == (3, {})
    with pytest.raises(SecretNotFoundException):
        Secret.update("missing", "x", **opts)


def test_values_are_never_returned_and_sealed_at_rest(server, opts, made):
    made.append("sealed")
    Secret.create("sealed", VALUE, **opts)
    answer = httpx.get(f"{server.url}/secrets/sealed", headers={"X-API-Key": opts["api_key"]})
    assert answer.status_code == 200 and VALUE not in answer.text and "value" not in answer.json()
    listed = httpx.get(f"{server.url}/secrets", headers={"X-API-Key": opts["api_key"]})
    assert VALUE not in listed.text
    data = Path(server.env["CORRAL_DATA_DIR"])
    for path in data.glob("corral.db*"):  # the database and its write-ahead log
        assert VALUE.encode() not in path.read_bytes(), path
    key = data / "secrets.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert VALUE not in (TEST_ROOT / INSTANCE / "serve.log").read_text()


def test_list_pages_through_every_secret(opts, made):
    for name in ("page-a", "page-b", "page-c"):
        made.append(name)
        Secret.create(name, "x", **opts)
    paginator = Secret.list(limit=2, **opts)
    seen = []
    while paginator.has_next:
        seen += [s.name for s in paginator.next_items()]
    assert {"page-a", "page-b", "page-c"} <= set(seen) and len(seen) == len(set(seen))


def test_destroy_says_whether_there_was_one(opts):
    Secret.create("short-lived", "x", **opts)
    assert Secret.destroy("short-lived", **opts) is True
    assert Secret.destroy("short-lived", **opts) is False
    with pytest.raises(SecretNotFoundException):
        Secret.get_info("short-lived", **opts)


def test_another_keys_secrets_are_not_visible(server, opts, made):
    made.append("mine")
    Secret.create("mine", "x", **opts)
    other = {**opts, "api_key": server.cli("keys", "create", "--name", "someone-else").strip()}
    assert Secret.exists("mine", **other) is False


@pytest.mark.parametrize(("name", "metadata", "message"), [
    ("has space", None, "name must be 1-128 characters"),
    ("sec_reserved", None, "reserved for secret ids"),
    ("x" * 129, None, "name must be 1-128 characters"),
    ("too-much-metadata", {f"k{i}": "v" for i in range(33)}, "at most 32 are allowed"),
])
def test_bad_input_is_refused(opts, name, metadata, message):
    with pytest.raises(SecretException, match=message):
        Secret.create(name, "x", metadata=metadata, **opts)


def test_a_second_secret_with_the_same_name_is_a_conflict(opts, made):
    made.append("twice")
    Secret.create("twice", "x", **opts)
    with pytest.raises(SecretException, match="exists already"):
        Secret.create("TWICE", "y", **opts)
