"""Network benchmark: a sandbox's HTTP port reached straight at its address, through the plain-HTTP
listener's header routing, and through the public HTTPS listener (`https://<port>-<id>.<domain>`), all in
the same run against the same server in the sandbox; and a sandbox's egress over NAT.

    sudo .venv/bin/python benchmarks/network.py [--n 500] [--write docs/benchmarks.md]

Latency is per request on one kept-alive connection (p50/p95/p99), and separately per new connection (a
TCP, or TCP + TLS, handshake each time). Requests/s is 8 clients at once, kept alive. Egress: new
connections from inside a sandbox over NAT and through the domain rules' egress proxy. Needs the `base`
template and port 443 on 127.0.0.1 (the public listener).
"""

from __future__ import annotations

import argparse
import ssl
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.envd import pct
from benchmarks.report import targets_table, write_section
from benchmarks.tti import _address
from tests.helpers.server import ServerProcess
from tests.helpers.testnet import TestHost

BENCH_ROOT = Path("/var/tmp/corral-bench-network")
DOMAIN = "corral-bn.localhost"
INTERNET = "203.0.113.77"  # a test namespace standing in for a host on the internet
TARGETS = {"https_added_p50": 2.0, "egress_added_p50": 5.0}
# HTTP/1.1 with keep-alive (Python's http.server speaks 1.0 and closes every connection by default).
SERVER = r'''
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Small(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no delayed-ACK wait between them
    def do_GET(self):
        body = b"x" * 256
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("0.0.0.0", 8000), Small).serve_forever()
'''


def stats(samples: list[float]) -> str:
    return f"{pct(samples, 50):.2f} | {pct(samples, 95):.2f} | {pct(samples, 99):.2f}"


def timed(client: httpx.Client, url: str, headers: dict, n: int) -> list[float]:
    for _ in range(20):
        assert client.get(url, headers=headers).status_code == 200
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        response = client.get(url, headers=headers)
        samples.append((time.perf_counter() - start) * 1000)
        assert response.status_code == 200
    return samples


def per_request(url: str, headers: dict, n: int, verify) -> list[float]:
    with httpx.Client(verify=verify, trust_env=False) as client:
        return timed(client, url, headers, n)


def per_connection(url: str, headers: dict, n: int, verify) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        with httpx.Client(verify=verify, trust_env=False) as client:
            assert client.get(url, headers=headers).status_code == 200
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def throughput(url: str, headers: dict, seconds: float, verify, clients: int = 8) -> float:
    done = [0] * clients
    stop = time.monotonic() + seconds

    def one(i: int) -> None:
        with httpx.Client(verify=verify, trust_env=False) as client:
            while time.monotonic() < stop:
                assert client.get(url, headers=headers).status_code == 200
                done[i] += 1

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients)))
    return sum(done) / seconds


def egress_samples(sbx, url: str, n: int) -> list[float]:
    """New connections from inside the sandbox to a host 'on the internet' (a test namespace), timed by
    curl itself (name lookup + connect + request + response); each must succeed."""
    script = (f"for i in $(seq {n}); do curl -sf -o /dev/null -w '%{{time_total}}\\n' {url} || exit 1; done")
    out = sbx.commands.run(script, timeout=300).stdout.split()
    return [float(v) * 1000 for v in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()

    from e2b import Sandbox

    internet = TestHost("bninet", INTERNET).up()
    internet.serve_http(80)
    internet.serve_https(443, BENCH_ROOT / "web-tls")  # a certificate for *.egress.test from its own CA
    # Names resolve (for sandboxes and for the egress proxy) through a DNS server in a namespace of ours
    # that answers INTERNET for every name: the benchmark's names never reach a real resolver.
    names = TestHost("bndns", "10.98.77.53").up()
    names.serve_dns(INTERNET)
    server = ServerProcess("bN", "10.218.0.0/22", BENCH_ROOT, dns_upstream="10.98.77.53", pool_size=1,
                           domain=DOMAIN, https_port=443,
                           # Requests straight to the sandbox pass no proxy: the idle policy would freeze it.
                           # The egress proxy verifies the test host with the test host's own CA.
                           extra_env={"CORRAL_IDLE_FREEZE_S": "0",
                                      "CORRAL_EGRESS_EXTRA_CA": str(BENCH_ROOT / "web-tls" / "ca.pem")})
    results: dict[str, list[float] | float] = {}
    try:
        server.start(wait_pool=1)
        key = server.cli("keys", "create", "--name", "bench").strip()
        sbx = Sandbox.create(api_url=server.url, sandbox_url=server.url, api_key=key, timeout=1800)
        ca = ssl.create_default_context(cafile=str(Path(server.env["CORRAL_DATA_DIR"]) / "tls" / "ca.pem"))
        try:
            sbx.files.write("/home/user/small.py", SERVER)
            sbx.commands.run("python3 /home/user/small.py", background=True)
            direct = f"http://{_address(server, sbx.sandbox_id)}:8000/"
            routed = f"{server.url}/"
            public = f"https://8000-{sbx.sandbox_id}.{DOMAIN}/"
            route = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "8000"}
            deadline = time.monotonic() + 15
            while True:
                try:
                    if httpx.get(direct, timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            # One SSL context made beforehand for every client: httpx would build one per client (~25 ms,
            # loading certifi) even for plain http URLs, and the new-connection figures would measure that.
            plain = ssl.create_default_context()
            for name, url, headers, verify in (("direct", direct, {}, plain), ("routed", routed, route, plain),
                                               ("https", public, {}, ca)):
                results[f"{name} request"] = per_request(url, headers, args.n, verify)
                results[f"{name} connection"] = per_connection(url, headers, max(50, args.n // 5), verify)
                results[f"{name} rps"] = throughput(url, headers, args.seconds, verify)
                print(f"{name}: request {stats(results[f'{name} request'])} ms, new connection "
                      f"{stats(results[f'{name} connection'])} ms, {results[f'{name} rps']:.0f} req/s", flush=True)
            results["egress nat"] = egress_samples(sbx, f"http://{INTERNET}/", max(50, args.n // 5))
            print(f"egress over NAT: {stats(results['egress nat'])} ms", flush=True)
            fenced = Sandbox.create(api_url=server.url, sandbox_url=server.url, api_key=key, timeout=1800,
                                    network={"allow_out": ["bench.test"], "deny_out": ["0.0.0.0/0"]})
            try:
                # The sandbox resolves the name once (curl's own cache is per process: each run asks DNS).
                results["egress proxy"] = egress_samples(fenced, "http://bench.test/", max(50, args.n // 5))
                results["egress nat by name"] = egress_samples(sbx, "http://bench.test/", max(50, args.n // 5))
            finally:
                fenced.kill()
            print(f"egress by name: over NAT {stats(results['egress nat by name'])} ms, through the domain "
                  f"rules' proxy {stats(results['egress proxy'])} ms", flush=True)
            from e2b import Secret

            Secret.create("bench-key", "sk-bench-secret", api_url=server.url, api_key=key)
            ruled = Sandbox.create(api_url=server.url, sandbox_url=server.url, api_key=key, timeout=1800, network={
                "allow_out": ["bench.egress.test"], "deny_out": ["0.0.0.0/0"],
                "rules": {"bench.egress.test": [{"transform": {"headers": {
                    "Authorization": "Bearer ${e2b.secrets.bench-key}"}}}]}})
            try:
                n = max(50, args.n // 5)
                # Both with -k: the same client work (curl does not load and parse the CA bundle), so the
                # difference is the proxy's.
                results["https nat"] = egress_samples(sbx, "-k https://bench.egress.test/", n)
                results["https rewritten"] = egress_samples(ruled, "-k https://bench.egress.test/", n)
            finally:
                ruled.kill()
            print(f"egress HTTPS by name: over NAT {stats(results['https nat'])} ms, with a header rule (TLS "
                  f"terminated and re-made by the proxy) {stats(results['https rewritten'])} ms", flush=True)
        finally:
            sbx.kill()
    finally:
        server.stop()
        server.destroy_everything()
        internet.down()
        names.down()

    def row(label: str, name: str) -> str:
        return (f"| {label} | {stats(results[f'{name} request'])} | {stats(results[f'{name} connection'])} | "
                f"{results[f'{name} rps']:.0f} |")

    added = pct(results["https request"], 50) - pct(results["direct request"], 50)
    proxy_added = pct(results["egress proxy"], 50) - pct(results["egress nat by name"], 50)
    rewrite_added = pct(results["https rewritten"], 50) - pct(results["https nat"], 50)
    added_routed = pct(results["routed request"], 50) - pct(results["direct request"], 50)
    lines = [
        "| path to port 8000 of a sandbox | kept alive p50 ms | p95 | p99 | new connection p50 ms | p95 | p99 | "
        "requests/s, 8 clients |", "|---|---|---|---|---|---|---|---|",
        row("straight to the sandbox's address (baseline)", "direct"),
        row("plain HTTP listener, `E2b-Sandbox-Id`/`-Port` headers", "routed"),
        row(f"public HTTPS listener, `https://8000-<id>.{DOMAIN}`", "https"),
        "",
        f"Per request over the baseline (p50): header routing +{added_routed:.2f} ms, public HTTPS "
        f"+{added:.2f} ms; a new HTTPS connection {pct(results['https connection'], 50):.1f} ms against "
        f"{pct(results['direct connection'], 50):.1f} ms (the TLS handshake, ECDSA P-256).",
        "",
        "| egress: a new HTTP connection from inside a sandbox, timed by curl | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|",
        f"| to the address, over NAT (no rules; address rules are set lookups on this path) | "
        f"{stats(results['egress nat'])} |",
        f"| by name, over NAT (no rules) | {stats(results['egress nat by name'])} |",
        f"| by name, through the egress proxy (`allow_out` of that name, `deny_out` of everything) | "
        f"{stats(results['egress proxy'])} |",
        f"| HTTPS by name, over NAT (no rules) | {stats(results['https nat'])} |",
        f"| HTTPS by name with a header rule (the proxy terminates TLS, sets the header, verifies the server) | "
        f"{stats(results['https rewritten'])} |",
        "",
        f"The domain rules' proxy adds {proxy_added:+.2f} ms p50 per new connection (it reads the request head, "
        f"resolves the name itself and dials it); a header rule over HTTPS {rewrite_added:+.2f} ms (two TLS "
        "handshakes instead of one, one of them with a certificate made once per name). The host is a test "
        "namespace at "
        f"{INTERNET}; names resolve through a test DNS server in another namespace.",
        "",
        *targets_table([
            (f"public HTTPS adds <= {TARGETS['https_added_p50']:.0f} ms p50 per request over direct",
             f"+{added:.2f} ms", added <= TARGETS["https_added_p50"]),
            (f"egress through rules adds <= {TARGETS['egress_added_p50']:.0f} ms p50 per new connection",
             f"{proxy_added:+.2f} ms (domain rules, through the proxy)", proxy_added <= TARGETS["egress_added_p50"]),
            (f"egress through header rules adds <= {TARGETS['egress_added_p50']:.0f} ms p50 per new connection",
             f"{rewrite_added:+.2f} ms (HTTPS, intercepted)", rewrite_added <= TARGETS["egress_added_p50"]),
        ]),
    ]
    report = "\n".join(lines)
    print(report)
    if args.write:
        write_section(args.write, "network-benchmark", report, heading="Network: public URLs over TLS, egress",
                      command=f"sudo .venv/bin/python benchmarks/network.py --n {args.n} --write {args.write}")


if __name__ == "__main__":
    main()
