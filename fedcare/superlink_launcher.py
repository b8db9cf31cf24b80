"""fedcare's SuperLink: Flower's own app on two listeners, so hospitals never reach the control plane.

    python -m fedcare.superlink_launcher --host HOST --port PORT --control-port CPORT \\
        --ssl-ca-certfile ca.crt --ssl-certfile server.crt --ssl-keyfile server.key \\
        [--control-ssl-certfile control.crt --control-ssl-keyfile control.key] \\
        [--database state.db] [--disable-runtime-dependency-installation]

Flower 1.41's `flower-superlink` serves Fleet, Control and Runtime APIs on one port, and the
open-source Control API has no authentication: a hospital holding only the deployment's `ca.crt`
could list, start and stop runs and register node keys. This launcher runs the same Flower app
(`fedcare.superlink_app`) behind two uvicorn servers in one event loop:

- public  HOST:PORT, TLS with the SuperLink certificate: only `/v1/fleet/*` and `/health`
  (`fedcare.fleet_allowlist.FleetOnly`, exact paths), node authentication always on (only
  registered node keys), no lifespan, no websockets, no proxy headers. Hospitals dial this.
- control 127.0.0.1:CPORT (a loopback address is required), TLS with a certificate for
  127.0.0.1: the whole app (Control, Runtime, Fleet). It owns the lifespan, so Flower's SuperExec
  and the ServerApps connect here; `flwr` on the coordinator's machine uses it.

Every certificate and key is parsed, each certificate checked against its key and its validity
period first (`fedcare/tls_files.py`): an expired certificate is refused by name, with the
renewing command, rather than served to nodes that would blame their CA or SANs.
Both addresses are bound before anything starts (a busy port is one clear error, and nothing else
is ever bound); the control server starts first and the public one only once the control
server (and its SuperExec) is up. uvicorn installs its signal handlers per server, each
replacing the last, so this launcher handles SIGINT/SIGTERM itself: the public listener stops
first, then the control listener, whose lifespan stops the SuperExec (killed if it has not left
within `SUPEREXEC_STOP_S`). A second signal cuts the graceful wait short. Exit status: 0 after a
signal, 1 when a server stopped on its own, 2 when it refused to start (one line on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import os
import signal
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedcare.errors import FedcareError
from fedcare.tls_files import read_ca_certificates, read_server_credentials

if TYPE_CHECKING:
    from fedcare.superlink_app import FlowerSuperLink

GRACEFUL_SHUTDOWN_S = 10  # longest wait for requests in flight when a listener stops
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _credential_files(args: argparse.Namespace) -> dict[str, str]:
    """Flag -> path of the CA, certificate and key files of both listeners, each present, parsed and in date."""
    files = {
        "--ssl-ca-certfile": args.ssl_ca_certfile,
        "--ssl-certfile": args.ssl_certfile,
        "--ssl-keyfile": args.ssl_keyfile,
        "--control-ssl-certfile": args.control_ssl_certfile or args.ssl_certfile,
        "--control-ssl-keyfile": args.control_ssl_keyfile or args.ssl_keyfile,
    }
    for flag, path in files.items():
        if not Path(path).is_file():
            raise FedcareError(f"{flag} {path}: no such file", "use the files `fedcare deploy init` wrote")
    if bool(args.control_ssl_certfile) != bool(args.control_ssl_keyfile):
        raise FedcareError(
            "--control-ssl-certfile and --control-ssl-keyfile go together",
            "pass both, or neither (the public certificate then serves both listeners)",
        )
    # Parsed and dated now: an expired certificate would be served, and every node blame its CA or SANs.
    read_ca_certificates(Path(args.ssl_ca_certfile), "--ssl-ca-certfile")
    read_server_credentials(
        Path(args.ssl_certfile),
        Path(args.ssl_keyfile),
        f"--ssl-certfile {args.ssl_certfile}",
        "the SuperLink's certificate",
    )
    if args.control_ssl_certfile:
        read_server_credentials(
            Path(args.control_ssl_certfile),
            Path(args.control_ssl_keyfile),
            f"--control-ssl-certfile {args.control_ssl_certfile}",
            "the SuperLink's control certificate",
        )
    return files


@dataclass(frozen=True)
class LauncherSettings:
    """Where each listener binds and which files it serves with (validated by `from_args`)."""

    public_host: str
    public_port: int
    control_host: str
    control_port: int
    ca_certificate: Path
    certificate: Path
    key: Path
    control_certificate: Path
    control_key: Path
    database: str | None  # None: Flower's in-memory state
    runtime_dependency_install: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LauncherSettings:
        try:
            loopback = ipaddress.ip_address(args.control_host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise FedcareError(
                f"--control-host '{args.control_host}' is not a loopback IP address: the control "
                "listener serves the unauthenticated Control API",
                "use 127.0.0.1 (run `flwr` on the coordinator's machine)",
            )
        if args.port == args.control_port:
            raise FedcareError(
                f"--port and --control-port are both {args.port}",
                "give the control listener its own port (e.g. the public port + 1)",
            )
        files = _credential_files(args)
        install = (
            not args.disable_runtime_dependency_installation
            and os.environ.get("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION") != "1"
        )
        ca, certificate, key, control_certificate, control_key = (
            Path(p).expanduser().resolve() for p in files.values()
        )
        return cls(
            args.host,
            args.port,
            args.control_host,
            args.control_port,
            ca,
            certificate,
            key,
            control_certificate,
            control_key,
            args.database,
            install,
        )


def _port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError("a port is 1-65535")
    return value


def parser() -> argparse.ArgumentParser:
    """The launcher's options (named like flower-superlink's where they mean the same)."""
    p = argparse.ArgumentParser(
        prog="python -m fedcare.superlink_launcher",
        description="Flower's SuperLink with the Fleet API public and the control plane on loopback only.",
    )
    p.add_argument("--host", default="127.0.0.1", help="public listener (Fleet API): the address hospitals dial")
    p.add_argument("--port", type=_port, required=True, help="public listener's port")
    p.add_argument("--control-host", default="127.0.0.1", help="control listener: a loopback IP [127.0.0.1]")
    p.add_argument("--control-port", type=_port, required=True, help="control listener's port (flwr, SuperExec)")
    p.add_argument("--ssl-ca-certfile", required=True, help="the deployment's CA certificate")
    p.add_argument(
        "--ssl-certfile", required=True, help="public listener's TLS certificate (SANs: what hospitals dial)"
    )
    p.add_argument("--ssl-keyfile", required=True, help="public listener's TLS key")
    p.add_argument(
        "--control-ssl-certfile", help="control listener's TLS certificate, valid for the control host [--ssl-certfile]"
    )
    p.add_argument("--control-ssl-keyfile", help="control listener's TLS key [--ssl-keyfile]")
    p.add_argument("--database", default=None, help="SQLite file for the SuperLink's state [in memory]")
    p.add_argument(
        "--disable-runtime-dependency-installation",
        action="store_true",
        help="never pip/uv-install a run's dependencies (fedcare's environment forces this anyway)",
    )
    return p


def bind(host: str, port: int) -> list[socket.socket]:
    """Bound (not yet listening) TCP sockets for every address ``host`` resolves to; FedcareError if any is busy.

    Binding here, before Flower's state or SuperExec start, makes a busy port one clear error and
    keeps every socket this process serves on exactly what the settings name. The servers start
    listening on them only when they start serving.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise FedcareError(
            f"cannot resolve listener host '{host}': {exc.strerror}", "use an IP address of this machine"
        ) from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        hint = (
            "is another SuperLink (or anything else) using that port? stop it or choose another port"
            if exc.errno == errno.EADDRINUSE
            else f"'{host}' is not an address of this machine: bind the public listener to this machine's IP "
            "or 0.0.0.0 (`--host`), keeping the certificate's SANs for the name hospitals dial"
            if exc.errno == errno.EADDRNOTAVAIL
            else ""
        )
        raise FedcareError(f"cannot listen on {_address(host, port)}: {exc.strerror}", hint) from None
    return sockets


def _uvicorn_server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """A uvicorn server that leaves SIGINT/SIGTERM to the launcher (one handler for both servers)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server


def _listeners(flower: FlowerSuperLink, settings: LauncherSettings) -> tuple[Any, Any]:
    """The two uvicorn servers: control (Flower's whole app, its lifespan) and public (Fleet and /health only)."""
    import uvicorn

    from fedcare.fleet_allowlist import FleetOnly

    Server = _uvicorn_server_class()
    common: dict[str, Any] = dict(
        access_log=True,
        proxy_headers=False,
        server_header=False,
        ws="none",
        workers=1,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    control = Server(
        uvicorn.Config(
            flower.app,
            host=settings.control_host,
            port=settings.control_port,
            lifespan="on",
            log_config=flower.log_config,
            ssl_certfile=str(settings.control_certificate),
            ssl_keyfile=str(settings.control_key),
            **common,
        )
    )
    public = Server(
        uvicorn.Config(
            FleetOnly(flower.app, flower.public_paths),
            host=settings.public_host,
            port=settings.public_port,
            lifespan="off",
            log_config=None,
            ssl_certfile=str(settings.certificate),
            ssl_keyfile=str(settings.key),
            **common,
        )
    )
    return control, public


async def serve(
    flower: FlowerSuperLink,
    settings: LauncherSettings,
    control_sockets: list[socket.socket],
    public_sockets: list[socket.socket],
) -> int:
    """Run both listeners until a signal (0) or until one stops on its own (1)."""
    control, public = _listeners(flower, settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():  # a second signal: stop waiting for requests in flight
            control.force_exit = public.force_exit = True
        stop.set()

    for sig in HANDLED_SIGNALS:
        loop.add_signal_handler(sig, on_signal)
    stopping = asyncio.create_task(stop.wait())
    control_task = asyncio.create_task(control.serve(sockets=control_sockets))
    while not control.started and not control_task.done() and not stop.is_set():
        await asyncio.sleep(0.05)
    running = [control_task, stopping]
    public_task = None
    if control.started and not stop.is_set():
        public_task = asyncio.create_task(public.serve(sockets=public_sockets))
        running.append(public_task)
        _say(
            f"public listener https://{_address(settings.public_host, settings.public_port)}: Fleet API and "
            f"/health only, registered node keys only; control listener "
            f"https://{_address(settings.control_host, settings.control_port)}: Control, Runtime and Fleet "
            "APIs, this machine only"
        )
    await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
    signalled = stop.is_set()
    public.should_exit = True  # hospitals first, then the control plane and its SuperExec
    if public_task is not None:
        _report(await asyncio.gather(public_task, return_exceptions=True), "public")
    else:
        for sock in public_sockets:
            sock.close()
    control.should_exit = True
    _report(await asyncio.gather(control_task, return_exceptions=True), "control")
    stopping.cancel()
    for sig in HANDLED_SIGNALS:
        loop.remove_signal_handler(sig)
    if not signalled:
        _say("a listener stopped on its own (see the log above): the SuperLink is down")
    return 0 if signalled else 1


def _report(results: list[object], listener: str) -> None:
    for result in results:
        if isinstance(result, BaseException):
            _say(f"the {listener} listener failed: {type(result).__name__}: {result}")


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _say(line: str) -> None:
    print(f"fedcare SuperLink: {line}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Validate, bind both listeners, build Flower's app, serve; see the module docstring for exit codes."""
    from fedcare.safe_environment import apply_safe_environment

    apply_safe_environment()  # no telemetry, no update check, no runtime pip/uv installs
    args = parser().parse_args(argv)
    try:
        from fedcare.superlink_app import ControlListener, build_superlink_app, require_verified_flower

        settings = LauncherSettings.from_args(args)
        require_verified_flower()  # before anything is bound or created
        control_sockets = bind(settings.control_host, settings.control_port)
        public_sockets = bind(settings.public_host, settings.public_port)
        control = ControlListener(
            settings.control_host,
            settings.control_port,
            settings.ca_certificate,
            settings.control_certificate,
            settings.control_key,
        )
        flower = build_superlink_app(control, settings.database, settings.runtime_dependency_install)
    except FedcareError as exc:
        from fedcare.error_output import print_error

        print_error(exc)
        return 2
    import uvicorn

    loop_factory = uvicorn.Config(
        flower.app, log_config=None
    ).get_loop_factory()  # uvloop when installed, as uvicorn.run
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(serve(flower, settings, control_sockets, public_sockets))


if __name__ == "__main__":
    sys.exit(main())
