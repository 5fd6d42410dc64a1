"""The ``dbmtls`` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

import click

from dbmtls import __version__
from dbmtls.config.load import Explained, explain_config, load_config
from dbmtls.config.model import Config
from dbmtls.errors import ConfigError
from dbmtls.logs import setup_logging

CONFIG_HELP = (
    "Config file: dbmtls YAML, Istio DestinationRules with the ServiceEntries/Services they name "
    "(repeatable; merged in order)."
)


def _load(configs: tuple[str, ...]) -> Config:
    try:
        return load_config(configs)
    except ConfigError as exc:
        click.echo(f"dbmtls: config error: {exc.message}", err=True)
        sys.exit(2)


def _load_explained(configs: tuple[str, ...]) -> Explained:
    try:
        return explain_config(configs)
    except ConfigError as exc:
        click.echo(f"dbmtls: config error: {exc.message}", err=True)
        sys.exit(2)


def _log_config_notes(explained: Explained) -> None:
    """What `check` lists as ignored or skipped, in the log too: a sidecar's log is often all
    that is read, and a field that silently did nothing is what Istio users get bitten by."""
    from dbmtls.logs import LOG

    for note in explained.explanation.notes:
        LOG.info("config note", extra={"fields": {"note": str(note)}})
    for name, exp in explained.explanation.databases.items():
        for note in exp.ignored:
            LOG.info("config field ignored", extra={"fields": {"db": name, "note": str(note)}})
        for note in exp.notes:
            LOG.info("config note", extra={"fields": {"db": name, "note": str(note)}})


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="dbmtls", message="%(prog)s %(version)s")
def main() -> None:
    """dbmtls: the app talks plaintext to localhost, dbmtls talks verified mutual TLS to the database."""


@main.command(short_help="Print the version.")
def version() -> None:
    """Print the version."""
    click.echo(f"dbmtls {__version__}")


@main.command(short_help="Run the proxy in the foreground (SIGTERM drains, exit 0).")
@click.option("-c", "--config", "configs", multiple=True, required=True, help=CONFIG_HELP)
@click.option("--admin", "admin", default=None, help="Admin server address (host:port), or 'off'.")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default=None,
    help="Log level (default: the config's log.level, else info).",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default=None,
    help="Log format; json for log collectors (default: the config's log.format, else text).",
)
def run(configs: tuple[str, ...], admin: str | None, log_level: str | None, log_format: str | None) -> None:
    """Run the proxy in the foreground (logs to stderr; SIGTERM drains and exits 0)."""
    explained = _load_explained(configs)
    config = explained.config
    if admin is not None and admin != "off":
        from dbmtls.config.model import AdminConfig
        from dbmtls.config.schema import ValidationError

        try:
            AdminConfig(listen=admin, allowRemote=config.admin.allowRemote)
        except ValidationError as exc:
            msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise click.BadParameter(msg, param_hint="--admin") from None
    setup_logging(log_level or config.log.level, log_format or config.log.format)
    _log_config_notes(explained)
    from dbmtls.app import run as run_app

    try:
        code = run_app(config, admin_listen=admin)
    except ConfigError as exc:
        click.echo(f"dbmtls: {exc.message}", err=True)
        sys.exit(1)
    sys.exit(code)


@main.command(short_help="Validate config and certificate files; print the result.")
@click.option("-c", "--config", "configs", multiple=True, required=True, help=CONFIG_HELP)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the effective configuration, where each setting came from and every error as JSON.",
)
@click.option(
    "--bind-check/--no-bind-check",
    default=True,
    show_default=True,
    help="Try each listen address (off: checking the config of a dbmtls that is already running).",
)
def check(configs: tuple[str, ...], as_json: bool, bind_check: bool) -> None:
    """Validate the configuration and the certificate files; print the effective configuration.

    For each database it says where its protocol, port, listener and each TLS setting came from,
    and which fields of the inputs it ignores.
    """
    from dbmtls.check import database_report, note_text, origin_text, shown
    from dbmtls.config.load import explain_config

    try:
        explained = explain_config(configs)
    except ConfigError as exc:
        if as_json:
            error = {"kind": "config", "source": exc.source, "path": exc.path, "message": exc.detail}
            click.echo(json.dumps({"ok": False, "config": None, "databases": [], "notes": [], "errors": [error]}))
        click.echo(f"dbmtls: config error: {exc.message}", err=True)
        sys.exit(2)
    config = explained.config
    reports = [database_report(db, explained.explanation.databases.get(db.name)) for db in config.databases]
    dns_problems: list[dict[str, Any]] = []
    dns_lines = _check_dns(config, dns_problems)
    errors = [e for r in reports for e in r["errors"]] + dns_problems + _check_serving(config, bind=bind_check)
    plane_lines = _check_plane(config, reports)
    for db, report in zip(config.databases, reports, strict=True):
        if db.tls.mode == "DISABLE":
            report["warnings"].append("tls.mode is DISABLE: traffic to the database is NOT encrypted")
    notes = explained.explanation.notes
    dump = config.model_dump(mode="json")
    if as_json:
        out = {
            "ok": not errors,
            "config": dump,
            "databases": reports,
            "notes": [n.as_json() for n in notes],
            "dns": dns_lines,
            "dataPlane": plane_lines,
            "errors": errors,
        }
        click.echo(json.dumps(out, indent=2))
    else:
        import yaml

        for db, report in zip(config.databases, reports, strict=True):
            # what the registry says this database will do, and why: YAML comments (the output stays YAML)
            host, port = db.upstream
            click.echo(f"# {db.name}: {db.spec.title} on {db.listen} -> {host}:{port}; {db.spec.upgrade}")
            click.echo(f"#   errors the app sees: {db.spec.errors}")
            for key, origin in report["provenance"].items():
                click.echo(f"#   {key}: {shown(report['values'].get(key))} <- {origin_text(origin)}")
            for note in report["notes"]:
                click.echo(f"#   note: {note_text(note)}")
            for note in report["ignored"]:
                click.echo(f"#   {note_text(note)}")
        for note in notes:
            click.echo(f"# skipped: {note}")
        for line in dns_lines + plane_lines:
            click.echo(f"# {line}")
        click.echo(yaml.safe_dump(dump, sort_keys=False).rstrip())
    for report in reports:
        for w in report["warnings"]:
            click.echo(f"warning: {report['name']}: {w}", err=True)
    if errors:
        for e in errors:
            click.echo(f"dbmtls: error: {e['text']}", err=True)
        sys.exit(1)


def _check_serving(config: Config, *, bind: bool) -> list[dict[str, Any]]:
    """What would stop `run` before it serves anything: no database, a listen address taken."""
    import errno
    import socket

    from dbmtls.config.model import split_host_port

    if not config.databases:
        text = "no database to serve: the inputs configure none (add one under databases:, or a DestinationRule)"
        return [{"kind": "config", "message": text, "text": text}]
    problems: list[dict[str, Any]] = []
    listeners = [(db.name, f"databases {db.name!r} listen", db.listen) for db in config.databases]
    listeners += [
        ("admin", "admin.listen", config.admin.listen),
        ("admin", "admin.publicListen", config.admin.publicListen),
    ]
    for name, field, listen in listeners if bind else []:
        if listen == "off" or listen.startswith("unix:"):
            continue
        host, port = split_host_port(listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listeners do
            try:
                probe.bind((host, port))
            except OSError as exc:
                why = "already in use by another process" if exc.errno == errno.EADDRINUSE else exc.strerror
                text = (
                    f"{field} {listen}: {why}; `dbmtls run` would fail to start: pick another port or stop "
                    "that process (--no-bind-check when checking the config of a dbmtls that is running)"
                )
                problems.append({"kind": "listen", "database": name, "message": text, "text": text})
    return problems


def _check_plane(config: Config, reports: list[dict[str, Any]]) -> list[str]:
    """Who would move each database's bytes (docs/native.md); a warning per database when
    dataPlane native cannot be had here (run falls back to python, so it is not an error)."""
    from dbmtls.native import load
    from dbmtls.proxy.server import runs_native

    if config.dataPlane == "python":
        return []
    module, why = load()
    if module is None:
        if config.dataPlane == "auto":  # the default: python is what this build has, nothing to warn about
            return [f"data plane: python (native not available: {why})"]
        for report in reports:
            report["warnings"].append(f"dataPlane native is not available, dbmtls run uses python: {why}")
        return [f"data plane: python (native asked for, not available: {why})"]
    native = [db.name for db in config.databases if runs_native(db.spec)]
    python = [db.name for db in config.databases if not runs_native(db.spec)]
    threads = f", {config.nativeThreads} worker threads" if config.nativeThreads > 1 else ""
    lines = [f"data plane: native ({module.OPENSSL_VERSION}{threads}) for {', '.join(native) or 'none'}"]
    if python:
        lines.append(f"  python for {', '.join(python)}: their session drivers run on the python plane only")
    return lines


def _check_dns(config: Config, problems: list[dict[str, Any]]) -> list[str]:
    """How names will be resolved; in dns.mode direct, resolve every server name now and add
    the ones that fail to ``problems`` (a name that cannot be resolved fails every connection)."""
    import asyncio

    from dbmtls.proxy.resolver import is_ip_literal, make_resolver, resolve_all

    resolver = make_resolver(config.dns)
    if resolver is None:
        return ["dns: mode system (getaddrinfo: /etc/hosts first, then the system's DNS)"]
    lines = [f"dns: mode direct (DNS only, never /etc/hosts): {resolver.describe()}"]
    hosts = {db.name: db.dial_target[0] for db in config.databases}
    names = [h for h in hosts.values() if not is_ip_literal(h)]
    results = asyncio.run(resolve_all(resolver, names)) if names else {}
    for name, host in hosts.items():
        result = results.get(host)
        if result is None:
            continue  # an IP address: nothing to resolve
        if isinstance(result, tuple):
            lines.append(f"  {name}: {host} -> {', '.join(result)}")
        else:
            problems.append(
                {
                    "kind": "dns",
                    "database": name,
                    "message": f"{result.message} (hint: {result.hint})",
                    "text": f"database {name!r}: {result.message} (hint: {result.hint})",
                }
            )
    return lines


@main.command(short_help="Check the way to a database step by step, with fixes.")
@click.argument("url", required=False)
@click.option("-c", "--config", "configs", multiple=True, help=CONFIG_HELP)
@click.option("--database", "database", default=None, help="With -c: only this database (default: every one).")
@click.option("--cert", default=None, help="URL: client certificate (PEM) to present.")
@click.option("--key", default=None, help="URL: its private key (PEM).")
@click.option("--ca", default=None, help="URL: CA bundle that verifies the server (default: the system trust store).")
@click.option("--sni", default=None, help="URL: the name to send and verify (default: the URL's host).")
@click.option("--user", default=None, help="PostgreSQL/MySQL: log in as this user (with -c: its userCertificates).")
@click.option(
    "--timeout",
    default=None,
    help="Connect and per-step timeout (URL default 5s; with -c: instead of connectTimeout/handshakeTimeout).",
)
@click.option("--json", "as_json", is_flag=True, help="The same steps as a JSON document.")
def doctor(
    url: str | None,
    configs: tuple[str, ...],
    database: str | None,
    cert: str | None,
    key: str | None,
    ca: str | None,
    sni: str | None,
    user: str | None,
    timeout: str | None,
    as_json: bool,
) -> None:
    """Check the way to a database step by step, with a fix for each failure.

    \b
    DNS (and /etc/hosts), TCP, the protocol's plaintext preamble, the TLS handshake, the
    server's certificate, the client certificate the server asks for and its verdict on
    ours, and a PostgreSQL/MySQL login.  Either every database of a config:
      dbmtls doctor -c dbmtls.yaml [--database NAME] [--user U]
    or one server by URL (postgres://, postgresql://, cockroachdb://, mysql://, mariadb://,
    redis://, rediss://, mongodb://, tcp://HOST:PORT):
      dbmtls doctor postgres://db.example:5432 --cert tls.crt --key tls.key --ca ca.crt --user app
    Exit 0 when every step passes, 1 otherwise, 2 for bad usage.
    """
    from dbmtls.config.model import parse_duration
    from dbmtls.doctor import TargetError, diagnose, from_database, from_url, render_json, render_text

    if (url is None) == (not configs):
        raise click.UsageError("give a URL or -c CONFIG (not both)")
    seconds: float | None = None
    if timeout is not None:
        try:
            seconds = parse_duration(timeout)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--timeout") from None
    try:
        if url is not None:
            if database is not None:
                raise click.UsageError("--database goes with -c")
            targets = [from_url(url, cert=cert, key=key, ca=ca, sni=sni, user=user, timeout=seconds or 5.0)]
        else:
            given = [name for name, v in (("--cert", cert), ("--key", key), ("--ca", ca), ("--sni", sni)) if v]
            if given:
                raise click.UsageError(f"{', '.join(given)} go with a URL; with -c the config says it")
            config = _load(configs)
            dbs = [db for db in config.databases if database is None or db.name == database]
            if not dbs:
                names = ", ".join(db.name for db in config.databases) or "none"
                raise click.UsageError(
                    f"no database {database!r} in the config (databases: {names})"
                    if database
                    else "the config has no databases"
                )
            targets = [from_database(db, config, user, timeout=seconds) for db in dbs]
    except TargetError as exc:
        raise click.UsageError(str(exc)) from None
    reports = [diagnose(t) for t in targets]
    click.echo(render_json(reports) if as_json else render_text(reports))
    sys.exit(0 if all(r.ok for r in reports) else 1)


@main.command(short_help="Exit 0 once a running dbmtls is ready (/readyz is 200).")
@click.option("--admin", "admin", default="127.0.0.1:15000", show_default=True, help="Admin server address.")
@click.option("--timeout", "timeout", default="30s", show_default=True, help="How long to wait (e.g. 30s, 2m).")
def wait(admin: str, timeout: str) -> None:
    """Exit 0 once dbmtls is ready (GET /readyz answers 200); exit 1 on timeout, with the last reason."""
    import time
    import urllib.error
    import urllib.request

    from dbmtls.config.model import parse_duration

    try:
        limit = parse_duration(timeout)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--timeout") from None
    url = f"http://{admin}/readyz"
    deadline = time.monotonic() + limit
    last = "no answer yet"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    click.echo("dbmtls is ready")
                    return
        except urllib.error.HTTPError as exc:
            last = exc.read().decode(errors="replace").strip()
        except OSError as exc:
            last = f"cannot reach {url}: {getattr(exc, 'reason', exc)}"
        if time.monotonic() >= deadline:
            click.echo(f"dbmtls: not ready after {timeout}: {last}", err=True)
            sys.exit(1)
        time.sleep(0.2)


@main.command(short_help="Run the Kubernetes admission webhook that injects sidecars.")
@click.option("--listen", required=True, help="Address to serve HTTPS on (host:port, e.g. 0.0.0.0:8443).")
@click.option("--tls-cert", "tls_cert", required=True, help="Serving certificate (PEM); reloaded when it changes.")
@click.option("--tls-key", "tls_key", required=True, help="Its private key (PEM).")
@click.option(
    "-f", "--file", "files", multiple=True, help="YAML with DestinationRules (repeatable; other kinds ignored)."
)
@click.option("--image", default=None, help="Sidecar image to inject (default: dbmtls:VERSION, or $DBMTLS_IMAGE).")
@click.option("--no-native-sidecar", is_flag=True, help="A regular container, not a native sidecar initContainer.")
@click.option("--cluster-domain", default="cluster.local", show_default=True, help="For the names in hostAliases.")
@click.option(
    "--watch/--no-watch",
    default=None,
    help="List and watch the cluster's DestinationRules (default: on when running in a pod).",
)
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", help="Log level."
)
@click.option(
    "--log-format", type=click.Choice(["text", "json"]), default="text", help="Log format; json for log collectors."
)
def webhook(
    listen: str,
    tls_cert: str,
    tls_key: str,
    files: tuple[str, ...],
    image: str | None,
    no_native_sidecar: bool,
    cluster_domain: str,
    watch: bool | None,
    log_level: str,
    log_format: str,
) -> None:
    """Run the mutating admission webhook that injects the sidecar into Pods (HTTPS, POST /inject)."""
    import asyncio
    import os

    from dbmtls.config.model import split_host_port
    from dbmtls.k8s import webhook as wh
    from dbmtls.k8s.inject import InjectOptions

    try:
        split_host_port(listen)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--listen") from None
    if watch is None:
        watch = wh.in_cluster()
    missing = wh.require_extras(watch=watch)
    if missing:
        click.echo(f"dbmtls: {missing}", err=True)
        sys.exit(1)
    try:
        static = wh.load_rule_files(files)
    except ValueError as exc:
        click.echo(f"dbmtls: config error: {exc}", err=True)
        sys.exit(2)
    setup_logging(log_level, log_format)
    options = InjectOptions(
        image=image or os.environ.get("DBMTLS_IMAGE") or InjectOptions.image,  # as `dbmtls inject`
        native_sidecar=not no_native_sidecar,
        cluster_domain=cluster_domain,
    )
    cert = wh.ServingCertificate(tls_cert, tls_key)
    try:
        cert.load()
    except wh.CertificateError as exc:
        click.echo(f"dbmtls: serving certificate: {exc}", err=True)
        sys.exit(1)
    watcher = None
    if watch:
        from dbmtls.k8s.watch import DestinationRuleWatcher

        watcher = DestinationRuleWatcher()
    try:
        code = asyncio.run(wh.serve(listen, cert, wh.Mesh(static, watcher), options, watcher=watcher))
    except OSError as exc:
        click.echo(f"dbmtls: {exc.strerror or exc}", err=True)
        sys.exit(1)
    sys.exit(code)


@main.command(short_help="Add the sidecar to Kubernetes YAML (like istioctl kube-inject).")
@click.option(
    "-f",
    "--filename",
    "files",
    multiple=True,
    required=True,
    type=click.File("r", encoding="utf-8"),
    help="Kubernetes YAML to inject (multi-document; '-' for stdin; repeatable). DestinationRules in it "
    "configure the sidecars and are printed unchanged.",
)
@click.option(
    "--mesh",
    "mesh_files",
    multiple=True,
    type=click.File("r", encoding="utf-8"),
    help="More DestinationRules to use, not printed (repeatable).",
)
@click.option("--image", default=None, help="Sidecar image (default: dbmtls:VERSION, or $DBMTLS_IMAGE).")
@click.option(
    "--native-sidecar/--no-native-sidecar",
    default=True,
    show_default=True,
    help="Native sidecar (initContainer, restartPolicy Always; Kubernetes >= 1.29) or a plain container.",
)
@click.option("--namespace", "-n", default="default", show_default=True, help="Namespace of objects that name none.")
@click.option(
    "--cluster-domain",
    default="cluster.local",
    show_default=True,
    help="The cluster's DNS domain, for the names in hostAliases.",
)
def inject(
    files: tuple[TextIO, ...],
    mesh_files: tuple[TextIO, ...],
    image: str | None,
    native_sidecar: bool,
    namespace: str,
    cluster_domain: str,
) -> None:
    """Add the dbmtls sidecar to workloads that opt in (like istioctl kube-inject)."""
    import os

    import yaml

    from dbmtls.k8s.inject import InjectError, InjectOptions, inject_documents

    def read(stream: TextIO) -> list[Any]:
        try:
            return [d for d in yaml.safe_load_all(stream) if d is not None]
        except yaml.YAMLError as exc:
            click.echo(f"dbmtls inject: {stream.name}: invalid YAML: {exc}", err=True)
            sys.exit(2)

    docs = [d for f in files for d in read(f)]
    mesh = [d for f in mesh_files for d in read(f) if isinstance(d, dict) and d.get("kind") == "DestinationRule"]
    options = InjectOptions(
        image=image or os.environ.get("DBMTLS_IMAGE") or InjectOptions.image,
        native_sidecar=native_sidecar,
        cluster_domain=cluster_domain,
        default_namespace=namespace,
    )
    try:
        out = inject_documents(docs, mesh, options)
    except InjectError as exc:
        click.echo(f"dbmtls inject: {exc.message}", err=True)
        sys.exit(1)
    from dbmtls.k8s.yamlio import dump_all

    click.echo(dump_all(out), nl=False)


@main.group(short_help="A development PKI, and cert-manager manifests.")
def certs() -> None:
    """A development PKI: a CA and certificates shaped like cert-manager Secrets (tls.crt, tls.key, ca.crt)."""


def _refuse_overwrite(out: Path, names: tuple[str, ...], force: bool, what: str) -> None:
    """Never replace key material by surprise: a second `certs` run must say so and stop."""
    present = [n for n in names if (out / n).exists()]
    if present and not force:
        raise click.ClickException(f"{out} {what} ({', '.join(present)}): use another --out, or --force to replace it")


@certs.command("ca", short_help="Create a CA (ca.crt, ca.key).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Directory to write to.")
@click.option("--cn", default="dbmtls dev CA", show_default=True, help="The CA certificate's common name.")
@click.option("--rsa", is_flag=True, help="RSA 2048 instead of ECDSA P-256.")
@click.option("--days", default=3650, show_default=True, help="Validity in days.")
@click.option("--force", is_flag=True, help="Replace a CA already in --out (everything it issued stops verifying).")
def certs_ca(out: str, cn: str, rsa: bool, days: int, force: bool) -> None:
    """Create a CA (ca.crt, ca.key)."""
    from dbmtls.pki import create_ca, describe

    _refuse_overwrite(
        Path(out),
        ("ca.crt", "ca.key"),
        force,
        "holds a CA already; a new one would make every certificate it issued fail verification "
        "(and a running dbmtls would reload it)",
    )
    d = create_ca(out, common_name=cn, key_type="rsa" if rsa else "ecdsa", days=days)
    click.echo(f"CA written to {d}: {describe(Path(d) / 'ca.crt')}")


@certs.command("issue", short_help="Issue a server and/or client certificate from a CA.")
@click.option(
    "--ca",
    "ca_dir",
    required=True,
    type=click.Path(file_okay=False, exists=True),
    help="Directory of the CA (from certs ca).",
)
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory to write tls.crt, tls.key and ca.crt to.",
)
@click.option("--server", "servers", multiple=True, help="Server name or IP (repeatable).")
@click.option("--client", "client", default=None, help="Client certificate common name (e.g. the DB user).")
@click.option("--rsa", is_flag=True, help="RSA 2048 instead of ECDSA P-256.")
@click.option("--days", default=90, show_default=True, help="Validity in days.")
@click.option("--force", is_flag=True, help="Replace a certificate already in --out (a running dbmtls reloads it).")
def certs_issue(
    ca_dir: str, out: str, servers: tuple[str, ...], client: str | None, rsa: bool, days: int, force: bool
) -> None:
    """Issue a server (--server) and/or client (--client) certificate signed by the CA."""
    from dbmtls.pki import describe, issue

    if not servers and not client:
        raise click.UsageError("give --server NAME (repeatable) and/or --client CN")
    _refuse_overwrite(Path(out), ("tls.crt", "tls.key"), force, "holds a certificate already")
    try:
        d = issue(ca_dir, out, server_names=servers, client_cn=client, key_type="rsa" if rsa else "ecdsa", days=days)
    except (ConfigError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"certificate written to {d}: {describe(Path(d) / 'tls.crt')}")


@certs.command("k8s", short_help="Print cert-manager Issuers and Certificates.")
@click.option("-n", "--namespace", required=True, help="Namespace of the Certificates (and of the database).")
@click.option("--server", default=None, help="The database's Service name: a server Certificate for every name of it.")
@click.option(
    "--headless", multiple=True, help="A headless Service of the same pods (repeatable): adds *.NAME wildcards."
)
@click.option(
    "--ip", "ips", multiple=True, help="An extra IP address for the server (repeatable; loopback is always in)."
)
@click.option(
    "--client",
    "clients",
    multiple=True,
    help="Client certificate CN (repeatable; Secret CN-tls); CN=NAME names the objects.",
)
@click.option(
    "--ca-issuer", default=None, help="Sign with this existing Issuer (or clusterissuer/NAME) instead of printing a CA."
)
@click.option("--cluster-domain", default="cluster.local", show_default=True, help="The cluster's DNS domain.")
@click.option("--rsa", is_flag=True, help="RSA 2048 (PKCS#1 keys, for old clients) instead of ECDSA P-256.")
def certs_k8s(
    namespace: str,
    server: str | None,
    headless: tuple[str, ...],
    ips: tuple[str, ...],
    clients: tuple[str, ...],
    ca_issuer: str | None,
    cluster_domain: str,
    rsa: bool,
) -> None:
    """Print cert-manager manifests (multi-document YAML): a CA chain, a server and client Certificates."""
    from dbmtls.k8s.certmanager import CertManagerError, K8sCerts, render

    opts = K8sCerts(
        namespace=namespace,
        server=server,
        headless=headless,
        ips=ips,
        clients=clients,
        ca_issuer=ca_issuer,
        cluster_domain=cluster_domain,
        key_type="rsa" if rsa else "ecdsa",
    )
    try:
        text = render(opts)
    except CertManagerError as exc:
        raise click.UsageError(exc.message) from None
    click.echo(text, nl=False)


@main.command(short_help="The README story on this machine, end to end.")
@click.option("--keep", is_flag=True, help="Keep the temporary directory (certificates, logs).")
def demo(keep: bool) -> None:
    """The seed scenario on this machine: mTLS-only Redis refuses plaintext; through dbmtls it answers."""
    from dbmtls.demo import run_demo

    sys.exit(run_demo(keep=keep))


if __name__ == "__main__":  # pragma: no cover
    main()
