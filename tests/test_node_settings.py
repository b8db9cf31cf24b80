"""hospital.toml: precise validation errors, a flower-supernode command Flower parses back exactly."""

import os
import shlex
import socket
import textwrap
from pathlib import Path

import pytest
import typer
from flwr.common.config import parse_config_args
from typer.testing import CliRunner

from fedcare.deploy_commands import deploy_app, diagnose, node_app, shell_line
from fedcare.deploy_pki import make_node_key
from fedcare.errors import FedcareError
from fedcare.node_settings import check_data, format_node_config, load_node_settings, supernode_command
from tests.support.deployment_processes import TlsStandIn
from tests.support.hospital_state import write_consortium


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def node_dir(tmp_path):
    make_node_key(tmp_path / "node.key")
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    write_consortium(tmp_path, "Hungary")
    return tmp_path


CONSORTIUM = '[consortium]\nname = "Hungary"\nroster = "roster.toml"\nidentity-key = "identity.key"\n'


def _write(folder, data: str, extra: str = "", port: int | None = None):
    """hospital.toml with ``data`` under [data] and ``extra`` sections; a dataset-id and a budget unless given."""
    if "dataset-id" not in data and "dataset = " in data:
        data += 'dataset-id = "test-data"\n'
    if "[privacy]" not in extra:
        extra += "[privacy]\nepsilon-budget = 1.0\n"
    if "[consortium]" not in extra and "require-secure-aggregation = false" not in extra:
        extra += CONSORTIUM
    path = folder / "hospital.toml"
    path.write_text(
        textwrap.dedent(f"""\
        [superlink]
        address = "127.0.0.1:9092"
        root-certificates = "ca.crt"
        [node]
        private-key = "node.key"
        clientappio-port = {port or _free_port()}
        [data]
        """)
        + textwrap.dedent(data)
        + textwrap.dedent(extra)
    )
    return path


FHD = 'dataset = "fed-heart-disease"\ndataset-id = "heart-2026"\npartition-id = 1\n'


def test_valid_settings_give_the_exact_supernode_command(node_dir):
    path = _write(node_dir, FHD, '[privacy]\nledger-dir = "my ledgers"\nepsilon-budget = 2\n', port=_free_port())
    s = load_node_settings(path)
    assert s.dataset == "fed-heart-disease" and s.private_key == node_dir / "node.key"
    assert s.node_config == {
        "partition-id": 1,
        "cache-dir": str(node_dir / "cache"),
        "dataset-id": "heart-2026",
        "ledger-dir": str(node_dir / "my ledgers"),
        "epsilon-budget": 2.0,
        # the hospital's whole policy, defaults spelled out: the ClientApp reads nothing else
        "delta": 1e-4,
        "require-dp": True,
        "require-secure-aggregation": True,
        "min-hospitals": 3,
        "min-secagg-threshold": 2,
        "max-secagg-clip-range": 10.0,
        "release-evaluation": "per-hospital",
        "hardened-noise": False,
        "secagg-name": "Hungary",
        "secagg-roster": str(node_dir / "roster.toml"),
        "secagg-identity-key": str(node_dir / "identity.key"),
    }
    assert s.warm_clientapp and s.poll_interval == 0.5  # the fast defaults
    cmd = supernode_command(s, "/venv/bin/flower-supernode", python="/venv/bin/python")
    at = cmd.index("--")
    assert cmd[:at] == [
        "/venv/bin/python",
        "-m",
        "fedcare.node_launcher",
        "--warm-clientapp",
        "--poll-interval",
        "0.5",
        "--approved-fabs",
        str(node_dir / "my ledgers" / "approved-fabs.json"),
        "--settings",
        str(s.path),
    ]
    flower = cmd[at + 1 :]
    flags = dict(zip(flower[::2], flower[1::2]))
    assert flags["--root-certificates"] == str(node_dir / "ca.crt")
    assert flags["--auth-supernode-private-key"] == str(node_dir / "node.key")
    assert flags["--superlink"] == "127.0.0.1:9092"
    assert flags["--host"] == "127.0.0.1" and flags["--port"] == str(s.clientappio_port)
    assert "--insecure" not in cmd
    assert parse_config_args([flags["--node-config"]]) == s.node_config  # Flower reads back what we meant


def _with_node_keys(path, keys: str):
    path.write_text(path.read_text().replace("[data]", keys + "[data]"))
    return path


def test_flowers_own_timing_still_runs_approved_fabs_only(node_dir):
    s = load_node_settings(_with_node_keys(_write(node_dir, FHD), "warm-clientapp = false\npoll-interval = 3\n"))
    assert not s.warm_clientapp and s.poll_interval == 3.0
    cmd = supernode_command(s, "/venv/bin/flower-supernode", python="py")
    at = cmd.index("--")
    assert cmd[:4] == ["py", "-m", "fedcare.node_launcher", "--approved-fabs"]  # cold executor, FAB check
    assert "--warm-clientapp" not in cmd and "--poll-interval" not in cmd and "--allow-any-fab" not in cmd
    assert cmd[at + 1] == "--superlink" and "--isolation" not in cmd and "--auth-supernode-private-key" in cmd
    s = load_node_settings(_with_node_keys(_write(node_dir, FHD), "warm-clientapp = true\npoll-interval = 3\n"))
    assert supernode_command(s, python="py")[:5] == [
        "py",
        "-m",
        "fedcare.node_launcher",
        "--warm-clientapp",
        "--approved-fabs",
    ]
    s = load_node_settings(_with_node_keys(_write(node_dir, FHD), "warm-clientapp = false\npoll-interval = 0.25\n"))
    assert supernode_command(s, python="py")[3:6] == ["--poll-interval", "0.25", "--approved-fabs"]


def test_the_code_section_approves_digests_and_names_the_store(node_dir):
    digest = "ab" * 32
    s = load_node_settings(_write(node_dir, FHD))
    assert s.approved_fabs == () and s.approved_fabs_store == node_dir / "ledgers" / "approved-fabs.json"
    s = load_node_settings(
        _write(
            node_dir, FHD, f'[code]\napproved-fabs = ["sha256:{digest.upper()}"]\napproval-store = "state/fabs.json"\n'
        )
    )
    assert s.approved_fabs == (digest,) and s.approved_fabs_store == node_dir / "state" / "fabs.json"
    cmd = supernode_command(s, python="py")
    at = cmd.index("--")
    assert cmd[cmd.index("--approve") + 1] == digest and cmd.index("--approve") < at
    assert cmd[cmd.index("--approved-fabs") + 1] == str(node_dir / "state" / "fabs.json")
    with pytest.raises(FedcareError, match=r"\[code\] approved-fabs: 'nope' is not a SHA-256 digest"):
        load_node_settings(_write(node_dir, FHD, '[code]\napproved-fabs = ["nope"]\n'))


@pytest.mark.parametrize(
    "keys,message",
    [
        ("poll-interval = 0\n", r"\[node\] poll-interval: 0.0 is outside 0.05..60 seconds"),
        ("poll-interval = 'fast'\n", "must be float, not str"),
        ("warm-clientapp = 'yes'\n", "must be bool, not str"),
    ],
)
def test_bad_latency_settings(node_dir, keys, message):
    with pytest.raises(FedcareError, match=message):
        load_node_settings(_with_node_keys(_write(node_dir, FHD), keys))


def test_node_config_quoting_round_trips_through_flowers_parser():
    config = {
        "data-path": "/data/with space/x.csv",
        "labels": "/data/o'brien/labels.csv",
        "partition-id": 3,
        "epsilon-budget": 0.5,
        "require-deidentified": False,
        "on-unreadable": "skip",
        "windows": "C:\\data\\ct",
        "big": 1e-05,
    }
    text = format_node_config(config)
    assert "data-path='/data/with space/x.csv'" in text and "require-deidentified=false" in text
    assert "partition-id=3" in text and "epsilon-budget=0.5" in text
    assert parse_config_args([text]) == config
    with pytest.raises(FedcareError, match="mixes quotes"):
        format_node_config({"data-path": '/d/it\'s "x"'})
    with pytest.raises(FedcareError, match="control character"):
        format_node_config({"data-path": "/d/a\nb"})


@pytest.mark.parametrize(
    "data,extra,message",
    [
        (FHD + "colour = 'red'\n", "", r"\[data\] colour: unknown key"),
        (FHD, "[extras]\nx = 1\n", r"\[extras\]: unknown section"),
        ('dataset = "mnist"\n', "", "unknown dataset 'mnist'"),
        ('dataset = "fed-heart-disease"\n', "", r"\[data\] partition-id: is missing"),
        ('dataset = "fed-heart-disease"\npartition-id = 4\n', "", "4 is out of range"),
        ('dataset = "fed-heart-disease"\npartition-id = "1"\n', "", "must be int, not str"),
        (FHD + 'data-path = "x.csv"\n', "", "data-path: is not used by dataset 'fed-heart-disease'"),
        ('dataset = "ehr-table"\ndata-path = "table.csv"\n', "", r"\[data\] schema: is missing"),
        ('dataset = "ehr-table"\ndata-path = "nowhere.csv"\nschema = "s.toml"\n', "", "nowhere.csv does not exist"),
        ('dataset = "dicom"\ndata-path = "ca.crt"\n', "", "is not a folder"),
        ('dataset = "dicom"\ndata-path = "."\nmultiframe = "all"\n', "", "'all' is not one of first, every, reject"),
        (FHD, "[privacy]\nepsilon-budget = 0\n", "epsilon-budget: 0.0 is not a positive number"),
        (FHD, '[privacy]\nledger-dir = "l"\n', r"\[privacy\] epsilon-budget: is missing"),
        (FHD, "[privacy]\nepsilon-budget = 1\nmin-hospitals = 1\n", "min-hospitals: 1 is below 2"),
        (FHD, '[privacy]\nepsilon-budget = 1\nrequire-dp = "yes"\n', r"\[privacy\] require-dp: must be bool"),
        ('dataset = "fed-heart-disease"\ndataset-id = ""\npartition-id = 1\n', "", "dataset-id: is empty"),
    ],
)
def test_bad_settings_name_file_key_and_fix(node_dir, data, extra, message):
    path = _write(node_dir, data, extra)
    with pytest.raises(FedcareError, match=message) as info:
        load_node_settings(path)
    assert str(path) in info.value.problem


def test_missing_files_keys_and_busy_ports(node_dir):
    path = _write(node_dir, FHD)
    (node_dir / "ca.crt").unlink()
    with pytest.raises(FedcareError, match=r"root-certificates: .*ca.crt does not exist"):
        load_node_settings(path)
    (node_dir / "ca.crt").write_text("x")
    os.chmod(node_dir / "node.key", 0o644)
    with pytest.raises(FedcareError, match=r"readable by other users \(mode 0644\)"):
        load_node_settings(path)
    os.chmod(node_dir / "node.key", 0o600)
    path.write_text(path.read_text().replace('"node.key"', '"node.pub"'))
    os.chmod(node_dir / "node.pub", 0o600)
    with pytest.raises(FedcareError, match="not an OpenSSH private key"):
        load_node_settings(path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        path = _write(node_dir, FHD, port=busy.getsockname()[1])
        with pytest.raises(FedcareError, match="already in use"):
            load_node_settings(path)
        assert load_node_settings(path, check_port=False).clientappio_port == busy.getsockname()[1]
    with pytest.raises(FedcareError, match="no node settings file"):
        load_node_settings(node_dir / "absent.toml")
    (node_dir / "broken.toml").write_text("[data\n")
    with pytest.raises(FedcareError, match="not valid TOML"):
        load_node_settings(node_dir / "broken.toml")


def test_check_data_runs_the_clientapps_loader(node_dir):
    assert check_data(load_node_settings(_write(node_dir, FHD))).name == "Hungary"
    (node_dir / "table.csv").write_text("id;age\n1;50\n")
    (node_dir / "schema.toml").write_text('kind = "table"\n')
    bad = _write(node_dir, 'dataset = "ehr-table"\ndata-path = "table.csv"\nschema = "schema.toml"\n')
    with pytest.raises(FedcareError):
        check_data(load_node_settings(bad))


def _cli(*args):
    app = typer.Typer()
    app.add_typer(deploy_app, name="deploy")
    app.add_typer(node_app, name="node")
    return CliRunner().invoke(app, list(args))


def test_cli_exit_codes(tmp_path):
    done = _cli("deploy", "init", str(tmp_path / "d"), "--hospital", "a", "--hospital", "b")
    assert done.exit_code == 0, done.output
    assert "flwr supernode register" in done.output
    again = _cli("deploy", "init", str(tmp_path / "d"), "--hospital", "a")
    assert again.exit_code == 2 and "refusing" in again.output
    settings = tmp_path / "d" / "a" / "hospital.toml"
    settings.write_text(settings.read_text().replace("clientappio-port = 9094", f"clientappio-port = {_free_port()}"))
    link = tmp_path / "d" / "superlink"
    with TlsStandIn(link / "server.crt", link / "server.key") as superlink:  # --check-only asks the SuperLink too
        settings.write_text(settings.read_text().replace("127.0.0.1:9092", f"127.0.0.1:{superlink.port}"))
        ok = _cli("node", "start", "--config", str(settings), "--check-only")
    assert ok.exit_code == 0, ok.output
    assert "data ok: Cleveland" in ok.output and "--auth-supernode-private-key" in ok.output
    assert f"superlink ok: 127.0.0.1:{superlink.port}" in ok.output
    settings.write_text(settings.read_text() + "\n[extras]\n")
    assert _cli("node", "start", "--config", str(settings), "--check-only").exit_code == 2


class _S:
    superlink_address = "127.0.0.1:9092"
    public_key = Path("/h/node.pub")
    private_key = Path("/h/node.key")
    root_certificates = Path("/h/ca.crt")


@pytest.mark.parametrize(
    "log,expected",
    [
        (
            [
                "ERROR : Exit Code: 305",
                "Failed to initialize the connection to the SuperLink.",
                "[code: 2004] Failed to activate SuperNode.",
            ],
            "not registered with the SuperLink",
        ),
        (
            [
                "ERROR : SSL/TLS handshake error detected.",
                "ERROR : Exit Code: 305",
                "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed",
            ],
            "TLS failure",
        ),
        # a real node against a SuperLink serving an expired certificate logs exactly this (Flower 1.41)
        (
            [
                "ERROR : SSL/TLS handshake error detected.",
                "ERROR : Exit Code: 305",
                "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: certificate has expired (_ssl.c:1006)",
            ],
            "the SuperLink's certificate at 127.0.0.1:9092 has expired: the coordinator renews it with `fedcare deploy renew",
        ),
        (
            ["ERROR : Exit Code: 305", "certificate verify failed: certificate is not yet valid (_ssl.c:1006)"],
            "is not valid yet: check the clock",
        ),
        (["ERROR : Exit Code: 305", "[Errno 111] Connection refused"], "connection refused at 127.0.0.1:9092"),
        (["ERROR : Exit Code: 302", "Unable to parse the private key file."], "not an EC private key"),
    ],
)
def test_flower_exit_reasons_are_explained(log, expected):
    assert expected in diagnose(log, 1, _S())
    assert diagnose(["INFO : SuperExec terminated gracefully."], 0, _S()) is None


def test_printed_command_is_one_pasteable_shell_line():
    command = ["flower-supernode", "--node-config", "partition-id=1 data-path='/d/a b' x='$HOME'", "--port", "9094"]
    line = shell_line(command)
    assert "--node-config \"partition-id=1 data-path='/d/a b'" not in line  # $ forces safe quoting
    assert shlex.split(line) == command
    plain = ["flower-supernode", "--node-config", "data-path='/d/a b' partition-id=1"]
    assert shell_line(plain).endswith("--node-config \"data-path='/d/a b' partition-id=1\"")
    assert shlex.split(shell_line(plain)) == plain
