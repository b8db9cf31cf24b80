"""PHI findings per PS3.15 Annex E: keywords of identifying attributes, never their values."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from client.datasets.phi_guard import PROFILE, RETAIN_OPTIONS, phi_findings
from fedcare.errors import FedcareError
from tests.test_dicom_reader import make_dataset


def clean() -> Dataset:
    return make_dataset(np.zeros((8, 8), dtype=np.uint16), name="clean")


def test_clean_dataset_has_no_findings():
    assert phi_findings(clean()) == []


def test_every_profile_keyword_is_a_real_dicom_keyword():
    assert len(PROFILE) > 200
    assert [kw for kw in PROFILE if tag_for_keyword(kw) is None] == []
    assert set(v for v in PROFILE.values() if v) <= set(RETAIN_OPTIONS)


@pytest.mark.parametrize("keyword,value", [
    ("PatientName", "Doe^Jane"), ("PatientID", "MRN123456"), ("OtherPatientIDs", "X-99"),
    ("PatientBirthDate", "19700101"), ("PatientBirthTime", "101010"), ("PatientAddress", "1 Main St"),
    ("PatientTelephoneNumbers", "555-0100"), ("AccessionNumber", "ACC42"), ("InstitutionName", "St Elsewhere"),
    ("InstitutionAddress", "2 Hill Rd"), ("InstitutionalDepartmentName", "Radiology"),
    ("ReferringPhysicianName", "House^Greg"), ("PerformingPhysicianName", "Grey^Meredith"),
    ("OperatorsName", "Tech^Tom"), ("StudyDate", "20240102"), ("StudyTime", "120000"), ("SeriesDate", "20240102"),
    ("AcquisitionDate", "20240102"), ("ContentDate", "20240102"), ("ContentTime", "120001"), ("StudyID", "S1"),
    ("DeviceSerialNumber", "SN-777"), ("StationName", "CT01"), ("PatientAge", "045Y"), ("PatientSex", "F"),
    ("MedicalRecordLocator", "LOC-1"), ("StudyDescription", "chest for Doe"), ("ImageComments", "call Jane"),
])
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
    assert phi_findings(ds, retain=["dates", "patient-characteristics", "device-identity", "institution-identity",
                                    "descriptors"]) == ["PatientName"]
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
