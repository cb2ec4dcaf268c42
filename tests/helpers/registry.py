"""A real OCI registry on loopback for tests: Debian's `docker-registry` (the CNCF distribution registry) in
a temporary directory, optionally behind htpasswd users, and `push_rootfs` that makes an OCI image out of
directories with `umoci` and pushes it with `skopeo`.

    with running_registry(tmp_path, users={"alice": "s3cret"}) as registry:
        image = registry.push_rootfs(rootfs, "corral/small:1", credentials=("alice", "s3cret"))
        image.reference   # "127.0.0.1:<port>/corral/small:1"
        image.digest      # the manifest digest the registry holds

The registry speaks plain HTTP, so whatever pulls from it must list `127.0.0.1:<port>` (or `127.0.0.1:*`)
among its insecure registries.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PushedImage:
    reference: str  # registry/repository:tag
    digest: str  # sha256:... of the manifest as pushed

    @property
    def by_digest(self) -> str:
        return self.reference.rsplit(":", 1)[0] + "@" + self.digest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    def __init__(self, root: Path, *, users: dict[str, str] | None = None) -> None:
        self.root = root
        self.users = dict(users or {})
        self.storage = root / "storage"
        self.port = 0
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def reference(self, name: str) -> str:
        return f"{self.address}/{name}"

    # ------------------------------------------------------------ lifecycle

    def _write_config(self) -> Path:
        self.storage.mkdir(parents=True, exist_ok=True)
        lines = [
            "version: 0.1",
            "log:",
            "  level: warn",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.storage}",
            "http:",
            f"  addr: {self.address}",
            f"  secret: {secrets.token_hex(16)}",
        ]
        if self.users:
            htpasswd = self.root / "htpasswd"
            htpasswd.touch(mode=0o600)
            for user, password in self.users.items():
                # -i: the password comes on stdin, not the command line.
                subprocess.run(["htpasswd", "-B", "-i", str(htpasswd), user], input=password, text=True,
                               check=True, capture_output=True, timeout=30)
            lines += ["auth:", "  htpasswd:", "    realm: corral-test", f"    path: {htpasswd}"]
        config = self.root / "config.yml"
        config.write_text("\n".join(lines) + "\n")
        return config

    def start(self) -> None:
        for _ in range(5):
            self.port = _free_port()
            config = self._write_config()
            with open(self.root / "registry.log", "ab") as log:
                self.process = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log,
                                                stderr=log, stdin=subprocess.DEVNULL)
            if self._wait_ready():
                return
            self.stop()
        raise RuntimeError(f"docker-registry did not start; see {self.root / 'registry.log'}")

    def _wait_ready(self, timeout: float = 20) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                urllib.request.urlopen(f"http://{self.address}/v2/", timeout=2).close()
                return True
            except urllib.error.HTTPError:
                return True  # 401: up, and asking for credentials
            except OSError:
                time.sleep(0.1)
        return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    # ------------------------------------------------------------ content

    def blob_data(self, digest: str) -> Path:
        """The file the registry serves blob `digest` from (to tamper with it)."""
        hex_ = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"

    def manifest(self, image: PushedImage) -> dict:
        """The pushed manifest, read from the registry's storage."""
        return json.loads(self.blob_data(image.digest).read_bytes())

    def push_rootfs(self, rootfs: Path, name: str, *, second_layer: Path | None = None,
                    deleted: Sequence[str] = (), credentials: tuple[str, str] | None = None,
                    config: Sequence[str] = (), architecture: str = "amd64") -> PushedImage:
        """Pushes an image whose first layer is the directory `rootfs` (as /) and, when `second_layer` or
        `deleted` is given, a second layer with that directory's contents and whiteouts for the `deleted`
        absolute paths. `name` is repository:tag in this registry; `config` are extra `umoci config` flags
        (e.g. "--config.env=A=1"). Ownership, modes and symlinks are kept (run as root)."""
        with tempfile.TemporaryDirectory(prefix="corral-push-", dir=self.root) as work:
            layout = Path(work) / "layout"
            image = f"{layout}:img"
            umoci = ["umoci", "--log", "error"]

            def run(*argv: str) -> None:
                subprocess.run(argv, check=True, capture_output=True, timeout=600)

            run(*umoci, "init", "--layout", str(layout))
            run(*umoci, "new", "--image", image)
            run(*umoci, "config", "--image", image, "--os", "linux", "--architecture", architecture,
                "--config.cmd", "/bin/sh", *config)
            run(*umoci, "insert", "--image", image, "--no-history", str(rootfs), "/")
            if second_layer is not None or deleted:
                # umoci makes one layer per insert: build the second layer in an image of its own and graft
                # it on, so added files and whiteouts travel as one layer.
                self._second_layer(layout, second_layer, deleted)
            digest_file = Path(work) / "digest"
            argv = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--digestfile", str(digest_file)]
            auth_file = None
            if credentials:
                auth_file = Path(work) / "auth.json"
                _write_auth_file(auth_file, self.address, *credentials)
                argv += ["--dest-authfile", str(auth_file)]
            else:
                argv += ["--dest-no-creds"]
            run(*argv, f"oci:{image}", f"docker://{self.reference(name)}")
            return PushedImage(self.reference(name), digest_file.read_text().strip())

    def copy_image(self, source: PushedImage, name: str, *, add_layer: Path | None = None,
                   credentials: tuple[str, str] | None = None) -> PushedImage:
        """Pushes `source` (an image in an open registry on loopback, this one or another) as `name` here,
        its layers as they are (no recompression of a large root filesystem), with `add_layer` (an
        uncompressed layer tar: files, symlinks, `.wh.` whiteouts) appended when given."""
        with tempfile.TemporaryDirectory(prefix="corral-push-", dir=self.root) as work:
            layout = Path(work) / "layout"
            image = f"{layout}:img"

            def run(*argv: str) -> None:
                subprocess.run(argv, check=True, capture_output=True, timeout=600)

            run("skopeo", "copy", "--quiet", "--src-tls-verify=false", "--src-no-creds",
                f"docker://{source.reference}", f"oci:{image}")
            if add_layer is not None:
                run("umoci", "--log", "error", "raw", "add-layer", "--no-history", "--image", image, str(add_layer))
            digest_file = Path(work) / "digest"
            argv = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--digestfile", str(digest_file)]
            if credentials:
                auth_file = Path(work) / "auth.json"
                _write_auth_file(auth_file, self.address, *credentials)
                argv += ["--dest-authfile", str(auth_file)]
            else:
                argv += ["--dest-no-creds"]
            run(*argv, f"oci:{image}", f"docker://{self.reference(name)}")
            return PushedImage(self.reference(name), digest_file.read_text().strip())

    def push_index(self, name: str, platforms: dict[str, PushedImage]) -> PushedImage:
        """Pushes an OCI image index (a multi-platform image) whose entries are images already pushed here,
        e.g. {"linux/amd64": a, "linux/arm64": b}."""
        import hashlib

        with tempfile.TemporaryDirectory(prefix="corral-push-", dir=self.root) as work:
            layout = Path(work) / "layout"
            entries = []
            for i, (platform, image) in enumerate(platforms.items()):
                subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{image.by_digest}",
                                f"oci:{layout}:p{i}"], check=True, capture_output=True, timeout=600)
                os_, _, architecture = platform.partition("/")
                manifest = next(m for m in json.loads((layout / "index.json").read_text())["manifests"]
                                if m["annotations"]["org.opencontainers.image.ref.name"] == f"p{i}")
                entries.append({"mediaType": manifest["mediaType"], "digest": manifest["digest"],
                                "size": manifest["size"], "platform": {"os": os_, "architecture": architecture}})
            index_bytes = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                                      "manifests": entries}).encode()
            digest = hashlib.sha256(index_bytes).hexdigest()
            (layout / "blobs" / "sha256" / digest).write_bytes(index_bytes)
            top = json.loads((layout / "index.json").read_text())
            top["manifests"].append({"mediaType": "application/vnd.oci.image.index.v1+json",
                                     "digest": f"sha256:{digest}", "size": len(index_bytes),
                                     "annotations": {"org.opencontainers.image.ref.name": "index"}})
            (layout / "index.json").write_text(json.dumps(top))
            subprocess.run(["skopeo", "copy", "--quiet", "--all", "--dest-tls-verify=false", "--dest-no-creds",
                            f"oci:{layout}:index", f"docker://{self.reference(name)}"],
                           check=True, capture_output=True, timeout=600)
            return PushedImage(self.reference(name), f"sha256:{digest}")

    def _second_layer(self, layout: Path, added: Path | None, deleted: Sequence[str]) -> None:
        """Appends one layer to layout:img holding `added`'s files and whiteouts for `deleted`: umoci unpacks
        the image into a bundle, the change is made there, and `umoci repack` records the difference."""
        bundle = layout.parent / "bundle"
        image = f"{layout}:img"
        subprocess.run(["umoci", "--log", "error", "unpack", "--image", image, str(bundle)], check=True,
                       capture_output=True, timeout=600)
        rootfs = bundle / "rootfs"
        for path in deleted:
            target = rootfs / path.strip("/")
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        if added is not None:
            subprocess.run(["cp", "-a", f"{added}/.", str(rootfs)], check=True, timeout=600)
        subprocess.run(["umoci", "--log", "error", "repack", "--no-history", "--image", image, str(bundle)],
                       check=True, capture_output=True, timeout=600)
        shutil.rmtree(bundle)


def _write_auth_file(path: Path, registry: str, username: str, password: str) -> None:
    import base64

    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"auths": {registry: {"auth": token}}}, f)


@contextlib.contextmanager
def running_registry(root: Path, *, users: dict[str, str] | None = None) -> Iterator[Registry]:
    """A started registry storing under `root` (made if missing); stopped on exit."""
    if missing := tools_missing():
        raise RuntimeError(f"the test registry needs {', '.join(missing)}: run "
                           "CORRAL_TEST_TOOLS=1 scripts/install.sh (scripts/test.sh does)")
    root.mkdir(parents=True, exist_ok=True)
    registry = Registry(root, users=users)
    registry.start()
    try:
        yield registry
    finally:
        registry.stop()


def tools_missing() -> list[str]:
    return [t for t in ("docker-registry", "skopeo", "umoci", "htpasswd") if shutil.which(t) is None]
