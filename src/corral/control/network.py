"""A sandbox's network options as E2B's API takes them (`network` on create, `PUT /sandboxes/{id}/network`),
validated with E2B's messages. Ingress options are enforced by the proxy (`Ingress`); egress rules by
address (`Egress`: allowOut/denyOut addresses and CIDRs) and the internet switch by the runtime's
firewall, by domain name by the host's egress proxy. Header rules, DNS servers and an upstream proxy are
refused with a 400 rather than accepted and not enforced (docs/network.md)."""

from __future__ import annotations

import ipaddress
import re
import secrets
from dataclasses import dataclass, field

from corral.control.errors import ApiError
from corral.envd import DEFAULT_PORT as ENVD_PORT

TRAFFIC_TOKEN_HEADER = "e2b-traffic-access-token"
UNSUPPORTED_KEYS: tuple[str, ...] = ()
# E2B's limits on network.rules.
MAX_RULE_DOMAINS, MAX_RULE_HEADERS, MAX_HEADER_NAME, MAX_HEADER_VALUE, MAX_RULE_DOMAIN = 10, 20, 64, 2048, 128
MAX_SECRETS_PER_DOMAIN = 32
_PLACEHOLDER = re.compile(r"\$\{e2b\.secrets\.([A-Za-z0-9_-]{1,128})\}")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP header name (RFC 9110 token)
MALFORMED = "Network transform header contains a malformed E2B placeholder."
# Headers that frame or route the request: the egress proxy sets them itself.
_RESERVED_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "upgrade", "keep-alive", "te",
                     "trailer", "proxy-connection", "proxy-authorization", "proxy-authenticate"}
_VISIBLE = re.compile(r"^[\t\x20-\x7e]*$")
# E2B's own answer where its egress proxy option is off, so SDK users see what they would there.
EGRESS_PROXY_REFUSAL = "Egress proxy (network.egressProxy) is not enabled for this team."
MAX_EGRESS_ENTRIES = 1000
ALL_TRAFFIC = "0.0.0.0/0"
# What E2B accepts as a masked Host: a host name or address, an optional port, `${PORT}` anywhere.
_MASK = re.compile(r"^[A-Za-z0-9.\-\[\]:]+(:(\d{1,5}|\$\{PORT\}))?$")
_DOMAIN = re.compile(r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z][A-Za-z0-9-]*$")


@dataclass(frozen=True)
class Ingress:
    """How the proxy treats requests to a sandbox's ports."""

    traffic_token: str | None = None  # set: non-envd ports need it in `e2b-traffic-access-token`
    mask_request_host: str | None = None  # Host sent to the sandbox instead of the public one
    https_ports: frozenset[int] = field(default_factory=frozenset)  # spoken to over HTTPS (unverified)

    def host_for(self, port: int) -> str | None:
        if self.mask_request_host is None or port == ENVD_PORT:
            return None
        return self.mask_request_host.replace("${PORT}", str(port))

    def token_refusal(self, port: int, given: str | None) -> str | None:
        """E2B's message when a request to `port` lacks the right traffic token, else None."""
        if self.traffic_token is None or port == ENVD_PORT:
            return None
        if given is None:
            return (f"Sandbox is secured with traffic access token. Token header '{TRAFFIC_TOKEN_HEADER}' "
                    "is missing")
        if not secrets.compare_digest(given.encode(), self.traffic_token.encode()):
            return (f"Sandbox is secured with traffic access token. Provided token in header "
                    f"'{TRAFFIC_TOKEN_HEADER}' is invalid")
        return None

    def for_another_sandbox(self) -> Ingress:
        """The same options for a new sandbox (a fork, a start from a snapshot): its own token."""
        if self.traffic_token is None:
            return self
        return Ingress(secrets.token_urlsafe(24), self.mask_request_host, self.https_ports)

    def to_record(self) -> dict:
        return {"trafficToken": self.traffic_token, "maskRequestHost": self.mask_request_host,
                "httpsPorts": sorted(self.https_ports)}

    @classmethod
    def from_record(cls, data: dict | None) -> Ingress:
        data = data or {}
        return cls(traffic_token=data.get("trafficToken"), mask_request_host=data.get("maskRequestHost"),
                   https_ports=frozenset(data.get("httpsPorts") or ()))

    def as_read_back(self) -> dict:
        """`get_info().network`'s ingress part, in the create body's keys (no token: it is secret)."""
        shown: dict = {"allowPublicTraffic": self.traffic_token is None}
        if self.mask_request_host is not None:
            shown["maskRequestHost"] = self.mask_request_host
        if self.https_ports:
            shown["httpsPorts"] = sorted(self.https_ports)
        return shown


def _bad(message: str) -> ApiError:
    return ApiError(400, message)


def refuse_egress_options(network: dict) -> None:
    """What is not enforced yet is refused: a sandbox must never run believing it is fenced in."""
    if network.get("egressProxy") not in (None, {}):
        raise ApiError(403, EGRESS_PROXY_REFUSAL)
    for key in UNSUPPORTED_KEYS:
        if network.get(key) not in (None, [], {}):
            raise _bad(f"network.{key} is not supported by this server yet (egress rules by address and domain "
                       f"are; header rules and secrets are not)")
    dns = network.get("dnsServers")
    if dns not in (None, []):
        raise _bad("network.dnsServers is not supported by this server yet")


@dataclass(frozen=True)
class Egress:
    """Egress rules by address, as normalised CIDRs: `allow` wins over `deny` and over the internet switch;
    private ranges, the host and other sandboxes stay closed whatever they say."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()  # names (lower case; `*.x` wildcards, `*`) for ports 80 and 443
    # Header rules: host pattern -> {"headers": {header: template}, "methods": [...], "pathPrefixes": [...]}
    # (`${e2b.secrets.<name>}` resolved in the proxy; methods and path prefixes: Corral's extension).
    rules: dict[str, dict] = field(default_factory=dict)

    def to_record(self) -> dict:
        return {"allowOut": list(self.allow), "denyOut": list(self.deny), "allowDomains": list(self.domains),
                "rules": self.rules}

    @classmethod
    def from_record(cls, data: dict | None) -> Egress:
        data = data or {}
        return cls(tuple(data.get("allowOut") or ()), tuple(data.get("denyOut") or ()),
                   tuple(data.get("allowDomains") or ()), dict(data.get("rules") or {}))

    def as_read_back(self) -> dict:
        shown: dict = {}
        if self.allow or self.domains:
            shown["allowOut"] = [*self.allow, *self.domains]
        if self.deny:
            shown["denyOut"] = list(self.deny)
        if self.rules:
            shown["rules"] = {host: [_rule_read_back(rule)] for host, rule in self.rules.items()}
        return shown


def _entries(network: dict, key: str) -> list[str]:
    value = network.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(f"network.{key} must be a list of strings")
    if len(value) > MAX_EGRESS_ENTRIES:
        raise _bad(f"network.{key} has {len(value)} entries; at most {MAX_EGRESS_ENTRIES} are allowed")
    return value


def _cidr(text: str) -> ipaddress.IPv4Network | None:
    try:
        network = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return None
    return network if isinstance(network, ipaddress.IPv4Network) else None


def _looks_like_a_domain(text: str) -> bool:
    return text == "*" or bool(_DOMAIN.match(text))


def egress_from(network: dict | None) -> Egress:
    """The allowOut/denyOut of a create or update body, with E2B's 400 messages."""
    if not network:
        return Egress()
    allow, deny, domains = [], [], []
    for entry in _entries(network, "allowOut"):
        cidr = _cidr(entry)
        if cidr is not None:
            allow.append(str(cidr))
        elif _looks_like_a_domain(entry) and len(entry) <= 253:
            domains.append(entry.lower().rstrip("."))
        else:
            raise _bad(f"invalid allowed address {entry}")
    for entry in _entries(network, "denyOut"):
        cidr = _cidr(entry)
        if cidr is None or (cidr.network_address == ipaddress.IPv4Address(0) and cidr.prefixlen != 0):
            raise _bad(f"invalid denied CIDR {entry}")
        deny.append(str(cidr))
    rules = rules_from(network.get("rules"))
    if domains and ALL_TRAFFIC not in deny:
        raise _bad("When specifying allowed domains in allow out, you must include 'ALL_TRAFFIC' in deny out to "
                   "block all other traffic.")
    return Egress(tuple(dict.fromkeys(allow)), tuple(dict.fromkeys(deny)), tuple(dict.fromkeys(domains)), rules)


def _rule_read_back(rule: dict) -> dict:
    shown: dict = {"transform": {"headers": dict(rule.get("headers") or {})}}
    for key in ("methods", "pathPrefixes"):
        if rule.get(key):
            shown[key] = list(rule[key])
    return shown


def rules_from(raw) -> dict[str, dict]:
    """`network.rules` (`{host: [{"transform": {"headers": {...}}}]}`) with E2B's limits and messages."""
    if raw in (None, {}):
        return {}
    if not isinstance(raw, dict):
        raise _bad("network.rules must be an object of host names")
    if len(raw) > MAX_RULE_DOMAINS:
        raise _bad(f"network.rules has {len(raw)} domains; at most {MAX_RULE_DOMAINS} are allowed")
    rules: dict[str, dict] = {}
    for host, entries in raw.items():
        pattern = host.lower().rstrip(".") if isinstance(host, str) else ""
        if not pattern or len(pattern) > MAX_RULE_DOMAIN or pattern == "*" or not _DOMAIN.match(pattern):
            raise _bad(f"network.rules: {host!r} is not a valid domain")
        if pattern.startswith("*.") and "." not in pattern[2:]:
            raise _bad(f"network.rules: {host!r} is too broad (a wildcard needs a domain of at least two labels)")
        if not isinstance(entries, list) or len(entries) != 1 or not isinstance(entries[0], dict):
            raise _bad(f"network.rules[{host}]: exactly one rule per domain")
        transform = entries[0].get("transform")
        headers = (transform.get("headers") if isinstance(transform, dict) else None) or {}
        methods, prefixes = _scope(entries[0], host)
        if not isinstance(headers, dict) or not (headers or methods or prefixes):
            raise _bad(f"network.rules[{host}]: a rule needs transform.headers (or methods or pathPrefixes)")
        if len(headers) > MAX_RULE_HEADERS:
            raise _bad(f"network.rules[{host}]: at most {MAX_RULE_HEADERS} headers")
        names: set[str] = set()
        for name, value in headers.items():
            if not isinstance(name, str) or len(name) > MAX_HEADER_NAME or not _TOKEN.match(name):
                raise _bad(f"network.rules[{host}]: {name!r} is not a valid header name")
            if name.lower() in _RESERVED_HEADERS:
                raise _bad(f"network.rules[{host}]: {name} cannot be set by a rule (the proxy owns it)")
            if not isinstance(value, str) or len(value) > MAX_HEADER_VALUE or not _VISIBLE.match(value):
                raise _bad(f"network.rules[{host}]: the value of {name} is not a valid header value")
            names |= set(_PLACEHOLDER.findall(value))
            if "${" in _PLACEHOLDER.sub("", value):
                if "${e2b.identity." in value:
                    raise _bad("iam identity tokens are not supported by this server (no identity provider to "
                               "mint JWT-SVIDs)")
                raise _bad(MALFORMED)
        if len(names) > MAX_SECRETS_PER_DOMAIN:
            raise _bad(f"network.rules[{host}]: at most {MAX_SECRETS_PER_DOMAIN} distinct secrets")
        rules[pattern] = {"headers": dict(headers), "methods": methods, "pathPrefixes": prefixes}
    return rules


def _scope(rule: dict, host: str) -> tuple[list[str], list[str]]:
    """Corral's extension to a rule (through the REST API: the SDKs pass on only transform.headers): the
    methods and path prefixes allowed to the domain; anything else is answered 403 by the proxy."""
    methods, prefixes = rule.get("methods") or [], rule.get("pathPrefixes") or []
    if not isinstance(methods, list) or not all(isinstance(m, str) and _TOKEN.match(m) for m in methods):
        raise _bad(f"network.rules[{host}].methods must be a list of HTTP methods")
    if not isinstance(prefixes, list) or not all(isinstance(p, str) and p.startswith("/") and len(p) <= 1024
                                                 for p in prefixes):
        raise _bad(f"network.rules[{host}].pathPrefixes must be a list of paths starting with '/'")
    return [m.upper() for m in methods], list(prefixes)


def refuse_iam(iam: dict | None) -> None:
    """Identity tokens minted for the sandbox (`iam={"tokens": ...}`) need an identity provider this server
    does not have: refused rather than sent as the literal placeholder."""
    if iam and iam.get("tokens"):
        raise _bad("iam identity tokens are not supported by this server (no identity provider to mint "
                   "JWT-SVIDs); create the sandbox without `iam`")


def ingress_from_create(network: dict | None) -> Ingress:
    """The ingress options of a create body's `network`; 400 with E2B's message when malformed."""
    if network is None:
        return Ingress()
    if not isinstance(network, dict):
        raise _bad("network must be an object")
    refuse_egress_options(network)
    public = network.get("allowPublicTraffic")
    if public is not None and not isinstance(public, bool):
        raise _bad("network.allowPublicTraffic must be a boolean")
    mask = network.get("maskRequestHost")
    if mask is not None and (not isinstance(mask, str) or not mask or len(mask) > 255 or not _MASK.match(mask)):
        raise _bad(f"mask request host is not valid: {mask}")
    ports = network.get("httpsPorts") or []
    if not isinstance(ports, list) or not all(isinstance(p, int) and not isinstance(p, bool) for p in ports):
        raise _bad("network.httpsPorts must be a list of port numbers")
    for port in ports:
        if not 1 <= port <= 65535:
            raise _bad(f"https port {port} is not a valid port")
        if port == ENVD_PORT:
            raise _bad(f"https port {port} is not allowed: it is envd's port")
    return Ingress(traffic_token=None if public is not False else secrets.token_urlsafe(24),
                   mask_request_host=mask, https_ports=frozenset(ports))
