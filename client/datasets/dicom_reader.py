"""Decode one DICOM file into model-ready pixels: float32 (size, size) in [0, 1], bright = dense.

Hospitals export whatever their PACS writes: MONOCHROME1 radiographs, CT with rescale
slope/intercept and several windows, signed 16-bit data, JPEG / JPEG-LS / JPEG 2000 / RLE
compressed files, colour ultrasound, RT and SR objects mixed into the same folder. The model wants
one convention; anything that cannot be brought to it is refused with a `DicomRejected` naming the
file and the reason. Reasons hold keywords, tag numbers, SOP class and transfer-syntax names only,
never a header value (values may identify a patient); pydicom's own warnings and log records,
which may quote values, are silenced while reading.

Pipeline (the PS3.3 C.11 grayscale pipeline, then geometry):
  stored values -> Modality LUT (Rescale Slope/Intercept or LUT sequence) -> VOI (VOI LUT sequence,
  else the first Window Center/Width, else a robust 0.5/99.5-percentile stretch) -> [0, 1] ->
  MONOCHROME1 inverted -> the longer physical side (PixelSpacing, ImagerPixelSpacing or
  PixelAspectRatio) resized to `size` (bilinear, antialiased), the shorter side zero-padded,
  centred. Padding keeps anatomy undistorted; zero is background in MONOCHROME2.
Colour (RGB, YBR_*, PALETTE COLOR) becomes BT.601 luminance by default (an ultrasound or a
secondary capture still trains a grayscale CNN); `ImagePolicy(colour="reject")` refuses it.
Enhanced multi-frame objects keep windows in functional groups, which are not read: those frames
get the percentile stretch (the stretch is invariant to a positive rescale, so HU offsets do not
matter there).
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import stat
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, cast

import numpy as np

from fedcare.errors import FedcareError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

PREPROCESSING_VERSION = 1  # bump whenever the output of read_dicom changes (invalidates caches)
MULTIFRAME_MODES = ("first", "every", "reject")
COLOUR_MODES = ("luminance", "reject")
MAX_PIXELS = 1 << 27  # decoded per file (~1 GB as float64); whole-slide images do not belong here

_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_422", "PALETTE COLOR"}
_UNSUPPORTED_PI = {"YBR_PARTIAL_420", "HSV", "ARGB", "CMYK", "XYB"}
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_BT601 = np.array([0.299, 0.587, 0.114])
_UNDEFINED_LENGTH = 0xFFFFFFFF
# SOP class UID prefixes of objects that are not images to classify, even when they carry pixels.
_NON_IMAGE_PREFIXES = {
    "1.2.840.10008.5.1.4.1.1.88.": "structured report",
    "1.2.840.10008.5.1.4.1.1.9.": "waveform",
    "1.2.840.10008.5.1.4.1.1.11.": "presentation state",
    "1.2.840.10008.5.1.4.1.1.104.": "encapsulated document",
    "1.2.840.10008.5.1.4.1.1.66": "raw data, registration or segmentation",
    "1.2.840.10008.5.1.4.1.1.481.": "radiotherapy object",
    "1.2.840.10008.1.3.10": "DICOMDIR media index",
}
_RT_IMAGE = "1.2.840.10008.5.1.4.1.1.481.1"


@dataclass(frozen=True)
class ImagePolicy:
    """How every image of a run is brought to the model's input; part of the cache key."""

    size: int = 64
    multiframe: str = "first"  # "first" | "every" | "reject"
    colour: str = "luminance"  # "luminance" | "reject"

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not 8 <= self.size <= 1024:
            raise FedcareError(
                f"image size must be an integer from 8 to 1024, got {self.size!r}", "set --image-size (e.g. 64)"
            )
        if self.multiframe not in MULTIFRAME_MODES:
            raise FedcareError(
                f"unknown multiframe policy {self.multiframe!r}", f"choose one of: {', '.join(MULTIFRAME_MODES)}"
            )
        if self.colour not in COLOUR_MODES:
            raise FedcareError(f"unknown colour policy {self.colour!r}", f"choose one of: {', '.join(COLOUR_MODES)}")

    def key(self) -> str:
        """A string naming this policy and the preprocessing version, for cache keys."""
        return f"v{PREPROCESSING_VERSION}-size{self.size}-mf_{self.multiframe}-colour_{self.colour}"


class DicomRejected(FedcareError):
    """One file that cannot become a model input; `code` groups reasons for reports."""

    def __init__(self, path: str | os.PathLike, reason: str, code: str = "rejected", hint: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        self.code = code
        super().__init__(f"{self.path}: {reason}", hint)


def path_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be read as a regular file, in words (None when it can).

    The real cause, not a guess: a symbolic link loop or a permission problem is not "missing".
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "is a symbolic link to a missing file" if os.path.islink(path) else "does not exist"
    except OSError as exc:
        return os_error_cause(exc)
    if stat.S_ISDIR(st.st_mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    return None


def os_error_cause(exc: OSError) -> str:
    """An OSError as a short phrase naming its cause (no path: callers name the file)."""
    causes: dict[int | None, str] = {
        errno.ELOOP: "is a symbolic link loop",
        errno.EACCES: "cannot be read: permission denied",
        errno.EPERM: "cannot be read: operation not permitted",
        errno.ENOENT: "does not exist",
        errno.ENOTDIR: "does not exist (a parent in its path is not a folder)",
        errno.EISDIR: "is a directory, not a file",
    }
    cause = causes.get(exc.errno)
    if cause is None:
        cause = f"cannot be read: {exc.strerror or type(exc).__name__}"
    return cause


def read_dicom(path: str | os.PathLike, policy: ImagePolicy) -> list[np.ndarray]:
    """Decode the file at `path` into one (or, with multiframe="every", one per frame) image."""
    name, p = _readable(path)
    with _guarded(name):
        ds = _parse(str(p), name, p.stat().st_size, defer_size=None)
        return decode_dataset(ds, policy, name)


def read_dicom_bytes(data: bytes, policy: ImagePolicy, name: str) -> list[np.ndarray]:
    """`read_dicom` for a file already in memory (the folder loader hashes the same bytes)."""
    with _guarded(name):
        ds = _parse(io.BytesIO(data), name, len(data), defer_size=None)
        return decode_dataset(ds, policy, name)


def read_header(path: str | os.PathLike) -> Dataset:
    """Every element of the file except large values (pixel data is deferred, not loaded).

    Used for PHI checks and sizes. Elements after Pixel Data (e.g. digital signatures) are read
    too, unlike with `stop_before_pixels`.
    """
    name, p = _readable(path)
    with _guarded(name):
        return _parse(str(p), name, p.stat().st_size, defer_size=64 * 1024)


def _readable(path: str | os.PathLike) -> tuple[str, Path]:
    """The file's name and path, refused (``not-a-file``) when it is not a regular readable file."""
    name, p = str(path), Path(path)
    problem = path_problem(p)
    if problem is not None:
        raise DicomRejected(name, problem, "not-a-file")
    return name, p


def read_header_bytes(data: bytes, name: str) -> Dataset:
    """`read_header` for a file already in memory."""
    with _guarded(name):
        return _parse(io.BytesIO(data), name, len(data), defer_size=None)


def decode_dataset(ds: Dataset, policy: ImagePolicy, name: str = "<dataset>") -> list[np.ndarray]:
    """The pixels of a parsed dataset, per `policy`; raises DicomRejected when it is not usable."""
    with _guarded(name):
        return _decode(ds, policy, name)


# ---------------------------------------------------------------------------------------------
# Parsing


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom while reading: its warnings and log records quote header values."""
    logger = logging.getLogger("pydicom")
    disabled = logger.disabled
    logger.disabled = True  # cheaper than setLevel, which clears every logger's cache
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with np.errstate(all="ignore"):
                yield
    finally:
        logger.disabled = disabled


@contextlib.contextmanager
def _guarded(name: str) -> Iterator[None]:
    """Quiet pydicom, and turn any unforeseen failure into a DicomRejected (never a traceback)."""
    with quiet_pydicom():
        try:
            yield
        except (DicomRejected, MemoryError):
            raise
        except RecursionError:
            raise DicomRejected(name, "corrupt DICOM file (sequences nested too deeply)", "corrupt") from None
        except Exception as exc:  # the contract is: every file loads or is rejected
            raise DicomRejected(name, f"unreadable DICOM file ({type(exc).__name__})", "corrupt") from None


def _parse(source: str | BinaryIO, name: str, file_size: int, defer_size: int | None):
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    if file_size == 0:
        raise DicomRejected(name, "empty file (0 bytes)", "empty", "copy or export the file again")
    try:
        ds = dcmread(source, defer_size=defer_size)
    except InvalidDicomError:
        ds = _parse_without_preamble(source, name, defer_size)
    except (
        OSError,
        EOFError,
        struct.error,
        ValueError,
        KeyError,
        TypeError,
        IndexError,
        OverflowError,
        UnicodeError,
        NotImplementedError,
        AttributeError,
    ) as exc:
        raise DicomRejected(name, f"truncated or corrupt DICOM header ({type(exc).__name__})", "corrupt") from None
    if len(ds) == 0:
        raise DicomRejected(name, "no data elements after the file meta header (truncated file?)", "truncated")
    _check_not_truncated(ds, name, file_size)
    return ds


def _parse_without_preamble(source: str | BinaryIO, name: str, defer_size: int | None):
    """Some archives write bare datasets (no 128-byte preamble, no 'DICM'): accept those only."""
    from pydicom import dcmread
    from pydicom.tag import Tag

    not_dicom = DicomRejected(
        name, "not a DICOM file (no 'DICM' marker and no recognisable DICOM elements)", "not-dicom"
    )
    if hasattr(source, "seek"):
        source.seek(0)
    try:
        ds = dcmread(source, force=True, defer_size=defer_size)
    except Exception:  # force-parsing arbitrary bytes may fail any way it likes
        raise not_dicom from None
    if Tag("SOPClassUID") not in ds and Tag("Rows") not in ds:
        raise not_dicom
    return ds


def _check_not_truncated(ds, name: str, file_size: int) -> None:
    """pydicom reads a file cut short without complaint; a value running past EOF gives it away."""
    from pydicom.dataelem import RawDataElement
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return  # offsets count inflated bytes; zlib itself reports a cut stream
    last = next(reversed(ds.keys()), None)  # elements are stored in file order: the last one ends last
    raw = ds.get_item(last) if last is not None else None
    if not isinstance(raw, RawDataElement) or raw.length == _UNDEFINED_LENGTH:
        return
    end = raw.value_tell + raw.length
    if raw.value is not None and len(raw.value) < raw.length:
        end = file_size + 1
    if end > file_size:
        raise DicomRejected(
            name,
            "truncated file (an element runs past the end of the file)",
            "truncated",
            "copy or export the file again",
        )


# ---------------------------------------------------------------------------------------------
# Decoding


def _decode(ds, policy: ImagePolicy, name: str) -> list[np.ndarray]:
    check_image_class(ds, name)
    if not any(kw in ds for kw in _PIXEL_KEYWORDS):
        raise DicomRejected(name, "no Pixel Data (7FE0,0010) element", "no-pixel-data")
    rows, cols, frames = _geometry(ds, name)
    if frames > 1 and policy.multiframe == "reject":
        raise DicomRejected(
            name,
            f"multi-frame image ({frames} frames) refused by the multiframe policy",
            "multiframe",
            "use --multiframe first or every",
        )
    only_first = frames > 1 and policy.multiframe == "first"
    if rows * cols * (1 if only_first else frames) > MAX_PIXELS:
        raise DicomRejected(
            name,
            f"image too large (over {MAX_PIXELS:,} pixels to decode from Rows x Columns x NumberOfFrames)",
            "too-large",
        )
    pi = _photometric(ds, name)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    colour = pi in _COLOUR or samples > 1
    if colour and policy.colour == "reject":
        raise DicomRejected(name, "colour image refused by the colour policy (PhotometricInterpretation)", "colour")
    ts = _transfer_syntax(ds, name)
    arr = _pixels(ds, name, ts, index=0 if only_first else None)
    per_frame = 3 if samples > 1 else 2  # PALETTE COLOR stores one sample per pixel
    stack = [arr] if arr.ndim == per_frame else list(arr)

    row_mm, col_mm = _pixel_aspect(ds)
    out, blank = [], 0
    for frame in stack:  # one frame at a time: float64 copies of a long cine would not fit in memory
        img = _gray(frame, ds, pi, colour, name)
        if img is None:
            blank += 1
            img = np.zeros(frame.shape[:2])
        if not np.isfinite(img).all():
            raise DicomRejected(name, "NaN or infinite pixel values after conversion", "nan")
        out.append(_fit(img, policy.size, row_mm, col_mm))
    if blank == len(out):
        raise DicomRejected(name, "blank image (every pixel has the same value)", "blank")
    return out


def check_image_class(ds: Dataset, name: str) -> None:
    """Refuse (``DicomRejected``, code ``non-image``) an object that is not an image: a structured
    report, waveform, presentation state, document, segmentation, RT object or DICOMDIR."""
    sop = str(ds.get("SOPClassUID", "") or "")
    meta = getattr(ds, "file_meta", None)
    if not sop and meta is not None:
        sop = str(meta.get("MediaStorageSOPClassUID", "") or "")
    if not sop or sop == _RT_IMAGE:
        return
    for prefix, kind in _NON_IMAGE_PREFIXES.items():
        if sop.startswith(prefix):
            from pydicom.uid import UID

            label = UID(sop).name if UID(sop).is_valid and UID(sop).name != sop else "a non-image class"
            raise DicomRejected(name, f"not an image to classify: {kind} (SOP class '{label}')", "non-image")


def _geometry(ds, name: str) -> tuple[int, int, int]:
    try:
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    except (TypeError, ValueError):
        raise DicomRejected(name, "invalid Rows/Columns (0028,0010)/(0028,0011)", "corrupt") from None
    if "Rows" not in ds or "Columns" not in ds:
        raise DicomRejected(name, "no Rows/Columns (0028,0010)/(0028,0011)", "incomplete-header")
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        raise DicomRejected(name, "invalid NumberOfFrames (0028,0008)", "corrupt") from None
    if rows <= 0 or cols <= 0 or frames <= 0:
        raise DicomRejected(name, "zero-size image (Rows, Columns or NumberOfFrames is 0)", "zero-size")
    return rows, cols, frames


def _photometric(ds, name: str) -> str:
    pi = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if pi in ("MONOCHROME1", "MONOCHROME2") or pi in _COLOUR:
        return pi
    if pi in _UNSUPPORTED_PI:
        raise DicomRejected(name, f"unsupported PhotometricInterpretation {pi}", "unsupported-photometric")
    if not pi and int(ds.get("SamplesPerPixel", 1) or 1) == 1:
        return "MONOCHROME2"  # absent in some bare exports; the standard default for one sample
    raise DicomRejected(name, "unrecognised PhotometricInterpretation (0028,0004)", "unsupported-photometric")


def _transfer_syntax(ds, name: str):
    """The file's transfer syntax, checked against the installed decoders before decoding."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.tag import Tag
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    ts = meta.get("TransferSyntaxUID")
    if not ts:
        # Bare datasets: the parser found the encoding; only native (uncompressed) data is usable.
        raw = ds.get_item(next(Tag(kw) for kw in _PIXEL_KEYWORDS if kw in ds))
        if getattr(raw, "length", 0) == _UNDEFINED_LENGTH:
            raise DicomRejected(
                name, "compressed pixel data without a Transfer Syntax UID (0002,0010)", "unsupported-transfer-syntax"
            )
        implicit, little = ds.original_encoding
        ts = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        meta.TransferSyntaxUID = ts
    ts = UID(str(ts))
    label = ts.name if ts.is_transfer_syntax else "an unknown (private) transfer syntax"
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise DicomRejected(
            name,
            f"pydicom has no pixel decoder for '{label}' (video or unsupported syntax)",
            "unsupported-transfer-syntax",
            "re-export the images uncompressed or with JPEG/JPEG-LS/JPEG 2000/RLE",
        ) from None
    if not decoder.is_available:
        need = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise DicomRejected(
            name, f"no installed plugin decodes '{label}'", "unsupported-transfer-syntax", f"install one of: {need}"
        )
    return ts


def _pixels(ds, name: str, ts, index: int | None) -> np.ndarray:
    from pydicom.pixels import pixel_array

    try:
        return pixel_array(ds, index=index)
    except MemoryError:
        raise
    except ValueError as exc:
        if "less than expected" in str(exc) or "too short" in str(exc):
            raise DicomRejected(
                name,
                "truncated pixel data (fewer bytes than Rows x Columns x frames need)",
                "truncated",
                "copy or export the file again",
            ) from None
        raise DicomRejected(
            name, f"pixel data could not be decoded as '{ts.name}' ({type(exc).__name__})", "undecodable"
        ) from None
    except Exception as exc:  # each plugin fails its own way
        hint = "re-export uncompressed"
        if ts.is_compressed:
            hint = (
                "the data may be corrupt or use a codec variant pylibjpeg lacks: try "
                f"`pip install python-gdcm`, or {hint}"
            )
        raise DicomRejected(
            name, f"pixel data could not be decoded as '{ts.name}' ({type(exc).__name__})", "undecodable", hint
        ) from None


def _gray(frame: np.ndarray, ds, pi: str, colour: bool, name: str) -> np.ndarray | None:
    """One frame as float64 in [0, 1], bright = dense; None when the frame is blank."""
    from pydicom.pixels.processing import apply_color_lut, apply_modality_lut

    if colour:
        if pi == "PALETTE COLOR":
            try:
                frame = apply_color_lut(frame, ds)
            except Exception:
                raise DicomRejected(name, "invalid palette colour lookup table (0028,1201-1203)", "corrupt") from None
        values = frame.astype(np.float64) @ _BT601
        return _stretch(values)
    try:
        values = apply_modality_lut(frame, ds).astype(np.float64)
    except Exception:
        raise DicomRejected(
            name, "invalid Modality LUT / Rescale Slope / Rescale Intercept (0028,1052-3000)", "corrupt"
        ) from None
    if not np.isfinite(values).all():
        raise DicomRejected(
            name, "NaN or infinite pixel values after the modality LUT (Rescale Slope/Intercept)", "nan"
        )
    if values.size == 0 or values.min() == values.max():
        return None
    out = _voi(values, ds)
    if out is None:
        out = _stretch(values)
    return 1.0 - cast(np.ndarray, out) if pi == "MONOCHROME1" else out


def _voi(values: np.ndarray, ds) -> np.ndarray | None:
    """The VOI LUT or the first window mapped to [0, 1]; None when absent or unusable."""
    from pydicom.pixels.processing import apply_voi, apply_windowing

    try:
        seq = ds.get("VOILUTSequence")
        if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
            n, first = int(seq[0].LUTDescriptor[0]) or 1 << 16, int(seq[0].LUTDescriptor[1])
            lut = apply_voi(np.arange(first, first + n, dtype=np.int64), ds).astype(np.float64)
            lo, hi = float(lut.min()), float(lut.max())
            out = apply_voi(np.rint(values).astype(np.int64), ds).astype(np.float64)
        elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
            # The output range depends on BitsStored / rescale; probing with +-inf reads it back.
            lo, hi = apply_windowing(np.array([-np.inf, np.inf]), ds)
            out = apply_windowing(values, ds)
        else:
            return None
    except Exception:  # a malformed window falls back to the stretch
        return None
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi == lo:
        return None
    return np.clip((out - lo) / (hi - lo), 0.0, 1.0)


def _stretch(values: np.ndarray) -> np.ndarray | None:
    lo, hi = np.percentile(values, [0.5, 99.5])
    if hi <= lo:
        lo, hi = values.min(), values.max()
    if hi <= lo:
        return None
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def _pixel_aspect(ds) -> tuple[float, float]:
    """Physical (row, column) pixel size, or its ratio; square when unknown or malformed."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "PixelAspectRatio"):
        try:
            value = ds.get(keyword)
            if value is None or len(value) != 2:
                continue
            row, col = float(value[0]), float(value[1])
        except (TypeError, ValueError):
            continue
        if np.isfinite(row) and np.isfinite(col) and row > 0 and col > 0:
            return row, col
    return 1.0, 1.0


def _fit(img: np.ndarray, size: int, row_mm: float, col_mm: float) -> np.ndarray:
    """Resize keeping the physical aspect ratio; zero-pad the short side to a size x size square."""
    import torch
    import torch.nn.functional as F

    rows, cols = img.shape
    height, width = rows * row_mm, cols * col_mm
    scale = size / max(height, width)
    new_rows = int(min(size, max(1, round(height * scale))))
    new_cols = int(min(size, max(1, round(width * scale))))
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    if (new_rows, new_cols) != (rows, cols):
        t = F.interpolate(t, size=(new_rows, new_cols), mode="bilinear", align_corners=False, antialias=True)
    out = np.zeros((size, size), dtype=np.float32)
    top, left = (size - new_rows) // 2, (size - new_cols) // 2
    out[top : top + new_rows, left : left + new_cols] = t[0, 0].numpy()
    return np.clip(out, 0.0, 1.0, out=out)
