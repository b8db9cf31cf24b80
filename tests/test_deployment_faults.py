"""Deployment faults a hospital meets, each with one named outcome instead of a hang or a misleading reason.

- a node killed a moment ago (a real SuperNode, SIGKILLed) left its Runtime API port in TIME-WAIT: the node
  starts again at once, while a live listener still blocks the port and is named;
- a corrupted or wrong-type ca.crt / node.key: one error naming the file, before any process starts (also in
  `--check-only`, and in a real `fedcare.node_launcher` process);
- a SuperLink address nobody answers: "cannot reach the SuperLink at HOST:PORT (...)", retried for a bounded
  time with the address named each time, then the node stops (a real `fedcare node start` process);
- an expired or not-yet-valid SuperLink certificate: named as such, with the date and the renewing command
  (a TLS stand-in on 127.0.0.1 serving the certificate, and the real SuperLink launcher refusing to serve it).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from typer.testing import CliRunner

from fedcare.deploy_commands import node_app
from fedcare.deploy_pki import init_deployment, renew_superlink_certificates
from fedcare.errors import FedcareError
from fedcare.node_settings import check_credentials, load_node_settings, port_is_free
from fedcare.superlink_probe import SuperLinkUnreachable, probe_superlink
from tests.conftest import ROOT
from tests.support.deployment_processes import BIN, TlsStandIn, free_port, kill_group, stop

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture
def deployment(tmp_path):
    """A real deployment (CA, SuperLink certificates, one hospital) whose hospital.toml has a free local port."""
    files = init_deployment(tmp_path / "deploy", ["Cleveland"], superlink_address=f"127.0.0.1:{free_port()}")
    settings = files.hospitals[0].settings
    settings.write_text(settings.read_text().replace("clientappio-port = 9094", f"clientappio-port = {free_port()}"))
    return files


def _dial(files, address: str, extra_superlink: str = "") -> Path:
    """Point the hospital's settings at ``address`` (and add ``extra_superlink`` keys under [superlink])."""
    path = files.hospitals[0].settings
    text = re.sub(r'address = "[^"]*"', f'address = "{address}"', path.read_text())
    path.write_text(text.replace('root-certificates = "ca.crt"\n', f'root-certificates = "ca.crt"\n{extra_superlink}'))
    return path


def _tcp_states(port: int) -> set[str]:
    """States (hex, as Linux writes them) of every IPv4 TCP socket on 127.0.0.1:``port``."""
    states = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port:
            states.add(fields[3])
    return states


# -- the Runtime API port ------------------------------------------------------------------------------------


def test_a_port_left_in_time_wait_by_a_stopped_node_is_free_but_a_live_listener_is_named(deployment):
    # A SuperNode's Runtime API listener (uvicorn sets SO_REUSEADDR) that served its ClientApp and then died:
    # the node's side closed first, so its end of the connection sits in TIME-WAIT for a minute.
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    served, _ = listener.accept()
    served.close()
    listener.close()
    client.close()
    assert "06" in _tcp_states(port)  # TIME-WAIT, and nothing listening
    assert port_is_free(port)

    with socket.socket() as live:  # a node that is still running (it could bind: SO_REUSEADDR)
        live.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        live.bind(("127.0.0.1", port))
        live.listen()
        assert not port_is_free(port)
        path = deployment.hospitals[0].settings
        path.write_text(re.sub(r"clientappio-port = \d+", f"clientappio-port = {port}", path.read_text()))
        with pytest.raises(FedcareError, match=rf"127\.0\.0\.1:{port} is already in use") as info:
            load_node_settings(path)
        assert f"process {os.getpid()}" in info.value.problem  # who holds it, when this user can see


def test_a_killed_node_can_start_again_at_once(deployment):
    """A real SuperNode (Flower's, through fedcare's launcher) killed while its Runtime API had a connection:
    its port is left in TIME-WAIT, and the settings check passes at once (it failed for a minute before)."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "fedcare.node_launcher",
        "--allow-any-fab",
        "--",
        "--insecure",
        "--superlink",
        f"127.0.0.1:{free_port()}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
        start_new_session=True,
    )
    try:
        client = None
        for _ in range(600):  # hang guard: the Runtime API listens within seconds
            assert proc.poll() is None, "the node exited"
            try:
                client = socket.create_connection(("127.0.0.1", port), timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        assert client is not None, "the node's Runtime API never listened"
        client.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # served: the node accepted it,
        assert client.recv(4096).startswith(b"HTTP/1.1 ")  # and keeps it open (keep-alive)
        kill_group(proc)  # a crash: the node's end closes first
        while client.recv(4096):  # read to its FIN (unread data would reset instead)
            pass
        client.close()
    finally:
        stop(proc)
    assert "06" in _tcp_states(port) and "0A" not in _tcp_states(port)  # TIME-WAIT, no listener
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # what the check did before: "already in use"
    path = deployment.hospitals[0].settings
    path.write_text(re.sub(r"clientappio-port = \d+", f"clientappio-port = {port}", path.read_text()))
    assert load_node_settings(path).clientappio_port == port


# -- certificate and key files -------------------------------------------------------------------------------


def _check(files):
    check_credentials(load_node_settings(files.hospitals[0].settings))


def test_the_deployments_own_files_pass(deployment):
    _check(deployment)


@pytest.mark.parametrize(
    "content,message",
    [
        (b"-----BEGIN CERTIFICATE-----\n", "is not a PEM certificate"),  # truncated by a copy
        (b"-----BEGIN CERTIFICATE-----\nMIIB3zCCAWWgAwIBAgIU\n-----END CERTIFICATE-----\n", "is not a PEM certificate"),
        (b"\x00\x01garbage", "is not a PEM certificate"),
    ],
)
def test_a_corrupted_ca_certificate_is_named(deployment, content, message):
    ca = deployment.hospitals[0].root_certificate
    ca.write_bytes(content)
    with pytest.raises(FedcareError, match=message) as info:
        _check(deployment)
    assert str(ca) in info.value.problem and "[superlink] root-certificates" in info.value.problem
    assert "ca.crt" in info.value.hint


def test_a_wrong_type_file_as_ca_certificate_is_named(deployment):
    hospital = deployment.hospitals[0]
    hospital.root_certificate.write_bytes(deployment.server_certificate.read_bytes())  # the SuperLink's, not the CA
    with pytest.raises(FedcareError, match="holds no CA certificate"):
        _check(deployment)
    hospital.root_certificate.write_bytes(hospital.public_key.read_bytes())  # the node's public key
    with pytest.raises(FedcareError, match="is not a PEM certificate"):
        _check(deployment)


def test_an_expired_ca_certificate_is_named(deployment):
    from fedcare.deploy_pki import _make_ca

    _, old = _make_ca(NOW - dt.timedelta(days=4000))
    ca = deployment.hospitals[0].root_certificate
    ca.write_bytes(old.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(FedcareError, match=r"the deployment's CA certificate .* expired on") as info:
        _check(deployment)
    assert str(ca) in info.value.problem


def test_a_corrupted_or_wrong_type_node_key_is_named(deployment):
    key = deployment.hospitals[0].private_key
    text = key.read_bytes()
    key.write_bytes(text[: len(text) // 2] + b"\n-----END OPENSSH PRIVATE KEY-----\n")
    with pytest.raises(FedcareError, match=r"\[node\] private-key: .*node.key is not an OpenSSH private key"):
        _check(deployment)
    other = ed25519.Ed25519PrivateKey.generate()  # an OpenSSH key Flower refuses: not EC
    key.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    with pytest.raises(FedcareError, match="is an Ed25519PrivateKey, not an EC key"):
        _check(deployment)


def _cli(*args: str):
    return CliRunner().invoke(node_app, list(args))


def test_check_only_reads_the_ca_before_anything_starts(deployment):
    ca = deployment.hospitals[0].root_certificate
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    done = _cli("start", "--config", str(deployment.hospitals[0].settings), "--check-only")
    assert done.exit_code == 2, done.output
    assert "is not a PEM certificate" in done.output and "ca.crt" in done.output
    assert "data ok" not in done.output  # before the data, before any process


# -- a SuperLink nobody answers ------------------------------------------------------------------------------


def test_a_closed_port_is_named_as_unreachable(deployment):
    port = free_port()
    with pytest.raises(
        SuperLinkUnreachable,
        match=rf"cannot reach the SuperLink at 127\.0\.0\.1:{port} "
        r"\(connection refused\)",
    ) as info:
        probe_superlink(f"127.0.0.1:{port}", deployment.ca_certificate)
    assert "[superlink] address" in info.value.hint


def test_a_port_that_does_not_speak_tls_is_named(deployment):
    with (
        TlsStandIn(None, None) as plain,  # answers, but in plain text
        pytest.raises(FedcareError, match=rf"127\.0\.0\.1:{plain.port} answers but does not speak TLS"),
    ):
        probe_superlink(f"127.0.0.1:{plain.port}", deployment.ca_certificate)


def test_node_start_against_a_closed_port_retries_for_a_bounded_time_naming_the_address(deployment):
    """A real `fedcare node start` process: it names the address on every attempt, then stops with exit 1."""
    port = free_port()
    settings = _dial(deployment, f"127.0.0.1:{port}", "connect-wait = 1\n")
    proc = subprocess.Popen(
        [str(BIN / "fedcare"), "node", "start", "--config", str(settings)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=120)  # hang guard: today's node retries forever
    except subprocess.TimeoutExpired:
        stop(proc)  # the node runs in a session of its own
        output, _ = proc.communicate()
        pytest.fail(f"the node kept retrying silently:\n{output[-2000:]}")
    assert proc.returncode == 1, output
    named = re.findall(rf"cannot reach the SuperLink at 127\.0\.0\.1:{port} \(connection refused\)", output)
    assert len(named) >= 2, output  # each retry, then the final error
    assert "retrying" in output and "is the SuperLink running" in output
    assert "Starting Flower SuperNode" not in output  # nothing started


def test_the_start_wait_is_a_setting(deployment):
    assert load_node_settings(deployment.hospitals[0].settings).superlink_wait_s == 120  # the default
    path = _dial(deployment, "127.0.0.1:9092", "connect-wait = 0\n")
    assert load_node_settings(path).superlink_wait_s == 0
    path.write_text(path.read_text().replace("connect-wait = 0", "connect-wait = -1"))
    with pytest.raises(FedcareError, match=r"\[superlink\] connect-wait: -1.0 is outside"):
        load_node_settings(path)


# -- the SuperLink's certificate -----------------------------------------------------------------------------


def _served(files, now: dt.datetime):
    """Reissue the SuperLink's certificates as if issued at ``now`` (from the same CA, the same SANs)."""
    renew_superlink_certificates(files.out_dir, now=now)
    return files.server_certificate, files.server_key


def test_an_expired_superlink_certificate_is_named_with_its_date_and_the_renewal(deployment):
    certificate, key = _served(deployment, NOW - dt.timedelta(days=900))
    expired = x509.load_pem_x509_certificate(certificate.read_bytes()).not_valid_after_utc
    assert expired < NOW
    with TlsStandIn(certificate, key) as link, pytest.raises(FedcareError) as info:
        probe_superlink(f"127.0.0.1:{link.port}", deployment.hospitals[0].root_certificate)
    assert not isinstance(info.value, SuperLinkUnreachable)  # no waiting: the coordinator must act
    assert f"the SuperLink's certificate expired on {expired:%Y-%m-%d %H:%M} UTC" in info.value.problem
    assert "fedcare deploy renew" in info.value.hint
    assert "CA" not in info.value.problem and "SAN" not in info.value.problem


def test_a_not_yet_valid_superlink_certificate_is_named(deployment):
    certificate, key = _served(deployment, NOW + dt.timedelta(days=2))
    with (
        TlsStandIn(certificate, key) as link,
        pytest.raises(FedcareError, match=r"the SuperLink's certificate is not valid before \d{4}-\d\d-\d\d") as info,
    ):
        probe_superlink(f"127.0.0.1:{link.port}", deployment.hospitals[0].root_certificate)
    assert "clock" in info.value.hint


def test_a_certificate_from_another_ca_or_for_another_name_is_named(deployment, tmp_path):
    other = init_deployment(tmp_path / "other", ["x"])
    with (
        TlsStandIn(other.server_certificate, other.server_key) as link,
        pytest.raises(FedcareError, match="not signed by the CA in"),
    ):
        probe_superlink(f"127.0.0.1:{link.port}", deployment.ca_certificate)
    named = init_deployment(
        tmp_path / "named", ["x"], sans=["link.example.org"], superlink_address="link.example.org:9092"
    )
    with (
        TlsStandIn(named.server_certificate, named.server_key) as link,
        pytest.raises(FedcareError, match=r"does not name 127\.0\.0\.1 \(it names link\.example\.org\)"),
    ):
        probe_superlink(f"127.0.0.1:{link.port}", named.ca_certificate)


def test_the_valid_certificate_passes_and_a_renewal_fixes_an_expired_one(deployment):
    node_key = deployment.hospitals[0].private_key.read_bytes()
    _served(deployment, NOW - dt.timedelta(days=900))
    renewed = renew_superlink_certificates(deployment.out_dir)
    assert deployment.server_certificate in renewed and deployment.control_certificate in renewed
    certificate = x509.load_pem_x509_certificate(deployment.server_certificate.read_bytes())
    ca = x509.load_pem_x509_certificate(deployment.ca_certificate.read_bytes())
    certificate.verify_directly_issued_by(ca)
    assert certificate.not_valid_after_utc > NOW + dt.timedelta(days=800)
    assert deployment.hospitals[0].private_key.read_bytes() == node_key  # nothing else replaced
    with TlsStandIn(deployment.server_certificate, deployment.server_key) as link:
        probe_superlink(f"127.0.0.1:{link.port}", deployment.hospitals[0].root_certificate)


def test_node_start_check_only_names_an_expired_superlink_certificate(deployment):
    certificate, key = _served(deployment, NOW - dt.timedelta(days=900))
    with TlsStandIn(certificate, key) as link:
        settings = _dial(deployment, f"127.0.0.1:{link.port}")
        done = _cli("start", "--config", str(settings), "--check-only")
    assert done.exit_code == 1, done.output
    assert "the SuperLink's certificate expired on" in done.output and "fedcare deploy renew" in done.output


def test_the_superlink_launcher_refuses_an_expired_certificate(deployment):
    """A real launcher process: it stops at once, naming the file and the date (hospitals could not connect)."""
    _served(deployment, NOW - dt.timedelta(days=900))
    # hang guard: before the fix the launcher served the certificate
    returncode, output = _run_until_exit(
        deployment.superlink_command(sys.executable), "the launcher served an expired certificate"
    )
    assert returncode == 2, output
    assert f"--ssl-certfile {deployment.server_certificate}: the SuperLink's certificate expired on" in output
    assert "fedcare deploy renew" in output


def _run_until_exit(command: list[str], hang: str) -> tuple[int, str]:
    """Run a real process that must stop by itself; a process still running after 60 s fails with ``hang``."""
    proc = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        stop(proc)
        output, _ = proc.communicate()
        pytest.fail(f"{hang}:\n{output[-2000:]}")
    return proc.returncode, output


def test_the_node_launcher_reads_its_ca_before_flower_starts(deployment):
    """A real `python -m fedcare.node_launcher` (what `node start` runs) given a truncated ca.crt stops at once."""
    hospital = deployment.hospitals[0]
    hospital.root_certificate.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    command = [
        sys.executable,
        "-m",
        "fedcare.node_launcher",
        "--allow-any-fab",
        "--",
        "--superlink",
        f"127.0.0.1:{free_port()}",
        "--root-certificates",
        str(hospital.root_certificate),
        "--auth-supernode-private-key",
        str(hospital.private_key),
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
    ]
    # hang guard: before the fix the node waited with its port held
    returncode, output = _run_until_exit(command, "the node started with a corrupted ca.crt")
    assert returncode == 2, output
    assert f"--root-certificates: {hospital.root_certificate} is not a PEM certificate" in output
    assert "Starting Flower SuperNode" not in output


def test_flowers_retry_warning_names_the_superlink():
    from fedcare.deploy_commands import name_the_superlink

    line = "WARNING :   Connection attempt failed, retrying in 1.92 seconds"
    assert name_the_superlink(line, "10.0.0.5:9092") == (
        f"{line} (fedcare: cannot reach the SuperLink at 10.0.0.5:9092; the node keeps retrying, Ctrl-C stops it)"
    )
    assert (
        name_the_superlink("INFO :      Starting Flower SuperNode", "10.0.0.5:9092")
        == "INFO :      Starting Flower SuperNode"
    )


def test_deploy_renew_reissues_the_superlink_certificates(deployment, tmp_path):
    from fedcare.deploy_commands import deploy_app

    before = deployment.server_certificate.read_bytes()
    done = CliRunner().invoke(deploy_app, ["renew", str(deployment.out_dir)])
    assert done.exit_code == 0, done.output
    assert str(deployment.server_certificate) in done.output and "restart the SuperLink" in done.output
    assert deployment.server_certificate.read_bytes() != before
    missing = CliRunner().invoke(deploy_app, ["renew", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "is not a deployment folder" in missing.output


def test_commands_md_says_when_and_how_to_renew(deployment):
    text = deployment.commands_file.read_text()
    assert f"`fedcare deploy renew {deployment.out_dir}`" in text and "825 days" in text


def test_the_superlink_launcher_reads_its_key_with_its_certificate(deployment):
    from fedcare.superlink_launcher import LauncherSettings, parser

    def settings(key: Path) -> LauncherSettings:
        command = deployment.superlink_command("python")
        command[command.index("--ssl-keyfile") + 1] = str(key)
        return LauncherSettings.from_args(parser().parse_args(command[3:]))

    assert settings(deployment.server_key).key == deployment.server_key
    with pytest.raises(
        FedcareError, match=f"{deployment.control_key} is not the key of {deployment.server_certificate}"
    ):
        settings(deployment.control_key)
    broken = deployment.out_dir / "broken.key"
    broken.write_bytes(deployment.server_key.read_bytes()[:60])
    with pytest.raises(FedcareError, match=r"broken.key is not a readable PEM private key"):
        settings(broken)
