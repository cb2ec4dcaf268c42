"""`corral serve`: the REST API and the sandbox proxy on one listener.

Requests that carry `E2b-Sandbox-Id` + `E2b-Sandbox-Port` (or, with a domain, a `<port>-<id>.<domain>`
Host) go to the sandbox; everything else is the API.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
from urllib.parse import parse_qsl

from corral.config import PlatformSettings, Settings
from corral.control.api import create_api
from corral.control.db import open_database
from corral.control.errors import ApiError, HostPaths
from corral.control.keys import ApiKeys, owner_of
from corral.control.metering import Prices
from corral.control.plane import ControlPlane
from corral.control.secrets import Secrets, load_key
from corral.control.templates import BaseImage, BuildLimits, Templates
from corral.control.volumes import Volumes
from corral.control.webhooks import Webhooks
from corral.envd import DEFAULT_PORT as ENVD_PORT
from corral.mcp.http import PATH as MCP_PATH
from corral.mcp.http import McpEndpoint
from corral.network.dns import upstream_resolvers
from corral.network.egress_proxy import EgressPolicy, EgressProxy
from corral.network.firewall import EGRESS_PROXY_PORT
from corral.network.sandbox_dns import SandboxResolver
from corral.orchestrator.capacity import WarmUp
from corral.orchestrator.sandboxes import Orchestrator
from corral.proxy.proxy import SandboxProxy, route_from_host
from corral.proxy.tls import EgressCA
from corral.runtime.gvisor import GVisorRuntime
from corral.storage.volumes import VolumeStore
from corral.templates import envd_layer, images
from corral.templates.builder import Builder
from corral.templates.store import TemplateStore

log = logging.getLogger("corral.server")


def _templates(database, runtime: GVisorRuntime, store: TemplateStore, settings: Settings,
               platform: PlatformSettings) -> Templates:
    """Templates users build (control/templates.py), on the builder (templates/builder.py)."""
    builder = Builder(runtime, settings.cache_dir, dns_address=str(settings.dns_address),
                      envd_layer=lambda: envd_layer.ensure_envd_layer(settings.cache_dir), extra_ca_pem=store.extra_ca)

    async def pull(reference: str, registry: dict | None, log) -> BaseImage:
        builtin = images.default_base_image_maps_to_builtin(reference)
        credentials = None
        if registry:
            if registry.get("type", "registry") != "registry":
                raise ApiError(400, f"registry type {registry.get('type')!r} is not supported (only username "
                                    "and password registries)")
            credentials = images.RegistryCredentials(str(registry.get("username") or ""),
                                                     str(registry.get("password") or ""))
        try:
            rootfs = await images.pull_image(reference, credentials=credentials, cache_dir=settings.cache_dir,
                                             log=log, insecure_registries=settings.insecure_registries)
            layers = images.image_base_layers(rootfs, log)
        except images.ImageError as e:
            if builtin is None:
                raise ApiError(getattr(e, "status", 400), str(e)) from None
            # E2B's default base cannot be pulled here: Corral's own `base` stands in for it.
            log(f"{reference} cannot be used ({e}); using Corral's built-in template {builtin!r} instead")
            snapshot = runtime.open_snapshot(store.resolve(builtin))
            layers = tuple(p for p in snapshot.layers
                           if not (p.name.endswith(".etc") or p.is_relative_to(settings.cache_dir / "envd")))
            return BaseImage(layers, f"template:{snapshot.path}")
        return BaseImage(layers, "image:" + ",".join(map(str, layers)))

    return Templates(database, runtime, cache_dir=settings.cache_dir, data_dir=settings.data_dir, builder=builder,
                     builtin=lambda: set(store.recipes), resolve_snapshot=store.resolve,
                     limits=BuildLimits(max_concurrent=platform.max_concurrent_builds,
                                        timeout_s=platform.build_timeout_s,
                                        layer_cache_bytes=int(platform.build_cache_gb * 1024**3)),
                     pull_image=pull)


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class CorralServer:
    def __init__(self, settings: Settings, platform: PlatformSettings, *, domain: str | None = None,
                 public: bool = False) -> None:
        """`domain`: Host `<port>-<id>.<domain>` goes to sandboxes; `public`: the domain is served over
        HTTPS (`corral serve`), so sandbox answers name it and the SDKs build their envd URLs from it."""
        self.settings = settings
        self.database = open_database(platform.resolved_database_url(settings))
        self.keys = ApiKeys(self.database)
        store = TemplateStore(settings)
        runtime = GVisorRuntime(settings)
        self.orchestrator = Orchestrator(runtime, store.resolve, pool_size=platform.pool_size,
                                         pool_templates=platform.pool_templates,
                                         prepared_size=platform.prepared_pool_size,
                                         warm_ups={name: WarmUp(recipe.warm_up_command, recipe.warm_up)
                                                   for name, recipe in store.recipes.items()},
                                         template_resources={name: recipe.resources
                                                             for name, recipe in store.recipes.items()},
                                         idle_after_s=platform.idle_freeze_s,
                                         idle_fresh_s=platform.idle_fresh_s,
                                         breathe_every_s=platform.idle_breathe_every_s,
                                         resume_warm_s=platform.resume_warm_s,
                                         resume_warm_max=platform.resume_warm_max,
                                         budget=platform.restore_budget or None)
        self.control = ControlPlane(self.database, self.orchestrator, platform,
                                    checkpoint_dir=settings.data_dir / "checkpoints",
                                    recordings_dir=settings.data_dir / "recordings",
                                    is_template=lambda name: name in store.recipes or any(
                                        t.name == name for t in store.list()),
                                    secrets=Secrets(self.database, load_key(platform.secrets_key_file(settings))),
                                    volumes=Volumes(self.database, VolumeStore(settings.data_dir / "volumes"),
                                                    load_key(platform.secrets_key_file(settings)),
                                                    default_mb=platform.volume_default_mb,
                                                    max_mb=platform.volume_max_mb),
                                    webhooks=Webhooks(self.database, load_key(platform.secrets_key_file(settings)),
                                                      allow_private=platform.webhooks_allow_private),
                                    prices=Prices.from_env())
        self.control.public_domain = domain if public else None
        self.control.templates = _templates(self.database, runtime, store, settings, platform)
        self.control.templates.metrics = self.control.metrics
        self.control.templates.events = self.control.events
        # While public URLs are served, sandboxes resolve them through our DNS server (network/sandbox_dns.py).
        self.resolver = None
        if public and domain and settings.service_address is not None:
            self.resolver = SandboxResolver(domain, settings.service_address, upstream_resolvers(),
                                            listen=settings.service_address)
        # Egress rules by domain: the proxy nftables sends those sandboxes' ports 80 and 443 to.
        # Header rules: HTTPS to those domains is intercepted with certificates from the egress CA, which
        # every new sandbox trusts (envd's caBundle); never the public listener's CA.
        self.egress_proxy = None
        if settings.service_address is not None:
            egress_ca = EgressCA(settings.data_dir / "tls")
            self.orchestrator.intercept_certificates = egress_ca.pem
            self.egress_proxy = EgressProxy(self._egress_policy, [str(r) for r in upstream_resolvers()],
                                            listen=str(settings.service_address), port=EGRESS_PROXY_PORT,
                                            never=[settings.sandbox_network], ca=egress_ca,
                                            secret=self._egress_secret, upstream_tls=_upstream_tls())
        self.api = create_api(self.control, self.keys, HostPaths.of(settings))
        self.proxy = SandboxProxy(self._address, self.control.sandboxes.ingress)
        self.control.metrics.proxy = self.proxy.traffic
        self.orchestrator.on_gone.append(self.proxy.forget)
        self.domain = domain
        # MCP over HTTP at /mcp, once `serve_mcp` says where the tools reach this server's API.
        self.mcp: McpEndpoint | None = None

    def serve_mcp(self, api_url: str) -> None:
        self.mcp = McpEndpoint(self.keys, api_url, self.domain)

    async def _address(self, sandbox_id: str) -> str | None:
        """Where the proxy sends a sandbox's traffic; a paused sandbox with autoResume is resumed first."""
        address = await self.orchestrator.reachable_address(sandbox_id)
        if address is None and await self.control.branching.auto_resume(sandbox_id):
            address = await self.orchestrator.reachable_address(sandbox_id)
        return address

    def _egress_policy(self, address: str) -> EgressPolicy | None:
        sandbox = self.orchestrator.runtime.sandbox_at(address)
        if sandbox is None:
            return None
        config = sandbox.config
        return EgressPolicy(config.internet, config.egress_allow, config.egress_deny, config.egress_domains,
                            config.egress_rules)

    async def _egress_secret(self, address: str, name: str) -> str | None:
        """The value of secret `name` of the owner of the sandbox at `address`, for its header rules."""
        sandbox = self.orchestrator.runtime.sandbox_at(address)
        entry = next((e for e in self.orchestrator.registry.entries() if sandbox and e.sandbox.id == sandbox.id),
                     None)
        row = await self.control.sandboxes.row(entry.api_id) if entry is not None else None
        if row is None or self.control.secrets is None:
            return None
        return await self.control.secrets.value(owner_of(row), name)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        route = self._route(scope)
        if route is not None:
            with self.orchestrator.in_use(route[0]):
                await self.proxy(scope, receive, send, *route)
        elif self.mcp is not None and scope["type"] == "http" and scope["path"] == MCP_PATH:
            await self.mcp(scope, receive, send)
        else:
            await self.api(scope, receive, send)

    def _route(self, scope) -> tuple[str, int] | None:
        sandbox_id = _header(scope, b"e2b-sandbox-id")
        port = _header(scope, b"e2b-sandbox-port")
        if sandbox_id is not None and port is not None and port.isdigit():
            return sandbox_id, int(port)
        host = _header(scope, b"host")
        if self.domain and host and (route := route_from_host(host, self.domain)) is not None:
            return route
        if scope["type"] == "http" and scope["path"] == "/files" and b"signature=" in scope["query_string"]:
            return self._signed_file_route(scope)
        return None

    def _signed_file_route(self, scope) -> tuple[str, int] | None:
        query = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
        operation = "write" if scope["method"] == "POST" else "read"
        sandbox_id = self.control.sandboxes.sandbox_for_signature(
            query.get("path", ""), operation, query.get("username", ""), query.get("signature", ""),
            query.get("signature_expiration"))
        return (sandbox_id, ENVD_PORT) if sandbox_id else None

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    if self.resolver is not None:
                        await self.resolver.start()
                    if self.egress_proxy is not None:
                        await self.egress_proxy.start()
                    await self.control.start()
                    await self.control.templates.start()
                    if self.mcp is not None:
                        await self.mcp.start()
                except Exception as e:
                    log.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                with contextlib.suppress(Exception):
                    await self.proxy.close()
                if self.mcp is not None:
                    with contextlib.suppress(Exception):
                        await self.mcp.close()
                await self.control.templates.close()
                await self.control.close()
                if self.resolver is not None:
                    await self.resolver.close()
                if self.egress_proxy is not None:
                    await self.egress_proxy.close()
                self.database.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _upstream_tls() -> ssl.SSLContext:
    """How the egress proxy verifies the servers it forwards rewritten requests to: the system's CAs, and
    the CA file CORRAL_EGRESS_EXTRA_CA names (a private CA of the operator's; the tests' own servers)."""
    context = ssl.create_default_context()
    if extra := os.environ.get("CORRAL_EGRESS_EXTRA_CA"):
        context.load_verify_locations(cafile=extra)
    return context
