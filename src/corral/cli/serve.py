"""`corral serve`: the API server."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from pathlib import Path

import typer
from rich.console import Console

from corral.config import PlatformSettings, load_settings

console = Console()


DEFAULT_DOMAIN = "corral.localhost"  # *.localhost resolves to this machine (libnss-myhostname, docs/network.md)


def serve_command(
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 for remote clients)."),
    port: int = typer.Option(3000, help="Port for the API and the sandbox proxy (plain HTTP, header routing)."),
    domain: str = typer.Option(None, envvar="CORRAL_DOMAIN",
                               help=f"Public domain: https://api.<domain> and https://<port>-<sandboxID>.<domain> "
                                    f"(default {DEFAULT_DOMAIN})."),
    https_port: int = typer.Option(None, envvar="CORRAL_HTTPS_PORT", show_default="443",
                                   help="Port of the HTTPS listener for the domain (0: none). The SDKs' "
                                        "E2B_DOMAIN needs 443. Left unset and 443 taken, serve goes on without "
                                        "HTTPS and says so; set, a taken port is an error."),
    tls_cert: Path = typer.Option(None, envvar="CORRAL_TLS_CERT",
                                  help="Certificate chain for <domain> and *.<domain> (default: signed by this "
                                       "installation's own CA, made at the first start)."),
    tls_key: Path = typer.Option(None, envvar="CORRAL_TLS_KEY", help="The key of --tls-cert."),
    pool_size: int = typer.Option(None, help="Warm sandboxes kept per pooled template (CORRAL_POOL_SIZE)."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
    log_format: str = typer.Option("text", envvar="CORRAL_LOG_FORMAT",
                                   help="text, or json: one JSON object per log line (ts, level, logger, message, "
                                        "requestID inside an API request)."),
) -> None:
    """Serve the E2B-compatible API and the sandbox proxy: plain HTTP on --port, and HTTPS for the public
    domain on --https-port."""
    import dataclasses

    from corral.observability.logs import LOG_FORMATS, configure_logging
    from corral.server import CorralServer

    if log_format not in LOG_FORMATS:
        Console(stderr=True).print(f"[red]error:[/red] --log-format must be one of {', '.join(LOG_FORMATS)}")
        raise typer.Exit(2)
    settings = load_settings()
    platform = PlatformSettings()
    if pool_size is not None:
        platform = dataclasses.replace(platform, pool_size=pool_size)
    domain = (domain or DEFAULT_DOMAIN).strip().lower().rstrip(".")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    from corral.network import service

    tls, https_sockets = None, []
    asked_for_https = https_port is not None
    https_port = 443 if https_port is None else https_port
    if https_port:
        tls = _tls_files(settings, domain, tls_cert, tls_key)
        try:  # before anything is built: a taken port fails at once
            https_sockets = _bind(host, https_port, "HTTPS", quiet=not asked_for_https)
        except PortTaken as taken:
            # The default, not asked for: a newcomer's first `corral serve` on a machine that runs a web
            # server still comes up, over plain HTTP (E2B_API_URL / E2B_SANDBOX_URL).
            Console(stderr=True).print(f"[yellow]warning:[/yellow] {taken}; serving without HTTPS "
                                       f"(--https-port N for another port, 0 to say so)")
            tls, https_port = None, 0
    # Sandboxes reach the server itself (its egress proxy; with public URLs its DNS and HTTPS too) at the
    # instance's service address.
    settings = dataclasses.replace(settings, service_address=settings.service_address
                                   or service.default_address(settings.instance), public_urls=bool(https_port))
    service.add(settings.instance, settings.service_address)
    if https_port:
        https_sockets += _bind(str(settings.service_address), 443, "HTTPS for sandboxes")
    http_sockets = _bind(host, port, "HTTP")
    _ensure_templates(settings, platform.pool_templates or ("base",))
    server = CorralServer(settings, platform, domain=domain, public=tls is not None)
    if tls is not None and tls.ca is not None:  # sandboxes open public URLs too
        server.orchestrator.trusted_certificates = "\n".join(
            p for p in (server.orchestrator.trusted_certificates, tls.ca.read_text()) if p)
    key_line = "export E2B_API_KEY=<a key from `corral keys create`>"
    admin_line = "# sign in with an API key (`corral keys create --scope admin` for one that manages keys)"
    if not asyncio.run(server.keys.list()):
        first, secret = asyncio.run(server.keys.create("default"))
        key_line = f"export E2B_API_KEY={secret}   # created now as 'default'; shown only once"
        # The dashboard's first sign-in: a key of the same team that may also manage keys, kept out of the
        # SDKs' environment so the everyday key is not the one that can make more.
        _, admin = asyncio.run(server.keys.create("admin", team=first.team_id, scopes=["admin"]))
        admin_line = f"# sign in with the admin key {admin}   (created now as 'admin'; shown only once)"
    console.print("[bold]Point the E2B SDKs at this server:[/bold]")
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    # MCP tools call the API as any client would, over this listener.
    server.serve_mcp(f"http://{shown if ':' not in shown else f'[{shown}]'}:{http_sockets[0].getsockname()[1]}")
    if tls is not None:
        lines = [f"export E2B_DOMAIN={domain}" + ("" if https_port == 443 else
                                                   f"   # the SDKs reach it only on 443; this one is on {https_port}")]
        if tls.bundle is not None:
            lines += [f"export SSL_CERT_FILE={tls.bundle}   # Python: system CAs + this installation's CA",
                      f"export NODE_EXTRA_CA_CERTS={tls.ca}"]
        lines += [key_line, f"# or, over plain HTTP: export E2B_API_URL=http://{shown}:{port} "
                            f"E2B_SANDBOX_URL=http://{shown}:{port}"]
    else:
        lines = [f"export E2B_API_URL=http://{shown}:{port}", f"export E2B_SANDBOX_URL=http://{shown}:{port}",
                 key_line]
    listening = http_sockets[0].getsockname()[1]
    lines += [f"# Dashboard: http://{shown}:{listening}/dashboard {admin_line.removeprefix('# ')}",
              f"# MCP clients: http://{shown}:{listening}/mcp with the header 'Authorization: Bearer <key>' "
              "(docs/mcp.md)"]
    print("\n".join(lines), flush=True)
    configure_logging(log_format, log_level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    asyncio.run(_serve(server, http_sockets, https_sockets, tls, log_level, log_format))


def _tls_files(settings, domain: str, cert: Path | None, key: Path | None):
    from corral.proxy.tls import TLSError, installation_tls, operator_tls

    try:
        if cert or key:
            if not (cert and key):
                raise TLSError("--tls-cert and --tls-key go together")
            return operator_tls(cert, key)
        return installation_tls(settings.data_dir / "tls", domain)
    except TLSError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


class PortTaken(Exception):
    pass


def _bind(host: str, port: int, what: str, *, quiet: bool = False) -> list[socket.socket]:
    """Listening sockets for `host` (loopback: 127.0.0.1 and ::1, as `*.localhost` names resolve to both;
    0.0.0.0: IPv4 and IPv6). A port that cannot be had stops serve with the reason, or with `quiet`
    raises PortTaken for the caller to decide."""
    hosts = {"127.0.0.1": ["127.0.0.1", "::1"], "localhost": ["127.0.0.1", "::1"],
             "0.0.0.0": ["0.0.0.0", "::"], "::": ["0.0.0.0", "::"]}.get(host, [host])
    sockets = []
    for address in hosts:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            # IPPROTO_TCP spelled out: asyncio turns Nagle off (TCP_NODELAY) only on accepted sockets whose
            # proto says TCP, and with it on, every streamed response's last chunk waited ~20-40 ms for
            # the client's delayed ACK (commands.run took 56 ms instead of 25).
            sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        except OSError:
            continue  # no IPv6 on this host
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((address, port))
        except OSError as exc:
            sock.close()
            if family == socket.AF_INET6 and address != host and exc.errno == errno.EADDRNOTAVAIL:
                continue  # ::1 missing (IPv6 disabled): IPv4 alone
            for s in sockets:
                s.close()
            if quiet:
                raise PortTaken(f"cannot listen for {what} on {address} port {port}: {exc.strerror}") from None
            hint = " (--https-port 0 turns HTTPS off)" if what.startswith("HTTPS") else ""
            Console(stderr=True).print(f"[red]error:[/red] cannot listen for {what} on {address} port {port}: "
                                       f"{exc.strerror}{hint}")
            raise typer.Exit(2) from None
        sock.listen(2048)
        sock.set_inheritable(True)
        sockets.append(sock)
    return sockets


async def _serve(server, http_sockets: list[socket.socket], https_sockets: list[socket.socket], tls,
                 log_level: str, log_format: str = "text") -> None:
    """Both listeners in one process over one app. The HTTP one runs the app's start-up and shutdown, and
    the HTTPS one starts once it is up. A signal stops HTTPS first (it holds the handlers last), and
    uvicorn passes it on to HTTP, which shuts the app down."""
    import uvicorn

    common = dict(log_level=log_level, access_log=False, timeout_keep_alive=300, timeout_graceful_shutdown=5,
                  ws="websockets-sansio")
    if log_format == "json":
        common["log_config"] = None  # uvicorn's loggers then write through the root logger's JSON handler
    http = uvicorn.Server(uvicorn.Config(server, lifespan="on", **common))
    http_task = asyncio.create_task(http.serve(sockets=http_sockets))
    if not https_sockets:
        await http_task
        return
    while not http.started:
        if http_task.done():
            await http_task
            return
        await asyncio.sleep(0.05)
    https = uvicorn.Server(uvicorn.Config(server, lifespan="off", ssl_certfile=str(tls.cert),
                                          ssl_keyfile=str(tls.key), **common))
    https_task = asyncio.create_task(https.serve(sockets=https_sockets))
    await asyncio.wait({http_task, https_task}, return_when=asyncio.FIRST_COMPLETED)
    http.should_exit = https.should_exit = True
    await asyncio.gather(http_task, https_task, return_exceptions=True)


def _ensure_templates(settings, names: tuple[str, ...]) -> None:
    """Builds the templates the server pools (`base` by default) when they are missing or their recipe
    changed (an upgrade): the first start on a fresh machine takes about a minute, later ones none."""
    from corral.cli.build_progress import BuildDisplay
    from corral.cli.local import local_runtime
    from corral.runtime.base import TemplateNotFound

    async def build() -> None:
        async with local_runtime(settings) as (runtime, store):
            for name in names:
                if name not in store.recipes:
                    continue
                try:
                    store.resolve(name)
                    verb = "" if await store.is_current(name, runtime) else "rebuilding out-of-date"
                except TemplateNotFound:
                    verb = "building"
                if not verb:
                    continue
                with BuildDisplay(console, name, verb) as display:
                    await store.build(name, runtime, progress=display)
                console.print(f"[green]built[/green] template {name}")

    asyncio.run(build())
