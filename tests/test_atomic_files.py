"""fedcare.atomic_files: the one atomic-replace helper, and that product code uses no other."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from fedcare import atomic_files
from fedcare.atomic_files import PRIVATE, SHARED, replace_file
from fedcare.project_packages import PACKAGES
from tests.conftest import ROOT


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring it afterwards."""
    old = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_bytes_and_text_are_written_whole(tmp_path: Path) -> None:
    target = tmp_path / "state.bin"
    replace_file(target, b"\x00\xffbytes")
    assert target.read_bytes() == b"\x00\xffbytes"
    replace_file(target, "text é\n")
    assert target.read_bytes() == "text é\n".encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]


def test_a_private_file_is_0600_under_any_umask_even_over_a_readable_one(tmp_path: Path, umask) -> None:
    umask(0)
    target = tmp_path / "key.pem"
    target.write_text("old")
    os.chmod(target, 0o644)
    replace_file(target, b"secret")
    assert _mode(target) == 0o600 and PRIVATE == 0o600
    fresh = tmp_path / "ledger.json"
    replace_file(fresh, "{}")
    assert _mode(fresh) == 0o600


def test_a_shared_file_gets_the_mode_open_would_give_it(tmp_path: Path, umask) -> None:
    umask(0o022)
    target = tmp_path / "manifest.json"
    replace_file(target, "{}", mode=SHARED)
    assert _mode(target) == 0o644
    umask(0o002)
    replace_file(target, "{}", mode=SHARED)
    assert _mode(target) == 0o664


def test_a_crash_before_the_rename_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "ledger.json"
    target.write_text("old, whole")

    def crash(src, dst):
        assert Path(src).read_text() == "new"  # the temporary was complete when the "crash" came
        raise OSError("simulated crash")

    monkeypatch.setattr(atomic_files.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        replace_file(target, "new", sync_folder=True)
    assert target.read_text() == "old, whole"
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "approvals.json"
    target.write_text("old")

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(atomic_files.os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        replace_file(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["approvals.json"]


def test_the_file_is_fsynced_and_the_folder_only_when_asked(tmp_path: Path, monkeypatch) -> None:
    synced: list[str] = []
    real = os.fsync
    monkeypatch.setattr(
        atomic_files.os,
        "fsync",
        lambda fd: (synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"), real(fd)),
    )
    replace_file(tmp_path / "a", b"1")
    assert synced == ["file"]
    synced.clear()
    replace_file(tmp_path / "b", b"2", sync_folder=True)
    assert synced == ["file", "dir"]


# Writers that replace a file by hand (a temporary + rename) instead of calling replace_file. The
# checkpoint swaps a whole folder (server/checkpoint.py), which a file helper cannot do.
_HAND_WRITTEN = re.compile(r"\bos\.replace\(|\bmkstemp\(|\bNamedTemporaryFile\(|\.rename\(")
_ALLOWED = {
    "fedcare/atomic_files.py",
    "server/checkpoint.py",
    # moving finished hospital folders out of a staging folder, not replacing a file (the generators' one helper)
    "simulation/folder_lock.py:rename",
}


def test_product_code_replaces_files_only_through_the_helper() -> None:
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            for number, line in enumerate(path.read_text().splitlines(), 1):
                match = _HAND_WRITTEN.search(line)
                if (
                    match
                    and name not in _ALLOWED
                    and not (match.group(0) == ".rename(" and f"{name}:rename" in _ALLOWED)
                ):
                    offenders.append(f"{name}:{number}: {line.strip()}")
    assert not offenders, "replace files with fedcare.atomic_files.replace_file:\n" + "\n".join(offenders)
