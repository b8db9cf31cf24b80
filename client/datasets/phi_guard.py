"""Find identifying attributes in a DICOM header (PS3.15 Annex E, Basic Confidentiality Profile).

A hospital must not train on images that still carry identity: a model can memorise what it is
fed, and files get copied. `phi_findings` names the attributes (keywords or tags, never values)
that the Basic Application Level Confidentiality Profile (Table E.1-1, read from a maintained
source: see `confidentiality_profile`) removes or blanks and that are still present with a
non-empty value, at any depth of nested sequences. An empty result means the guard read the whole
header and found nothing; anything it cannot fully inspect is a finding, never a pass.

What is refused, and why:
- Every non-UID attribute of Table E.1-1 with a value (actions X, Z, D and their combinations), and
  the repeating groups Curve Data (50xx) and Overlay Data / Comments (60xx,3000/4000). A dummy
  value ("ANON", a shifted date) is indistinguishable from a real one to a checker, so any
  non-empty value is a finding. Type 2 attributes emptied by a de-identifier (zero length) pass.
- Not UIDs: the profile replaces them, and a replaced UID looks exactly like an original one.
- Private tags (odd groups) with a value: the profile removes them all; reported as "private tags"
  unless the "private-tags" option is granted (their content is then not vetted).
- BurnedInAnnotation (0028,0301) and RecognizableVisualFeatures (0028,0302), wherever present,
  unless their value is exactly "NO": "YES" means text or a face in the pixels; anything else
  (empty, misspelt, undecodable) cannot be trusted. An absent BurnedInAnnotation is a finding only
  with `strict=True` (most de-identified exports omit it).
- Not inspected, so refused (the finding says "not inspected: ..."): a sequence that cannot be
  parsed, sequences nested deeper than `MAX_DEPTH`, a text value that cannot be decoded in the
  declared Specific Character Set (or the default repertoire when none is declared), an unknown
  Specific Character Set, a large text value not loaded into memory.
- PatientIdentityRemoved "YES" changes nothing: the flag alone proves nothing.
- Options of PS3.15 E.3 that a data approval may grant can be passed in `retain` (see
  `confidentiality_profile.RETAIN_OPTIONS`): those groups are then not reported.
"""

from __future__ import annotations

from collections.abc import Iterable

from client.datasets.confidentiality_profile import RETAIN_OPTIONS, Profile, profile, tag_label

__all__ = ["MAX_DEPTH", "RETAIN_OPTIONS", "guard_version", "phi_findings"]

PRIVATE_TAGS = "private tags"
BURNED_IN = "BurnedInAnnotation"
BURNED_IN_ABSENT = "BurnedInAnnotation (absent)"
NOT_INSPECTED = "not inspected"
MAX_DEPTH = 32  # nesting levels scanned; deeper content is refused, not skipped
_BURNED_IN_TAG = 0x00280301
_ANNOTATION_FLAGS = (0x00280301, 0x00280302)  # BurnedInAnnotation, RecognizableVisualFeatures: must be "NO"
_CHARSET_TAG = 0x00080005
_CHARSET_VRS = ("SH", "LO", "ST", "LT", "UC", "UT", "PN")  # values whose bytes depend on the character set
_UNDEFINED_LENGTH = 0xFFFFFFFF


def guard_version() -> str:
    """Names the rule set (table edition, package version, fedcare rules): part of every cache key of guard results."""
    return profile().version


class _NotInspected(Exception):
    """The guard could not read part of the header; the message says what (never a value)."""


def phi_findings(ds, strict: bool = False, retain: Iterable[str] = ()) -> list[str]:
    """Sorted labels of identifying or uninspectable attributes in `ds` (values are never returned).

    `strict` also reports a missing BurnedInAnnotation; `retain` names PS3.15 E.3 options whose
    attributes an approval allows to keep (see RETAIN_OPTIONS). An empty list means the whole
    header was read and nothing was found.
    """
    retain = set(retain)
    unknown = retain - set(RETAIN_OPTIONS)
    if unknown:
        from fedcare.errors import FedcareError

        raise FedcareError(
            f"unknown de-identification option(s): {', '.join(sorted(unknown))}",
            f"choose from: {', '.join(RETAIN_OPTIONS)}",
        )
    from client.datasets.dicom_reader import quiet_pydicom

    rules = profile()
    found: set[str] = set()
    with quiet_pydicom():
        try:
            _scan(ds, rules, retain, found, depth=0, encodings=["ascii"])
        except RecursionError:
            found.add(f"header ({NOT_INSPECTED}: nested too deeply to parse)")
        except Exception as exc:  # whatever stopped the scan, the file was not fully read
            found.add(f"header ({NOT_INSPECTED}: {type(exc).__name__})")
        if strict and _BURNED_IN_TAG not in ds:
            found.add(BURNED_IN_ABSENT)
    return sorted(found)


def _scan(ds, rules: Profile, retain: set[str], found: set[str], depth: int, encodings: list[str]) -> None:
    if depth > MAX_DEPTH:
        found.add(f"sequences nested deeper than {MAX_DEPTH} levels ({NOT_INSPECTED})")
        return
    if _CHARSET_TAG in ds:
        encodings = _encodings(ds, found, encodings)
    for tag in list(ds.keys()):
        tag = int(tag)
        if (tag >> 16) & 1:
            if "private-tags" not in retain and not _is_empty(ds, tag):
                found.add(PRIVATE_TAGS)
            continue
        if tag in _ANNOTATION_FLAGS:
            _check_flag(ds, tag, found)
            continue
        rule = rules.rule_for(tag)
        if rule is not None:
            label, option = rule
            if option not in retain and not _is_empty(ds, tag):
                found.add(label)
            continue
        try:
            _check_text(ds, tag, encodings)
            items = _sequence_items(ds, tag)
        except _NotInspected as exc:
            found.add(f"{tag_label(tag)} ({NOT_INSPECTED}: {exc})")
            continue
        for item in items:
            _scan(item, rules, retain, found, depth + 1, encodings)


def _check_flag(ds, tag: int, found: set[str]) -> None:
    """BurnedInAnnotation / RecognizableVisualFeatures pass only as an explicit "NO"."""
    label = tag_label(tag)
    try:
        value = _raw_bytes(ds, tag)
        text = value.decode("ascii") if value is not None else str(ds[tag].value or "")
    except (_NotInspected, UnicodeError, ValueError, TypeError, KeyError):
        found.add(f"{label} ({NOT_INSPECTED}: value cannot be read)")
        return
    text = text.strip(" \x00").upper()
    if text == "YES":
        found.add(label)
    elif text != "NO":
        found.add(f"{label} (not an explicit NO)")


def _encodings(ds, found: set[str], inherited: list[str]) -> list[str]:
    """Python codecs for this item's Specific Character Set; an unknown or unreadable one is a finding.

    The default repertoire (no set, or ISO_IR 6 alone) is ASCII: pydicom's lenient Latin-1 stand-in
    would decode anything, so bytes outside ASCII there cannot be trusted.
    """
    from pydicom.charset import python_encoding

    try:
        raw = _raw_bytes(ds, _CHARSET_TAG)
        if raw is not None:
            terms = raw.decode("ascii").split("\\")
        else:
            value = ds[_CHARSET_TAG].value
            terms = [value] if isinstance(value, str) else [str(v) for v in value or [""]]
    except (_NotInspected, UnicodeError, ValueError, TypeError, KeyError):
        found.add(f"SpecificCharacterSet ({NOT_INSPECTED}: value cannot be read)")
        return inherited
    terms = [t.strip(" \x00") for t in terms] or [""]
    unknown = [t for t in terms if t not in python_encoding]
    if unknown:
        found.add(f"SpecificCharacterSet ({NOT_INSPECTED}: unknown character set)")
        return inherited
    codecs = [python_encoding[t] for t in terms]
    return ["ascii"] if codecs == [python_encoding[""]] else codecs


def _check_text(ds, tag: int, encodings: list[str]) -> None:
    """A text value the header stores as bytes must decode in the declared character set."""
    from pydicom.charset import decode_bytes
    from pydicom.config import strict_reading
    from pydicom.datadict import dictionary_VR
    from pydicom.dataelem import RawDataElement
    from pydicom.valuerep import PN_DELIMS, TEXT_VR_DELIMS

    elem = ds.get_item(tag)
    if not isinstance(elem, RawDataElement):
        return  # already a str in memory: nothing left to decode
    vr = elem.VR
    if vr is None:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return  # an unknown public tag in implicit VR: bytes of unknown type, scanned as a sequence if it is one
    if vr not in _CHARSET_VRS or elem.length == 0:
        return
    if elem.value is None:
        raise _NotInspected("large value not loaded")
    try:
        with strict_reading():
            decode_bytes(elem.value, encodings, PN_DELIMS if vr == "PN" else TEXT_VR_DELIMS)
    except (UnicodeError, LookupError, ValueError):
        raise _NotInspected("cannot be decoded in the declared character set") from None


def _raw_bytes(ds, tag: int) -> bytes | None:
    """The stored bytes of an element read from a file; None when it is already a value in memory."""
    from pydicom.dataelem import RawDataElement

    elem = ds.get_item(tag)
    if not isinstance(elem, RawDataElement):
        return None
    if elem.value is None and elem.length:
        raise _NotInspected("large value not loaded")
    return elem.value or b""


def _is_empty(ds, tag: int) -> bool:
    """True for a zero-length or blank value; read from the raw element where possible."""
    from pydicom.dataelem import RawDataElement

    try:
        elem = ds.get_item(tag)
    except Exception:  # unreadable: cannot be shown empty
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
    if isinstance(value, str):
        return value.strip(" \x00") == ""
    if isinstance(value, bytes):
        return value.strip(b" \x00") == b""
    try:
        return len(value) == 0
    except TypeError:
        return str(value).strip() == ""


def _sequence_items(ds, tag: int) -> list:
    """Items of a sequence element; other elements are not converted (that is most of the cost).

    A sequence pydicom cannot parse raises _NotInspected: its items may hold anything.
    """
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
        if vr == "UN" and raw.length == _UNDEFINED_LENGTH:
            vr = "SQ"  # a sequence of an unknown type: pydicom reads it as one, or it cannot be inspected
        if vr != "SQ":
            return []
    try:
        elem = ds[tag]
        if getattr(elem, "VR", None) != "SQ":
            if isinstance(raw, RawDataElement) and raw.length == _UNDEFINED_LENGTH:
                raise _NotInspected("undefined-length value that is not a readable sequence")
            return []
        return list(elem.value or [])
    except _NotInspected:
        raise
    except RecursionError:
        raise _NotInspected("sequence nested too deeply to parse") from None
    except Exception:  # an unreadable sequence: its items may hold anything
        raise _NotInspected("sequence cannot be parsed") from None
