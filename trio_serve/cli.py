"""`initrunner serve|validate`: startup checks, the banner, signals, exit codes.

User mistakes (missing file, bad YAML, invalid role, missing provider key, port
in use) print one line naming the cause and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import resource
import secrets
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from pathlib import Path

import attrs
import trio

from trio_serve import audit_cli
from trio_serve.audit import DEFAULT_PATH as DEFAULT_AUDIT_DB
from trio_serve.audit import AuditDatabase
from trio_serve.config import Role, load_role
from trio_serve.errors import StartupError
from trio_serve.guard import LOOPBACK_PROXIES, TrustedProxies, is_loopback_host
from trio_serve.providers.factory import provider_api_key
from trio_serve.server import MAX_REFUSING, SHUTDOWN_GRACE_S, Running, ServeOptions, serve

EXIT_USAGE = 2

log = logging.getLogger("trio_serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="initrunner", description="Serve an agent as an OpenAI-compatible HTTP API.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("serve", help="serve a role file over HTTP")
    run.add_argument("role_file", type=Path, help="path to the role YAML file")
    run.add_argument("--host", default="127.0.0.1", help="host to bind (default: 127.0.0.1)")
    run.add_argument("--port", type=_port, default=8000, help="port to listen on (default: 8000; 0 picks one)")
    run.add_argument("--api-key", default=None, help="Bearer key clients must send (env INITRUNNER_API_KEY)")
    run.add_argument(
        "--audit-db",
        type=Path,
        default=None,
        help=f"audit database (default: env INITRUNNER_AUDIT_DB, else {DEFAULT_AUDIT_DB})",
    )
    run.add_argument("--no-audit", action="store_true", help="disable audit logging")
    run.add_argument(
        "--grace-period",
        type=_seconds,
        default=SHUTDOWN_GRACE_S,
        metavar="SECONDS",
        help=f"on SIGINT/SIGTERM, time given to requests in flight (default: {SHUTDOWN_GRACE_S:g})",
    )
    run.add_argument(
        "--cors-origin", action="append", default=[], metavar="ORIGIN", help="allowed CORS origin (repeatable)"
    )
    run.add_argument(
        "--forwarded-allow-ips",
        type=_proxies,
        default=LOOPBACK_PROXIES,
        metavar="IPS",
        help="proxies whose X-Forwarded-For/-Proto are believed: addresses or networks, comma-separated, "
        "or '*' (default: 127.0.0.1,::1)",
    )
    check = commands.add_parser("validate", help="check a role file without serving it")
    check.add_argument("role_file", type=Path, help="path to the role YAML file")
    audit_cli.add_commands(commands, DEFAULT_AUDIT_DB)
    return parser


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be between 0 and 65535, got {port}")
    return port


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"must be between 0 and 3600 seconds, got {text}")
    return seconds


def _proxies(text: str) -> TrustedProxies:
    try:
        return TrustedProxies.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Our own messages at INFO; libraries (httpx logs every request at INFO) stay at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    try:
        if args.command == "validate":
            return _validate(args)
        if args.command == "audit":
            return audit_cli.run(args, audit_path(args.audit_db, os.environ), os.environ)
        return _serve(args, os.environ)
    except StartupError as exc:
        print(f"initrunner: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except audit_cli.AuditCliError as exc:
        print(f"initrunner: error: {exc}", file=sys.stderr)
        return audit_cli.EXIT_FAILURE


def audit_path(given: Path | None, env: Mapping[str, str]) -> Path:
    """--audit-db, else INITRUNNER_AUDIT_DB, else the default under the home directory."""
    return (given or Path(env.get("INITRUNNER_AUDIT_DB") or DEFAULT_AUDIT_DB)).expanduser()


def _validate(args: argparse.Namespace) -> int:
    role = _load(args.role_file)
    provider_api_key(role.model, os.environ)
    print(f"{args.role_file}: ok (agent {role.name}, model {role.model.provider}:{role.model.name})")
    return 0


def _load(path: Path) -> Role:
    role = load_role(path)
    if role.ignored_keys:
        print(
            f"initrunner: warning: {path}: not served here, ignored: {', '.join(role.ignored_keys)}",
            file=sys.stderr,
        )
    return role


@attrs.frozen(kw_only=True)
class _Plan:
    host: str
    port: int
    options: ServeOptions


def _serve(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    role = _load(args.role_file)
    if args.cors_origin:
        merged = tuple(dict.fromkeys(role.server.cors_origins + tuple(args.cors_origin)))
        role = attrs.evolve(role, server=attrs.evolve(role.server, cors_origins=merged))
    options = ServeOptions(
        role=role,
        api_key=_client_key(args, env),
        provider_key=provider_api_key(role.model, env),
        created=_created(args.role_file),
        grace_s=args.grace_period,
        proxies=args.forwarded_allow_ips,
        audit_db=None if args.no_audit else AuditDatabase.open(audit_path(args.audit_db, env), env),
    )
    _raise_descriptor_limit(role.server.max_connections, role.server.max_upstream_calls)
    trio.run(_run, _Plan(host=args.host, port=args.port, options=options))
    return 0


def _raise_descriptor_limit(max_connections: int, max_upstream_calls: int) -> None:
    """Make room for the configured caps, so the server answers 503 at its cap
    rather than failing to accept at the system's (often 1024 by default)."""
    needed = max_connections + max_upstream_calls + MAX_REFUSING + 256  # + audit, logs, listeners
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    with suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft < needed:
        print(
            f"initrunner: warning: the open-file limit ({soft}) is below the {needed} the connection caps need; "
            "raise it (ulimit -n) or lower security.server.max_connections",
            file=sys.stderr,
        )


def _client_key(args: argparse.Namespace, env: Mapping[str, str]) -> str | None:
    key = args.api_key or env.get("INITRUNNER_API_KEY") or None
    if key is None and not is_loopback_host(args.host):
        # Off loopback, an open server would hand the agent (and its provider
        # bill) to anyone who can reach it: require a generated key instead.
        key = secrets.token_urlsafe(32)
        print(f"initrunner: no --api-key given for {args.host}; generated one: {key}", file=sys.stderr)
    return key


def _created(role_file: Path) -> int:
    try:
        return int(role_file.stat().st_mtime)
    except OSError:
        return int(time.time())


async def _run(plan: _Plan) -> None:
    listeners = await _bind(plan.host, plan.port)
    async with trio.open_nursery() as nursery:
        running = await nursery.start(_serve_then_stop, plan.options, listeners, nursery.cancel_scope)
        _print_banner(plan.options.role, running)
        await _stop_on_signals(running, nursery.cancel_scope)


async def _serve_then_stop(
    options: ServeOptions,
    listeners: list[trio.SocketListener],
    everything: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve(options, listeners, task_status=task_status)
    everything.cancel()  # drained: stop waiting for signals too


async def _bind(host: str, port: int) -> list[trio.SocketListener]:
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"cannot listen on {host}:{port}: the port is already in use") from None
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


async def _stop_on_signals(running: Running, everything: trio.CancelScope) -> None:
    """The first SIGINT/SIGTERM drains gracefully; a second one stops at once."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if running.draining():
                everything.cancel()
                return
            log.info("initrunner: %s received, finishing requests in flight", signal.Signals(signum).name)
            running.shutdown()


def _print_banner(role: Role, running: Running) -> None:
    host, port = running.addresses[0]
    shown = f"[{host}]" if ":" in host else host
    base = f"http://{shown}:{port}"
    print(f"initrunner: serving agent {role.name!r} ({role.model.provider}:{role.model.name})", flush=True)
    print(f"  OpenAI base URL: {base}/v1", flush=True)
    print(f"  model id:        {role.name}", flush=True)
    print(f"  health:          {base}/health", flush=True)
