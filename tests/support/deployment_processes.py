"""Process helpers for the real-deployment tests: fedcare's SuperLink launcher, `flower-supernode` and `flwr` on 127.0.0.1.

Every process is started in its own process group (``start_new_session``) with its output in a log
file, and stopped by PID through that group, so nothing outlives a test. Waits are hang guards only.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fedcare.deploy_pki import DeploymentFiles, split_address
from fedcare.node_settings import NodeSettings, load_node_settings
from fedcare.safe_environment import SAFE_ENVIRONMENT
from tests.conftest import ROOT

BIN = Path(sys.executable).parent
HANG_GUARD_S = 900


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TlsStandIn:
    """A SuperLink stand-in for address/certificate probes: a listener on 127.0.0.1 that completes each TLS
    handshake with ``certificate``/``key`` and closes the connection, or with ``certificate`` None answers
    in plain text (a port that does not speak TLS). ``with TlsStandIn(...) as link:`` ... ``link.port``."""

    def __init__(self, certificate: Path | None, key: Path | None) -> None:
        self.context = None
        if certificate is not None:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(str(certificate), str(key))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, name="tls-stand-in", daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # closed: the test is done
                return
            with connection:
                connection.settimeout(10)
                try:
                    if self.context is None:
                        connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    else:
                        with self.context.wrap_socket(connection, server_side=True):
                            pass
                except OSError:  # the client refused the certificate, or hung up
                    pass

    def __enter__(self) -> TlsStandIn:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(timeout=10)


def stock_superlink_command(files: DeploymentFiles, executable: str = "flower-superlink") -> list[str]:
    """Flower's own `flower-superlink` as fedcare started it before its launcher: Fleet, Control and Runtime APIs
    on the one public port (TLS, node authentication). The baseline the control-plane attacks are checked against."""
    host, port = split_address(files.superlink_address)
    return [
        executable,
        "--ssl-ca-certfile",
        str(files.ca_certificate),
        "--ssl-certfile",
        str(files.server_certificate),
        "--ssl-keyfile",
        str(files.server_key),
        "--enable-supernode-auth",
        "--host",
        host,
        "--port",
        str(port),
        *(["--database", str(files.database)] if files.database is not None else []),
        "--disable-runtime-dependency-installation",
    ]


def listening_addresses(pids: list[int]) -> set[tuple[str, int]]:
    """(IP, port) of every TCP socket in LISTEN state that one of ``pids`` holds open (Linux /proc)."""
    inodes = set()
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:  # the process is gone (or a descriptor closed meanwhile)
            continue
        inodes |= {link[8:-1] for link in links if link.startswith("socket:[")}
    found = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            raw = b"".join(bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, len(address), 8))
            found.add((str(ipaddress.ip_address(raw[:width])), int(port, 16)))
    return found


def https_status(
    port: int, method: str, target: str, ca: Path, headers: dict[str, str] | None = None, body: bytes = b""
) -> int:
    """Send one request with ``target`` exactly as given (no normalising) over TLS to 127.0.0.1:``port``,
    verifying the server against ``ca``; return the HTTP status."""
    context = ssl.create_default_context(cafile=str(ca))
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=60)
    try:
        connection.putrequest(method, target, skip_accept_encoding=True)
        for name, value in {
            "content-type": "application/protobuf",
            "content-length": str(len(body)),
            **(headers or {}),
        }.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Wait until ``proc`` (a SuperLink) accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the SuperLink exited early:\n{log.read_text()[-3000:]}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"SuperLink did not listen on 127.0.0.1:{port}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group of ``proc`` (SIGKILL after 30 s); reap the leader.

    Processes it started in groups of their own (the SuperLink's SuperExec and the ServerApps under it) are
    given 10 s to follow their parent out, as Flower makes them, then killed by group.
    """
    others = child_groups(proc.pid) if proc.poll() is None else []  # (a reaped PID may be reused)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    else:  # the leader exited; make sure no child of its group is left behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(group_members(g) for g in others) and time.monotonic() < deadline:
        time.sleep(0.1)
    for group in others:
        if group_members(group):
            _killpg(group)


def kill_group(proc: subprocess.Popen, timeout: float = 30) -> list[int]:
    """A crash: SIGKILL the process group of ``proc`` and every group its descendants started (no cleanup
    anywhere), wait until none of them is left, and return the PIDs that were killed."""
    groups = [proc.pid, *(child_groups(proc.pid) if proc.poll() is None else [])]
    killed = [pid for group in groups for pid in group_members(group)]
    for group in groups:
        _killpg(group)
    proc.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while any(group_members(g) for g in groups) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [pid for group in groups for pid in group_members(group)]
    assert not left, f"processes survived SIGKILL: {left}"
    return killed


def _killpg(group: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, process group) of a live process, from /proc (Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
    return state, int(ppid), int(pgrp)


def _processes() -> dict[int, tuple[str, int, int]]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
            found[int(entry.name)] = stat
    return found


def group_members(pgid: int) -> list[int]:
    """PIDs of live (non-zombie) processes in process group ``pgid``."""
    return sorted(pid for pid, (state, _, pgrp) in _processes().items() if pgrp == pgid and state != "Z")


def descendants(pid: int) -> list[int]:
    """PIDs of the live descendants of ``pid``."""
    table = _processes()
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, (state, ppid, _) in table.items() if ppid == parent and state != "Z"]
        found += children
        frontier += children
    return sorted(found)


def child_groups(pid: int) -> list[int]:
    """Process groups, other than its own, that descendants of ``pid`` run in (e.g. a SuperLink's SuperExec)."""
    own = _proc_stat(pid)
    groups = {stat[2] for p in descendants(pid) if (stat := _proc_stat(p)) is not None}
    return sorted(groups - {own[2] if own else pid})


def hospital_settings(files: DeploymentFiles, index: int, partition: int, ledgers: Path) -> NodeSettings:
    """The init-written hospital.toml, with a free local port and a ledger folder in tmp."""
    path = files.hospitals[index].settings
    text = re.sub(r"clientappio-port = \d+", f"clientappio-port = {free_port()}", path.read_text())
    text = re.sub(r"partition-id = \d+", f"partition-id = {partition}", text)
    text = text.replace('ledger-dir = "ledgers"', f'ledger-dir = "{ledgers / files.hospitals[index].name}"')
    path.write_text(text)
    return load_node_settings(path)


def deployment_env(files: DeploymentFiles, **extra: str) -> dict[str, str]:
    """The environment of every process: loopback-only, no telemetry, the deployment's FLWR_HOME."""
    return {
        **os.environ,
        **SAFE_ENVIRONMENT,
        "FLWR_HOME": str(files.flwr_home),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        **extra,
    }  # flower-superexec must be on PATH


class Processes:
    """The processes one test started (each in its own group, logging to ``logs/NAME.log``) and `flwr`."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.tmp_path, self.env = tmp_path, env
        self.logs = tmp_path / "logs"
        self.logs.mkdir(exist_ok=True)
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, command: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.logs / f"{name}.log"
        with open(log, "a") as out:
            proc = subprocess.Popen(
                command,
                cwd=ROOT if command[0] == sys.executable else self.tmp_path,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc, log

    def flwr(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=300
        )

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)


def start_run(flwr: Callable[..., subprocess.CompletedProcess], connection: str, run_config: str) -> str:
    """`flwr run . CONNECTION --run-config ...`; returns the new run's id."""
    run = flwr("run", ".", connection, "--run-config", run_config)
    assert run.returncode == 0, run.stdout + run.stderr
    return re.search(r"started run (\d+)", run.stdout + run.stderr).group(1)


def run_status(flwr: Callable[..., subprocess.CompletedProcess], connection: str, run_id: str) -> str:
    """The run's status as `flwr ls` reports it (e.g. ``running``, ``finished:completed``); "" if unknown."""
    listing = flwr("ls", connection, "--run-id", run_id, "--format", "json")
    try:
        runs = json.loads(listing.stdout).get("runs", []) if listing.returncode == 0 else []
    except json.JSONDecodeError:
        runs = []
    return runs[0]["status"].lower() if runs else ""


def wait_for_run(
    flwr: Callable[..., subprocess.CompletedProcess],
    connection: str,
    run_id: str,
    nodes: list[tuple[subprocess.Popen, Path]],
    timeout: float = HANG_GUARD_S,
    poll_s: float = 5,
    done: Callable[[], bool] | None = None,
    fallback_s: float = 20,
) -> str:
    """Poll `flwr ls` until the run finished (its status returned); every SuperNode in ``nodes`` must stay up.

    Each `flwr` call costs ~2 s of CPU (imports), which slows a run on a 2-core machine: with ``done`` (a cheap
    check, e.g. "results.json of this run exists") `flwr ls` is asked only once ``done()`` holds, or every
    ``fallback_s`` seconds (a run that failed writes no results).
    """
    status, deadline, asked = "", time.monotonic() + timeout, time.monotonic()
    while time.monotonic() < deadline:
        if done is None or done() or time.monotonic() - asked > fallback_s:
            asked = time.monotonic()
            status = run_status(flwr, connection, run_id)
            if status.startswith("finished"):
                break
        for proc, log in nodes:
            assert proc.poll() is None, f"a SuperNode died:\n{log.read_text()[-3000:]}"
        time.sleep(poll_s)
    return status
