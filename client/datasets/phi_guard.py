"""Find identifying attributes in a DICOM header (PS3.15 Annex E, Basic Confidentiality Profile).

A hospital must not train on images that still carry identity: a model can memorise what it is
fed, and files get copied. `phi_findings` names the attributes (keywords only, never values) that
the Basic Application Level Confidentiality Profile (Table E.1-1) removes or blanks and that are
still present with a non-empty value, at any depth of nested sequences.

What is implemented, and why:
- The profile's X / Z / D / X/Z/D actions on non-UID attributes: names, IDs, birth data, addresses,
  telephone numbers, institution, physicians and operators, dates and times, descriptions and
  comments, device identity, patient characteristics. A dummy value ("ANON", a shifted date) is
  indistinguishable from a real one to a checker, so any non-empty value is a finding.
  Type 2 attributes emptied by a de-identifier (zero length) pass.
- Not UIDs (action U): the profile replaces them with new UIDs, and a replaced UID looks exactly
  like an original one, so their presence proves nothing. SOP Instance UID must stay (labels
  may reference it).
- Private tags (odd groups): the profile removes them all ("private tags").
- BurnedInAnnotation (0028,0301) "YES" is a finding (text in the pixels); absent is a finding only
  with `strict=True` (most de-identified exports omit it). RecognizableVisualFeatures "YES" too.
- Overlays (60xx groups) may hold burned-in style text: present overlay data is a finding.
- PatientIdentityRemoved "YES" changes nothing: the flag alone proves nothing.
- Options of PS3.15 E.3 that a data approval may grant can be passed in `retain`
  ("patient-characteristics", "dates", "device-identity", "institution-identity",
  "descriptors", "private-tags"): those groups are then not reported.
"""

from __future__ import annotations

from typing import Iterable

RETAIN_OPTIONS = ("patient-characteristics", "dates", "device-identity", "institution-identity", "descriptors",
                  "private-tags")

_IDENTITY = """
PatientName PatientID IssuerOfPatientID OtherPatientIDs OtherPatientIDsSequence OtherPatientNames
PatientBirthName PatientMotherBirthName PatientBirthDate PatientBirthTime PatientBirthDateInAlternativeCalendar
PatientDeathDateInAlternativeCalendar PatientAlternativeCalendar PatientAddress PatientTelephoneNumbers
PatientTelecomInformation PatientInsurancePlanCodeSequence InsurancePlanIdentification MedicalRecordLocator
MilitaryRank BranchOfService CountryOfResidence RegionOfResidence PatientReligiousPreference
PatientPrimaryLanguageCodeSequence PatientPrimaryLanguageModifierCodeSequence ResponsiblePerson
ResponsibleOrganization PatientComments AccessionNumber AdmissionID IssuerOfAdmissionID ServiceEpisodeID
IssuerOfServiceEpisodeID ServiceEpisodeDescription StudyID StudyIDIssuer RequestedProcedureID
PerformedProcedureStepID PlacerOrderNumberImagingServiceRequest FillerOrderNumberImagingServiceRequest
ReferencedPatientSequence ReferencedPatientAliasSequence ReferencedStudySequence
ReferencedPerformedProcedureStepSequence CurrentPatientLocation PatientInstitutionResidence
ScheduledPatientInstitutionResidence PatientTransportArrangements Occupation Allergies MedicalAlerts
AdditionalPatientHistory LastMenstrualDate SpecialNeeds PatientState AdmittingDiagnosesDescription
AdmittingDiagnosesCodeSequence DischargeDiagnosisDescription ReasonForStudy ReasonForTheRequestedProcedure
ReasonForTheImagingServiceRequest RequestedProcedureDescription RequestedProcedureComments
RequestedProcedureLocation ImagingServiceRequestComments OrderEnteredBy OrderEntererLocation
OrderCallbackPhoneNumber IdentifyingComments ConfidentialityConstraintOnPatientDataDescription
ReferringPhysicianName ReferringPhysicianAddress ReferringPhysicianTelephoneNumbers
ReferringPhysicianIdentificationSequence ConsultingPhysicianName ConsultingPhysicianIdentificationSequence
PerformingPhysicianName PerformingPhysicianIdentificationSequence NameOfPhysiciansReadingStudy
PhysiciansReadingStudyIdentificationSequence PhysiciansOfRecord PhysiciansOfRecordIdentificationSequence
RequestingPhysician RequestingService OperatorsName OperatorIdentificationSequence
ScheduledPerformingPhysicianName ScheduledPerformingPhysicianIdentificationSequence
NamesOfIntendedRecipientsOfResults IntendedRecipientsOfResultsIdentificationSequence PersonName
PersonAddress PersonTelephoneNumbers PersonIdentificationCodeSequence HumanPerformerName
HumanPerformerOrganization ActualHumanPerformersSequence ScheduledHumanPerformersSequence
VerifyingObserverName VerifyingObserverSequence VerifyingObserverIdentificationCodeSequence
VerifyingOrganization AuthorObserverSequence ParticipantSequence ContentCreatorName
ContentCreatorIdentificationCodeSequence PhysicianApprovingInterpretation InterpretationRecorder
InterpretationTranscriber InterpretationAuthor InterpretationApproverSequence InterpretationIDIssuer
DistributionName DistributionAddress ResultsIDIssuer ResultsDistributionListSequence TopicAuthor
ContentSequence AcquisitionContextSequence GraphicAnnotationSequence IconImageSequence
DigitalSignaturesSequence ReferencedDigitalSignatureSequence ReferencedSOPInstanceMACSequence MAC
OriginalAttributesSequence ModifiedAttributesSequence TextString TextComments Arbitrary
PerformedLocation ScheduledProcedureStepLocation ScheduledStudyLocation ScheduledStudyLocationAETitle
"""
_CHARACTERISTICS = """
PatientAge PatientSex PatientSize PatientWeight EthnicGroup PregnancyStatus SmokingStatus PatientSexNeutered
"""
_DATES = """
StudyDate StudyTime SeriesDate SeriesTime AcquisitionDate AcquisitionTime AcquisitionDateTime ContentDate
ContentTime InstanceCreationDate InstanceCreationTime OverlayDate OverlayTime CurveDate CurveTime
AdmittingDate AdmittingTime PerformedProcedureStepStartDate PerformedProcedureStepStartTime
PerformedProcedureStepEndDate PerformedProcedureStepEndTime ScheduledProcedureStepStartDate
ScheduledProcedureStepStartTime ScheduledProcedureStepEndDate ScheduledProcedureStepEndTime
DateOfLastCalibration TimeOfLastCalibration TimezoneOffsetFromUTC
"""
_DEVICE = """
DeviceSerialNumber StationName StationAETitle DetectorID GantryID GeneratorID CassetteID PlateID
SourceSerialNumber SoftwareVersions ModifyingDeviceID ModifyingDeviceManufacturer PerformedStationName
PerformedStationAETitle PerformedStationNameCodeSequence PerformedStationGeographicLocationCodeSequence
ScheduledStationName ScheduledStationAETitle ScheduledStationNameCodeSequence
ScheduledStationGeographicLocationCodeSequence
"""
_INSTITUTION = """
InstitutionName InstitutionAddress InstitutionCodeSequence InstitutionalDepartmentName
InstitutionalDepartmentTypeCodeSequence
"""
_DESCRIPTORS = """
StudyDescription SeriesDescription ProtocolName AcquisitionComments AcquisitionDeviceProcessingDescription
AcquisitionProtocolDescription DerivationDescription ImageComments FrameComments ImagePresentationComments
StudyComments VisitComments PerformedProcedureStepDescription CommentsOnThePerformedProcedureStep
ScheduledProcedureStepDescription ModifiedImageDescription ContrastBolusAgent PreMedication Impressions
InterpretationText InterpretationDiagnosisDescription ResultsComments TopicTitle TopicSubject TopicKeywords
"""

# keyword -> the retain option that exempts it (None: always checked)
PROFILE: dict[str, str | None] = {
    **{kw: None for kw in _IDENTITY.split()},
    **{kw: "patient-characteristics" for kw in _CHARACTERISTICS.split()},
    **{kw: "dates" for kw in _DATES.split()},
    **{kw: "device-identity" for kw in _DEVICE.split()},
    **{kw: "institution-identity" for kw in _INSTITUTION.split()},
    **{kw: "descriptors" for kw in _DESCRIPTORS.split()},
}

PRIVATE_TAGS = "private tags"
OVERLAY = "OverlayData"
BURNED_IN = "BurnedInAnnotation"
BURNED_IN_ABSENT = "BurnedInAnnotation (absent)"
_BURNED_IN_TAG = 0x00280301
_RECOGNIZABLE_TAG = 0x00280302
_UNDEFINED_LENGTH = 0xFFFFFFFF


def _profile_tags() -> dict[int, tuple[str, str | None]]:
    from pydicom.datadict import tag_for_keyword

    tags: dict[int, tuple[str, str | None]] = {}
    for keyword, option in PROFILE.items():
        tag = tag_for_keyword(keyword)
        if tag is None:  # a keyword this pydicom does not know: a typo here, caught by the tests
            continue
        tags[int(tag)] = (keyword, option)
    return tags


_TAGS: dict[int, tuple[str, str | None]] | None = None


def phi_findings(ds, strict: bool = False, retain: Iterable[str] = ()) -> list[str]:
    """Sorted keywords of identifying attributes present in `ds` (values are never returned).

    `strict` also reports a missing BurnedInAnnotation; `retain` names PS3.15 E.3 options whose
    attributes an approval allows to keep (see RETAIN_OPTIONS).
    """
    global _TAGS
    retain = set(retain)
    unknown = retain - set(RETAIN_OPTIONS)
    if unknown:
        from fedcare.errors import FedcareError

        raise FedcareError(f"unknown de-identification option(s): {', '.join(sorted(unknown))}",
                           f"choose from: {', '.join(RETAIN_OPTIONS)}")
    if _TAGS is None:
        _TAGS = _profile_tags()
    from client.datasets.dicom_reader import quiet_pydicom

    found: set[str] = set()
    with quiet_pydicom():
        _scan(ds, _TAGS, retain, found, depth=0)
        burned = _text_value(ds, _BURNED_IN_TAG)
        recognizable = _text_value(ds, _RECOGNIZABLE_TAG)
    if burned == "YES":
        found.add(BURNED_IN)
    elif burned is None and strict:
        found.add(BURNED_IN_ABSENT)
    if recognizable == "YES":
        found.add("RecognizableVisualFeatures")
    return sorted(found)


def _scan(ds, tags, retain: set[str], found: set[str], depth: int) -> None:
    if depth > 32:  # a pathological file; what was seen so far is reported
        return
    for tag in list(ds.keys()):
        tag = int(tag)
        group = tag >> 16
        if group & 1:
            if "private-tags" not in retain and not _is_empty(ds, tag):
                found.add(PRIVATE_TAGS)
            continue
        if 0x6000 <= group <= 0x601E and (tag & 0xFFFF) in (0x3000, 0x4000):
            if not _is_empty(ds, tag):
                found.add(OVERLAY)
            continue
        entry = tags.get(tag)
        if entry is not None:
            keyword, option = entry
            if option not in retain and not _is_empty(ds, tag):
                found.add(keyword)
            continue
        items = _sequence_items(ds, tag)
        for item in items:
            _scan(item, tags, retain, found, depth + 1)


def _is_empty(ds, tag: int) -> bool:
    """True for a zero-length or blank value; read from the raw element where possible."""
    from pydicom.dataelem import RawDataElement

    try:
        elem = ds.get_item(tag)
    except Exception:  # noqa: BLE001 - unreadable: cannot be shown empty
        return False
    if isinstance(elem, RawDataElement):
        if elem.length == 0:
            return True
        if elem.value is None or elem.length == _UNDEFINED_LENGTH:
            return False  # deferred or a sequence: has content
        return elem.value.strip(b" \x00") == b""
    value = elem.value
    if value is None:
        return True
    if isinstance(value, (str, bytes)):
        return value.strip(" \x00" if isinstance(value, str) else b" \x00") == ("" if isinstance(value, str) else b"")
    try:
        return len(value) == 0
    except TypeError:
        return str(value).strip() == ""


def _sequence_items(ds, tag: int) -> list:
    """Items of a sequence element; other elements are not converted (that is most of the cost)."""
    from pydicom.datadict import dictionary_VR
    from pydicom.dataelem import RawDataElement

    raw = ds.get_item(tag)
    if isinstance(raw, RawDataElement):
        vr = raw.VR
        if vr is None:  # implicit VR: the dictionary knows; unknown tags with undefined length may be sequences
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                vr = "SQ" if raw.length == _UNDEFINED_LENGTH else None
        if vr != "SQ":
            return []
    try:
        elem = ds[tag]
        if getattr(elem, "VR", None) != "SQ":
            return []
        return list(elem.value or [])
    except Exception:  # noqa: BLE001 - an unreadable sequence: nothing to scan inside
        return []


def _text_value(ds, tag: int) -> str | None:
    """An enumerated code string (YES/NO) normalised; None when absent or empty."""
    try:
        if tag not in ds:
            return None
        value = ds[tag].value
    except Exception:  # noqa: BLE001
        return None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    text = str(value or "").strip().upper()
    return text or None
