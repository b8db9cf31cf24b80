"""Who a secure-aggregation participant is: Ed25519 identity keys checked against a pinned roster.

Why: the coordinator relays every public key a node advertises. Unsigned, it can substitute its own
keys (and read every share), add nodes it plays itself, or drop nodes, and no hospital would notice.
Each hospital therefore signs what it advertises with its identity key, and every hospital checks
those signatures against a consortium roster it pinned at setup: the list of member hospitals and
their identity public keys, whose fingerprints each hospital verified out of band. A key that is
not on the roster, a second node claiming a member's name, or a key the member did not sign is
refused.

The roster protects against the coordinator only if the coordinator cannot write it alone: each
hospital makes its own identity key (``fedcare deploy identity-key``) and sends the public half;
the consortium checks every fingerprint before pinning the roster. ``fedcare deploy init`` writes
keys and a roster for a demo deployment (then the coordinator knew the keys: re-key for real use).

A simulation has no hospitals to verify each other, only virtual ones: ``SimulatedConsortium``
derives each virtual hospital's identity key from a secret kept with the simulated hospitals'
state (never given to the ServerApp), so the coordinator's code still cannot sign for them.

Statements are signed as canonical JSON lists whose first element names the statement and the
protocol (domain separation): a signature over one kind of statement never verifies as another.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from secure_aggregation.errors import SecAggError

PROTOCOL = "fedcare-secagg/v2"
KEY_PREFIX = "ed25519:"


def canonical(kind: str, *fields: Any) -> bytes:
    """The bytes a statement of ``kind`` is signed as (sorted keys, no spaces, bytes as hex)."""
    return json.dumps(
        [PROTOCOL, kind, *fields],
        separators=(",", ":"),
        sort_keys=True,
        default=lambda v: v.hex() if isinstance(v, (bytes, bytearray)) else str(v),
    ).encode()


def digest(*parts: Any) -> bytes:
    """SHA-256 of a canonical encoding: what statements carry for sets and blobs."""
    return hashlib.sha256(canonical("digest", *parts)).digest()


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(public: bytes) -> str:
    """What hospitals compare out of band: SHA-256 of the raw public key, in groups."""
    h = hashlib.sha256(b"fedcare-identity" + public).hexdigest()[:40]
    return ":".join(h[i : i + 4] for i in range(0, len(h), 4))


def verify(public: bytes, signature: bytes | bytearray, message: bytes) -> bool:
    """True when ``signature`` is ``public``'s Ed25519 signature of ``message``; never raises."""
    try:
        Ed25519PublicKey.from_public_bytes(bytes(public)).verify(bytes(signature), message)
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


class Consortium:
    """The hospitals a node accepts as secure-aggregation peers, and this node's own signing key."""

    def public_key(self, name: str) -> bytes | None:
        """``name``'s identity public key, or None when ``name`` is not a member."""
        raise NotImplementedError

    def signing_key(self, name: str) -> Ed25519PrivateKey:
        """This node's identity key (it is hospital ``name``)."""
        raise NotImplementedError

    def sign(self, name: str, message: bytes) -> bytes:
        key = self.signing_key(name)
        if self.public_key(name) != public_bytes(key):
            raise SecAggError(
                f"this node's identity key is not the one the roster lists for {name!r}",
                "point identity-key at this hospital's own key, or fix the roster",
            )
        return key.sign(message)

    def check(self, name: str, signature: object, message: bytes, what: str) -> None:
        """Raise ``SecAggError`` unless ``name`` is a member and signed ``message``."""
        public = self.public_key(name)
        if public is None:
            raise SecAggError(f"{what}: {name!r} is not on this hospital's consortium roster")
        if not isinstance(signature, (bytes, bytearray)) or not verify(public, signature, message):
            raise SecAggError(f"{what}: the signature of {name!r} does not verify against its roster key")


@dataclass(frozen=True)
class Roster:
    """A pinned consortium roster file: ``[hospitals.<name>] identity = "ed25519:<hex>"``."""

    path: Path
    members: dict[str, bytes]

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Roster:
        path = Path(path)
        try:
            doc = tomllib.loads(path.read_text())
        except OSError as exc:
            raise SecAggError(
                f"cannot read the consortium roster {path}: {exc.strerror}",
                "set roster in hospital.toml to the roster your consortium pinned",
            ) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise SecAggError(f"the consortium roster {path} is not valid TOML ({exc})") from None
        members: dict[str, bytes] = {}
        for name, entry in (doc.get("hospitals") or {}).items():
            text = entry.get("identity") if isinstance(entry, dict) else None
            try:
                if not isinstance(text, str) or not text.startswith(KEY_PREFIX):
                    raise ValueError
                key = bytes.fromhex(text[len(KEY_PREFIX) :])
                Ed25519PublicKey.from_public_bytes(key)
            except ValueError:
                raise SecAggError(
                    f'the consortium roster {path}: hospitals.{name} has no valid identity = "{KEY_PREFIX}<64 hex>"'
                ) from None
            if key in members.values():
                raise SecAggError(f"the consortium roster {path} lists one identity key twice ({name})")
            members[str(name)] = key
        if not members:
            raise SecAggError(
                f"the consortium roster {path} lists no hospital",
                "a roster lists every member hospital under [hospitals.<name>]",
            )
        return cls(path, members)

    @staticmethod
    def text(members: dict[str, bytes]) -> str:
        """A roster file's text for ``members`` (name -> raw public key), fingerprints as comments."""
        lines = [
            "# fedcare consortium roster: every member hospital's identity key.",
            "# Pin it at a hospital only after checking each fingerprint with that hospital directly.",
            "",
        ]
        for name in sorted(members):
            lines += [
                f"[hospitals.{json.dumps(name)}]",
                f'identity = "{KEY_PREFIX}{members[name].hex()}"',
                f"# fingerprint {fingerprint(members[name])}",
                "",
            ]
        return "\n".join(lines)


class RosterConsortium(Consortium):
    """A deployed hospital: the roster it pinned and its own identity key file."""

    def __init__(self, roster: Roster, key_path: str | os.PathLike[str]) -> None:
        self.roster = roster
        self.key_path = Path(key_path)
        self._key: Ed25519PrivateKey | None = None

    def public_key(self, name: str) -> bytes | None:
        return self.roster.members.get(name)

    def signing_key(self, name: str) -> Ed25519PrivateKey:
        if self._key is None:
            self._key = load_identity_key(self.key_path)
        return self._key


class SimulatedConsortium(Consortium):
    """Virtual hospitals: identity keys derived from a secret only the simulated hospitals hold."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self._keys: dict[str, Ed25519PrivateKey] = {}

    @classmethod
    def in_folder(cls, folder: str | os.PathLike[str]) -> SimulatedConsortium:
        """The secret in ``folder`` (0600), created once by whichever virtual hospital comes first."""
        path = Path(folder) / "consortium-secret"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(os.urandom(32))
                handle.flush()
                os.fsync(handle.fileno())
        secret = path.read_bytes()
        if len(secret) != 32:  # another process is still writing it
            import time

            time.sleep(0.05)
            secret = path.read_bytes()
        return cls(secret)

    def signing_key(self, name: str) -> Ed25519PrivateKey:
        if name not in self._keys:
            seed = HKDF(
                algorithm=hashes.SHA256(), length=32, salt=b"fedcare-simulated-identity", info=name.encode("utf-8")
            ).derive(self._secret)
            self._keys[name] = Ed25519PrivateKey.from_private_bytes(seed)
        return self._keys[name]

    def public_key(self, name: str) -> bytes | None:
        return public_bytes(self.signing_key(name))


def make_identity_key(path: str | os.PathLike[str], force: bool = False) -> bytes:
    """Write a new identity key (PEM, 0600) at ``path``; returns its raw public key."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not force:
        raise SecAggError(
            f"{path} already exists; refusing to replace an identity key",
            "a replaced key must be re-pinned in every hospital's roster: pass --force if you mean it",
        )
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    return public_bytes(key)


def load_identity_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise SecAggError(
            f"cannot read the identity key {path}: {exc.strerror}",
            "set identity-key in hospital.toml to this hospital's key",
        ) from None
    except (ValueError, TypeError):
        raise SecAggError(f"{path} is not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SecAggError(f"{path} holds a {type(key).__name__}, not an Ed25519 identity key")
    return key
