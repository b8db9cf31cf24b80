"""A hospital's DICOM folder read as series of slices, assembled into 3D volumes.

CT and MR studies arrive as series: hundreds of single-slice files (or one enhanced multi-frame
object) that share a SeriesInstanceUID. A volume is only meaningful when its slices are ordered by
where they lie, not by file name or InstanceNumber, so each slice's position is projected on the
slice normal (the cross product of ImageOrientationPatient's row and column directions) and the
slices sorted by it; the slice spacing is measured from those positions (SliceThickness is not
the spacing). Pixels go through the Modality LUT (RescaleSlope/RescaleIntercept, per slice, or
per frame in an enhanced object), so a CT volume is in Hounsfield units whatever each scanner
stored.

A series that cannot become one regular volume is refused with its reason: slices with different
orientations, sizes or pixel spacings, two slices at one position, a missing slice (a gap of more
than half a spacing beyond the series' own step), uneven spacing, too few slices, or no geometry
at all. A refusal names the series by the folder of its files and their count and the slices by
their index along the normal; it never quotes a header value (UIDs, positions and spacings can
identify a patient or a scanner's site).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from client.datasets.dicom_reader import DicomRejected, check_image_class, quiet_pydicom, read_header
from fedcare.errors import FedcareError

MIN_SLICES = 3  # fewer cannot be told apart from a scout or a pair of localisers
ORIENTATION_TOLERANCE = 1e-3  # direction cosines that differ by less are the same orientation
DUPLICATE_FRACTION = 0.01  # two slices closer than this fraction of the step are at one position
GAP_FRACTION = 1.5  # a step longer than this many times the series' step means a missing slice
UNEVEN_FRACTION = 0.1  # steps that differ from the series' step by more than this are uneven
ENHANCED_FRAME_KEYWORDS = ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence")


class SeriesRejected(FedcareError):
    """One series that cannot become a volume; ``where`` names it without any header value."""

    def __init__(self, where: str, reason: str, hint: str = "") -> None:
        self.where = where
        self.reason = reason
        super().__init__(f"{where}: {reason}", hint)


@dataclasses.dataclass(frozen=True)
class SliceHeader:
    """What ordering a slice needs: its geometry and Modality LUT, and which file and frame it is."""

    file: str
    frame: int | None  # the frame index in an enhanced multi-frame object; None for a single slice
    orientation: tuple[float, ...]  # ImageOrientationPatient: row direction then column direction
    position: tuple[float, float, float]  # ImagePositionPatient of the first pixel, in mm
    pixel_spacing: tuple[float, float]  # (between rows, between columns) in mm
    shape: tuple[int, int]  # (Rows, Columns)
    slope: float = 1.0
    intercept: float = 0.0
    instance_uid: str = ""  # SOPInstanceUID: how a segmentation refers to this slice (never printed)


@dataclasses.dataclass(frozen=True)
class SeriesGeometry:
    """A checked series: its slices in order along the normal, and the volume's voxel geometry."""

    slices: tuple[SliceHeader, ...]
    spacing: tuple[float, float, float]  # (between slices, between rows, between columns) in mm
    direction: np.ndarray  # 3x3: rows are the row direction, the column direction, the slice normal
    origin: tuple[float, float, float]  # the first slice's position

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.slices), *self.slices[0].shape)


@dataclasses.dataclass(frozen=True)
class SeriesVolume:
    """One series as a volume in modality units (Hounsfield units for CT), slices first."""

    where: str  # the series' folder and file count (safe to print)
    study_uid: str  # for matching labels only: never printed
    series_uid: str
    voxels: np.ndarray  # float32 (slices, rows, columns)
    geometry: SeriesGeometry


def where_series(files: Sequence[str]) -> str:
    """A series' name for messages: the folder its files are in (relative names) and their count."""
    folders = sorted({str(Path(f).parent) for f in files})
    folder = folders[0] if len(folders) == 1 else f"{folders[0]} (+{len(folders) - 1} folders)"
    return f"series in {folder}/ ({len(files)} file{'s' if len(files) != 1 else ''})"


def slice_headers(ds: Any, file: str) -> list[SliceHeader]:
    """The slices a parsed dataset holds: one for a classic image, one per frame for an enhanced
    multi-frame object (geometry and rescale from its functional groups)."""
    if all(k in ds for k in ENHANCED_FRAME_KEYWORDS):
        return _enhanced_slices(ds, file)
    shape = _shape(ds, file)
    if int(ds.get("NumberOfFrames") or 1) > 1:
        raise SeriesRejected(
            file,
            "a multi-frame object without per-frame positions (no functional groups)",
            "export it as an enhanced CT/MR object or as one file per slice",
        )
    return [
        SliceHeader(
            file,
            None,
            _floats(ds, "ImageOrientationPatient", 6, file),
            _floats(ds, "ImagePositionPatient", 3, file),  # type: ignore[arg-type]  # 3 values, checked
            _floats(ds, "PixelSpacing", 2, file),  # type: ignore[arg-type]  # 2 values, checked
            shape,
            _number(ds, "RescaleSlope", 1.0, file),
            _number(ds, "RescaleIntercept", 0.0, file),
            str(ds.get("SOPInstanceUID", "")),
        )
    ]


def _enhanced_slices(ds: Any, file: str) -> list[SliceHeader]:
    shared = ds.SharedFunctionalGroupsSequence[0] if len(ds.SharedFunctionalGroupsSequence) else None
    shape = _shape(ds, file)
    slices = []
    for index, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        where = f"{file} frame {index + 1}"
        rescale = _group_item(frame, shared, "PixelValueTransformationSequence")
        slices.append(
            SliceHeader(
                file,
                index,
                _floats(
                    _required_item(frame, shared, "PlaneOrientationSequence", where),
                    "ImageOrientationPatient",
                    6,
                    where,
                ),
                _floats(
                    _required_item(frame, shared, "PlanePositionSequence", where), "ImagePositionPatient", 3, where
                ),  # type: ignore[arg-type]
                _floats(_required_item(frame, shared, "PixelMeasuresSequence", where), "PixelSpacing", 2, where),  # type: ignore[arg-type]
                shape,
                _number(rescale, "RescaleSlope", 1.0, where) if rescale is not None else 1.0,
                _number(rescale, "RescaleIntercept", 0.0, where) if rescale is not None else 0.0,
            )
        )
    return slices


def _group_item(frame: Any, shared: Any, keyword: str) -> Any:
    """A functional group's item: the frame's own, else the shared one (None: neither has it)."""
    for source in (frame, shared):
        if source is not None and keyword in source and len(source[keyword].value):
            return source[keyword].value[0]
    return None


def _required_item(frame: Any, shared: Any, keyword: str, where: str) -> Any:
    item = _group_item(frame, shared, keyword)
    if item is None:
        raise SeriesRejected(where, f"no {keyword} in its functional groups", "re-export the series")
    return item


def _shape(ds: Any, file: str) -> tuple[int, int]:
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not isinstance(rows, int) or not isinstance(cols, int) or rows < 1 or cols < 1:
        raise SeriesRejected(file, "Rows (0028,0010) or Columns (0028,0011) is missing or not a size")
    return rows, cols


def _floats(ds: Any, keyword: str, count: int, file: str) -> tuple[float, ...]:
    """A multi-valued decimal element as ``count`` finite floats; refused, naming the keyword only."""
    value = ds.get(keyword) if ds is not None else None
    try:
        values = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        values = ()
    if len(values) != count or not all(np.isfinite(values)):
        raise SeriesRejected(
            file,
            f"{keyword} is missing or malformed (needs {count} numbers)",
            "a volume needs every slice's position, orientation and pixel spacing: re-export the series",
        )
    return values


def _number(ds: Any, keyword: str, default: float, file: str) -> float:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not np.isfinite(number):
        raise SeriesRejected(file, f"{keyword} is not a number")
    return number


def order_slices(slices: Sequence[SliceHeader], where: str) -> SeriesGeometry:
    """The slices sorted by position along the normal, checked to form one regular volume."""
    if len(slices) < MIN_SLICES:
        raise SeriesRejected(
            where, f"{len(slices)} slice(s): a volume needs at least {MIN_SLICES}", "export the whole series"
        )
    first = slices[0]
    row_dir, col_dir = np.array(first.orientation[:3]), np.array(first.orientation[3:])
    for s in slices[1:]:
        if np.max(np.abs(np.array(s.orientation) - np.array(first.orientation))) > ORIENTATION_TOLERANCE:
            raise SeriesRejected(
                where, "slices with different orientations (a localiser or a second stack mixed in)", _SPLIT
            )
        if s.shape != first.shape or not np.allclose(s.pixel_spacing, first.pixel_spacing, rtol=1e-4, atol=1e-6):
            raise SeriesRejected(where, "slices with different sizes or pixel spacings", _SPLIT)
    normal = np.cross(row_dir, col_dir)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-2):
        raise SeriesRejected(where, "ImageOrientationPatient does not hold two perpendicular unit directions")
    depth = np.array([float(np.dot(s.position, normal)) for s in slices])
    order = np.argsort(depth, kind="stable")
    steps = np.diff(depth[order])
    step = float(np.median(steps))
    _check_steps(steps, step, where)
    ordered = tuple(slices[i] for i in order)
    return SeriesGeometry(
        ordered,
        (step, *first.pixel_spacing),
        np.stack([row_dir, col_dir, normal]),
        ordered[0].position,
    )


_SPLIT = "export each stack as its own series"


def _check_steps(steps: np.ndarray, step: float, where: str) -> None:
    """Refuse duplicate positions, missing slices and uneven spacing, naming slice indices only."""
    if step <= 0:
        raise SeriesRejected(where, "most slices share one position (not a volume)", _SPLIT)
    duplicate = np.flatnonzero(steps < DUPLICATE_FRACTION * step)
    if duplicate.size:
        i = int(duplicate[0])
        raise SeriesRejected(
            where,
            f"two slices at one position (slices {i + 1} and {i + 2} along the normal; {duplicate.size} such pair(s))",
            "remove the duplicate files, or export each acquisition as its own series",
        )
    gaps = np.flatnonzero(steps > GAP_FRACTION * step)
    if gaps.size:
        i = int(gaps[0])
        missing = round(float(steps[i]) / step) - 1
        raise SeriesRejected(
            where,
            f"missing slices: about {missing} slice(s) absent between slices {i + 1} and {i + 2} along the normal",
            "copy the complete series from the PACS",
        )
    uneven = np.flatnonzero(np.abs(steps - step) > UNEVEN_FRACTION * step)
    if uneven.size:
        raise SeriesRejected(
            where,
            f"uneven slice spacing ({uneven.size} step(s) differ from the series' step by more than "
            f"{UNEVEN_FRACTION:.0%})",
            "resample the series to a regular grid before export",
        )


@dataclasses.dataclass
class SeriesFolder:
    """A folder read as series: the volumes, the series refused (by name, with the reason), the files
    that are not DICOM images, and the files that still carry identifying attributes (keywords only)."""

    volumes: list[SeriesVolume]
    refused: list[tuple[str, str]]  # (the series' name, the reason): two series may share a folder
    unreadable: dict[str, str]
    identifying: dict[str, list[str]]
    segmentations: dict[str, str] = dataclasses.field(default_factory=dict)  # DICOM SEG file -> its series UID


def read_series_folder(root: Path, names: Iterable[str], retain: tuple[str, ...] = ()) -> SeriesFolder:
    """Every series among the files ``names`` (relative to ``root``): grouped, guarded, ordered, decoded.

    The de-identification guard runs on every slice's header first; whether its findings stop the
    load is the caller's policy (``identifying`` lists them). A caller that refuses identifying
    files calls ``group_series`` and ``assemble_series`` itself, so no pixel is decoded first."""
    return assemble_series(root, group_series(root, names, retain))


def assemble_series(root: Path, grouped: GroupedFiles) -> SeriesFolder:
    """Every grouped series assembled into a volume, or refused with its reason."""
    volumes, refused = [], []
    for headers in grouped.series.values():
        try:
            volumes.append(assemble_volume(headers, root))
        except SeriesRejected as exc:
            refused.append((exc.where, exc.reason))
    volumes.sort(key=lambda v: v.where)
    refused.sort()
    return SeriesFolder(volumes, refused, grouped.unreadable, grouped.identifying, grouped.segmentations)


SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclasses.dataclass
class GroupedFiles:
    """A folder's files sorted by what they are: image headers by series, segmentations by the
    series they segment, files that are neither (with the reason), and the guard's findings."""

    series: dict[str, list[tuple[Any, str]]] = dataclasses.field(default_factory=dict)
    segmentations: dict[str, str] = dataclasses.field(default_factory=dict)  # SEG file -> series UID
    unreadable: dict[str, str] = dataclasses.field(default_factory=dict)
    identifying: dict[str, list[str]] = dataclasses.field(default_factory=dict)


def group_series(root: Path, names: Iterable[str], retain: tuple[str, ...] = ()) -> GroupedFiles:
    """Read every file's header once: the de-identification guard runs on each (images and
    segmentations alike), then images are grouped by SeriesInstanceUID and DICOM SEG objects by the
    series they reference."""
    from client.datasets.phi_guard import phi_findings

    grouped = GroupedFiles()
    for name in names:
        try:
            ds = read_header(root / name)
        except DicomRejected as exc:
            grouped.unreadable[name] = exc.reason
            continue
        findings = phi_findings(ds, retain=retain)
        if findings:
            grouped.identifying[name] = findings
        if str(ds.get("SOPClassUID", "")) == SEGMENTATION_STORAGE:
            referenced = ds.get("ReferencedSeriesSequence") or []
            if len(referenced) != 1 or not referenced[0].get("SeriesInstanceUID"):
                grouped.unreadable[name] = "a segmentation that does not reference exactly one series"
            else:
                grouped.segmentations[name] = str(referenced[0].SeriesInstanceUID)
            continue
        try:
            check_image_class(ds, name)
        except DicomRejected as exc:
            grouped.unreadable[name] = exc.reason
            continue
        uid = ds.get("SeriesInstanceUID")
        if not uid:
            grouped.unreadable[name] = "no SeriesInstanceUID (0020,000E): cannot tell which series it belongs to"
            continue
        grouped.series.setdefault(str(uid), []).append((ds, name))
    return grouped


def read_mask(root: Path, seg_name: str, volume: SeriesVolume) -> np.ndarray:
    """A DICOM SEG object's segments combined into one boolean mask aligned with ``volume``'s slices
    (by the SOP Instance UIDs its frames were derived from); refused naming the file when it does
    not fit the series."""
    import highdicom as hd

    uids = [s.instance_uid for s in volume.geometry.slices]
    with quiet_pydicom():
        try:
            seg = hd.seg.segread(str(root / seg_name))
            pixels = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=uids, combine_segments=True, skip_overlap_checks=True
            )
        except Exception as exc:  # highdicom refuses a SEG that does not match its source its own way
            raise SeriesRejected(seg_name, f"segmentation does not fit {volume.where} ({type(exc).__name__})") from None
    if pixels.shape != volume.voxels.shape:
        raise SeriesRejected(seg_name, f"segmentation frames are not the size of {volume.where}'s slices")
    return pixels > 0


def assemble_volume(headers: Sequence[tuple[Any, str]], root: Path) -> SeriesVolume:
    """One series' headers -> its checked geometry and its voxels in modality units."""
    where = where_series([name for _, name in headers])
    slices: list[SliceHeader] = []
    with quiet_pydicom():
        for ds, name in headers:
            try:
                slices += slice_headers(ds, name)
            except SeriesRejected as exc:  # one slice's geometry: the series is refused, the file named
                raise SeriesRejected(where, f"{exc.where}: {exc.reason}", exc.hint) from None
    geometry = order_slices(slices, where)
    studies = {str(ds.get("StudyInstanceUID", "")) for ds, _ in headers}
    if len(studies) != 1 or not next(iter(studies)):
        raise SeriesRejected(where, "files of one series name different (or no) studies", "re-export the study")
    voxels = _voxels(geometry, root, where)
    return SeriesVolume(where, studies.pop(), str(headers[0][0].SeriesInstanceUID), voxels, geometry)


def _voxels(geometry: SeriesGeometry, root: Path, where: str) -> np.ndarray:
    """Decode every slice in order, each through its own Modality LUT."""
    from pydicom import dcmread
    from pydicom.pixels import pixel_array

    volume = np.empty(geometry.shape, dtype=np.float32)
    cache: dict[str, Any] = {}
    with quiet_pydicom():
        for k, s in enumerate(geometry.slices):
            path = root / s.file
            try:
                if s.frame is None:
                    pixels = pixel_array(str(path))
                else:
                    ds = cache.get(s.file) or cache.setdefault(s.file, dcmread(str(path)))
                    pixels = pixel_array(ds, index=s.frame)
            except Exception as exc:  # each decoder fails its own way; the file is named, never its values
                raise SeriesRejected(
                    where, f"{s.file}: pixel data could not be decoded ({type(exc).__name__})"
                ) from None
            if pixels.shape != s.shape:
                raise SeriesRejected(where, f"{s.file}: pixel data does not match Rows x Columns")
            volume[k] = pixels.astype(np.float32) * np.float32(s.slope) + np.float32(s.intercept)
    return volume
