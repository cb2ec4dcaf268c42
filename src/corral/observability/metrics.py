"""The server's Prometheus metrics (`GET /metrics`, docs/operations.md), in a registry of its own per server
(tests run several servers in one process).

Two kinds:
- what happened, recorded where it happens: latency histograms of create, resume and fork, creates per API
  key, template builds;
- what is, read from its one owner when Prometheus scrapes (`render`): sandboxes by state and template
  (the database), pool levels and restore failures (the capacity manager), proxy traffic (the proxy's
  plain counters). Nothing keeps a second count of these that could drift.

Labels never carry sandbox ids (one series per sandbox would grow without bound) nor anything secret: API
keys appear by their id, which `corral keys ls` shows and which grants nothing."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from corral.control.plane import ControlPlane
    from corral.proxy.proxy import ProxyTraffic

# Seconds: a create from the pool takes ~0.1 s, a cold restore ~0.5 s, a fork of many a few seconds.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BUILD_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
# Per-team usage counters (all time, as of the last metering flush) and what each is read from.
TEAM_USAGE = {
    "vcpu_seconds": "vCPU-seconds of the team's running sandboxes.",
    "memory_gib_seconds": "Memory GiB-seconds (allocated) of the team's running sandboxes.",
    "disk_gib_hours": "Disk GiB-hours (allocated) of the team's running sandboxes.",
    "snapshot_gib_hours": "GiB-hours of the team's checkpoints (pauses, snapshots, fork points).",
    "build_minutes": "Minutes of the team's template builds.",
    "cost": "Cost of the team's usage by the price table (CORRAL_PRICES), in its currency.",
}
TEAM_USAGE_SOURCE = {"vcpu_seconds": "vcpu_s", "memory_gib_seconds": "memory_gib_s", "disk_gib_hours": "disk_gib_h",
                     "snapshot_gib_hours": "snapshot_gib_h", "build_minutes": "build_min", "cost": "cost"}


@dataclass
class ServerState:
    """What the scrape-time metrics read, gathered in one go before the registry is rendered."""

    sandboxes: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (state, template) -> count
    pool_ready: Mapping[str, int] = field(default_factory=dict)  # template -> ready sandboxes
    prepared_containers: int = 0
    resume_ready: int = 0
    restore_failures: Mapping[str, int] = field(default_factory=dict)
    proxy_responses: Sequence[int] = (0,) * 6  # by status class, index 1..5
    proxy_bytes_in: int = 0
    proxy_bytes_out: int = 0
    # Each team's usage so far, as recorded by the last metering flush: team id -> the usage row (quantities and
    # cost), from control/metering.py.
    team_usage: Mapping[str, Mapping[str, float]] = field(default_factory=dict)


class _StateCollector:
    """Yields the scrape-time metrics from the last `ServerState` it was given."""

    def __init__(self) -> None:
        self.state = ServerState()

    def describe(self) -> list[Metric]:
        return []  # names checked at collect time only; nothing else registers them

    def collect(self):
        state = self.state
        sandboxes = GaugeMetricFamily("corral_sandboxes", "Sandboxes by state (running, paused) and template.",
                                      labels=["state", "template"])
        for (status, template), count in sorted(state.sandboxes.items()):
            sandboxes.add_metric([status, template], count)
        yield sandboxes
        ready = GaugeMetricFamily("corral_pool_ready_sandboxes",
                                  "Started sandboxes waiting in the pool to be claimed, per pooled template.",
                                  labels=["template"])
        for template, count in sorted(state.pool_ready.items()):
            ready.add_metric([template], count)
        yield ready
        yield GaugeMetricFamily("corral_pool_prepared_containers",
                                "Containers prepared ahead for restores (templates' stock, paused sandboxes' "
                                "resumes, forks' clones).", value=state.prepared_containers)
        yield GaugeMetricFamily("corral_pool_resume_ready",
                                "Paused sandboxes whose resume is prepared right now.", value=state.resume_ready)
        failures = CounterMetricFamily("corral_restore_failures",
                                       "Failed starts from a memory snapshot: in a container prepared ahead "
                                       "(container=prepared, a new one is tried next) or in a new one "
                                       "(container=new, the start fails).", labels=["container"])
        for container in ("prepared", "new"):
            failures.add_metric([container], state.restore_failures.get(container, 0))
        yield failures
        requests = CounterMetricFamily("corral_proxy_requests",
                                       "Requests the sandbox proxy answered, by status class (WebSockets accepted: "
                                       "1xx).", labels=["status_class"])
        for index, status_class in enumerate(STATUS_CLASSES, start=1):
            requests.add_metric([status_class], state.proxy_responses[index])
        yield requests
        yield CounterMetricFamily("corral_proxy_received_bytes",
                                  "Body bytes the proxy received from clients for sandboxes (requests and "
                                  "WebSocket messages).", value=state.proxy_bytes_in)
        yield CounterMetricFamily("corral_proxy_sent_bytes",
                                  "Body bytes the proxy sent to clients from sandboxes (responses and WebSocket "
                                  "messages).", value=state.proxy_bytes_out)
        for quantity, help_text in TEAM_USAGE.items():
            family = CounterMetricFamily(f"corral_team_{quantity}", help_text, labels=["team_id"])
            for team_id, usage in sorted(state.team_usage.items()):
                family.add_metric([team_id], usage.get(TEAM_USAGE_SOURCE[quantity], 0.0))
            yield family


class ServerMetrics:
    """One server's metrics. Components record into the histograms and counters; `render` reads the rest."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.create_seconds = Histogram(
            "corral_sandbox_create_seconds", "Time to create a sandbox, from a template or a snapshot (successful "
            "creates).", buckets=LATENCY_BUCKETS, registry=registry)
        self.resume_seconds = Histogram(
            "corral_sandbox_resume_seconds", "Time to resume a paused sandbox.", buckets=LATENCY_BUCKETS,
            registry=registry)
        self.fork_seconds = Histogram(
            "corral_sandbox_fork_seconds", "Time to fork a sandbox, all its clones (one observation per fork "
            "call).", buckets=LATENCY_BUCKETS, registry=registry)
        self.creates = Counter(
            "corral_sandbox_creates", "Sandbox creates by API key id and outcome (ok, error).",
            ["key_id", "outcome"], registry=registry)
        self.template_builds = Counter(
            "corral_template_builds", "Template builds finished, by result (ready, error).", ["result"],
            registry=registry)
        self.template_build_seconds = Histogram(
            "corral_template_build_seconds", "Time a template build took, from its start to ready or error.",
            buckets=BUILD_BUCKETS, registry=registry)
        self._state = _StateCollector()
        registry.register(self._state)
        # The sandbox proxy's counters (server.py hands them over); none on a server without a proxy.
        self.proxy: ProxyTraffic | None = None

    def created(self, key_id: str, seconds: float | None) -> None:
        """A create finished: `seconds` it took, or None when it failed."""
        self.creates.labels(key_id, "ok" if seconds is not None else "error").inc()
        if seconds is not None:
            self.create_seconds.observe(seconds)

    def build_finished(self, ready: bool, seconds: float) -> None:
        self.template_builds.labels("ready" if ready else "error").inc()
        self.template_build_seconds.observe(seconds)

    async def render(self, plane: ControlPlane) -> bytes:
        """The Prometheus text exposition, with the scrape-time metrics read now."""
        self._state.state = await gather_state(plane, self.proxy)
        return generate_latest(self.registry)


async def gather_state(plane: ControlPlane, proxy: ProxyTraffic | None) -> ServerState:
    capacity = plane.orchestrator.capacity
    # What the capacity manager holds is read before any await: a refill finishing meanwhile would hide a claim.
    state = ServerState(
        pool_ready={template: capacity.ready(template) for template in capacity.ready_templates},
        prepared_containers=len(capacity.prepared_ids()), resume_ready=capacity.resume_ready(),
        restore_failures=Tally(capacity.restore_failures),
        proxy_responses=tuple(proxy.responses) if proxy is not None else (0,) * 6,
        proxy_bytes_in=proxy.bytes_in if proxy is not None else 0,
        proxy_bytes_out=proxy.bytes_out if proxy is not None else 0)
    state.sandboxes = await plane.sandboxes.count_by_state_and_template()
    if (meter := getattr(plane, "meter", None)) is not None:
        state.team_usage = {row["team"]: row for row in await meter.usage(None, group_by=("team",))}
    return state


# Where components not part of a server (tools, tests) record: nobody scrapes it.
UNSCRAPED = ServerMetrics()
