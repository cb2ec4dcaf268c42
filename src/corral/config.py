"""Where Corral keeps its files and which network it hands to sandboxes.

Every value has a default that works on a fresh machine and can be overridden by an environment
variable, so tests and benchmarks can run side by side with a real installation.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path


def _env_path(name: str, default: str) -> Path:
    return Path(os.environ.get(name, default))


@dataclass(frozen=True)
class Settings:
    # Durable state: sandbox records, storage volume (filesystem layers), checkpoints.
    data_dir: Path = field(default_factory=lambda: _env_path("CORRAL_DATA_DIR", "/var/lib/corral"))
    # Expensive, rebuildable artefacts keyed by their inputs: template root filesystems and snapshots.
    cache_dir: Path = field(default_factory=lambda: _env_path("CORRAL_CACHE_DIR", "/var/cache/corral"))
    # Volatile state that dies with the host: runsc's state root, OCI bundles.
    run_dir: Path = field(default_factory=lambda: _env_path("CORRAL_RUN_DIR", "/run/corral"))
    # Every sandbox gets a /30 out of this network.
    sandbox_network: ipaddress.IPv4Network = field(
        default_factory=lambda: ipaddress.IPv4Network(os.environ.get("CORRAL_SANDBOX_NETWORK", "10.201.0.0/16"))
    )
    # Short tag put into every kernel object name (netns, veth, nft table) so that two Corral instances
    # (e.g. the test suite next to a real install) never touch each other's objects.
    instance: str = field(default_factory=lambda: os.environ.get("CORRAL_INSTANCE", "c0"))
    # Size of the sparse XFS image that holds sandbox filesystems (only used blocks take disk space).
    storage_size_gb: int = field(default_factory=lambda: int(os.environ.get("CORRAL_STORAGE_GB", "256")))
    runsc: str = field(default_factory=lambda: os.environ.get("CORRAL_RUNSC", "runsc"))
    platform: str = field(default_factory=lambda: os.environ.get("CORRAL_PLATFORM", "systrap"))

    # The nameserver in every sandbox's resolv.conf; nftables DNATs it to the host's resolver. A fixed
    # address (not one out of sandbox_network) so template snapshots do not depend on the network.
    dns_address: ipaddress.IPv4Address = field(
        default_factory=lambda: ipaddress.IPv4Address(os.environ.get("CORRAL_DNS_ADDRESS", "169.254.53.53"))
    )

    # Where sandboxes reach the server itself (its DNS server, its HTTPS listener for public URLs); set by
    # `corral serve` when it serves public URLs (network/service.py), None otherwise.
    service_address: ipaddress.IPv4Address | None = field(
        default_factory=lambda: ipaddress.IPv4Address(os.environ["CORRAL_SERVICE_ADDRESS"])
        if os.environ.get("CORRAL_SERVICE_ADDRESS") else None)
    # The server serves public URLs: sandboxes' DNS goes to its DNS server at the service address, and its
    # HTTPS there is open to them (set by `corral serve`).
    public_urls: bool = False

    # Memory a restore must leave available to the host; a restore that would eat into it is refused (507).
    memory_reserve_mb: int = field(default_factory=lambda: int(os.environ.get("CORRAL_MEMORY_RESERVE_MB", "512")))
    # Registries `from_image` may reach over plain HTTP or unverified TLS (templates/images.py): host[:port]
    # patterns with shell wildcards, e.g. "registry.internal:5000,127.0.0.1:*". None by default.
    insecure_registries: tuple[str, ...] = field(default_factory=lambda: tuple(
        r.strip() for r in os.environ.get("CORRAL_INSECURE_REGISTRIES", "").split(",") if r.strip()))

    # Certificate authorities every template trusts beyond its own bundle, for networks behind a
    # TLS-intercepting proxy: PEM files, or "host" for the ones this host trusts beyond Debian's bundle
    # (/usr/local/share/ca-certificates/*.crt), or "none".
    template_ca: str = field(default_factory=lambda: os.environ.get("CORRAL_TEMPLATE_CA", "host"))

    def template_ca_pem(self) -> str:
        """The PEM text of `template_ca`."""
        if self.template_ca in ("", "none"):
            return ""
        if self.template_ca == "host":
            files = sorted(Path("/usr/local/share/ca-certificates").glob("**/*.crt"))
        else:
            files = [Path(p) for p in self.template_ca.split(",") if p]
        return "\n".join(f.read_text().strip() for f in files if f.is_file())

    @property
    def runsc_root(self) -> Path:
        return self.run_dir / "runsc"

    @property
    def storage_dir(self) -> Path:
        return self.data_dir / "storage"


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))


@dataclass(frozen=True)
class PlatformSettings:
    """The orchestrator's and API server's knobs (see docs/platform.md)."""

    # SQLAlchemy URL of the state database; SQLite in the data directory by default.
    database_url: str = field(default_factory=lambda: os.environ.get("CORRAL_DATABASE_URL", ""))
    # Sandboxes per template kept restored and waiting, so create is a claim plus /init. Each costs
    # ~14 MiB and some idle CPU (docs/benchmarks.md), hence a small default.
    pool_size: int = field(default_factory=lambda: _env_int("CORRAL_POOL_SIZE", 2))
    pool_templates: tuple[str, ...] = field(
        default_factory=lambda: tuple(t for t in os.environ.get("CORRAL_POOL_TEMPLATES", "base").split(",") if t))
    # Containers kept created (network, disk, `runsc create`) and ready for a restore, so a create that
    # misses the warm pool restores in ~0.1 s instead of ~0.3 s.
    prepared_pool_size: int = field(default_factory=lambda: _env_int("CORRAL_PREPARED_POOL", 4))
    # After a pause, the resume's container is prepared and held (frozen, no CPU) for this long, so a
    # resume within it skips ~130 ms of setup (orchestrator/capacity.py). 0 turns it off.
    resume_warm_s: float = field(default_factory=lambda: float(os.environ.get("CORRAL_RESUME_WARM_S", "600")))
    # How many paused sandboxes are held ready at most; a new pause releases the oldest beyond that.
    resume_warm_max: int = field(default_factory=lambda: _env_int("CORRAL_RESUME_WARM_MAX", 16))
    # Starts (restores and cold boots) that run at once, users' and refills' together; 0: max(2, cores).
    restore_budget: int = field(default_factory=lambda: _env_int("CORRAL_RESTORE_BUDGET", 0))
    default_timeout_s: int = 300
    # 0 means no maximum: sandboxes may live as long as their owner keeps extending them.
    max_timeout_s: int = field(default_factory=lambda: _env_int("CORRAL_MAX_TIMEOUT_S", 0))
    metrics_interval_s: float = field(default_factory=lambda: float(os.environ.get("CORRAL_METRICS_INTERVAL_S", "5")))
    # Samples kept per sandbox (720 x 5 s = one hour).
    metrics_kept: int = field(default_factory=lambda: _env_int("CORRAL_METRICS_KEPT", 720))
    # The idle policy (orchestrator/idle.py): a sandbox with no request through the proxy and little CPU
    # for this long is frozen (no CPU; thawed in ~1 ms by the next request). 0 turns it off.
    idle_freeze_s: float = field(default_factory=lambda: float(os.environ.get("CORRAL_IDLE_FREEZE_S", "10")))
    # ... and sooner when it was created from a template and has had no request yet (0: no sooner).
    idle_fresh_s: float = field(default_factory=lambda: float(os.environ.get("CORRAL_IDLE_FRESH_S", "1")))
    # Frozen sandboxes run for a second this often, so their timers still fire (late by up to this).
    idle_breathe_every_s: float = field(
        default_factory=lambda: float(os.environ.get("CORRAL_IDLE_BREATHE_S", "10")))
    # Template builds (docs/templates.md): at most this many run at once, the rest wait ("waiting").
    max_concurrent_builds: int = field(default_factory=lambda: _env_int("CORRAL_MAX_BUILDS", 2))
    build_timeout_s: float = field(default_factory=lambda: float(os.environ.get("CORRAL_BUILD_TIMEOUT_S", "3600")))
    # Disk the cache of build step layers may take before unused layers are evicted.
    build_cache_gb: float = field(default_factory=lambda: float(os.environ.get("CORRAL_BUILD_CACHE_GB", "50")))

    # Volumes (docs/volumes.md): the size a volume gets when its create names none, and the largest allowed.
    volume_default_mb: int = field(default_factory=lambda: _env_int("CORRAL_VOLUME_DEFAULT_MB", 1024))
    volume_max_mb: int = field(default_factory=lambda: _env_int("CORRAL_VOLUME_MAX_MB", 100 * 1024))

    # Desktop recordings (docs/desktop.md): the longest and largest one, and how many an API key may store.
    recording_max_s: int = field(default_factory=lambda: _env_int("CORRAL_RECORDING_MAX_S", 3600))
    recording_max_mb: int = field(default_factory=lambda: _env_int("CORRAL_RECORDING_MAX_MB", 512))
    recordings_per_key: int = field(default_factory=lambda: _env_int("CORRAL_RECORDINGS_PER_KEY", 100))

    # Usage metering (docs/operations.md): how often running sandboxes' and checkpoints' usage is recorded
    # (what a crash can leave to the next server, never lose); prices come from CORRAL_PRICES.
    metering_interval_s: float = field(default_factory=lambda: float(os.environ.get("CORRAL_METERING_INTERVAL_S",
                                                                                    "10")))

    # Lifecycle and operations events (docs/operations.md) older than this are deleted (0: kept forever).
    events_keep_days: float = field(default_factory=lambda: float(os.environ.get("CORRAL_EVENTS_KEEP_DAYS", "30")))

    # Webhook deliveries may also reach loopback, private, link-local and this server's addresses
    # (docs/operations.md); by default they go to public addresses only.
    webhooks_allow_private: bool = field(
        default_factory=lambda: os.environ.get("CORRAL_WEBHOOKS_ALLOW_PRIVATE", "").lower() in ("1", "true", "yes"))

    # Who may scrape GET /metrics (docs/operations.md): with a token, scrapes that send it as a bearer token;
    # public, anyone who reaches the listener; neither, clients on loopback only.
    metrics_token: str = field(default_factory=lambda: os.environ.get("CORRAL_METRICS_TOKEN", ""))
    metrics_public: bool = field(
        default_factory=lambda: os.environ.get("CORRAL_METRICS_PUBLIC", "").lower() in ("1", "true", "yes"))

    def secrets_key_file(self, settings: Settings) -> Path:
        """The key secrets are sealed with (control/secrets.py): CORRAL_SECRETS_KEY_FILE, else in the data
        directory."""
        return Path(os.environ.get("CORRAL_SECRETS_KEY_FILE") or settings.data_dir / "secrets.key")

    def resolved_database_url(self, settings: Settings) -> str:
        return self.database_url or f"sqlite:///{settings.data_dir / 'corral.db'}"


def load_settings() -> Settings:
    return Settings()
