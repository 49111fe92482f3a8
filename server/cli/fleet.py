"""``edgeherd server run``, ``edgeherd device …``, ``edgeherd model …`` and ``edgeherd deploy``."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from server.cli._common import Broker, DataDir, console, err, fail, open_registry, require_actor
from server.cli.remote import call, pack_bundle, remote, short_time

server_app = typer.Typer(help="Run the server.", no_args_is_help=True)
fleet_app = typer.Typer(help="Simulated fleets for tests and load.", no_args_is_help=True)
device_app = typer.Typer(help="Enrol, list and revoke devices.", no_args_is_help=True)
model_app = typer.Typer(help="Register and inspect model versions.", no_args_is_help=True)


#: Bundles bigger than this show a spinner while they upload.
BIG_BUNDLE = 16 << 20


@server_app.command("run")
def server_run(
    data_dir: DataDir = Path("data"),
    broker: Broker = None,
    metrics_port: Annotated[int, typer.Option("--metrics-port", help="Port of /metrics on 127.0.0.1; 0: off.")
                            ] = 9470,
    drift_interval: Annotated[float, typer.Option("--drift-interval", min=0, help="Seconds between drift "
                                                  "evaluations (one replica at a time holds the drift lease); "
                                                  "0: this replica never evaluates drift.")] = 10.0,
    rollout_interval: Annotated[float, typer.Option("--rollout-interval", min=0, help="Seconds between steps of "
                                                    "the active rollouts (each under its lease); 0: this replica "
                                                    "never steps rollouts.")] = 2.0,
    unicast_artifacts: Annotated[bool, typer.Option(
        "--unicast-artifacts", help="Answer every chunk request on the asking device's own topic, never on the "
        "artifact's shared broadcast topic (slower fan-out; for fleets whose devices must not see each other's "
        "artifacts).")] = False,
    public_host: Annotated[list[str] | None, typer.Option(
        "--public-host", help="A host name or IP address devices reach the managed broker at (repeatable): it goes "
        "in the broker's TLS certificate and the first one in the devices' agent.toml. Kept in the data directory "
        "for the next runs.")] = None,
    listen: Annotated[str | None, typer.Option(
        "--listen", help="HOST:PORT of the managed broker's devices' listener (TLS). Default: 0.0.0.0:8883 once a "
        "public host is given, else what the data directory holds (loopback and a free port at first).")] = None,
    api_listen: Annotated[str | None, typer.Option(
        "--api-listen", envvar="EDGEHERD_API_LISTEN", help="HOST:PORT of the operator API (HTTPS, docs/api.md); "
        "'off': none. Default: 0.0.0.0:9443 once a public host is given, else 127.0.0.1:9443.")] = None,
    log_level: Annotated[str, typer.Option("--log-level")] = "INFO",
    retain_days: Annotated[str | None, typer.Option(
        "--retain-days", envvar="EDGEHERD_RETAIN_DAYS", help="Days of telemetry, feature statistics and drift "
        "reports kept (docs/server.md, \"Retention\"); 0 or none: forever (the default).")] = None,
    retain: Annotated[list[str] | None, typer.Option(
        "--retain", help="TABLE=DAYS for one table (telemetry, feature_stats, drift_reports), over --retain-days; "
        "repeatable.")] = None,
    prune_every: Annotated[float | None, typer.Option(
        "--prune-every", min=1, help="Seconds between retention passes (default EDGEHERD_PRUNE_EVERY_S, 600).")
    ] = None,
) -> None:
    """Run the MQTT bridge, artifact distribution, drift evaluation and the operator API until SIGTERM.

    Refuses to start without operators.toml when the audit log shows the server was governed by one."""
    from hardware.process import configure_logging, wait_for_termination
    from server.app import ServerApp
    from server.broker import BrokerError, parse_listen
    from server.governance import GovernanceError, check_bootstrap
    from server.pki import PkiError
    from server.settings import SettingError

    try:
        check_bootstrap(data_dir)
    except GovernanceError as exc:
        fail(exc)
    if broker is not None and (public_host or listen):
        fail(ValueError("--public-host and --listen configure the managed broker; with --broker, configure your "
                         "own broker instead (docs/server.md, \"Bring your own broker\")"))
    from server.api.serve import DEFAULT_API_PORT, parse_api_listen

    if api_listen is None:
        api_listen = f"{'0.0.0.0' if public_host else '127.0.0.1'}:{DEFAULT_API_PORT}"  # noqa: S104
    try:
        api = None if api_listen == "off" else parse_api_listen(api_listen)
    except ValueError as exc:
        fail(exc)
    policy, every = _retention(retain_days, retain, prune_every)
    configure_logging(log_level)
    try:
        app = ServerApp(data_dir, broker_url=broker, metrics_port=metrics_port, drift_interval=drift_interval,
                        broadcast=not unicast_artifacts, rollout_interval=rollout_interval,
                        listen=parse_listen(listen) if listen else None, public_hosts=public_host or None,
                        api_listen=api, retention=policy, prune_every=every).start()
    except (BrokerError, OSError, SettingError, PkiError) as exc:
        fail(exc)
    wait_for_termination()
    app.stop()


def _retention(days: str | None, per_table: list[str] | None, every: float | None) -> tuple[Any, float]:
    """The retention policy and the seconds between passes of ``server run``'s options, or fail naming the bad one."""
    from server.retention import RetentionError, RetentionPolicy
    from server.settings import PRUNE_EVERY, SettingError

    try:
        return (RetentionPolicy.parse(days, per_table or ()),
                every if every is not None else PRUNE_EVERY.read().total_seconds())
    except (RetentionError, SettingError) as exc:
        fail(exc)


@server_app.command("prune")
def server_prune(
    data_dir: DataDir = Path("data"),
    retain_days: Annotated[str | None, typer.Option("--retain-days", envvar="EDGEHERD_RETAIN_DAYS",
                                                    help="As for `server run`.")] = None,
    retain: Annotated[list[str] | None, typer.Option("--retain", help="TABLE=DAYS, as for `server run`.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would go; delete nothing.")] = False,
) -> None:
    """Run one retention pass now: delete telemetry, feature statistics and drift reports older than kept."""
    from server.cli._common import open_engine
    from server.retention import Pruner

    policy, _ = _retention(retain_days, retain, 600.0)
    if not policy.active:
        fail(ValueError("nothing to prune: every table is kept forever; give --retain-days or --retain TABLE=DAYS"))
    engine = open_engine(data_dir)
    try:
        report = Pruner(engine, policy).prune(dry_run=dry_run)
    finally:
        engine.dispose()
    verb = "would delete" if dry_run else "deleted"
    console.print(f"{verb} {report.total} rows: " + ", ".join(f"{t} {n}" for t, n in report.deleted.items())
                  + f" ({policy.describe()})")


@server_app.command("backup")
def server_backup(dest: Annotated[Path, typer.Argument(help="New directory for the backup.")],
                  data_dir: DataDir = Path("data")) -> None:
    """Back up the database, artifact store, keys, broker files, operators.toml and the audit anchor; safe while
    the server runs."""
    from server.backup import BackupError, backup

    try:
        info = backup(data_dir, dest)
    except BackupError as exc:
        fail(exc)
    files = [str(f) for f in info["files"]] if isinstance(info["files"], list) else []
    console.print(f"backed up to {dest}: {info['counts']}" + "".join(f", {f}" for f in files)
                  + ("" if "operators.toml" in files else "; no operators.toml (the server is in bootstrap mode)"))


@server_app.command("restore")
def server_restore(src: Annotated[Path, typer.Argument(help="A directory made by `edgeherd server backup`.")],
                   data_dir: DataDir = Path("data")) -> None:
    """Restore a backup into an empty data directory (and, for PostgreSQL, an empty database), operators.toml
    and the audit anchor included."""
    from server.backup import BackupError, restore

    try:
        info = restore(src, data_dir)
    except BackupError as exc:
        fail(exc)
    console.print(f"restored {info['counts']} from {src} into {data_dir}")
    warnings = info.get("warnings")
    for warning in warnings if isinstance(warnings, list) else []:
        err.print(f"[yellow]warning:[/] {warning}")


@device_app.command("add")
def device_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Device id: a-z, 0-9 and '-'.")],
    profile: Annotated[str, typer.Option("--profile", help="Hardware profile (hardware/profiles, "
                                         "docs/hardware.md), e.g. raspberry-pi-5.")],
    group: Annotated[list[str] | None, typer.Option("--group", help="Group(s) the device belongs to.")] = None,
    custom_profile: Annotated[bool, typer.Option(
        "--custom-profile", help="--profile names hardware edgeherd has no profile for: accept the name, with no "
        "latency budget and the general artifact order.")] = False,
    out: Annotated[Path | None, typer.Option(
        "--out", help="With a login: the new directory the device's agent files (config and credentials, secret) "
        "are written to; default: ./NAME.")] = None,
    data_dir: DataDir = Path("data"),
    broker: Broker = None,
) -> None:
    """Create the device and its broker credentials, and write the agent config it needs (on the server host: in
    the data directory; with a login: in --out)."""
    from server.registry import RegistryError

    client = remote(ctx)
    if client is not None:
        answer = call(client, "POST", "/devices", {"id": name, "profile": profile, "groups": group or [],
                                                   "custom_profile": custom_profile})
        where = _write_agent_files(out or Path(name), answer)
        custom = f" with the custom profile {profile} (no latency budget)" if custom_profile else ""
        console.print(f"enrolled {name}{custom}; agent config and credentials in {where}")
        return
    actor = require_actor(ctx, data_dir, "ENROLL_DEVICE")
    try:
        enrolled = open_registry(data_dir, broker).add_device(name, profile, group or [], actor=actor,
                                                          custom_profile=custom_profile)
    except RegistryError as exc:
        fail(exc)
    custom = f" with the custom profile {profile} (no latency budget)" if custom_profile else ""
    console.print(f"enrolled {name}{custom}; agent config and password in {enrolled.agent_config.parent}")


def _write_agent_files(out: Path, answer: Any) -> Path:
    """The agent files POST /devices answered with (``files``: name → text), written 0600 into the new directory
    ``out`` (0700); never over existing files."""
    files = answer.get("files") if isinstance(answer, dict) else None
    if not isinstance(files, dict) or not files:
        fail(ValueError("the server enrolled the device but sent no agent files; fetch them on the server host "
                         "(<data>/devices/NAME)"))
    for fname in files:
        if not isinstance(fname, str) or fname in ("", ".", "..") or "/" in fname or "\\" in fname:
            fail(ValueError(f"the server sent an agent file named {fname!r}; refusing to write it"))
    try:
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        taken = [f for f in files if (out / f).exists()]
        if taken:
            fail(ValueError(f"{out} already holds {', '.join(sorted(taken))}; the device is enrolled, but its "
                             "agent files were not written: give a new --out directory, or revoke and add it again"))
        for fname, text in files.items():
            fd = os.open(out / fname, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(str(text))
    except OSError as exc:
        fail(ValueError(f"cannot write the agent files to {out}: {exc.strerror or exc}"))
    return out


@device_app.command("revoke")
def device_revoke(ctx: typer.Context, name: str, data_dir: DataDir = Path("data"), broker: Broker = None) -> None:
    """Remove the device's credentials and drop its broker session."""
    from server.registry import RegistryError

    client = remote(ctx)
    if client is not None:
        call(client, "POST", f"/devices/{name}/revoke")
        console.print(f"revoked {name}")
        return
    actor = require_actor(ctx, data_dir, "REVOKE_DEVICE")
    try:
        open_registry(data_dir, broker).revoke_device(name, actor=actor)
    except RegistryError as exc:
        fail(exc)
    console.print(f"revoked {name}")


@device_app.command("list")
def device_list(ctx: typer.Context, data_dir: DataDir = Path("data")) -> None:
    """Every device with its state; a custom profile (no hardware profile of that name) says so."""
    from datetime import datetime, timezone

    from hardware.profiles import label
    from server.presence import shown_status
    from server.settings import STALE_AFTER, SettingError

    client = remote(ctx)
    if client is not None:
        table = Table()
        for col in ("device", "profile", "groups", "status", "running", "install", "last seen"):
            table.add_column(col)
        for d in call(client, "GET", "/devices"):
            table.add_row(d["id"], label(d["profile"]), d["groups"], d["status"], d["running"], d["install"],
                          short_time(d["last_seen"], "%Y-%m-%d %H:%M:%S"))
        console.print(table)
        return
    try:
        stale_after = STALE_AFTER.read()
    except SettingError as exc:
        fail(exc)
    table = Table()
    for col in ("device", "profile", "groups", "status", "running", "install", "last seen"):
        table.add_column(col)
    now = datetime.now(timezone.utc)
    for d in open_registry(data_dir).devices():
        status = shown_status(d.status, d.last_seen, revoked=d.revoked, now=now, stale_after=stale_after)
        table.add_row(d.id, label(d.profile), ",".join(d.groups), status,
                      d.running_artifact or "—", d.install_step or "—",
                      f"{d.last_seen:%Y-%m-%d %H:%M:%S}" if d.last_seen else "—")
    console.print(table)


@model_app.command("push")
def model_push(ctx: typer.Context, bundle: Path, data_dir: DataDir = Path("data")) -> None:
    """Verify a signed bundle against the server key and register it (as a draft; its author: the bundle's,
    else whoever pushes it). With a login, the bundle directory is uploaded as a tar."""
    from server.registry import RegistryError

    client = remote(ctx)
    if client is not None:
        packed = pack_bundle(bundle)
        try:
            size = packed.stat().st_size
            with err.status(f"uploading {bundle} ({size / 1e6:.1f} MB) …") if size > BIG_BUNDLE else nullcontext():
                pushed = call(client, "POST", "/models/upload", upload=packed)
        finally:
            packed.unlink(missing_ok=True)
        console.print(f"registered {pushed['model']} {pushed['version']} (digest {pushed['manifest_sha256'][:12]}…)"
                      + (f", {pushed['stage']}" if pushed.get("stage") else ""))
        return
    actor = require_actor(ctx, data_dir, "PUSH_MODEL")
    try:
        version = open_registry(data_dir).push_model(bundle, actor=actor)
    except RegistryError as exc:
        fail(exc)
    console.print(f"registered {version.name} {version.version} (digest {version.manifest_sha256[:12]}…)")


@model_app.command("list")
def model_list(ctx: typer.Context, data_dir: DataDir = Path("data")) -> None:
    """Registered model versions."""
    client = remote(ctx)
    if client is not None:
        table = Table()
        for col in ("model", "version", "stage", "author", "approvals", "registered"):
            table.add_column(col)
        for v in call(client, "GET", "/models"):
            name, _, version = str(v["ref"]).partition(":")
            table.add_row(name, version, v["stage"], v["author"], v["approvals"], short_time(v["created"]))
        console.print(table)
        return
    table = Table()
    for col in ("model", "version", "stage", "digest", "registered"):
        table.add_column(col)
    for v in open_registry(data_dir).models():
        table.add_row(v.name, v.version, v.stage, v.manifest_sha256[:12], f"{v.created_at:%Y-%m-%d %H:%M}")
    console.print(table)


@model_app.command("show")
def model_show(ctx: typer.Context, ref: Annotated[str, typer.Argument(help="NAME:VERSION")],
               show_card: Annotated[bool, typer.Option("--card", help="With a login: print the model card too (it "
                                                  "lists the artifacts).")] = False,
               data_dir: DataDir = Path("data")) -> None:
    """A version's stage, author, approvals, artifacts, lineage and the devices running it."""
    from sqlmodel import Session

    from server.governance import version_card
    from server.registry import RegistryError

    client = remote(ctx)
    if client is not None:
        _show_remote(call(client, "GET", f"/models/{ref}"), with_card=show_card)
        return
    name, _, version = ref.partition(":")
    try:
        reg = open_registry(data_dir)
        row, signed = reg.model(name, version)
    except RegistryError as exc:
        fail(exc)
    with Session(reg.engine) as db:
        card = version_card(db, row, history=10)
    m = signed.manifest
    console.print(f"[bold]{m.model} {m.version}[/] ({row.stage}), digest {row.manifest_sha256}")
    console.print(f"  author: {row.author or '— (not recorded: it cannot be approved)'}")
    console.print("  artifacts:")
    for a in m.artifacts:
        console.print(f"    {a.name}: {a.target.value}/{a.precision.value}, {a.size} bytes, "
                      f"accuracy {a.metrics.get('accuracy', float('nan')):.4f}")
    console.print("  lineage:" if m.lineage else "  lineage: — (none recorded)")
    for k, v in sorted(m.lineage.items()):
        console.print(f"    {k}: {v}")
    console.print("  approvals:" if card["approvals"] else "  approvals: none")
    for a in card["approvals"]:
        verb = {"approve": "approved", "reject": "rejected"}.get(a["decision"], a["decision"])
        console.print(f"    {a['at']:%Y-%m-%d %H:%M} {a['actor']} {verb}: {a['reason']}")
    running = card["devices"]
    console.print(f"  running on {len(running)} device(s)" + (f": {', '.join(running[:20])}" if running else "")
                  + (f" and {len(running) - 20} more" if len(running) > 20 else ""))
    if card["history"]:
        console.print("  history (newest first):")
    for e in card["history"]:
        console.print(f"    #{e['seq']} {e['at']:%Y-%m-%d %H:%M} {e['actor']} {e['action']}")


def _show_remote(card: dict[str, Any], *, with_card: bool) -> None:
    """``model show`` from GET /models/{ref}: what the local command prints; the artifacts are in the model card
    (``--card``)."""
    console.print(f"[bold]{card['name']} {card['version']}[/] ({card['stage']}), digest {card['manifest_sha256']}")
    console.print(f"  author: {card['author'] or '— (not recorded: it cannot be approved)'}")
    lineage = card.get("lineage") or {}
    console.print("  lineage:" if lineage else "  lineage: — (none recorded)")
    for k, v in sorted(lineage.items()):
        console.print(f"    {k}: {v}")
    approvals = card.get("approvals") or []
    console.print("  approvals:" if approvals else "  approvals: none")
    for a in approvals:
        verb = {"approve": "approved", "reject": "rejected"}.get(a["decision"], a["decision"])
        console.print(f"    {short_time(a['at'])} {a['actor']} {verb}: {a['reason']}")
    running = card.get("devices") or []
    console.print(f"  running on {len(running)} device(s)" + (f": {', '.join(running[:20])}" if running else "")
                  + (f" and {len(running) - 20} more" if len(running) > 20 else ""))
    if card.get("history"):
        console.print("  history (newest first):")
    for e in card.get("history") or []:
        console.print(f"    #{e['seq']} {short_time(e['at'])} {e['actor']} {e['action']}")
    if with_card and card.get("card"):
        console.print("  model card:")
        console.print("    " + str(card["card"]).replace("\n", "\n    "), markup=False)


def deploy_command(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="NAME:VERSION")],
    device: Annotated[str, typer.Option("--device", help="The device to run it.")],
    artifact: Annotated[str | None, typer.Option("--artifact", help="Which artifact (default: the "
                                                 "first its profile prefers among those it can load).")] = None,
    data_dir: DataDir = Path("data"),
    broker: Broker = None,
) -> None:
    """Set one device's desired state to a registered version (published retained)."""
    from sqlmodel import Session

    from server.governance import Governance, GovernanceError, check_deploy
    from server.registry import RegistryError

    client = remote(ctx)
    if client is not None:
        if artifact is not None:
            fail(ValueError("--artifact is not available with a login: the API deploys the artifact the device's "
                             "profile prefers"))
        said = call(client, "POST", f"/models/{ref}/deploy", {"device": device})
        console.print(said["result"])
        return
    actor = require_actor(ctx, data_dir, "DEPLOY")
    name, _, version = ref.partition(":")
    try:
        registry = open_registry(data_dir, broker)
        with Session(registry.engine) as db:  # production devices take approved versions only
            check_deploy(db, ref, device, Governance.load(data_dir).config)
        desired = registry.deploy(name, version, device, artifact, actor=actor)
    except (RegistryError, GovernanceError) as exc:
        fail(exc)
    if desired is None:
        console.print(f"{device} will run {name} {version} once it connects and reports its runtimes (it has not "
                      "yet); the artifact is chosen then")
    else:
        console.print(f"{device} should now run {name} {version} ({desired.artifact}), generation "
                      f"{desired.generation}")


@fleet_app.command("simulate")
def fleet_simulate(
    devices: Annotated[int, typer.Option("--devices", min=1, max=100_000, help="How many simulated devices.")] = 100,
    seconds: Annotated[float, typer.Option("--seconds", min=1, help="How long to run.")] = 60.0,
    interval: Annotated[float, typer.Option("--interval", min=0.05, help="Seconds between a device's windows "
                                            "(an agent's default window is 60 s).")] = 60.0,
    model: Annotated[str | None, typer.Option("--model", help="NAME:VERSION whose reference profile the "
                                              "simulated statistics follow.")] = None,
    drifting: Annotated[int, typer.Option("--drifting", min=0, help="How many devices get drifting inputs.")] = 0,
    processes: Annotated[int, typer.Option("--processes", min=1, max=64)] = 4,
    data_dir: DataDir = Path("data"),
    broker: Broker = None,
) -> None:
    """Run simulated devices that speak the real protocol with real credentials (enrolled on first use).

    On the managed broker's TLS listener each device connects with its own certificate; the credentials are kept
    in <data>/simulator/credentials.json (0600, in a 0700 directory) for the next runs. Each process drives its
    share of the devices from one event loop; if one dies, the command stops and says which and why."""
    from protocol import manifest_digest
    from server.registry import RegistryError
    from server.simulate import PROFILE, SimConfig, SimulationError, load_credentials, simulate, store_credentials

    reg = open_registry(data_dir, broker)
    store = data_dir / "simulator"
    ids = [f"sim-{i:05d}" for i in range(devices)]
    try:
        known = load_credentials(store)
        missing = [d for d in ids if d not in known]
        # credentials of the other kind (the listener changed between TLS and passwords): re-issued
        stale = [d for d in ids if d in known and (known[d].certificate is not None) != reg.certificates]
        if missing:
            known |= reg.add_devices_bulk(missing, PROFILE, ["simulated"], custom_profile=True)
        if stale:
            known |= reg.new_credentials(stale)
        if missing or stale:
            store_credentials(store, known)
        reference = digest = None
        if model is not None:
            name, _, version = model.partition(":")
            _, signed = reg.model(name, version)
            reference, digest = signed.manifest.reference, manifest_digest(signed.manifest)
        cfg = SimConfig(reg.broker_url, {d: known[d] for d in ids}, seconds=seconds, interval=interval,
                        processes=min(processes, devices), reference=reference, manifest_sha256=digest,
                        drifting=frozenset(ids[:drifting]))
    except (RegistryError, ValueError, OSError) as exc:
        fail(exc)
    try:
        with console.status(f"{devices} simulated devices for {seconds:.0f} s ..."):
            result = simulate(cfg)
    except SimulationError as exc:
        fail(exc)
    console.print(f"sent {result.sent} messages, {result.acked} acknowledged by the broker; "
                  f"{result.failed_connects} devices could not connect; {len(result.per_device)} devices online, "
                  f"logged in within {result.connect_s:.1f} s")


ca_app = typer.Typer(help="The certificate authority devices and the broker trust (<data>/pki).",
                     no_args_is_help=True)
server_app.add_typer(ca_app, name="ca")


@ca_app.command("show")
def ca_show(data_dir: DataDir = Path("data")) -> None:
    """The trusted CAs (fingerprints, validity), the broker certificate's names and, during a rotation, the
    devices still holding only certificates from the previous CA."""
    from server.broker import BrokerError
    from server.pki import PkiError

    try:
        broker = open_registry(data_dir).broker
        if broker.authority is None:
            fail(ValueError(f"the managed broker of {data_dir} has no TLS (broker/listener.json says \"tls\": "
                             "false): its devices log in with passwords"))
        auth = broker.authority
        table = Table("role", "CA", "sha256 fingerprint", "valid from", "valid until", "devices", box=None)
        for ca in auth.cas():
            table.add_row(ca.role, ca.id, ca.sha256, f"{ca.not_before:%Y-%m-%d}", f"{ca.not_after:%Y-%m-%d}",
                          str(len(auth.devices_on(ca.id))))
        console.print(table)
        console.print(f"broker certificate names: {', '.join(auth.broker_names()) or '(not issued yet)'}")
        console.print(f"devices' listener: {broker.url}")
        previous = next((ca for ca in auth.cas() if ca.role == "previous"), None)
        if previous is not None:
            behind = sorted(auth.devices_on(previous.id))
            console.print(f"rotation under way: {len(behind)} device(s) hold only certificates from {previous.id}"
                          + (f" ({', '.join(behind[:10])}{' …' if len(behind) > 10 else ''})" if behind else "")
                          + "; `edgeherd device rotate-credentials DEVICE` moves one, `edgeherd server ca rotate "
                          "--finish` ends the rotation")
    except (PkiError, BrokerError, OSError) as exc:
        fail(exc)


@ca_app.command("rotate")
def ca_rotate(
    ctx: typer.Context,
    data_dir: DataDir = Path("data"),
    finish: Annotated[bool, typer.Option("--finish", help="End the rotation: stop trusting the previous CA and "
                                         "re-issue the broker's certificate from the new one.")] = False,
    force: Annotated[bool, typer.Option("--force", help="With --finish: finish although some devices hold only "
                                        "certificates from the previous CA (they are cut off until re-flashed).")
                     ] = False,
) -> None:
    """Rotate the CA without stranding devices: a new CA becomes current while the old one stays trusted; devices
    move with `device rotate-credentials`; `--finish` drops the old CA."""
    from server.broker import BrokerError
    from server.pki import PkiError

    actor = require_actor(ctx, data_dir, "ROTATE_CA")
    try:
        reg = open_registry(data_dir)
        broker = reg.broker
        if broker.authority is None:
            fail(ValueError(f"the managed broker of {data_dir} has no TLS: there is no CA to rotate"))
        if finish:
            behind = broker.authority.finish_rotation(force=force)
            detail: dict[str, Any] = {"phase": "finish", "cut_off": behind[:50]}
        else:
            new = broker.authority.rotate()
            detail = {"phase": "start", "ca": new.id, "sha256": new.sha256}
        broker.install_tls()  # the new bundle and CRLs (and, finishing, the broker's new certificate)
        broker.reload()
        reg.record(actor, "ca.rotate", "pki:ca", detail)
    except (PkiError, BrokerError, OSError) as exc:
        fail(exc)
    if finish:
        console.print("rotation finished: the previous CA is no longer trusted; the broker's certificate comes from "
                      "the current CA" + (f"; cut off: {', '.join(detail['cut_off'])}" if detail["cut_off"] else ""))
    else:
        console.print(f"new CA {detail['ca']} ({detail['sha256']}) is current; the previous one stays trusted. Move "
                      "each device with `edgeherd device rotate-credentials DEVICE`, then `edgeherd server ca rotate "
                      "--finish` (`edgeherd server ca show` counts those left)")
