"""`fedcare node approve|approved` (hospital) and `fedcare deploy fab` (coordinator): which code a node runs.

The coordinator builds the FAB it will ship, exactly as `flwr run` builds it, and tells hospitals its
digest (`fedcare deploy fab`). A hospital inspects it and approves it, by the .fab file (its digest
and files are printed, and a FAB that is not code-only is refused) or by the digest alone
(`fedcare node approve --config hospital.toml TARGET`); the approval goes into the hospital's store,
which its node reads for every task (fedcare/fab_approval.py, fedcare/node_launcher.py).

Registered on the `deploy` and `node` command groups at the end of fedcare/deploy_commands.py.
Exit codes as there: 0 done, 1 the FAB or the store is refused, 2 a usage error.
"""

from __future__ import annotations

from pathlib import Path

import typer

from fedcare.error_output import EXIT_USAGE, fail
from fedcare.errors import FedcareError
from fedcare.fab_approval import (
    STORE_NAME,
    FabContents,
    FabRefused,
    approve_digest,
    inspect_fab,
    normalize_digest,
    read_approvals,
)


def _fail(problem: str, hint: str = "", code: int = EXIT_USAGE) -> None:
    """Report through the one error printer (fedcare/error_output.py)."""
    fail(FedcareError(problem, hint), code)


def approval_store(config: Path) -> tuple[Path, tuple[str, ...]]:
    """The hospital's approval store and the digests its hospital.toml approves, from ``config``.

    The store is ``<ledger-dir>/approved-fabs.json`` (the hospital's private state folder) unless the
    settings name one (``NodeSettings.approved_fabs_store``, once hospital.toml has a ``[code]`` section).
    """
    from fedcare.node_settings import load_node_settings

    settings = load_node_settings(config, check_port=False)  # the node may be running: its port is taken
    store = getattr(settings, "approved_fabs_store", None)
    digests = tuple(getattr(settings, "approved_fabs", ()) or ())
    return Path(store) if store else Path(str(settings.node_config["ledger-dir"])) / STORE_NAME, digests


def _print_contents(contents: FabContents) -> None:
    typer.echo(f"FAB sha256:{contents.digest}")
    typer.echo(f"app {contents.app_id} {contents.version}, {len(contents.files)} files:")
    for name in contents.files:
        typer.echo(f"  {name}")


def approve(
    target: str = typer.Argument(..., help="the FAB to approve: an app.fab file, or its SHA-256 digest"),
    config: Path = typer.Option(..., "--config", help="this hospital's hospital.toml"),
) -> None:
    """Approve a FAB for this hospital's node: from then on the node runs that FAB's ClientApp."""
    try:
        store, _ = approval_store(config)
        path = Path(target).expanduser()
        if path.is_file():
            contents = inspect_fab(path.read_bytes())
            _print_contents(contents)
            record = approve_digest(
                store,
                contents.digest,
                source=str(path.resolve()),
                files=contents.files,
                app=f"{contents.app_id} {contents.version}",
            )
        else:
            try:
                digest = normalize_digest(target)
            except FedcareError:
                _fail(
                    f"'{target}' is neither a .fab file nor a SHA-256 digest",
                    "give the app.fab from the coordinator, or the digest `fedcare deploy fab` printed",
                )
            typer.echo(f"FAB sha256:{digest} (approved by digest: its files were not inspected here)")
            record = approve_digest(store, digest, source="digest")
    except FabRefused as exc:
        _fail(exc.problem, exc.hint, 1)
    except FedcareError as exc:
        _fail(exc.problem, exc.hint, 2)
    typer.echo(
        f"approved sha256:{record.digest} for this node (by {record.approved_by} at {record.approved_at}), "
        f"in {store}; the node uses it from its next message, without a restart"
    )


def approved(
    config: Path = typer.Option(..., "--config", help="this hospital's hospital.toml"),
) -> None:
    """List the FABs this hospital's node may run."""
    try:
        store, digests = approval_store(config)
        records = read_approvals(store)
    except FedcareError as exc:
        _fail(exc.problem, exc.hint, 2)
    typer.echo(f"approval store: {store}" + ("" if store.exists() else " (none yet)"))
    for r in records:
        what = r.app or ("approved by digest" if r.source == "digest" else r.source)
        typer.echo(f"  sha256:{r.digest}  {r.approved_at}  {r.approved_by}  {what}")
    for digest in digests:
        typer.echo(f"  sha256:{normalize_digest(digest)}  (hospital.toml [code] approved-fabs)")
    if not records and not digests:
        typer.echo("  no FAB is approved: this node refuses every FAB")


def fab(
    app_dir: Path = typer.Argument(Path("."), help="the app's folder (the one `flwr run` is given)"),
    out: Path | None = typer.Option(None, "--out", help="also write the FAB here (e.g. app.fab), for hospitals"),
) -> None:
    """Build the FAB exactly as `flwr run APP_DIR` would; print its digest and files for hospitals to approve."""
    from fedcare.compat.flower import build_fab

    try:
        fab_bytes, note = build_fab(app_dir)
    except Exception as exc:  # Flower's build errors (click/ValueError) carry their own explanation
        _fail(
            f"Flower could not build a FAB from {app_dir}: {getattr(exc, 'message', None) or exc}",
            "fix the app folder as the message says",
        )
    try:
        contents = inspect_fab(fab_bytes)
    except FabRefused as exc:
        _fail(f"hospitals will refuse this FAB: {exc.problem}", exc.hint, 1)
    _print_contents(contents)
    if note:
        typer.echo(
            f"warning: `flwr run {app_dir}` itself stops on a nested path: {note} Add that folder to the "
            "app's root .gitignore; the FAB above is what it then ships.",
            err=True,
        )
    if out is not None:
        out.write_bytes(fab_bytes)
        typer.echo(f"wrote {out}")
    typer.echo(
        f"each hospital approves it with: fedcare node approve --config hospital.toml "
        f"{out if out is not None else contents.digest}"
    )
