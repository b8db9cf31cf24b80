"""Which FABs a hospital's node may run: approval by SHA-256 digest, code-only contents.

The coordinator ships the FAB (Flower App Bundle) its SuperLink holds, and Flower's SuperNode would
install and import whatever that is. A hospital therefore names the FABs it accepts by digest
(sha256 of the FAB bytes: Flower's ``fab_hash``), in a store it owns (``approved-fabs.json`` in its
private state folder, written by ``fedcare node approve``) and/or as digests given to
``fedcare.node_launcher --approve``. The node's ClientApp executor calls ``FabPolicy.check`` on the
task's FAB bytes after they are pulled and before anything is installed or imported
(``fedcare.compat.flower.guard_fab_install``); a refusal becomes Flower's Error reply, so the
coordinator reads the digest and the approving command.

Even an approved FAB must carry code only: ``*.py``, the root ``pyproject.toml`` and Flower's
``.info/CONTENT`` manifest, which must list exactly those files with matching hashes. A FAB is code
travelling to every hospital; anything else in it (json, csv, keys, ledgers, weights) is data that
should never have left the coordinator, and Flower's installer would unpack it unchecked.

Stdlib and fedcare.errors only: the warm executor imports this before it forks, and it must not
depend on anything a FAB could replace.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import getpass
import hashlib
import io
import json
import os
import re
import socket
import stat
import tomllib
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedcare.atomic_files import replace_file
from fedcare.errors import FedcareError

STORE_NAME = "approved-fabs.json"  # in the hospital's state folder (default: its ledger-dir)
STORE_FORMAT = "fedcare-approved-fabs/1"
MANIFEST = ".info/CONTENT"
PYPROJECT = "pyproject.toml"
MAX_UNZIPPED_BYTES = 64 * 1024 * 1024  # a FAB is at most 10 MiB zipped (Flower); code is far smaller
_DIGEST = re.compile(r"(?:sha256:)?([0-9a-f]{64})")
_SAFE_PART = re.compile(r"[A-Za-z0-9_.-]+")


class FabRefused(FedcareError):
    """This node will not install or run this FAB (unapproved, not code-only, or not what the run names)."""


def normalize_digest(text: str) -> str:
    """``[sha256:]<64 hex>`` (any case, surrounding spaces) -> 64 lowercase hex characters."""
    match = _DIGEST.fullmatch(str(text).strip().lower())
    if not match:
        raise FedcareError(
            f"'{text}' is not a SHA-256 digest",
            "give the 64 hex characters `fedcare deploy fab` prints (optionally prefixed sha256:)",
        )
    return match.group(1)


def fab_digest(fab: bytes) -> str:
    """The FAB's digest: sha256 of its bytes, as Flower's fab_hash."""
    return hashlib.sha256(fab).hexdigest()


@dataclass(frozen=True)
class FabContents:
    """A code-only FAB: its digest, the files it installs, and the app it says it is."""

    digest: str
    files: list[str]
    app_id: str  # publisher/name, as Flower's fab_id
    version: str


def _is_code_path(name: str) -> bool:
    """A relative POSIX path of plain parts ending in .py, or the root pyproject.toml."""
    if name == PYPROJECT:
        return True
    parts = name.split("/")
    return (
        name.endswith(".py")
        and "\\" not in name
        and not name.startswith("/")
        and all(_SAFE_PART.fullmatch(p) and p not in (".", "..") for p in parts)
    )


def _app_identity(pyproject: bytes, digest: str) -> tuple[str, str]:
    try:
        config = tomllib.loads(pyproject.decode("utf-8"))
        publisher, project = config["tool"]["flwr"]["app"]["publisher"], config["project"]
        return f"{publisher}/{project['name']}", str(project["version"])
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
        raise FabRefused(
            f"FAB sha256:{digest} has no readable app identity in its pyproject.toml ({type(exc).__name__})",
            "rebuild it with `fedcare deploy fab`",
        ) from None


def inspect_fab(fab: bytes) -> FabContents:
    """Open a FAB without installing anything; refuse it unless it carries code only, as its manifest says."""
    digest = fab_digest(fab)
    where = f"FAB sha256:{digest}"
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
    except zipfile.BadZipFile:
        raise FabRefused(f"{where} is not a zip archive", "rebuild it with `fedcare deploy fab`") from None
    with archive:
        infos = archive.infolist()
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            raise FabRefused(f"{where} holds a file twice", "rebuild it with `fedcare deploy fab`")
        other = sorted(n for n in names if n != MANIFEST and not _is_code_path(n))
        links = sorted(i.filename for i in infos if stat.S_ISLNK(i.external_attr >> 16))
        if other or links:
            shown = ", ".join((other + links)[:5]) + (" ..." if len(other + links) > 5 else "")
            raise FabRefused(
                f"{where} carries files that are not code ({len(other) + len(links)}: {shown})",
                "a FAB may hold only *.py, pyproject.toml and .info/CONTENT: narrow `fab-include` in "
                "[tool.flwr.app] to the app's *.py and rebuild",
            )
        if MANIFEST not in names or PYPROJECT not in names:
            raise FabRefused(
                f"{where} lacks {MANIFEST if MANIFEST not in names else PYPROJECT}",
                "rebuild it with `fedcare deploy fab`",
            )
        if sum(i.file_size for i in infos) > MAX_UNZIPPED_BYTES:
            raise FabRefused(
                f"{where} unpacks to more than {MAX_UNZIPPED_BYTES // 2**20} MiB", "a FAB carries code only"
            )
        try:
            data = {n: archive.read(n) for n in names}
        except (zipfile.BadZipFile, RuntimeError, NotImplementedError, EOFError, zlib.error) as exc:
            raise FabRefused(
                f"{where} cannot be unpacked ({type(exc).__name__})", "rebuild it with `fedcare deploy fab`"
            ) from None
    listed: dict[str, str] = {}
    for line in data.pop(MANIFEST).decode("utf-8", "replace").strip().splitlines():
        path, _, rest = line.partition(",")
        listed[path] = rest.partition(",")[0]
    if set(listed) != set(data) or any(hashlib.sha256(data[p]).hexdigest() != h for p, h in listed.items()):
        raise FabRefused(
            f"{where}: its {MANIFEST} does not list exactly its files with their hashes",
            "rebuild it with `fedcare deploy fab`",
        )
    app_id, version = _app_identity(data[PYPROJECT], digest)
    return FabContents(digest, sorted(data), app_id, version)


@dataclass(frozen=True)
class Approval:
    """One approved digest: when, by whom, from what (a .fab file or a typed digest)."""

    digest: str
    approved_at: str
    approved_by: str
    source: str
    app: str = ""
    files: list[str] = field(default_factory=list)


def _check_store_mode(store: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise FedcareError(f"the approval store {store} is not a regular file", "point --approved-fabs at a file")
    if stat.S_IMODE(st.st_mode) & 0o022:
        mode = stat.S_IMODE(st.st_mode)
        raise FedcareError(
            f"the approval store {store} is writable by other users (mode {mode:04o})",
            f"chmod 600 {store}: whoever can write it decides what code this node runs",
        )


def read_approvals(store: Path) -> list[Approval]:
    """The store's approvals ([] when it does not exist yet); a broken or shared-writable store is an error."""
    store = Path(store)
    try:
        fd = os.open(store, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise FedcareError(
            f"cannot read the approval store {store}: {exc.strerror}",
            "it must be a plain file the node's user can read",
        ) from None
    with os.fdopen(fd, "rb") as f:
        _check_store_mode(store, os.fstat(f.fileno()))
        raw = f.read()
    try:
        doc = json.loads(raw)
        if doc.get("format") != STORE_FORMAT:
            raise ValueError(doc.get("format"))
        return [Approval(**{**r, "digest": normalize_digest(r["digest"])}) for r in doc["approvals"]]
    except (ValueError, TypeError, KeyError, AttributeError, FedcareError):
        raise FedcareError(
            f"{store} is not a fedcare approval store",
            "restore it from a backup, or move it away and approve the FABs again",
        ) from None


def approve_digest(
    store: Path, digest: str, source: str, files: Iterable[str] = (), app: str = "", approved_by: str | None = None
) -> Approval:
    """Record ``digest`` as approved (idempotent: an existing record is kept and returned)."""
    store, digest = Path(store), normalize_digest(digest)
    store.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = os.open(store.with_name(f"{store.name}.lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two `approve` at once must not lose one
        approvals = read_approvals(store)
        for existing in approvals:
            if existing.digest == digest:
                return existing
        record = Approval(
            digest,
            dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            approved_by or f"{getpass.getuser()}@{socket.gethostname()}",
            source,
            app,
            list(files),
        )
        doc = {"format": STORE_FORMAT, "approvals": [asdict(a) for a in [*approvals, record]]}
        replace_file(store, json.dumps(doc, indent=2) + "\n", sync_folder=True)
        return record
    finally:
        os.close(lock)


@dataclass
class FabPolicy:
    """A node's rule: run a FAB only if it is code-only and its digest is in ``store`` or ``digests``.

    ``check`` re-reads the store for every task, so an approval takes effect without a restart.
    ``settings`` (the hospital.toml) is only named in the refusal, as the approving command.
    """

    store: Path | None
    digests: frozenset[str]
    settings: Path | None = None

    def approve_command(self, digest: str) -> str:
        config = self.settings or "hospital.toml"
        return f"fedcare node approve --config {config} {digest}"

    def approved(self, digest: str) -> bool:
        """Whether ``digest`` is approved (a store that cannot be read approves nothing)."""
        if digest in self.digests:
            return True
        if self.store is None:
            return False
        return any(a.digest == digest for a in read_approvals(self.store))

    def check(
        self, fab: bytes, claimed_digest: str | None = None, app_id: str | None = None, app_version: str | None = None
    ) -> FabContents:
        """Return the FAB's contents if this node may run it; otherwise raise FabRefused saying why and what to do.

        ``claimed_digest``, ``app_id`` and ``app_version`` are what the run names (Flower's fab_hash, fab_id,
        fab_version): Flower loads the ClientApp from the folder they name, so they must be this FAB's.
        """
        digest = fab_digest(fab)
        if claimed_digest is not None and claimed_digest != digest:
            raise FabRefused(
                f"the task names FAB digest {claimed_digest} but its bytes are sha256:{digest}",
                "the node's state is inconsistent: restart the node",
            )
        if self.store is None and not self.digests:
            raise FabRefused(
                f"this node has no approved FABs, so it refused FAB sha256:{digest}",
                "start it with an approval store (`[code]` in hospital.toml), inspect the FAB and run "
                f"`{self.approve_command(digest)}`",
            )
        try:
            approved = self.approved(digest)
        except FedcareError as exc:
            raise FabRefused(f"refused FAB sha256:{digest}: {exc.problem}", exc.hint) from None
        if not approved:
            raise FabRefused(
                f"this hospital has not approved FAB sha256:{digest}",
                f"inspect it and run `{self.approve_command(digest)}` (or name the .fab file "
                "instead of the digest), then start the run again",
            )
        contents = inspect_fab(fab)
        if app_id is not None and (app_id, app_version) != (contents.app_id, contents.version):
            raise FabRefused(
                f"the run names app {app_id} {app_version}, but FAB sha256:{digest} says it is "
                f"{contents.app_id} {contents.version}",
                "the coordinator must ship the app unchanged",
            )
        return contents


def add_policy_arguments(parser) -> None:
    """The approval options of `fedcare.node_launcher` and its ClientApp executor (argparse)."""
    parser.add_argument(
        "--approved-fabs",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"the hospital's approval store ({STORE_NAME}, written by `fedcare node approve`); read for every task",
    )
    parser.add_argument(
        "--approve",
        action="append",
        default=[],
        metavar="DIGEST",
        help="also run the FAB with this SHA-256 digest (repeatable)",
    )
    parser.add_argument(
        "--settings",
        type=Path,
        default=None,
        metavar="HOSPITAL_TOML",
        help="this node's hospital.toml, named in refusals as the file `fedcare node approve` takes",
    )
    parser.add_argument(
        "--allow-any-fab",
        action="store_true",
        help="UNSAFE: run whatever FAB the SuperLink ships, unchecked (the coordinator then decides "
        "what code runs next to this hospital's data)",
    )


def policy_from_arguments(args) -> FabPolicy | None:
    """The node's FabPolicy from parsed options (None only for --allow-any-fab); bad digests are errors."""
    if args.allow_any_fab:
        if args.approved_fabs is not None or args.approve:
            raise FedcareError(
                "--allow-any-fab turns FAB approval off, yet approvals were given",
                "drop --allow-any-fab (approvals then apply) or drop the approvals",
            )
        return None
    store = args.approved_fabs.expanduser().resolve() if args.approved_fabs is not None else None
    settings = args.settings.expanduser().resolve() if args.settings is not None else None
    return FabPolicy(store, frozenset(normalize_digest(d) for d in args.approve), settings)


def policy_arguments(policy: FabPolicy | None) -> list[str]:
    """``policy`` as the options `add_policy_arguments` reads (to hand it to another process)."""
    if policy is None:
        return ["--allow-any-fab"]
    args: list[str] = []
    if policy.store is not None:
        args += ["--approved-fabs", str(policy.store)]
    for digest in sorted(policy.digests):
        args += ["--approve", digest]
    if policy.settings is not None:
        args += ["--settings", str(policy.settings)]
    return args
