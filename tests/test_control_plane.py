"""The control plane belongs to the coordinator: a hospital holding every file `fedcare deploy init` gave it
cannot reach the SuperLink's Control or Runtime API, while the coordinator (loopback) and registered nodes
(public listener) work as before.

Real processes on 127.0.0.1: fedcare's SuperLink launcher (TLS, node authentication, SQLite state), the
coordinator's `flwr` with the deployment's FLWR_HOME (the loopback control connection), and an attacking
hospital: a copy of its own folder (ca.crt, node.key, node.pub, hospital.toml) and a FLWR_HOME it wrote
itself that points `flwr` at the public address it dials, trusting its ca.crt. The attacking hospital is
registered and its node is online (the strongest hospital there is).

Baseline: with FEDCARE_CONTROL_PLANE_STOCK=1 the same attacks run against Flower's own `flower-superlink`
as fedcare started it before the launcher (`stock_superlink_command`: everything on the public port);
there the `flwr` attacks and the raw Control/Runtime/docs requests succeed, so those tests fail.

Every process is started in its own process group and stopped by PID; waits are hang guards only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from base64 import b64encode
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from fedcare.deploy_pki import DeploymentFiles, HospitalFiles, init_deployment, make_node_key
from fedcare.errors import FedcareError
from fedcare.fleet_allowlist import FleetOnly
from fedcare.superlink_app import VERIFIED_FLOWER, require_verified_flower
from tests.conftest import ROOT
from tests.support.deployment_processes import (
    BIN,
    HANG_GUARD_S,
    Processes,
    deployment_env,
    descendants,
    free_port,
    group_members,
    https_status,
    listening_addresses,
    stock_superlink_command,
    wait_for_port,
)

STOCK = os.environ.get("FEDCARE_CONTROL_PLANE_STOCK") == "1"


def _two_ports() -> tuple[int, int]:
    public = free_port()
    control = free_port()
    while control == public:
        control = free_port()
    return public, control


@dataclass
class ControlPlane:
    """A running SuperLink, the coordinator's `flwr`, and one hospital's own copy of what it was given."""

    tmp_path: Path
    files: DeploymentFiles
    processes: Processes
    link: subprocess.Popen
    link_log: Path
    public_port: int
    hospital: HospitalFiles  # the hospital's own copy of its folder (the attacker)
    hospital_home: Path  # the FLWR_HOME the hospital wrote itself

    def coordinator(self, *args: str) -> subprocess.CompletedProcess:
        """`flwr` on the coordinator's machine (the deployment's FLWR_HOME: the control connection)."""
        return self.processes.flwr(*args)

    def hospital_flwr(self, *args: str) -> subprocess.CompletedProcess:
        """`flwr` at the hospital: its own FLWR_HOME, connection `attack` = the public address + its ca.crt."""
        env = {**self.processes.env, "FLWR_HOME": str(self.hospital_home)}
        return subprocess.run(
            [str(BIN / "flwr"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )

    def runs(self) -> list[dict]:
        listing = self.coordinator("ls", self.files.connection, "--format", "json")
        assert listing.returncode == 0, listing.stdout + listing.stderr
        return json.loads(listing.stdout)["runs"]

    def nodes(self) -> list[dict]:
        listing = self.coordinator("supernode", "list", self.files.connection, "--format", "json")
        assert listing.returncode == 0, listing.stdout + listing.stderr
        return json.loads(listing.stdout)["nodes"]


def _hospital_copy(files: DeploymentFiles, index: int, where: Path) -> HospitalFiles:
    """The hospital's folder as handed over: copied to the hospital's own place."""
    given = files.hospitals[index]
    folder = where / given.name
    shutil.copytree(given.folder, folder)
    assert {"ca.crt", "hospital.toml", "node.key", "node.pub"} <= {p.name for p in folder.iterdir()}
    return HospitalFiles(
        given.name, folder, folder / "node.key", folder / "node.pub", folder / "ca.crt", folder / "hospital.toml"
    )


@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("control-plane")
    public, control = _two_ports()
    files = init_deployment(
        tmp_path / "deploy", ["cleveland", "hungary"], superlink_address=f"127.0.0.1:{public}", control_port=control
    )
    processes = Processes(tmp_path, deployment_env(files))
    if STOCK:  # Flower's one port: the coordinator's connection is the public address too
        command = stock_superlink_command(files, str(BIN / "flower-superlink"))
        config = files.flwr_home / "config.toml"
        config.write_text(config.read_text().replace(f"127.0.0.1:{control}", f"127.0.0.1:{public}"))
    else:
        command = files.superlink_command(sys.executable)
    link, link_log = processes.start("superlink", command)
    try:
        wait_for_port(public, link, link_log)
        if not STOCK:
            wait_for_port(control, link, link_log)
        for h in files.hospitals:
            done = processes.flwr(*files.register_command(h)[1:], "--format", "json")
            assert done.returncode == 0 and json.loads(done.stdout)["success"], done.stdout + done.stderr
        hospital = _hospital_copy(files, 0, tmp_path / "at-the-hospital")
        home = tmp_path / "at-the-hospital" / "flwr-home"
        home.mkdir()
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "attack"\n\n[superlink.attack]\n'
            f'address = "127.0.0.1:{public}"\nroot-certificates = "{hospital.root_certificate}"\n'
        )
        yield ControlPlane(tmp_path, files, processes, link, link_log, public, hospital, home)
    finally:
        processes.stop_all()
        left = [pid for proc in processes.procs for pid in group_members(proc.pid)]
        assert not left, f"processes left behind: {left}"


def _refused(done: subprocess.CompletedProcess) -> None:
    assert done.returncode != 0, done.stdout + done.stderr
    assert "Not Found" in done.stdout + done.stderr, done.stdout + done.stderr


# --- the attacks, each through the hospital's own `flwr` and files ---------------------------------------


@pytest.mark.e2e
def test_hospital_cannot_list_runs(plane):
    _refused(plane.hospital_flwr("ls", "attack"))
    _refused(plane.hospital_flwr("supernode", "list", "attack"))
    # (with --format json, flwr 1.41 exits 0 even on failure: the JSON says so)
    listing = plane.hospital_flwr("ls", "attack", "--format", "json")
    assert json.loads(listing.stdout)["success"] is False and "Not Found" in listing.stdout, listing.stdout


@pytest.mark.e2e
def test_hospital_cannot_start_a_run(plane):
    before = plane.runs()
    _refused(plane.hospital_flwr("run", ".", "attack", "--run-config", f"output-dir='{plane.tmp_path / 'evil'}'"))
    assert plane.runs() == before


@pytest.mark.e2e
def test_hospital_cannot_register_or_remove_node_keys(plane):
    before = plane.nodes()
    own = make_node_key(plane.hospital.folder / "extra.key")  # a key of the hospital's own making
    _refused(plane.hospital_flwr("supernode", "register", str(own), "attack"))
    for node in before:
        _refused(plane.hospital_flwr("supernode", "unregister", str(node["node-id"]), "attack"))
    after = plane.nodes()
    assert [(n["node-id"], n["status"]) for n in after] == [(n["node-id"], n["status"]) for n in before]
    assert len(after) == len(plane.files.hospitals)


def _signed_node_headers(hospital: HospitalFiles) -> dict[str, str]:
    """The headers a SuperNode signs Fleet requests with, made from the hospital's own node.key."""
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.supercore.date import now
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

    key = load_ssh_private_key(hospital.private_key.read_bytes(), password=None)
    stamp = now().isoformat()
    return {
        "flwr-public-key": b64encode(public_key_to_bytes(key.public_key())).decode(),
        "flwr-timestamp": stamp,
        "flwr-signature": b64encode(sign_message(key, stamp.encode())).decode(),
    }


HIDDEN_TARGETS = [
    "/v1/control/list-runs",
    "/v1/control/start-run",
    "/v1/control/stop-run",
    "/v1/control/register-node",
    "/v1/control/unregister-node",
    "/v1/control/list-nodes",
    "/v1/runtime/get-nodes",
    "/v1/runtime/acquire-task",
    "/v1/runtime/create-task",
    "/v1/runtime/responses",
    "/docs",
    "/openapi.json",
    "/docs/oauth2-redirect",
    # traversal and encoding variants: none may reach a Control or Runtime route
    "//v1/control/list-runs",
    "/v1/fleet/../control/list-runs",
    "/v1/fleet/./../control/list-runs",
    "/v1/fleet/%2e%2e/control/list-runs",
    "/v1/fleet/%2E%2E/control/list-runs",
    "/v1/fleet/..%2fcontrol/list-runs",
    "/v1/fleet%2f..%2fcontrol/list-runs",
    "/v1%2Fcontrol%2Flist-runs",
    "/%761/control/list-runs",
    "/v1/fleet/get-run/../../control/list-runs",
    "/health/../v1/control/list-runs",
    "/./v1/control/list-runs",
    "/v1/control/list-runs/",
    "/V1/CONTROL/LIST-RUNS",
    "/v1/control/list-runs?x=/v1/fleet/get-run",
    "/v1/fleet/%67et-run",
    "/v1/fleet/get-run%00",
    "/v1//fleet/get-run",
    "/v1/fleet//get-run",
    "https://127.0.0.1/v1/control/list-runs",
    "*",
]


@pytest.mark.e2e
@pytest.mark.parametrize("target", HIDDEN_TARGETS)
def test_raw_requests_to_anything_but_fleet_get_404(plane, target):
    ca = plane.hospital.root_certificate
    signed = _signed_node_headers(plane.hospital)
    statuses = {
        (method, bool(headers)): https_status(plane.public_port, method, target, ca, headers)
        for method in ("POST", "GET")
        for headers in ({}, signed)
    }
    assert set(statuses.values()) == {404}, statuses


@pytest.mark.e2e
def test_fleet_and_health_still_reach_flower_publicly(plane):
    ca = plane.hospital.root_certificate
    assert https_status(plane.public_port, "GET", "/health", ca) == 200
    # Flower's node authentication answers (401), not the gate (404): the Fleet API is there
    assert https_status(plane.public_port, "POST", "/v1/fleet/get-run", ca) == 401
    assert https_status(plane.public_port, "GET", "/v1/fleet/get-run", ca) == 405


@pytest.mark.e2e
def test_public_listener_refuses_websockets_and_plain_http(plane):
    upgrade = {
        "connection": "Upgrade",
        "upgrade": "websocket",
        "sec-websocket-version": "13",
        "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    assert (
        https_status(plane.public_port, "GET", "/v1/fleet/pull-messages", plane.hospital.root_certificate, upgrade)
        != 101
    )
    with socket.create_connection(("127.0.0.1", plane.public_port), timeout=30) as plain:
        plain.sendall(b"POST /v1/control/list-runs HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
        try:
            answer = plain.recv(1024)
        except ConnectionResetError:
            answer = b""
    assert not answer.startswith(b"HTTP/1.1 2"), answer


# --- what must keep working ----------------------------------------------------------------------------


@pytest.mark.e2e
def test_coordinator_controls_over_loopback_and_a_registered_node_joins_publicly(plane):
    assert isinstance(plane.runs(), list)  # `flwr ls` over the control connection
    registered = plane.nodes()
    assert len(registered) == 2 and all(n["status"] == "registered" for n in registered), registered
    assert plane.files.connection == "fedcare"
    config = (plane.files.flwr_home / "config.toml").read_text()
    if not STOCK:
        assert f'address = "{plane.files.control_address}"' in config

    # The attacking hospital's own node, from its own copy of hospital.toml (which dials the public address)
    settings = plane.hospital.settings  # relative paths (key, ledgers, cache) stay in the hospital's copy
    text = settings.read_text()
    assert f'address = "127.0.0.1:{plane.public_port}"' in text
    settings.write_text(re.sub(r"clientappio-port = \d+", f"clientappio-port = {free_port()}", text))
    node, log = plane.processes.start(
        "cleveland-node", [str(BIN / "fedcare"), "node", "start", "--config", str(settings)]
    )
    deadline = time.monotonic() + HANG_GUARD_S
    online = []
    while time.monotonic() < deadline and not online:
        assert node.poll() is None, f"the node exited:\n{log.read_text()[-3000:]}"
        online = [n for n in plane.nodes() if n["status"] == "online"]
        time.sleep(1)
    assert len(online) == 1, f"{plane.nodes()}\n{log.read_text()[-3000:]}"
    assert f"--superlink 127.0.0.1:{plane.public_port}" in " ".join(log.read_text().split())
    access = plane.link_log.read_text()
    assert '"POST /v1/fleet/activate-node HTTP/1.1" 200' in access, access[-3000:]


@pytest.mark.e2e
@pytest.mark.skipif(STOCK, reason="fedcare's launcher only")
def test_only_the_two_given_addresses_listen(plane):
    pids = [plane.link.pid, *descendants(plane.link.pid)]
    assert listening_addresses(pids) == {
        ("127.0.0.1", plane.public_port),
        ("127.0.0.1", int(plane.files.control_address.rsplit(":", 1)[1])),
    }


# --- the launcher itself --------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_both_listeners_and_the_superexec(tmp_path, signum):
    public, control = _two_ports()
    files = init_deployment(
        tmp_path / "deploy",
        ["a"],
        superlink_address=f"127.0.0.1:{public}",
        control_port=control,
        superlink_state="memory",
    )
    processes = Processes(tmp_path, deployment_env(files))
    link, log = processes.start("superlink", files.superlink_command(sys.executable))
    try:
        wait_for_port(public, link, log)
        deadline = time.monotonic() + HANG_GUARD_S
        while not (children := descendants(link.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)  # the lifespan's SuperExec
        assert children, log.read_text()
        os.kill(link.pid, signum)  # the launcher alone, not its group
        assert link.wait(timeout=HANG_GUARD_S) == 0, log.read_text()[-3000:]
        deadline = time.monotonic() + HANG_GUARD_S
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in children if _alive(pid)], log.read_text()[-3000:]
        assert "SuperLinkLifespan: stop" in log.read_text()
        for port in (public, control):
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        processes.stop_all()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _launcher(files: DeploymentFiles, prelude: str = "", **env: str) -> subprocess.CompletedProcess:
    """Run the launcher's main() in a fresh Python after ``prelude`` (e.g. a pretend Flower version)."""
    command = files.superlink_command(sys.executable)[3:]
    code = f"{prelude}\nfrom fedcare.superlink_launcher import main\nraise SystemExit(main({command!r}))"
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**deployment_env(files), **env},
    )


@pytest.mark.parametrize(
    "prelude,env,message",
    [
        (
            "import flwr.supercore.version as v; v.package_version = '1.42.0'",
            {},
            f"verified against Flower {VERIFIED_FLOWER} and this is Flower 1.42.0: refusing to start",
        ),
        ("", {"FLWR_INTERNAL_GRPC_CONTROL_API": "1"}, "FLWR_INTERNAL_GRPC_CONTROL_API=1 would make Flower open"),
    ],
)
def test_launcher_refuses_to_start_unverified(tmp_path, prelude, env, message):
    public, control = _two_ports()
    files = init_deployment(tmp_path / "deploy", ["a"], superlink_address=f"127.0.0.1:{public}", control_port=control)
    done = _launcher(files, prelude, **env)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not files.database.exists()  # nothing created, nothing bound
    for port in (public, control):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0


def test_launcher_refuses_a_non_loopback_control_host_and_a_busy_port(tmp_path):
    public, control = _two_ports()
    files = init_deployment(tmp_path / "deploy", ["a"], superlink_address=f"127.0.0.1:{public}", control_port=control)
    command = files.superlink_command(sys.executable)[3:]
    from fedcare.superlink_launcher import main

    assert main([*command, "--control-host", "0.0.0.0"]) == 2
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", control))
        busy.listen()
        done = _launcher(files)
    assert done.returncode == 2 and f"cannot listen on 127.0.0.1:{control}" in done.stderr, done.stderr


def test_flower_gate_names_version_enterprise_and_legacy_listeners():
    require_verified_flower(VERIFIED_FLOWER, enterprise=False, environ={})
    with pytest.raises(FedcareError, match=r"this is Flower 1.40.0"):
        require_verified_flower("1.40.0", enterprise=False, environ={})
    with pytest.raises(FedcareError, match="Flower Enterprise"):
        require_verified_flower(VERIFIED_FLOWER, enterprise=True, environ={})
    with pytest.raises(FedcareError, match="FLWR_INTERNAL_GRPC_FLEET_API"):
        require_verified_flower(VERIFIED_FLOWER, enterprise=False, environ={"FLWR_INTERNAL_GRPC_FLEET_API": "1"})


def test_superlink_command_never_starts_flowers_single_port_superlink(tmp_path):
    files = init_deployment(tmp_path / "d", ["a"], superlink_address="127.0.0.1:19092")
    for executable in (str(BIN / "flower-superlink"), "flower-superlink", sys.executable):
        command = files.superlink_command(executable)
        assert command[1:3] == ["-m", "fedcare.superlink_launcher"] and "flower-superlink" not in command[0]
    legacy = replace(files, control_port=None, control_certificate=None, control_key=None)
    assert legacy.control_address == "127.0.0.1:19093" and "--control-ssl-certfile" not in legacy.superlink_command()


# --- the gate, in-process -------------------------------------------------------------------------------

FLEET = ["/v1/fleet/get-run", "/v1/fleet/pull-messages", "/health"]


def _through_gate(scope: dict) -> tuple[bool, list[dict]]:
    """Whether the gate passed ``scope`` to the app, and what it sent itself."""
    import asyncio

    reached, sent = [], []

    async def app(scope, receive, send):
        reached.append(scope)

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    asyncio.run(FleetOnly(app, FLEET)({"type": "http", "root_path": "", **scope}, receive, send))
    return bool(reached), sent


@pytest.mark.parametrize(
    "path,raw_path,root_path,passes",
    [
        ("/v1/fleet/get-run", b"/v1/fleet/get-run", "", True),
        ("/health", b"/health", "", True),
        ("/v1/fleet/get-run", None, "", True),  # a server that sets no raw_path
        ("/v1/fleet/get-run", b"/v1/fleet/%67et-run", "", False),  # decoded path allowed, raw path encoded
        ("/v1/fleet/get-run", b"/v1/fleet/get-run", "/v1/fleet", False),  # a root_path shifts what routes match
        ("/v1/fleet/get-run", b"/v1/fleet/get-run", "/", False),
        ("/v1/control/list-runs", b"/v1/control/list-runs", "", False),
        ("/v1/fleet/../control/list-runs", b"/v1/fleet/../control/list-runs", "", False),
        ("/v1/fleet/unknown", b"/v1/fleet/unknown", "", False),  # under the prefix, not a listed route
        ("/docs", b"/docs", "", False),
        ("/openapi.json", b"/openapi.json", "", False),
    ],
)
def test_gate_admits_exactly_the_listed_paths(path, raw_path, root_path, passes):
    scope = {"path": path, "root_path": root_path, **({"raw_path": raw_path} if raw_path is not None else {})}
    reached, sent = _through_gate(scope)
    assert reached == passes
    if not passes:
        assert sent[0]["status"] == 404 and sent[1]["body"] == b'{"detail":"Not Found"}'


def test_gate_closes_websockets_refuses_other_scopes_and_unsafe_allowlists():
    import asyncio

    reached, sent = [], []

    async def app(scope, receive, send):
        reached.append(scope)

    async def receive():
        return {"type": "websocket.connect"}

    async def send(message):
        sent.append(message)

    gate = FleetOnly(app, FLEET)
    asyncio.run(
        gate(
            {"type": "websocket", "path": "/v1/fleet/get-run", "raw_path": b"/v1/fleet/get-run", "root_path": ""},
            receive,
            send,
        )
    )
    assert not reached and sent == [{"type": "websocket.close", "code": 1008}]
    with pytest.raises(RuntimeError, match="does not serve 'lifespan'"):
        asyncio.run(gate({"type": "lifespan"}, receive, send))
    for bad in (
        [],
        ["/v1/control/list-runs"],
        ["/v1/fleet/{node_id}"],
        ["/v1/fleet/../control/x"],
        ["/docs"],
        ["/v1/fleet/"],
    ):
        with pytest.raises(ValueError, match="only literal Fleet paths"):
            FleetOnly(app, bad)
