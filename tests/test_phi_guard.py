"""PHI findings per PS3.15 Annex E: keywords of identifying attributes, never their values."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from client.datasets import confidentiality_profile
from client.datasets.confidentiality_profile import (
    FEDCARE_ADDITIONS,
    RETAIN_OPTIONS,
    SCANNED_SEQUENCES,
    profile,
    tag_label,
)
from client.datasets.dicom_reader import read_header_bytes
from client.datasets.phi_guard import MAX_DEPTH, guard_version, phi_findings
from fedcare.errors import FedcareError
from tests.support.dicom_files import make_dataset


def clean() -> Dataset:
    return make_dataset(np.zeros((8, 8), dtype=np.uint16), name="clean")


def test_clean_dataset_has_no_findings():
    assert phi_findings(clean()) == []


def _package_table() -> list[tuple[int, ...]]:
    """Table E.1-1 straight from the pinned package, independent of how fedcare reads it."""
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    return list(dicom_anonymization_database_selector("dicomfields_2026c")["ALL_TAGS"])


def test_profile_is_the_pinned_table_plus_explained_policy():
    from importlib.metadata import version

    assert version("dicom-anonymizer") == confidentiality_profile.TABLE_PACKAGE_VERSION == "2.1.0"
    table = _package_table()
    rules = profile()
    assert rules.table_size == len(set(table)) == 655
    exact = {(t[0] << 16) | t[1] for t in table if len(t) == 2}
    scanned = {int(tag_for_keyword(kw)) for kw in SCANNED_SEQUENCES}
    # every table entry is refused, allowed as a UID, or scanned inside (X/Z/U*); nothing else
    additions = {tag_for_keyword(kw) for kw in FEDCARE_ADDITIONS}
    assert exact == (set(rules.exact) - additions) | rules.allowed_uids | scanned
    assert not additions & exact  # the additions are really beyond the table
    assert all(dictionary_VR(tag) == "UI" for tag in rules.allowed_uids) and len(rules.allowed_uids) == 57
    assert [kw for kw in FEDCARE_ADDITIONS if tag_for_keyword(kw) is None] == []
    assert {option for _, option in rules.exact.values() if option} <= set(RETAIN_OPTIONS)
    assert len(rules.masked) == 3 and guard_version().startswith("dicomfields_2026c/2.1.0/")


def _value_for(vr: str):
    vr = vr.split(" or ")[0]
    return {
        "DA": "20240101",
        "TM": "120000",
        "DT": "20240101120000",
        "PN": "Doe^Jane",
        "AS": "045Y",
        "DS": "1.5",
        "IS": "3",
        "US": 1,
        "SS": 1,
        "UL": 1,
        "FL": 1.0,
        "FD": 1.0,
        "CS": "SECRET",
        "AE": "AE1",
        "UR": "http://x",
        "OB": b"\x01\x02",
        "OW": b"\x01\x02",
        "UN": b"\x01\x02",
        "SQ": None,
    }.get(vr, "SECRET-VALUE-1")


def test_every_non_uid_table_attribute_with_a_value_is_refused():
    """All of Table E.1-1 (2026c) except the explained allowlist, written to a file and read back."""
    rules = profile()
    ds = clean()
    expected = set()
    for entry in _package_table():
        if len(entry) == 4:
            continue
        tag = (entry[0] << 16) | entry[1]
        if tag in rules.allowed_uids or tag in rules.scanned_sequences:
            continue
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            vr = "LO"  # newer than this pydicom: refused by tag number
        value = _value_for(vr)
        if value is None:
            item = Dataset()
            item.CodeValue = "X"
            value = Sequence([item])
        ds.add_new(tag, vr.split(" or ")[0], value)
        expected.add(tag_label(tag))
    # repeating groups: overlay data/comments (60xx) and curve data (50xx, every element)
    ds.add_new(0x60023000, "OW", b"\x01" * 8)
    ds.add_new(0x60044000, "LT", "note")
    ds.add_new(0x50060005, "US", 2)
    ds.add_new(0x50003000, "OW", b"\x01\x00")
    expected |= {"OverlayData", "OverlayComments", "CurveDimensions", "CurveData"}
    read_back = read_header_bytes(_roundtrip(ds).getvalue(), "all.dcm")
    findings = phi_findings(read_back)
    assert len(expected) > 590
    assert expected - set(findings) == set()
    assert set(findings) - expected == set()
    assert "SECRET" not in repr(findings) and "Doe" not in repr(findings)


def test_referenced_and_source_image_sequences_holding_only_uids_pass():
    ds = clean()
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", "1.2.3.4"
    ds.ReferencedImageSequence = Sequence([item])
    ds.SourceImageSequence = Sequence([Dataset()])
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.5", "1.2.3.6"
    assert phi_findings(read_header_bytes(_roundtrip(ds).getvalue(), "x.dcm")) == []


@pytest.mark.parametrize(
    "keyword,value",
    [
        ("PatientName", "Doe^Jane"),
        ("PatientID", "MRN123456"),
        ("OtherPatientIDs", "X-99"),
        ("PatientBirthDate", "19700101"),
        ("PatientBirthTime", "101010"),
        ("PatientAddress", "1 Main St"),
        ("PatientTelephoneNumbers", "555-0100"),
        ("AccessionNumber", "ACC42"),
        ("InstitutionName", "St Elsewhere"),
        ("InstitutionAddress", "2 Hill Rd"),
        ("InstitutionalDepartmentName", "Radiology"),
        ("ReferringPhysicianName", "House^Greg"),
        ("PerformingPhysicianName", "Grey^Meredith"),
        ("OperatorsName", "Tech^Tom"),
        ("StudyDate", "20240102"),
        ("StudyTime", "120000"),
        ("SeriesDate", "20240102"),
        ("AcquisitionDate", "20240102"),
        ("ContentDate", "20240102"),
        ("ContentTime", "120001"),
        ("StudyID", "S1"),
        ("DeviceSerialNumber", "SN-777"),
        ("StationName", "CT01"),
        ("PatientAge", "045Y"),
        ("PatientSex", "F"),
        ("MedicalRecordLocator", "LOC-1"),
        ("StudyDescription", "chest for Doe"),
        ("ImageComments", "call Jane"),
    ],
)
def test_profile_attribute_with_a_value_is_a_finding(keyword, value):
    ds = clean()
    setattr(ds, keyword, value)
    findings = phi_findings(ds)
    assert findings == [keyword]
    assert value not in " ".join(findings)


def test_empty_type2_values_are_not_findings():
    ds = clean()
    ds.PatientName, ds.PatientID, ds.StudyDate, ds.AccessionNumber = "", "", "", ""
    assert phi_findings(ds) == []


def test_uids_are_not_findings():
    ds = clean()
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3.5"
    ds.FrameOfReferenceUID = "1.2.3.6"
    assert phi_findings(ds) == []


def test_other_patient_ids_sequence_and_nested_attributes_are_found():
    ds = clean()
    inner = Dataset()
    inner.PatientID = "OLD-MRN"
    ds.OtherPatientIDsSequence = Sequence([inner])
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    deeper = Dataset()
    deeper.PersonName = "Doe^John"
    item.ContentCreatorName = "Smith^Anna"
    item.add_new(0x00091010, "LO", "vendor secret")
    ds.ReferencedImageSequence = Sequence([item])
    ds.SourceImageSequence = Sequence([Dataset()])
    ds.SourceImageSequence[0].PurposeOfReferenceCodeSequence = Sequence([deeper])
    assert phi_findings(ds) == sorted(["OtherPatientIDsSequence", "ContentCreatorName", "private tags", "PersonName"])


def test_private_tags_are_a_finding_and_values_never_appear():
    ds = clean()
    ds.private_block(0x0011, "ACME 1.0", create=True).add_new(0x01, "LO", "SECRET-123")
    findings = phi_findings(ds)
    assert findings == ["private tags"]
    assert "SECRET" not in repr(findings)
    assert phi_findings(ds, retain=["private-tags"]) == []


def test_burned_in_annotation():
    ds = clean()
    assert phi_findings(ds, strict=True) == ["BurnedInAnnotation (absent)"]
    ds.BurnedInAnnotation = "YES"
    assert phi_findings(ds) == ["BurnedInAnnotation"]
    ds.BurnedInAnnotation = "NO"
    assert phi_findings(ds) == [] and phi_findings(ds, strict=True) == []


def test_patient_identity_removed_flag_alone_proves_nothing():
    ds = clean()
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "tool X"
    ds.PatientName = "Doe^Jane"
    assert phi_findings(ds) == ["PatientName"]


def test_retain_options_exempt_their_groups_only():
    ds = clean()
    ds.StudyDate, ds.PatientSex, ds.DeviceSerialNumber, ds.InstitutionName = "20240101", "M", "SN", "Hosp"
    ds.SeriesDescription, ds.PatientName = "AX T1", "Doe^Jane"
    assert phi_findings(
        ds, retain=["dates", "patient-characteristics", "device-identity", "institution-identity", "descriptors"]
    ) == ["PatientName"]
    with pytest.raises(FedcareError, match="unknown de-identification option"):
        phi_findings(ds, retain=["everything"])


def test_overlay_data_is_a_finding():
    ds = clean()
    ds.add_new(0x60003000, "OW", b"\x01" * 8)
    assert phi_findings(ds) == ["OverlayData"]


def test_real_export_and_deferred_header(caplog):
    ds = dcmread(get_testdata_file("CT_small.dcm"), defer_size=1024)
    findings = phi_findings(ds)
    assert {"PatientName", "PatientID", "StudyDate", "InstitutionName", "private tags"} <= set(findings)
    assert findings == sorted(findings)


def _roundtrip(ds: Dataset):
    import io

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return buffer


def test_invalid_values_do_not_leak_through_warnings_or_logs(caplog):
    ds = clean()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns (quoting the value) when the test sets it
        ds.add_new(0x00100030, "DA", "Doe-1970")  # invalid DA holding a name
    ds.add_new(0x00280301, "CS", "YES")
    raw = dcmread(_roundtrip(ds))  # as read from disk: values are converted lazily, inside phi_findings
    caplog.clear()
    ds = raw
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        assert phi_findings(ds) == ["BurnedInAnnotation", "PatientBirthDate"]
    assert not any("Doe" in str(w.message) for w in seen)
    assert "Doe" not in caplog.text


# --- what the guard cannot fully inspect is refused, never passed ---------------------------------------


def _file_with_reference_sequence() -> bytes:
    ds = clean()
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    ds.ReferencedImageSequence = Sequence([item])
    return _roundtrip(ds).getvalue()


def test_a_sequence_that_cannot_be_parsed_is_refused():
    data = bytearray(_file_with_reference_sequence())
    at = data.index(b"\x08\x00\x40\x11SQ")  # (0008,1140) explicit VR, 4-byte length, then the items
    length = int.from_bytes(data[at + 8 : at + 12], "little")
    data[at + 12 : at + 12 + length] = b"\xff" * length  # the items become garbage
    assert phi_findings(read_header_bytes(_file_with_reference_sequence(), "ok.dcm")) == []
    findings = phi_findings(read_header_bytes(bytes(data), "bad.dcm"))
    assert findings == ["ReferencedImageSequence (not inspected: sequence cannot be parsed)"]


def test_nesting_deeper_than_scanned_is_refused():
    ds = clean()
    inner = Dataset()
    inner.CodeValue = "X"  # nothing identifying: the depth alone refuses it
    for _ in range(MAX_DEPTH + 2):
        outer = Dataset()
        outer.SourceImageSequence = Sequence([inner])
        inner = outer
    ds.SourceImageSequence = inner.SourceImageSequence
    assert phi_findings(ds) == [f"sequences nested deeper than {MAX_DEPTH} levels (not inspected)"]


@pytest.mark.parametrize("keyword", ["BurnedInAnnotation", "RecognizableVisualFeatures"])
@pytest.mark.parametrize("value", ["", "MAYBE", "N", "UNKNOWN"])
def test_annotation_flags_pass_only_as_an_explicit_no(keyword, value):
    ds = clean()
    setattr(ds, keyword, value)
    read_back = read_header_bytes(_roundtrip(ds).getvalue(), "x.dcm")
    assert phi_findings(read_back) == [f"{keyword} (not an explicit NO)"]
    assert phi_findings(ds) == [f"{keyword} (not an explicit NO)"]
    setattr(ds, keyword, "NO")
    assert phi_findings(ds) == []
    setattr(ds, keyword, "YES")
    assert phi_findings(ds) == [keyword]


def _with_text(charset: str | None, raw: bytes) -> bytes:
    ds = clean()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.add_new(0x00080070, "LO", "PLACEHOLDER-ACME")  # Manufacturer: not in Table E.1-1, so its value is not read
    data = _roundtrip(ds).getvalue()
    assert len(raw) == len(b"PLACEHOLDER-ACME")
    return data.replace(b"PLACEHOLDER-ACME", raw)


UNDECODABLE = "Manufacturer (not inspected: cannot be decoded in the declared character set)"


@pytest.mark.parametrize(
    "charset,raw,finding",
    [
        ("ISO_IR 192", b"ACME \xff\xfe\xfd Medical", UNDECODABLE),
        (None, b"Sch\xf6n Medical Gm", UNDECODABLE),
        ("ISO_IR 999", b"ACME Medical Ltd", "SpecificCharacterSet (not inspected: unknown character set)"),
    ],
)
def test_text_in_a_character_set_the_guard_cannot_decode_is_refused(charset, raw, finding):
    findings = phi_findings(read_header_bytes(_with_text(charset, raw), "x.dcm"))
    assert findings == [finding]
    assert "Sch" not in repr(findings) and "ACME" not in repr(findings)


def test_text_in_a_declared_character_set_passes():
    assert phi_findings(read_header_bytes(_with_text("ISO_IR 100", b"Sch\xf6n Medical Gm"), "x.dcm")) == []
    assert phi_findings(read_header_bytes(_with_text("ISO_IR 192", "Schön Medical G".encode()), "x.dcm")) == []
    assert phi_findings(read_header_bytes(_with_text(None, b"ACME Medical Ltd"), "x.dcm")) == []


def test_private_tags_inside_sequences_are_refused_too():
    ds = clean()
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    item.private_block(0x0011, "ACME 1.0", create=True).add_new(0x01, "LO", "SECRET-123")
    ds.ReferencedImageSequence = Sequence([item])
    assert phi_findings(read_header_bytes(_roundtrip(ds).getvalue(), "x.dcm")) == ["private tags"]


def test_attributes_the_loader_needs_are_not_refused():
    needed = [
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "Rows",
        "Columns",
        "NumberOfFrames",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "PlanarConfiguration",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "RescaleSlope",
        "RescaleIntercept",
        "ModalityLUTSequence",
        "WindowCenter",
        "WindowWidth",
        "VOILUTSequence",
        "PixelSpacing",
        "ImagerPixelSpacing",
        "PixelAspectRatio",
        "RedPaletteColorLookupTableData",
        "PixelData",
        "FloatPixelData",
        "DoubleFloatPixelData",
        "SpecificCharacterSet",
        "PatientIdentityRemoved",
    ]
    rules = profile()
    assert [kw for kw in needed if rules.rule_for(int(tag_for_keyword(kw))) is not None] == []
