"""A hospital's DICOM folder + labels CSV -> ImageSet; a bad-input corpus gives precise errors, no partial state."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

import client.datasets.dicom_folder as dicom_folder
from client.datasets.dicom_folder import ImageSet, find_dicom_files, load_dicom_folder
from client.datasets.dicom_reader import ImagePolicy
from client.datasets.image_cache import ImageCache, file_digest
from fedcare.errors import FedcareError
from tests.support.dicom_files import hospital, ramp, write_dicom

POLICY = ImagePolicy(size=16)


def load(root: Path, **kw) -> ImageSet:
    return load_dicom_folder(root, root / "labels.csv", kw.pop("policy", POLICY), **kw)


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def fails(root: Path, *needles: str, absent: tuple[str, ...] = (), **kw) -> str:
    """Loading fails with a FedcareError whose message holds every needle and leaves the folder untouched."""
    before = snapshot(root)
    with pytest.raises(FedcareError) as exc:
        load(root, **kw)
    message = str(exc.value)
    for needle in needles:
        assert needle in message, message
    for secret in absent:
        assert secret not in message, message
    assert snapshot(root) == before
    return message


# --- the good path ------------------------------------------------------------------------------------


def test_loads_images_labels_and_sizes(tmp_path):
    images = load(hospital(tmp_path / "h"))
    assert images.x.shape == (6, 1, 16, 16) and images.x.dtype == np.float32
    assert images.y.tolist() == [0, 1, 0, 1, 0, 1] and images.y.dtype == np.int64
    assert images.names == [f"img{i:02d}.dcm" for i in range(6)] and images.groups.tolist() == list(range(6))
    assert images.sizes == {(24, 24): 3, (32, 24): 3}
    assert images.rejected == {} and images.phi == {} and images.unlabelled == [] and images.notes == []
    assert images.label_counts == {0: 3, 1: 3} and images.cache_misses == 6 and images.decode_seconds > 0


def test_cache_hit_returns_identical_arrays_without_decoding(tmp_path, monkeypatch):
    root, cache = hospital(tmp_path / "h"), tmp_path / "cache"
    first = load(root, cache_dir=cache)
    assert (first.cache_hits, first.cache_misses) == (0, 6)
    decoded = []
    real = dicom_folder.read_dicom_bytes
    monkeypatch.setattr(dicom_folder, "read_dicom_bytes", lambda *a, **k: decoded.append(a[2]) or real(*a, **k))
    second = load(root, cache_dir=cache)
    assert (second.cache_hits, second.cache_misses, decoded) == (6, 0, [])
    np.testing.assert_array_equal(second.x, first.x)
    other_size = load(root, cache_dir=cache, policy=ImagePolicy(size=8))  # the policy is part of the key
    assert other_size.cache_misses == 6 and len(decoded) == 6


def test_corrupt_cache_entry_is_a_miss_and_is_rewritten(tmp_path):
    root, cache_dir = hospital(tmp_path / "h"), tmp_path / "cache"
    first = load(root, cache_dir=cache_dir)
    cache = ImageCache(cache_dir)
    entry = cache.path_for(file_digest((root / "img03.dcm").read_bytes()), POLICY)
    entry.write_bytes(entry.read_bytes()[:-7])  # truncated
    other = cache.path_for(file_digest((root / "img04.dcm").read_bytes()), POLICY)
    blob = bytearray(other.read_bytes())
    blob[-1] ^= 0xFF  # one flipped byte
    other.write_bytes(bytes(blob))
    second = load(root, cache_dir=cache_dir)
    assert (second.cache_hits, second.cache_misses) == (4, 2)
    np.testing.assert_array_equal(second.x, first.x)
    assert load(root, cache_dir=cache_dir).cache_hits == 6
    assert not list(cache_dir.rglob("*.tmp"))


def test_image_cache_roundtrip_and_garbage(tmp_path):
    cache = ImageCache(tmp_path)
    arrays = [np.full((16, 16), 0.25, dtype=np.float32), np.zeros((16, 16), dtype=np.float32)]
    assert cache.get("ab" * 32, POLICY) is None
    cache.put("ab" * 32, POLICY, arrays)
    got = cache.get("ab" * 32, POLICY)
    assert len(got) == 2 and all(np.array_equal(a, b) for a, b in zip(got, arrays))
    cache.path_for("ab" * 32, POLICY).write_bytes(b"FEDCARE-IMAGE-CACHE\n[1, 2]\n")
    assert cache.get("ab" * 32, POLICY) is None
    assert (cache.hits, cache.misses) == (1, 2)


def test_multiframe_every_expands_frames_with_groups(tmp_path):
    root = tmp_path / "h"
    root.mkdir()
    write_dicom(root / "cine.dcm", np.stack([ramp(seed=k) for k in range(3)]))
    write_dicom(root / "a.dcm", ramp(seed=7))
    (root / "labels.csv").write_text("file,label\ncine.dcm,1\na.dcm,0\n")
    images = load(root, policy=ImagePolicy(size=16, multiframe="every"))
    assert images.names == ["a.dcm", "cine.dcm[frame 0]", "cine.dcm[frame 1]", "cine.dcm[frame 2]"]
    assert images.y.tolist() == [0, 1, 1, 1] and images.groups.tolist() == [0, 1, 1, 1]
    assert images.files == ["a.dcm", "cine.dcm"]
    assert load(root).x.shape[0] == 2  # "first" by default


def test_labels_by_sop_instance_uid_and_subfolders(tmp_path):
    root = tmp_path / "h"
    (root / "series1").mkdir(parents=True)
    uids = []
    for i in range(3):
        path = write_dicom(root / "series1" / f"IM{i}", ramp(seed=i))  # no extension: found by the DICM marker
        from pydicom import dcmread

        uids.append(dcmread(path).SOPInstanceUID)
    (root / "labels.csv").write_text("sop_instance_uid,label\n" + "".join(f"{u},{i % 2}\n" for i, u in enumerate(uids)))
    images = load(root)
    assert images.names == ["series1/IM0", "series1/IM1", "series1/IM2"] and images.y.tolist() == [0, 1, 0]
    (root / "labels.csv").write_text("sop_instance_uid,label\n1.2.3.999,1\n")
    fails(root, "1 sop_instance_uid value(s) match no readable DICOM file", "line(s) 2")


def test_unlabelled_files_are_reported_not_loaded(tmp_path):
    root = hospital(tmp_path / "h", csv="file,label\nimg00.dcm,0\nimg01.dcm,1\n")
    images = load(root)
    assert images.names == ["img00.dcm", "img01.dcm"]
    assert images.unlabelled == ["img02.dcm", "img03.dcm", "img04.dcm", "img05.dcm"]
    assert "4 DICOM file(s) without a label were ignored" in images.notes


def test_one_class_only_is_allowed_and_reported(tmp_path):
    images = load(hospital(tmp_path / "h", labels=[1] * 4, n=4))
    assert images.label_counts == {1: 4}
    assert any("only class 1" in note for note in images.notes)


def test_find_dicom_files_skips_hidden_dicomdir_and_other_files(tmp_path):
    root = hospital(tmp_path / "h", n=2)
    (root / ".cache").mkdir()
    write_dicom(root / ".cache" / "x.dcm", ramp())
    (root / "DICOMDIR").write_bytes(Path(get_testdata_file("rtplan.dcm")).read_bytes())
    (root / "README.txt").write_text("hello")
    assert find_dicom_files(root) == ["img00.dcm", "img01.dcm"]


# --- the bad-input corpus -----------------------------------------------------------------------------


def test_missing_labels_file(tmp_path):
    root = hospital(tmp_path / "h")
    (root / "labels.csv").unlink()
    fails(root, "labels file not found", "labels.csv", "file,label")


def test_empty_labels_file(tmp_path):
    fails(hospital(tmp_path / "h", csv=""), "labels.csv is empty")
    fails(hospital(tmp_path / "h2", csv="file,label\n"), "has a header but no rows")


def test_missing_label_column_names_the_columns_found(tmp_path):
    fails(
        hospital(tmp_path / "h", csv="file,diagnosis\nimg00.dcm,1\n"),
        "lacks column(s): label",
        "columns found: file, diagnosis",
    )
    fails(hospital(tmp_path / "h2", csv="path,label\nimg00.dcm,1\n"), "lacks column(s): file (or sop_instance_uid)")


@pytest.mark.parametrize("sep,said", [(";", "';'"), ("\t", "a tab")])
def test_wrong_delimiter_is_named(tmp_path, sep, said):
    csv = f"file{sep}label\nimg00.dcm{sep}0\nimg01.dcm{sep}1\n"
    fails(hospital(tmp_path / "h", csv=csv), f"uses {said} as delimiter", "save it comma-separated")


def test_labels_not_binary_lists_rows_never_values(tmp_path):
    csv = "file,label\nimg00.dcm,0\nimg01.dcm,DOE^JANE\nimg02.dcm,yes\nimg03.dcm,MRN-SECRET-0001\n"
    message = fails(
        hospital(tmp_path / "h", csv=csv),
        "must be 0 or 1",
        "3 row(s)",
        "line(s) 3, 4, 5",
        "values not shown",
        absent=("DOE", "JANE", "MRN", "SECRET", "yes"),
    )
    assert "'" + "yes" + "'" not in message


def test_duplicate_entries(tmp_path):
    csv = "file,label\nimg00.dcm,0\nimg01.dcm,1\n./img00.dcm,1\n"
    fails(hospital(tmp_path / "h", csv=csv), "listed more than once", "img00.dcm (lines 2, 4)")


def test_labels_naming_absent_files(tmp_path):
    csv = "file,label\nimg00.dcm,0\n" + "".join(f"gone{i}.dcm,1\n" for i in range(7))
    fails(hospital(tmp_path / "h", csv=csv), "7 labelled file(s) do not exist", "gone0.dcm", "and 2 more")


def test_paths_may_not_leave_the_folder(tmp_path):
    fails(hospital(tmp_path / "h", csv="file,label\n../x.dcm,1\n"), "must be relative to the imaging folder")


def test_identifying_headers_stop_the_load_naming_files_and_keywords_only(tmp_path):
    root = hospital(tmp_path / "h")
    write_dicom(root / "img01.dcm", ramp(), PatientName="Doe^Jane", PatientIdentityRemoved="YES")
    write_dicom(root / "img02.dcm", ramp(), BurnedInAnnotation="YES")
    from pydicom import dcmread

    ds = dcmread(root / "img03.dcm")
    ds.private_block(0x0011, "ACME 1.0", create=True).add_new(0x01, "LO", "SECRET-123")
    ds.save_as(root / "img03.dcm", enforce_file_format=True)
    cache = tmp_path / "cache"
    message = fails(
        root,
        "3 labelled DICOM file(s) still carry identifying attributes",
        "img01.dcm (PatientName)",
        "img02.dcm (BurnedInAnnotation)",
        "img03.dcm (private tags)",
        "PS3.15",
        "require-deidentified=false",
        absent=("Doe", "Jane", "SECRET"),
        cache_dir=cache,
    )
    assert "Traceback" not in message
    assert not cache.exists()  # stopped before any pixel was decoded
    images = load(root, require_deidentified=False)
    assert images.phi == {
        "img01.dcm": ["PatientName"],
        "img02.dcm": ["BurnedInAnnotation"],
        "img03.dcm": ["private tags"],
    }
    assert len(images.names) == 6


def test_unreadable_files_error_or_skip(tmp_path):
    root = hospital(tmp_path / "h")
    data = (root / "img01.dcm").read_bytes()
    (root / "img01.dcm").write_bytes(data[: len(data) // 2])  # truncated
    (root / "img02.dcm").write_text("not an image, Doe^Jane\n" * 20)  # not DICOM
    from pydicom import dcmread

    ds = dcmread(root / "img03.dcm")
    del ds.PixelData
    ds.save_as(root / "img03.dcm", enforce_file_format=True)  # no pixel data
    cache = tmp_path / "cache"
    fails(
        root,
        "3 labelled DICOM file(s) cannot be used",
        "img01.dcm: truncated",
        "img02.dcm: not a DICOM file",
        "img03.dcm: no Pixel Data",
        "on-unreadable=skip",
        absent=("Doe",),
        cache_dir=cache,
    )
    assert not list(cache.rglob("*.tmp"))  # entries of good files may exist; no half-written ones
    images = load(root, on_unreadable="skip")
    assert images.names == ["img00.dcm", "img04.dcm", "img05.dcm"]
    assert set(images.rejected) == {"img01.dcm", "img02.dcm", "img03.dcm"}
    assert "3 unreadable file(s) were skipped" in images.notes
    with pytest.raises(FedcareError, match="unknown on_unreadable mode"):
        load(root, on_unreadable="ignore")


def test_all_files_unusable_is_an_error(tmp_path):
    root = hospital(tmp_path / "h", n=2)
    for p in root.glob("*.dcm"):
        p.write_text("junk")
    fails(root, "no usable labelled images", on_unreadable="skip")


def test_missing_folder(tmp_path):
    with pytest.raises(FedcareError, match="imaging folder not found"):
        load_dicom_folder(tmp_path / "nope", tmp_path / "labels.csv", POLICY)


def test_later_epochs_skip_unchanged_files_and_a_changed_file_is_decoded_again(tmp_path):
    root, cache = hospital(tmp_path / "h"), tmp_path / "cache"
    first = load(root, cache_dir=cache)
    assert (first.cache_hits, first.cache_misses) == (0, 6)
    again = load(root, cache_dir=cache)
    assert (again.cache_hits, again.cache_misses) == (6, 0)
    np.testing.assert_array_equal(again.x, first.x)
    write_dicom(root / "img02.dcm", ramp(24, 24, lo=2000, hi=2100, seed=9))  # an edit: new size/mtime
    os.utime(root / "img02.dcm", ns=(1, 1))
    edited = load(root, cache_dir=cache)
    assert (edited.cache_hits, edited.cache_misses) == (5, 1)
    assert not np.array_equal(edited.x[2], first.x[2])


# --- unreadable inputs name the file and the real cause --------------------------------------------


def test_labels_file_that_is_a_directory_or_a_link_loop_names_the_cause(tmp_path):
    root = hospital(tmp_path / "site[red]")
    (root / "labels.csv").unlink()
    (root / "labels.csv").mkdir()
    fails(root, f"labels file {root / 'labels.csv'} is a directory, not a file")
    (root / "labels.csv").rmdir()
    (root / "labels.csv").symlink_to(root / "labels.csv")
    message = fails(root, "labels.csv is a symbolic link loop", "site[red]")
    assert "not found" not in message


def test_unreadable_labels_file_is_an_error_not_a_traceback(tmp_path, monkeypatch):
    # Tests run as root, for whom chmod 000 still reads: the PermissionError is simulated at the read.
    root = hospital(tmp_path / "h")
    real = Path.read_text

    def denied(self, *args, **kwargs):
        if self.name == "labels.csv":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    fails(root, "labels file", "labels.csv cannot be read: permission denied", "permissions")


def test_labelled_file_that_is_a_link_loop_or_empty_names_the_cause(tmp_path):
    root = hospital(tmp_path / "h")
    (root / "img01.dcm").unlink()
    (root / "img01.dcm").symlink_to(root / "img01.dcm")
    message = fails(root, "1 labelled file(s)", "cannot be read: img01.dcm (is a symbolic link loop)")
    assert "do not exist" not in message
    (root / "img01.dcm").unlink()
    (root / "img01.dcm").write_bytes(b"")
    message = fails(root, "img01.dcm: empty file (0 bytes)")
    assert "not a DICOM file" not in message


# --- the cache never lets a file past the guard ----------------------------------------------------------


def test_a_changed_guard_rechecks_files_it_passed_before(tmp_path, monkeypatch):
    root, cache = hospital(tmp_path / "h", n=2), tmp_path / "cache"
    assert load(root, cache_dir=cache).cache_misses == 2  # passed, header results and pixels cached
    # The guard changes (a new table edition or rule): its version changes, and it now refuses img01.
    monkeypatch.setattr(dicom_folder, "guard_version", lambda: "a-stricter-guard", raising=False)
    monkeypatch.setattr(
        dicom_folder,
        "phi_findings",
        lambda ds, **kw: ["PatientName"] if ds.SOPInstanceUID == _uid(root / "img01.dcm") else [],
    )
    fails(root, "img01.dcm (PatientName)", cache_dir=cache)


def _uid(path: Path) -> str:
    from pydicom import dcmread

    return dcmread(path).SOPInstanceUID


def test_a_file_changed_after_the_guard_read_it_is_neither_loaded_nor_cached(tmp_path, monkeypatch):
    root, cache = hospital(tmp_path / "h", n=2), tmp_path / "cache"
    checked = []
    real = dicom_folder.phi_findings

    def swap_after_check(ds, **kw):
        findings = real(ds, **kw)
        checked.append(ds)
        if len(checked) == 2:  # both headers passed: now img01 is replaced by an identifying file
            write_dicom(root / "img01.dcm", ramp(24, 24, seed=5), PatientName="Doe^Jane")
        return findings

    monkeypatch.setattr(dicom_folder, "phi_findings", swap_after_check)
    with pytest.raises(FedcareError) as exc:
        load(root, cache_dir=cache)
    message = str(exc.value)
    assert "img01.dcm: the file changed while it was being loaded" in message and "Doe" not in message
    swapped = file_digest((root / "img01.dcm").read_bytes())
    assert ImageCache(cache).get(swapped, POLICY) is None  # the unchecked bytes were never decoded into the cache
