"""`corral teams` and `corral keys`: teams, and their API keys with scopes, expiry and limits. These work on
this installation's database directly (run them on the server's machine, as its user), like `corral serve`."""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import datetime

import typer
from rich.console import Console
from rich.table import Table

from corral.config import PlatformSettings, load_settings

keys_app = typer.Typer(no_args_is_help=True, help="Create, list and revoke API keys (each belongs to a team).")
teams_app = typer.Typer(no_args_is_help=True, help="Teams: each key of a team sees and acts on all of the team's "
                                                   "sandboxes, templates, volumes and secrets.")
console = Console()
errors = Console(stderr=True)

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _database():
    from corral.control.db import open_database

    settings = load_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return open_database(PlatformSettings().resolved_database_url(settings))


def _keys():
    from corral.control.keys import ApiKeys

    return ApiKeys(_database())


def _fail(message: str) -> typer.Exit:
    errors.print(f"[red]error:[/red] {message}")
    return typer.Exit(1)


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).isoformat(" ", "seconds") if ts else ""


def parse_duration(text: str) -> int:
    """`30d`, `12h`, `90m`, `45s`, `2w` in seconds."""
    match = _DURATION.match(text.strip().lower())
    if not match or int(match.group(1)) == 0:
        raise typer.BadParameter(f"{text!r} is not a duration like 90m, 12h, 30d or 2w")
    return int(match.group(1)) * _UNIT_S[match.group(2)]


@keys_app.command("create")
def keys_create(
    name: str = typer.Option("default", help="A name to tell keys apart."),
    team: str = typer.Option(None, help="The team (id or name) the key belongs to; without it the key gets a new "
                                        "team of its own."),
    scope: list[str] = typer.Option(None, "--scope", help="What the key may do; repeat for several (read, "
                                                         "sandboxes, execute, templates, secrets, volumes, admin). "
                                                         "Default: all but admin."),
    expires_in: str = typer.Option(None, "--expires-in", help="The key stops working after this long (90m, 12h, "
                                                             "30d, 2w)."),
    templates: str = typer.Option(None, help="Comma-separated templates it may start sandboxes of (default: any)."),
    max_timeout: int = typer.Option(None, help="Longest sandbox timeout it may ask for, in seconds."),
    max_vcpus: float = typer.Option(None, help="Most vCPUs a sandbox it starts may have."),
    max_memory_mb: int = typer.Option(None, help="Most memory (MB) a sandbox it starts may have."),
    max_concurrent: int = typer.Option(None, help="Most sandboxes it may have running at once."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Create an API key; it is printed once and stored only as a hash."""
    from corral.control.keys import KeyLimits, TeamNotFound
    from corral.control.scopes import UnknownScope

    for value, option in ((max_timeout, "--max-timeout"), (max_memory_mb, "--max-memory-mb"),
                          (max_concurrent, "--max-concurrent")):
        if value is not None and value < 1:
            raise _fail(f"{option} must be at least 1")
    if max_vcpus is not None and max_vcpus <= 0:
        raise _fail("--max-vcpus must be above 0")
    limits = KeyLimits(templates=tuple(t.strip() for t in templates.split(",") if t.strip()) if templates else None,
                       max_timeout_s=max_timeout, max_vcpus=max_vcpus, max_memory_mb=max_memory_mb,
                       max_concurrent=max_concurrent)
    expires_at = time.time() + parse_duration(expires_in) if expires_in else None
    try:
        key, secret = asyncio.run(_keys().create(name, team=team, scopes=scope or None, expires_at=expires_at,
                                                 limits=limits))
    except TeamNotFound:
        raise _fail(f"no team {team!r} (see `corral teams ls`)") from None
    except UnknownScope as e:
        raise _fail(str(e)) from None
    if as_json:
        print(json.dumps({"id": key.id, "name": key.name, "key": secret, "team": key.team_id,
                          "scopes": sorted(key.scopes), "expires_at": key.expires_at}))
    else:
        print(secret)


@keys_app.command("ls")
def keys_ls(team: str = typer.Option(None, help="Only this team's keys (id or name)."),
            as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List API keys (never the keys themselves)."""
    from corral.control.keys import TeamNotFound

    try:
        keys = asyncio.run(_keys().list(team))
    except TeamNotFound:
        raise _fail(f"no team {team!r} (see `corral teams ls`)") from None
    now = time.time()

    def state(k) -> str:
        if k.revoked_at:
            return "revoked"
        return "expired" if k.expires_at is not None and k.expires_at <= now else "active"

    if as_json:
        print(json.dumps([{"id": k.id, "name": k.name, "prefix": k.prefix, "team": k.team_id,
                           "scopes": sorted(k.scopes), "limits": k.limits.to_record() or {},
                           "created_at": k.created_at, "expires_at": k.expires_at, "revoked": k.revoked_at is not None,
                           "state": state(k)} for k in keys]))
        return
    table = Table("id", "name", "team", "key starts", "scopes", "limits", "created", "expires", "state")
    for k in keys:
        limits = ", ".join(f"{name}={value if not isinstance(value, list) else '|'.join(value)}"
                           for name, value in (k.limits.to_record() or {}).items())
        table.add_row(k.id, k.name, k.team_id, k.prefix + "…", " ".join(sorted(k.scopes)), limits,
                      _when(k.created_at), _when(k.expires_at), state(k))
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="The key's id (see `corral keys ls`).")) -> None:
    """Revoke an API key: requests with it are refused from now on."""
    from corral.control.keys import KeyNotFound

    try:
        key = asyncio.run(_keys().revoke(key_id))
    except KeyNotFound:
        raise _fail(f"no API key with id {key_id}") from None
    print(f"revoked {key.id} ({key.name})")


@teams_app.command("create")
def teams_create(name: str = typer.Argument(..., help="The team's name (letters, digits, '.', '_', '-')."),
                 as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Create a team; then give it keys with `corral keys create --team NAME`."""
    from corral.control.keys import TeamExists

    try:
        team = asyncio.run(_keys().create_team(name))
    except TeamExists:
        raise _fail(f"a team named {name!r} exists already") from None
    except ValueError as e:
        raise _fail(str(e)) from None
    print(json.dumps({"id": team.id, "name": team.name}) if as_json else team.id)


_SETTINGS = ("max_concurrent", "max_vcpus", "max_memory_mb", "max_lifetime_s", "creates_per_s", "budget", "warn_at",
             "cap_policy")


@teams_app.command("set")
def teams_set(
    team: str = typer.Argument(..., help="The team's id or name."),
    max_concurrent: int = typer.Option(None, help="Most sandboxes running at once."),
    max_vcpus: float = typer.Option(None, help="Most vCPUs of its running sandboxes together."),
    max_memory_mb: int = typer.Option(None, help="Most memory (MB) of its running sandboxes together."),
    max_lifetime: str = typer.Option(None, help="Longest a sandbox may live from its start (90m, 12h, 2d)."),
    creates_per_second: float = typer.Option(None, help="Sandbox creates per second (429 with Retry-After above)."),
    budget: float = typer.Option(None, help="Monthly budget, in the price table's currency (docs/operations.md)."),
    warn_at: str = typer.Option(None, help="Comma-separated percentages of the budget that raise a warning "
                                           "(default 50,80,100)."),
    cap_policy: str = typer.Option(None, help="At the cap, running sandboxes 'finish' (default) or 'pause'."),
    unset: list[str] = typer.Option(None, "--unset", help="Remove a setting (e.g. --unset max_concurrent); repeat "
                                                          "for several."),
) -> None:
    """Set a team's quotas and spending cap; they apply from the next request on."""
    from corral.control.keys import TeamNotFound

    changes: dict = {}
    for name, value in (("max_concurrent", max_concurrent), ("max_vcpus", max_vcpus),
                        ("max_memory_mb", max_memory_mb), ("creates_per_s", creates_per_second), ("budget", budget),
                        ("cap_policy", cap_policy)):
        if value is not None:
            changes[name] = value
    if max_lifetime is not None:
        changes["max_lifetime_s"] = parse_duration(max_lifetime)
    if warn_at is not None:
        try:
            changes["warn_at"] = [float(p) for p in warn_at.split(",") if p.strip()]
        except ValueError:
            raise _fail(f"--warn-at takes percentages like 50,80,100, not {warn_at!r}") from None
    for name in unset or ():
        if name not in _SETTINGS:
            raise _fail(f"--unset takes one of {', '.join(_SETTINGS)}, not {name!r}")
        changes[name] = None
    if not changes:
        raise _fail("nothing to set (see --help)")
    try:
        row = asyncio.run(_keys().update_team(team, **changes))
    except TeamNotFound:
        raise _fail(f"no team {team!r} (see `corral teams ls`)") from None
    except ValueError as e:
        raise _fail(str(e)) from None
    print(json.dumps({"id": row.id, "name": row.name, **{name: getattr(row, name) for name in _SETTINGS}}))


@teams_app.command("ls")
def teams_ls(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List teams with their number of active keys, quotas and budget."""
    keys = _keys()
    teams = asyncio.run(keys.teams())
    rows = {t.id: asyncio.run(keys.team_row(t.id)) for t in teams}
    if as_json:
        print(json.dumps([{"id": t.id, "name": t.name, "created_at": t.created_at, "keys": t.keys,
                           **{name: getattr(rows[t.id], name) for name in _SETTINGS}} for t in teams]))
        return
    table = Table("id", "name", "keys", "quotas", "budget", "created")
    for t in teams:
        row = rows[t.id]
        quotas = ", ".join(f"{name}={getattr(row, name):g}" for name in _SETTINGS[:5] if getattr(row, name) is not None)
        budget = "" if row.budget is None else f"{row.budget:g} ({row.cap_policy or 'finish'} at the cap)"
        table.add_row(t.id, t.name, str(t.keys), quotas, budget, _when(t.created_at))
    console.print(table)


def usage_command(
    team: str = typer.Option(None, help="Only this team (id or name); default: every team."),
    start: str = typer.Option(None, "--from", help="First UTC day, YYYY-MM-DD (default: the first of this month)."),
    end: str = typer.Option(None, "--to", help="Last UTC day, YYYY-MM-DD (included; default: today)."),
    by: str = typer.Option("day", help="Comma-separated groups: day, month, template, key, team ('' for one total)."),
    csv_out: bool = typer.Option(False, "--csv", help="Print CSV (for spreadsheets) instead of a table."),
) -> None:
    """Usage and its cost from this installation's database (run on the server's machine): vCPU-seconds,
    memory GiB-seconds, disk and snapshot GiB-hours, build minutes, priced with CORRAL_PRICES. Records the
    usage of running sandboxes up to now first (safe beside a running server: each second counts once)."""
    import csv
    import datetime as dt
    import sys

    from corral.control.keys import ApiKeys, TeamNotFound
    from corral.control.metering import QUANTITIES, Meter, Prices, Usage

    database = _database()
    keys = ApiKeys(database)
    try:
        prices = Prices.from_env()
    except ValueError as e:
        raise _fail(str(e)) from None
    groups = tuple(g.strip() for g in by.split(",") if g.strip())
    today = dt.datetime.now(dt.UTC).date()
    for value, option in ((start, "--from"), (end, "--to")):
        if value is not None:
            try:
                dt.date.fromisoformat(value)
            except ValueError:
                raise _fail(f"{option} takes a day such as {today.isoformat()}, not {value!r}") from None
    first, last = start or today.replace(day=1).isoformat(), end or today.isoformat()
    meter = Meter(database, prices, interval_s=0)

    async def report():
        team_id = (await keys.team(team)).id if team else None
        await meter.flush(record_only=True)  # usage only: the server announces and enforces spending
        return await meter.usage(team_id, start_day=first, end_day=last, group_by=groups)

    try:
        rows = asyncio.run(report())
    except TeamNotFound:
        raise _fail(f"no team {team!r} (see `corral teams ls`)") from None
    except ValueError as e:
        raise _fail(str(e)) from None
    columns = [*groups, *QUANTITIES, f"cost_{prices.currency.lower()}"]
    if csv_out:
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row[g] for g in groups] + [f"{row[q]:.6f}" for q in QUANTITIES] + [f"{row['cost']:.6f}"])
        return
    table = Table(*groups, "vCPU-s", "memory GiB-s", "disk GiB-h", "snapshot GiB-h", "build min",
                  f"cost ({prices.currency})", title=f"usage {first} .. {last}")
    total = Usage()
    for row in rows:
        total.add(Usage(*(row[q] for q in QUANTITIES)))
        table.add_row(*(str(row[g]) for g in groups), *(f"{row[q]:.2f}" for q in QUANTITIES), f"{row['cost']:.4f}")
    table.add_row(*(["total"] + [""] * (len(groups) - 1) if groups else []),
                  *(f"{getattr(total, q):.2f}" for q in QUANTITIES), f"{prices.cost(total):.4f}", style="bold")
    console.print(table)
