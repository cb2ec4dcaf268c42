"""OCI images from registries as template bases: `pull_image` resolves a reference to its linux/amd64 image,
copies it with `skopeo` (which verifies every blob's digest as it downloads) into an OCI layout, checks
the layout's blobs against the registry's manifest once more, and unpacks the layers with `umoci`
(whiteouts applied) into one flat directory that serves as an overlay lower layer.

Layout under the cache directory (next to the ones in store.py):

  images/<key>/rootfs/            the unpacked root filesystem; <key> is `sha256-<hex>` of the image manifest
  images/<key>/image.json         where it came from (reference, digests) and the image's config
  images/<key>/python3-link/      for an image with Python only in /usr/local: /usr/bin/python3 linked there
  images/<key>.partial/           a pull in progress (renamed to <key> when complete)
  images/locks/<key>.lock         held while a pull of that image runs, so concurrent pulls do it once
  images/refs/<hash>.json         the manifest a tag last resolved to, for pulls while the registry is down

A cached image is reused when the reference resolves to the same manifest. A reference by digest reuses it
without asking the registry; so does a tag the registry cannot be reached for, when it resolved to a cached
image before. Either only for images that were pulled without credentials: an image that needed them is
reused only after the registry has accepted this pull's credentials for it again.

Credentials reach skopeo through an auth file (0600, in a private temporary directory, deleted as soon as
skopeo exits), never through its command line, and are redacted from anything skopeo prints.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import fnmatch
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from corral.templates.cachelock import cache_lock

# Resolving a reference is a few small requests: a registry that does not answer within this fails the
# pull instead of hanging the build.
RESOLVE_TIMEOUT_S = 30
# Copying the layers of a large image over a slow link.
COPY_TIMEOUT_S = 3600
UNPACK_TIMEOUT_S = 1800

PLATFORM = ("linux", "amd64")

INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")
SCHEMA1_TYPES = ("application/vnd.docker.distribution.manifest.v1+json",
                 "application/vnd.docker.distribution.manifest.v1+prettyjws")


@dataclass(frozen=True)
class RegistryCredentials:
    username: str
    password: str = field(repr=False)

    def __repr__(self) -> str:
        return f"RegistryCredentials(username={self.username!r}, password='***')"


class ImageError(Exception):
    """A pull that cannot be done; the message is safe to show to the user (it never holds credentials).
    `status`: 400 for a reference, image or credentials that are wrong, 502 for a registry that cannot be
    reached or serves content that does not match its digests."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- references

# The distribution project's reference grammar: name [":" tag] ["@" digest].
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN = re.compile(r"(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
                     r"(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
DOCKER_HUB = "docker.io"


@dataclass(frozen=True)
class ImageReference:
    domain: str  # registry host[:port]; docker.io for Docker Hub
    repository: str  # library/python, e2bdev/base, ...
    tag: str | None
    digest: str | None  # sha256:<hex>; when set, it decides what is pulled (the tag is only a label)

    @property
    def name(self) -> str:
        return f"{self.domain}/{self.repository}"

    def __str__(self) -> str:
        return self.name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")

    def at(self, digest: str) -> str:
        """skopeo's name for this repository's manifest `digest`."""
        return f"docker://{self.name}@{digest}"

    @property
    def transport(self) -> str:
        return f"docker://{self}"


def parse_reference(reference: str) -> ImageReference:
    """Parses and normalises an image reference as Docker does: `python:3.11` is
    docker.io/library/python:3.11, `e2bdev/base` is docker.io/e2bdev/base:latest."""
    def bad(why: str) -> ImageError:
        return ImageError(f"invalid image reference {reference!r}: {why}")

    if not reference or reference != reference.strip() or len(reference) > 512:
        raise bad("expected [registry/]repository[:tag][@sha256:digest]")
    rest, digest = reference, None
    if "@" in rest:
        rest, _, digest = rest.partition("@")
        if not _DIGEST.fullmatch(digest):
            raise bad("a digest is sha256: followed by 64 lowercase hex digits")
    tag = None
    last_slash = rest.rfind("/")
    if rest.rfind(":") > last_slash:
        rest, _, tag = rest.rpartition(":")
        if not _TAG.fullmatch(tag):
            raise bad(f"tag {tag!r} is not valid (letters, digits, _ . -, at most 128, not starting with . or -)")
    first, slash, remainder = rest.partition("/")
    # Docker also takes an uppercase first component for a registry host; here it is a bad repository name.
    if slash and ("." in first or ":" in first or first == "localhost"):
        domain, path = first, remainder
        if not _DOMAIN.fullmatch(domain):
            raise bad(f"registry {domain!r} is not a host name or address with an optional port")
    else:
        domain, path = DOCKER_HUB, rest
    if domain in ("index.docker.io", "registry-1.docker.io"):
        domain = DOCKER_HUB
    components = path.split("/")
    if not path or not all(_PATH_COMPONENT.fullmatch(c) for c in components):
        raise bad("repository names are lowercase letters, digits and separators (. _ __ -) between / ")
    if domain == DOCKER_HUB and len(components) == 1:
        path = f"library/{path}"
    if len(domain) + 1 + len(path) > 255:
        raise bad("the name is longer than 255 characters")
    if tag is None and digest is None:
        tag = "latest"
    return ImageReference(domain, path, tag, digest)


def default_base_image_maps_to_builtin(reference: str) -> str | None:
    """The built-in template that stands in for `reference` when it cannot be pulled: E2B's default base
    image `e2bdev/base` (any tag) is Corral's `base`. None for every other reference."""
    try:
        parsed = parse_reference(reference)
    except ImageError:
        return None
    if parsed.domain == DOCKER_HUB and parsed.repository == "e2bdev/base":
        return "base"
    return None


def is_insecure(domain: str, insecure_registries: tuple[str, ...]) -> bool:
    """Whether `domain` (host:port) is one the operator allows plain HTTP and unverified TLS for; entries
    are host[:port] patterns with shell wildcards (`127.0.0.1:*`)."""
    return any(fnmatch.fnmatchcase(domain, pattern) for pattern in insecure_registries)


# ---------------------------------------------------------------- skopeo

class _Skopeo:
    """Runs skopeo for one pull: credentials in a private auth file, transport security per registry."""

    def __init__(self, reference: ImageReference, credentials: RegistryCredentials | None, insecure: bool,
                 workdir: Path) -> None:
        self.reference = reference
        self.credentials = credentials
        self.insecure = insecure
        self.workdir = workdir
        self.auth_file: Path | None = None
        self.secrets: list[str] = []
        if credentials is not None:
            token = base64.b64encode(f"{credentials.username}:{credentials.password}".encode()).decode()
            self.secrets = [s for s in (credentials.password, token) if s]
            self.auth_file = workdir / "auth.json"
            fd = os.open(self.auth_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"auths": {reference.domain: {"auth": token}}}, f)
        self.policy = workdir / "policy.json"
        if Path("/etc/containers/policy.json").exists():
            self.policy = Path("/etc/containers/policy.json")
        else:
            # skopeo copy needs a signature policy; digests are what this module verifies.
            self.policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def _access(self, prefix: str) -> list[str]:
        auth = [f"--{prefix}authfile", str(self.auth_file)] if self.auth_file else [f"--{prefix}no-creds"]
        return [*auth, f"--{prefix}tls-verify={'false' if self.insecure else 'true'}"]

    async def inspect_raw(self, image: str, *, config: bool = False) -> bytes:
        argv = ["skopeo", "--command-timeout", f"{RESOLVE_TIMEOUT_S}s", "inspect", "--raw",
                *(["--config"] if config else []), *self._access(""), image]
        return await self._run(argv, RESOLVE_TIMEOUT_S + 5)

    async def copy(self, image: str, layout: Path, log: Callable[[str], None]) -> None:
        argv = ["skopeo", "--command-timeout", f"{COPY_TIMEOUT_S}s", "copy", "--policy", str(self.policy),
                *self._access("src-"), image, f"oci:{layout}:image"]
        await self._run(argv, COPY_TIMEOUT_S + 5, log)

    async def _run(self, argv: list[str], timeout: float, log: Callable[[str], None] | None = None) -> bytes:
        process = await _start(argv, stderr=asyncio.subprocess.PIPE, env=_skopeo_env(self.workdir))
        chunks: list[bytes] = []

        async def read_stdout() -> None:
            async for line in process.stdout:
                if log is None:
                    chunks.append(line)
                elif text := self.redact(line.decode(errors="replace").rstrip()):
                    log(text)

        try:
            _, stderr = await asyncio.wait_for(asyncio.gather(read_stdout(), process.stderr.read()), timeout)
            await process.wait()
        except BaseException as e:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            if isinstance(e, TimeoutError):
                raise ImageError(f"registry {self.reference.domain} did not answer within {timeout:.0f} s",
                                 502) from None
            raise
        if process.returncode != 0:
            raise self._error(self.redact(stderr.decode(errors="replace")))
        return b"".join(chunks)

    def _error(self, stderr: str) -> ImageError:
        """A clear message for what skopeo reports (its own wording is kept at the end)."""
        detail = _skopeo_message(stderr)
        ref, registry = str(self.reference), self.reference.domain
        lowered = stderr.lower()
        if "invalid reference format" in lowered:
            return ImageError(f"invalid image reference {ref!r}: {detail}")
        if "manifest unknown" in lowered or "name unknown" in lowered or "not found" in lowered:
            return ImageError(f"image {ref} not found in registry {registry} (no such repository or tag)")
        if "unauthorized" in lowered or "authentication required" in lowered or "denied" in lowered:
            if self.credentials is None:
                return ImageError(f"registry {registry} requires credentials for {ref} "
                                  "(from_image(..., username=, password=)), or the image does not exist")
            return ImageError(f"registry {registry} refused the credentials for {ref} (wrong username or "
                              "password, or no access to this repository)")
        if "http response to https client" in lowered:
            return ImageError(f"registry {registry} speaks plain HTTP; an operator can allow it by adding it "
                              "to the insecure_registries setting (CORRAL_INSECURE_REGISTRIES)", 502)
        if "digest" in lowered and ("match" in lowered or "expected" in lowered):
            return ImageError(f"registry {registry} served content for {ref} that does not match its digest; "
                              f"refused ({detail})", 502)
        if "x509" in lowered or "certificate" in lowered:
            return ImageError(f"registry {registry}'s TLS certificate is not trusted ({detail})", 502)
        if "timeout" in lowered or "deadline exceeded" in lowered:
            return ImageError(f"registry {registry} did not answer in time ({detail})", 502)
        unreachable = ("connection refused", "no such host", "network is unreachable", "no route to host",
                       "dial tcp", "connection reset")
        if any(s in lowered for s in unreachable) or re.search(r"\beof\b", lowered):
            return ImageError(f"registry {registry} cannot be reached ({detail})", 502)
        return ImageError(f"pulling {ref} from {registry} failed: {detail}", 502)


async def _start(argv: list[str], **kwargs) -> asyncio.subprocess.Process:
    try:
        return await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE, **kwargs)
    except FileNotFoundError:
        raise ImageError(f"{argv[0]} is not installed on this server (scripts/install.sh installs it)",
                         502) from None


def _skopeo_message(stderr: str) -> str:
    """skopeo's error without its logging decoration (time=... level=fatal msg="...")."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    text = lines[-1] if lines else "no output"
    if match := re.search(r'msg="(.*)"\s*$', text):
        text = match.group(1).replace('\\"', '"')
    text = re.sub(r'^Error parsing image name "[^"]*": ', "", text)
    return text[:500]


def _skopeo_env(workdir: Path) -> dict[str, str]:
    """The environment minus anything that would point skopeo at other credentials."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "XDG_RUNTIME_DIR")}
    env["HOME"] = str(workdir)
    return env


# ---------------------------------------------------------------- manifests

def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _media_type(manifest: dict) -> str:
    if manifest.get("mediaType"):
        return manifest["mediaType"]
    if manifest.get("schemaVersion") == 1:
        return SCHEMA1_TYPES[0]
    return INDEX_TYPES[0] if "manifests" in manifest else MANIFEST_TYPES[0]


def _json(raw: bytes, what: str, reference: ImageReference) -> dict:
    try:
        value = json.loads(raw)
    except ValueError:
        raise ImageError(f"registry {reference.domain} sent a {what} for {reference} that is not JSON", 502) from None
    if not isinstance(value, dict):
        raise ImageError(f"registry {reference.domain} sent a {what} for {reference} that is not an object", 502)
    return value


@dataclass(frozen=True)
class _Resolved:
    digest: str  # of the linux/amd64 image manifest
    manifest: dict


async def _resolve(skopeo: _Skopeo, reference: ImageReference, log: Callable[[str], None]) -> _Resolved:
    """The linux/amd64 image manifest `reference` names, its bytes checked against its digest."""
    raw = await skopeo.inspect_raw(reference.transport)
    digest = _sha256(raw)
    if reference.digest and digest != reference.digest:
        raise ImageError(f"registry {reference.domain} sent a manifest for {reference} whose digest is "
                         f"{digest}; refused", 502)
    manifest = _json(raw, "manifest", reference)
    media_type = _media_type(manifest)
    if media_type in INDEX_TYPES:
        platforms = [m for m in manifest.get("manifests", []) if isinstance(m, dict)]
        wanted = [m for m in platforms
                  if (m.get("platform") or {}).get("os") == PLATFORM[0]
                  and (m.get("platform") or {}).get("architecture") == PLATFORM[1]]
        if not wanted:
            offered = sorted({"{os}/{architecture}".format(**{"os": "?", "architecture": "?", **m["platform"]})
                              for m in platforms if isinstance(m.get("platform"), dict)})
            raise ImageError(f"image {reference} has no linux/amd64 variant (it offers: "
                             f"{', '.join(offered) or 'none'}); Corral runs linux/amd64 images only")
        digest = wanted[0].get("digest", "")
        if not _DIGEST.fullmatch(digest):
            raise ImageError(f"image {reference}'s index names an unsupported digest {digest!r}", 502)
        log(f"image index {_sha256(raw)}: linux/amd64 is {digest}")
        raw = await skopeo.inspect_raw(reference.at(digest))
        if _sha256(raw) != digest:
            raise ImageError(f"registry {reference.domain} sent a manifest for {reference} that does not match "
                             f"its digest {digest}; refused", 502)
        manifest = _json(raw, "manifest", reference)
        media_type = _media_type(manifest)
    if media_type in SCHEMA1_TYPES:
        raise ImageError(f"image {reference} uses the obsolete Docker schema 1 manifest; push it again with a "
                         "current tool (schema 2 or OCI)")
    if media_type not in MANIFEST_TYPES:
        raise ImageError(f"{reference} is not a container image (manifest type {media_type})")
    layers = manifest.get("layers")
    config = manifest.get("config")
    if not isinstance(layers, list) or not isinstance(config, dict) or not all(
            isinstance(d, dict) and _DIGEST.fullmatch(str(d.get("digest"))) for d in (*layers, config)):
        raise ImageError(f"image {reference}'s manifest does not list its config and layers by sha256 digest", 502)
    return _Resolved(digest, manifest)


def _check_platform(config: dict, reference: ImageReference) -> None:
    platform = (config.get("os"), config.get("architecture"))
    if platform != PLATFORM:
        raise ImageError(f"image {reference} is built for {platform[0]}/{platform[1]}; Corral runs "
                         "linux/amd64 images only")


def _verify_layout(layout: Path, resolved: _Resolved, reference: ImageReference) -> dict:
    """Every blob of the copied image hashes to its name, and its layers are the registry manifest's, in
    order. Returns the image config."""
    def blob(digest: str) -> bytes:
        data = (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()
        if _sha256(data) != digest:
            raise ImageError(f"blob {digest} of {reference} does not match its digest; refused", 502)
        return data

    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(blob(index["manifests"][0]["digest"]))
    copied = [layer["digest"] for layer in manifest["layers"]]
    expected = [layer["digest"] for layer in resolved.manifest["layers"]]
    if copied != expected:
        raise ImageError(f"the layers copied for {reference} are not the ones its manifest lists; refused", 502)
    for layer in copied:
        hasher = hashlib.sha256()
        with open(layout / "blobs" / "sha256" / layer.split(":", 1)[1], "rb") as f:
            while chunk := f.read(1 << 20):
                hasher.update(chunk)
        if "sha256:" + hasher.hexdigest() != layer:
            raise ImageError(f"layer {layer} of {reference} does not match its digest; refused", 502)
    return json.loads(blob(manifest["config"]["digest"]))


# ---------------------------------------------------------------- cache

def _key(manifest_digest: str) -> str:
    return manifest_digest.replace(":", "-")


def _ref_record(images: Path, reference: ImageReference) -> Path:
    return images / "refs" / (hashlib.sha256(str(reference).encode()).hexdigest()[:32] + ".json")


def _cached(images: Path, manifest_digest: str) -> dict | None:
    """image.json of a complete cache entry, or None."""
    entry = images / _key(manifest_digest)
    try:
        return json.loads((entry / "image.json").read_text()) if (entry / "rootfs").is_dir() else None
    except (OSError, ValueError):
        return None


def _digest_from_record(images: Path, reference: ImageReference) -> str | None:
    try:
        digest = json.loads(_ref_record(images, reference).read_text())["manifest_digest"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return digest if isinstance(digest, str) and _DIGEST.fullmatch(digest) else None


def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(value, indent=1) + "\n")
    temporary.replace(path)


@contextlib.contextmanager
def _private_tempdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="corral-pull-"))  # 0700
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def load_image_config(rootfs: Path) -> dict:
    """The `config` section of the image config of a rootfs `pull_image` returned (Env, Entrypoint, Cmd,
    WorkingDir, User, ...), for a builder that honours them."""
    meta = json.loads((rootfs.parent / "image.json").read_text())
    return meta.get("config", {}).get("config") or {}


# ---------------------------------------------------------------- pull

async def pull_image(reference: str, *, credentials: RegistryCredentials | None, cache_dir: Path,
                     log: Callable[[str], None], insecure_registries: tuple[str, ...] = ()) -> Path:
    """Pulls `reference`, verifies every blob's digest, unpacks its layers (whiteouts applied) into a root
    filesystem directory under cache_dir keyed by the manifest digest (reused when already there), and
    returns it. Writes progress lines through `log`."""
    parsed = parse_reference(reference)
    images = cache_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    insecure = is_insecure(parsed.domain, insecure_registries)

    # Pinned by digest and pulled anonymously before: no need to ask the registry.
    if parsed.digest and credentials is None:
        for digest in (parsed.digest, _digest_from_record(images, parsed)):
            if digest and (meta := _cached(images, digest)) and meta.get("public"):
                log(f"using cached image {parsed} ({digest})")
                return images / _key(digest) / "rootfs"

    with _private_tempdir() as workdir:
        skopeo = _Skopeo(parsed, credentials, insecure, workdir)
        log(f"resolving {parsed}" + (" (insecure registry)" if insecure else ""))
        try:
            resolved = await _resolve(skopeo, parsed, log)
        except ImageError as e:
            if e.status == 502 and credentials is None:
                digest = _digest_from_record(images, parsed)
                if digest and (meta := _cached(images, digest)) and meta.get("public"):
                    log(f"{e}; using the image {parsed} resolved to before ({digest})")
                    return images / _key(digest) / "rootfs"
            raise
        key = _key(resolved.digest)
        target = images / key
        async with cache_lock(images / "locks" / f"{key}.lock",
                              lambda: log("waiting for another pull of the same image")):
            if _cached(images, resolved.digest) is None:
                await _pull_into(skopeo, parsed, resolved, target, log)
            else:
                log(f"using cached image {parsed} ({resolved.digest})")
        if parsed.digest is None or parsed.digest != resolved.digest:
            _write_json(_ref_record(images, parsed), {"reference": str(parsed), "manifest_digest": resolved.digest,
                                                       "resolved_at": time.time()})
        return target / "rootfs"


async def _pull_into(skopeo: _Skopeo, reference: ImageReference, resolved: _Resolved, target: Path,
                     log: Callable[[str], None]) -> None:
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(mode=0o700)
    try:
        config_raw = await skopeo.inspect_raw(reference.at(resolved.digest), config=True)
        if _sha256(config_raw) != resolved.manifest["config"]["digest"]:
            raise ImageError(f"registry {reference.domain} sent a config for {reference} that does not match "
                             "its digest; refused", 502)
        _check_platform(_json(config_raw, "config", reference), reference)
        size = sum(int(layer.get("size") or 0) for layer in resolved.manifest["layers"])
        log(f"pulling {reference} ({resolved.digest}): {len(resolved.manifest['layers'])} layers, "
            f"{size / 1e6:.1f} MB")
        layout = partial / "layout"
        await skopeo.copy(reference.at(resolved.digest), layout, log)
        config = _verify_layout(layout, resolved, reference)
        _check_platform(config, reference)
        log("unpacking layers")
        await _unpack(layout, partial / "rootfs")
        shutil.rmtree(layout)
        meta = {"reference": str(reference), "manifest_digest": resolved.digest,
                "config_digest": resolved.manifest["config"]["digest"],
                "layers": [layer["digest"] for layer in resolved.manifest["layers"]],
                "public": skopeo.credentials is None, "config": config, "pulled_at": time.time()}
        _write_json(partial / "image.json", meta)
        os.chmod(partial, 0o755)
        if target.exists():  # left by something other than a complete pull (those hold image.json)
            shutil.rmtree(target)
        partial.rename(target)
        log(f"image {reference} ready")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


async def _unpack(layout: Path, rootfs: Path) -> None:
    argv = ["umoci", "--log", "error", "raw", "unpack", *(["--rootless"] if os.geteuid() != 0 else []),
            "--image", f"{layout}:image", str(rootfs)]
    process = await _start(argv, stderr=asyncio.subprocess.STDOUT)
    try:
        output, _ = await asyncio.wait_for(process.communicate(), UNPACK_TIMEOUT_S)
    except BaseException as e:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        if isinstance(e, TimeoutError):
            raise ImageError(f"unpacking the image's layers took longer than {UNPACK_TIMEOUT_S} s", 502) from None
        raise
    if process.returncode != 0:
        raise ImageError(f"unpacking the image's layers failed: {output.decode(errors='replace').strip()[-500:]}",
                         502)


# ---------------------------------------------------------------- what a template base needs

SYSTEM_PYTHON = "/usr/bin/python3"
# Where Docker Hub's `python:3.11` images (and images built on them) have their Python: they build CPython
# into /usr/local and have no /usr/bin/python3.
USR_LOCAL_PYTHON = "/usr/local/bin/python3.11"
PYTHON_LINK_LAYER = "python3-link"


def image_base_layers(rootfs: Path, log: Callable[[str], None]) -> tuple[Path, ...]:
    """The layers (top first) a pulled image's `rootfs` serves as a template base with: the rootfs itself
    and, when its Python is /usr/local/bin/python3.11 and it has no /usr/bin/python3, a layer above it that
    only links /usr/bin/python3 there (envd runs `python3 -I -S` with its own libraries, so the standard
    library is all it needs of the image's Python). Raises ImageError naming what the image lacks."""
    if _resolve_in(rootfs, SYSTEM_PYTHON) is None and _exists_in(rootfs, USR_LOCAL_PYTHON) and all(
            (rootfs / d).is_dir() and not (rootfs / d).is_symlink() for d in ("usr", "usr/bin")):
        check_image_rootfs(rootfs, python=USR_LOCAL_PYTHON)
        log(f"the image has no {SYSTEM_PYTHON}: linking it to {USR_LOCAL_PYTHON} in a layer above the image")
        return _python_link_layer(rootfs), rootfs
    check_image_rootfs(rootfs)
    return (rootfs,)


def _python_link_layer(rootfs: Path) -> Path:
    """`<image>/python3-link/`: usr/bin/python3 -> /usr/local/bin/python3.11, its directories with the
    image's own owners and modes (an overlay shows a directory with the attributes of its top layer)."""
    target = rootfs.parent / PYTHON_LINK_LAYER
    if target.is_dir():
        return target
    partial = rootfs.parent / f".{PYTHON_LINK_LAYER}.{os.getpid()}.{os.urandom(4).hex()}"
    try:
        (partial / "usr" / "bin").mkdir(parents=True)
        for directory in ("usr", "usr/bin"):
            info = (rootfs / directory).stat()
            os.chmod(partial / directory, stat.S_IMODE(info.st_mode))
            if os.geteuid() == 0:
                os.chown(partial / directory, info.st_uid, info.st_gid)
        (partial / SYSTEM_PYTHON.lstrip("/")).symlink_to(USR_LOCAL_PYTHON)
        os.chmod(partial, 0o755)
        try:
            partial.rename(target)
        except OSError as e:  # another build made it first
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def check_image_rootfs(rootfs: Path, *, python: str = SYSTEM_PYTHON) -> None:
    """Raises ImageError naming what an unpacked image lacks to serve as a Corral template: envd and the
    code interpreter run with the image's /usr/bin/python3 (or `python`, when a layer above the image links
    /usr/bin/python3 there), which must be Python 3.11 on glibc (their private libraries are CPython 3.11
    manylinux wheels), and build steps run with /bin/sh."""
    missing = []
    if not _exists_in(rootfs, "/bin/sh"):
        missing.append("/bin/sh (build steps and start commands run with it)")
    resolved = _resolve_in(rootfs, python)
    if resolved is None:
        elsewhere = [p for p in ("/usr/local/bin/python3", "/opt/conda/bin/python3") if _exists_in(rootfs, p)]
        hint = ""
        if elsewhere:
            version = _python_version(rootfs, _resolve_in(rootfs, elsewhere[0]))
            hint = (f"; this image's Python is {elsewhere[0]} ({version or 'version unknown'}), which Corral "
                    f"cannot use (it links {SYSTEM_PYTHON} to a Python 3.11 at {USR_LOCAL_PYTHON} only)")
        missing.append(f"{python} (Python 3.11: envd runs with it){hint}")
    else:
        version = _python_version(rootfs, resolved)
        if version != "3.11":
            missing.append(f"Python 3.11 at {python} (it is {version or 'of an unknown version'}; "
                           "envd's libraries are built for CPython 3.11)")
    glibc = _glibc_version(rootfs)
    if glibc is None:
        missing.append("glibc (musl-based images such as Alpine cannot run envd's libraries)")
    elif glibc < (2, 34):
        missing.append(f"glibc 2.34 or newer (it has {glibc[0]}.{glibc[1]})")
    if missing:
        raise ImageError("this image cannot be a Corral template base: it needs " + "; ".join(missing)
                         + ". Debian bookworm images with python3 installed work (Corral's `base` is one), and "
                         "so do Docker Hub's python:3.11 images.")


def _resolve_in(rootfs: Path, path: str, depth: int = 0) -> str | None:
    """`path` with its symlinks followed inside `rootfs` (absolute links point into it, not at the host);
    None when it does not exist."""
    if depth > 40:
        return None
    parts = [p for p in path.split("/") if p]
    current = ""
    for i, part in enumerate(parts):
        if part == "..":
            current = current.rsplit("/", 1)[0]
            continue
        candidate = f"{current}/{part}"
        host = rootfs / candidate.lstrip("/")
        if host.is_symlink():
            link = os.readlink(host)
            base = link if link.startswith("/") else f"{current}/{link}"
            rest = "/".join(parts[i + 1:])
            return _resolve_in(rootfs, f"{base}/{rest}" if rest else base, depth + 1)
        if not host.exists():
            return None
        current = candidate
    return current or "/"


def _exists_in(rootfs: Path, path: str) -> bool:
    resolved = _resolve_in(rootfs, path)
    return resolved is not None and (rootfs / resolved.lstrip("/")).is_file()


def _python_version(rootfs: Path, python: str) -> str | None:
    """X.Y of the interpreter at `python` (resolved inside rootfs), from its name (python3.11) or the
    standard library next to it, without running it."""
    if match := re.fullmatch(r"python(\d+\.\d+)", python.rsplit("/", 1)[-1]):
        return match.group(1)
    prefix = python.rsplit("/", 2)[0]  # /usr/bin/python3 -> /usr
    found = [m.group(1) for lib in (rootfs / prefix.lstrip("/") / "lib").glob("python3.*/os.py")
             if (m := re.fullmatch(r"python(\d+\.\d+)", lib.parent.name))]
    return found[0] if len(found) == 1 else None


def _glibc_version(rootfs: Path) -> tuple[int, int] | None:
    for candidate in ("/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libc.so.6",
                      "/lib64/libc.so.6", "/usr/lib64/libc.so.6"):
        resolved = _resolve_in(rootfs, candidate)
        if resolved is None:
            continue
        data = (rootfs / resolved.lstrip("/")).read_bytes()
        if match := re.search(rb"release version (\d+)\.(\d+)", data):
            return int(match.group(1)), int(match.group(2))
        versions = [(int(a), int(b)) for a, b in re.findall(rb"GLIBC_(\d+)\.(\d+)", data)]
        if versions:
            return max(versions)
    return None
