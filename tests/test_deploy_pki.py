"""Deployment key material: a verifiable chain, the SANs nodes dial, 0600 keys Flower itself accepts."""

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedcare.deploy_pki import init_deployment, make_node_key
from fedcare.errors import FedcareError


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy")
    return init_deployment(
        out,
        ["alpha", "beta", "gamma"],
        sans=["127.0.0.1", "localhost", "link.example.org"],
        superlink_address="127.0.0.1:19092",
    )


def _cert(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_server_certificate_chains_to_the_ca_with_the_sans(deployment):
    ca, server = _cert(deployment.ca_certificate), _cert(deployment.server_certificate)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ca.verify_directly_issued_by(ca)
    server.verify_directly_issued_by(ca)  # signature, issuer name, CA constraints
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "link.example.org"]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp384r1"


def test_control_certificate_names_loopback_only(deployment):
    ca, control = _cert(deployment.ca_certificate), _cert(deployment.control_certificate)
    control.verify_directly_issued_by(ca)
    sans = control.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]  # not the public names
    assert ExtendedKeyUsageOID.SERVER_AUTH in control.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value


def test_secrets_are_0600_in_0700_folders(deployment):
    secrets = [deployment.ca_key, deployment.server_key, deployment.control_key] + [
        h.private_key for h in deployment.hospitals
    ]
    assert all(_mode(p) == 0o600 for p in secrets), {str(p): oct(_mode(p)) for p in secrets}
    folders = [
        deployment.out_dir,
        deployment.ca_key.parent,
        deployment.server_key.parent,
        *(h.folder for h in deployment.hospitals),
    ]
    assert all(_mode(f) == 0o700 for f in folders)


def test_node_keys_load_with_flowers_own_loaders(deployment):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    class Args:
        auth_supernode_public_key = None

    for h in deployment.hospitals:
        Args.auth_supernode_private_key = str(h.private_key)
        private, public = _try_setup_client_authentication(Args)  # what flower-supernode runs
        assert private.curve.name == "secp384r1"
        registered = try_load_public_key(h.public_key)  # what `flwr supernode register` runs
        assert registered == try_load_public_key(h.public_key) and len(registered) > 0
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes

        assert public_key_to_bytes(public) == registered  # the .pub is this key's half
    assert len({h.public_key.read_bytes() for h in deployment.hospitals}) == 3


def test_connection_snippet_and_commands(deployment):
    # the coordinator's flwr talks to the loopback control listener (public port + 1), TLS with the CA
    assert deployment.control_address == "127.0.0.1:19093"
    config = (deployment.flwr_home / "config.toml").read_text()
    assert 'address = "127.0.0.1:19093"' in config and f'root-certificates = "{deployment.ca_certificate}"' in config
    assert "insecure" not in config and "19092" not in config
    commands = deployment.commands_file.read_text()
    start = next(line for line in commands.splitlines() if "fedcare.superlink_launcher" in line).split()
    assert start[:3] == ["python", "-m", "fedcare.superlink_launcher"]
    for flag, value in (
        ("--host", "127.0.0.1"),
        ("--port", "19092"),
        ("--control-port", "19093"),
        ("--ssl-ca-certfile", str(deployment.ca_certificate)),
        ("--ssl-certfile", str(deployment.server_certificate)),
        ("--ssl-keyfile", str(deployment.server_key)),
        ("--control-ssl-certfile", str(deployment.control_certificate)),
        ("--control-ssl-keyfile", str(deployment.control_key)),
        ("--database", str(deployment.database)),
    ):
        assert start[start.index(flag) + 1] == value, flag
    assert "--disable-runtime-dependency-installation" in start
    assert not any(line.strip().startswith("flower-superlink") for line in commands.splitlines())
    assert "public `127.0.0.1:19092`" in commands and "control `127.0.0.1:19093`" in commands
    assert "never forward or proxy it" in commands
    for heading in ("## The SuperLink's two listeners", "Public SuperLink address", "## 1. Coordinator"):
        assert commands.count(heading) == 1, heading  # each step once, in order
    for h in deployment.hospitals:
        assert f"flwr supernode register {h.public_key} fedcare" in commands
        assert f"fedcare node start --config {h.settings}" in commands
        assert 'address = "127.0.0.1:19092"' in h.settings.read_text()  # hospitals dial the public listener


def test_control_port_option_and_the_launcher_command(tmp_path):
    files = init_deployment(tmp_path / "d", ["a"], superlink_address="127.0.0.1:9092", control_port=9300)
    assert files.control_address == "127.0.0.1:9300"
    assert 'address = "127.0.0.1:9300"' in (files.flwr_home / "config.toml").read_text()
    command = files.superlink_command("/opt/env/bin/python")
    assert command[:3] == ["/opt/env/bin/python", "-m", "fedcare.superlink_launcher"]
    assert command[command.index("--control-port") + 1] == "9300"
    top = init_deployment(tmp_path / "top", ["a"], superlink_address="127.0.0.1:65535")
    assert top.control_address == "127.0.0.1:65534"


def test_superlink_state_in_memory_drops_the_database_and_says_what_a_restart_loses(tmp_path):
    files = init_deployment(tmp_path / "mem", ["alpha"], superlink_state="memory")
    assert files.database is None
    command = files.superlink_command()
    assert "--database" not in command and "fedcare.superlink_launcher" in command
    commands = files.commands_file.read_text()
    assert "state in memory" in commands and "register the hospitals again" in commands
    assert "start its node again" in commands
    assert "--database" not in commands


def test_refuses_to_overwrite_keys_unless_forced(deployment, tmp_path):
    before = deployment.hospitals[0].private_key.read_bytes()
    with pytest.raises(FedcareError, match="refusing"):
        init_deployment(deployment.out_dir, ["alpha"], superlink_address="127.0.0.1:19092")
    assert deployment.hospitals[0].private_key.read_bytes() == before
    key = tmp_path / "own" / "node.key"
    make_node_key(key)
    with pytest.raises(FedcareError, match="refusing to overwrite"):
        make_node_key(key)
    first = key.read_bytes()
    make_node_key(key, force=True)
    assert key.read_bytes() != first and _mode(key) == 0o600
    forced = init_deployment(tmp_path / "again", ["x"])
    again = init_deployment(tmp_path / "again", ["x"], force=True)
    assert forced.hospitals[0].private_key.read_bytes() != b"" and _mode(again.hospitals[0].private_key) == 0o600


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(hospitals=[]), "no hospitals"),
        (dict(hospitals=["a", "a"]), "named twice"),
        (dict(hospitals=["../evil"]), "cannot be a folder name"),
        (dict(hospitals=["a"], superlink_address="10.0.0.5:9092"), "not among the certificate SANs"),
        (dict(hospitals=["a"], superlink_address="nohost"), "is not HOST:PORT"),
        (dict(hospitals=["a"], sans=["bad name!"]), "neither an IP address nor a DNS name"),
        (dict(hospitals=["a"], superlink_state="redis"), "unknown SuperLink state 'redis'"),
        (dict(hospitals=["a"], superlink_address="127.0.0.1:9092", control_port=9092), "control port and the public"),
        (dict(hospitals=["a"], control_port=70000), "control port 70000 is not a port number"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, kwargs, message):
    with pytest.raises(FedcareError, match=message):
        init_deployment(tmp_path / "d", **kwargs)


def test_the_deployment_stays_out_of_the_flower_app_unless_asked(tmp_path):
    """Keys, ledgers and the coordinator's FLWR_HOME inside the app folder would travel with `flwr run .`
    (and its installed FABs break Flower's build): deploy init refuses to write there by default."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.flwr.app]\npublisher = "x"\n')
    with pytest.raises(FedcareError, match=r"is inside the Flower app .*app.* write the deployment outside the app"):
        init_deployment(app / "deploy", ["a"])
    assert not (app / "deploy").exists()
    files = init_deployment(app / "deploy", ["a"], inside_app=True)
    assert files.hospitals[0].settings.is_file()


def test_the_hospital_settings_deploy_init_writes_load_with_a_complete_policy(deployment):
    from fedcare.node_settings import load_node_settings

    settings = load_node_settings(deployment.hospitals[0].settings, check_port=False)
    config = settings.node_config
    assert config["dataset-id"].startswith(deployment.hospitals[0].name)
    assert config["require-dp"] is True and config["require-secure-aggregation"] is True
    assert config["epsilon-budget"] == 1.0 and config["min-hospitals"] == 3
