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
    return init_deployment(out, ["alpha", "beta", "gamma"], sans=["127.0.0.1", "localhost", "link.example.org"],
                           superlink_address="127.0.0.1:19092")


def _cert(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_server_certificate_chains_to_the_ca_with_the_sans(deployment):
    ca, server = _cert(deployment.ca_certificate), _cert(deployment.server_certificate)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ca.verify_directly_issued_by(ca)
    server.verify_directly_issued_by(ca)            # signature, issuer name, CA constraints
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "link.example.org"]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp384r1"


def test_secrets_are_0600_in_0700_folders(deployment):
    secrets = [deployment.ca_key, deployment.server_key] + [h.private_key for h in deployment.hospitals]
    assert all(_mode(p) == 0o600 for p in secrets), {str(p): oct(_mode(p)) for p in secrets}
    folders = [deployment.out_dir, deployment.ca_key.parent, deployment.server_key.parent,
               *(h.folder for h in deployment.hospitals)]
    assert all(_mode(f) == 0o700 for f in folders)


def test_node_keys_load_with_flowers_own_loaders(deployment):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    class Args:
        auth_supernode_public_key = None

    for h in deployment.hospitals:
        Args.auth_supernode_private_key = str(h.private_key)
        private, public = _try_setup_client_authentication(Args)      # what flower-supernode runs
        assert private.curve.name == "secp384r1"
        registered = try_load_public_key(h.public_key)               # what `flwr supernode register` runs
        assert registered == try_load_public_key(h.public_key) and len(registered) > 0
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes

        assert public_key_to_bytes(public) == registered            # the .pub is this key's half
    assert len({h.public_key.read_bytes() for h in deployment.hospitals}) == 3


def test_connection_snippet_and_commands(deployment):
    config = (deployment.flwr_home / "config.toml").read_text()
    assert 'address = "127.0.0.1:19092"' in config and f'root-certificates = "{deployment.ca_certificate}"' in config
    assert "insecure" not in config
    commands = deployment.commands_file.read_text()
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
                 "--host 127.0.0.1", "--port 19092", "--database"):
        assert flag in commands
    for h in deployment.hospitals:
        assert f"flwr supernode register {h.public_key} fedcare" in commands
        assert f"fedcare node start --config {h.settings}" in commands


def test_superlink_state_in_memory_drops_the_database_and_says_what_a_restart_loses(tmp_path):
    files = init_deployment(tmp_path / "mem", ["alpha"], superlink_state="memory")
    assert files.database is None
    command = files.superlink_command()
    assert "--database" not in command and "--enable-supernode-auth" in command
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


@pytest.mark.parametrize("kwargs,message", [
    (dict(hospitals=[]), "no hospitals"),
    (dict(hospitals=["a", "a"]), "named twice"),
    (dict(hospitals=["../evil"]), "cannot be a folder name"),
    (dict(hospitals=["a"], superlink_address="10.0.0.5:9092"), "not among the certificate SANs"),
    (dict(hospitals=["a"], superlink_address="nohost"), "is not HOST:PORT"),
    (dict(hospitals=["a"], sans=["bad name!"]), "neither an IP address nor a DNS name"),
    (dict(hospitals=["a"], superlink_state="redis"), "unknown SuperLink state 'redis'"),
])
def test_bad_input_is_one_clear_error(tmp_path, kwargs, message):
    with pytest.raises(FedcareError, match=message):
        init_deployment(tmp_path / "d", **kwargs)
