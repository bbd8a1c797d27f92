"""DICOM Part-10 files for the fake AWS HealthImaging, made with pydicom.

Two kinds, as Grand Challenge stores them: a small CT series (one single-frame instance per
slice, with the geometry SimpleITK's `ImageSeriesReader` needs to stack them) and a 2-frame
whole-slide microscopy instance (multi-frame, so the instances endpoint lists it once per
frame). Everything is deterministic: UIDs are derived from names, never random, so a cache
kept across runs stays valid and the oracle can name the files.

UIDs follow what Grand Challenge's de-identifier makes: digits and dots under one root, 60 to
64 characters long (safe as file names).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    VLWholeSlideMicroscopyImageStorage,
)

from fsmount.demo.content import pattern

UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root, standing in for Grand Challenge's
TRANSFER_SYNTAX = str(ExplicitVRLittleEndian)
_IMPLEMENTATION = UID_ROOT + "1"


def dicom_uid(*parts: object) -> str:
    """A stable UID for a sample object: the root, then digits, 60 to 64 characters in all."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    length = 60 + digest[0] % 5
    digits = str(int.from_bytes(digest, "big"))
    digits = "1" + digits  # a UID component never starts with 0
    return (UID_ROOT + digits)[:length]


@dataclass(frozen=True)
class DicomInstance:
    """One stored instance: its UIDs, the bytes of its Part-10 file and its frame count."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    frames: int
    data: bytes
    transfer_syntax: str = TRANSFER_SYNTAX


def _part10(ds: Dataset, sop_class: str) -> bytes:
    """`ds` as a Part-10 file (preamble, `DICM`, file meta) in explicit VR little endian."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _IMPLEMENTATION
    meta.ImplementationVersionName = "FSMOUNT_DEMO"
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _common(ds: Dataset, name: str, modality: str, study: str, series: str) -> None:
    ds.PatientName = "Demo^" + name
    ds.PatientID = f"DEMO-{name.upper()}"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.Modality = modality
    ds.StudyDate = "20240601"
    ds.StudyTime = "100000"


def ct_series(name: str, slices: int = 4, size: int = 16) -> list[DicomInstance]:
    """A CT volume of `slices` slices of `size`x`size` int16 pixels, one instance each."""
    study, series = dicom_uid(name, "study"), dicom_uid(name, "series")
    frame = dicom_uid(name, "frame-of-reference")
    out = []
    for z in range(slices):
        ds = Dataset()
        _common(ds, name, "CT", study, series)
        ds.SOPInstanceUID = dicom_uid(name, "slice", z)
        ds.FrameOfReferenceUID = frame
        ds.InstanceNumber = z + 1
        ds.ImagePositionPatient = [-5.44, -5.44, 1.25 * z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.68, 0.68]
        ds.SliceThickness = 1.25
        _pixels(ds, size, "MONOCHROME2", bits=16, signed=True)
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        pixels = bytearray()
        for y in range(size):
            for x in range(size):
                value = (
                    -1000 if (x - size / 2) ** 2 + (y - size / 2) ** 2 > (size / 2.5) ** 2 else 40
                )
                pixels += (value + (x * 7 + y * 3 + z * 11) % 30).to_bytes(2, "little", signed=True)
        ds.PixelData = bytes(pixels)
        out.append(DicomInstance(ds.SOPInstanceUID, study, series, 1, _part10(ds, CTImageStorage)))
    return out


def _pixels(ds: Dataset, size: int, photometric: str, *, bits: int, signed: bool) -> None:
    """The image pixel module of square frames, without the pixel data."""
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 3 if photometric == "RGB" else 1
    ds.PhotometricInterpretation = photometric
    if photometric == "RGB":
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = int(signed)


def _slide(name: str, part: str, number: int, frames: int) -> Dataset:
    """A dataset of the slide's one series: its tiles (`VOLUME`) or its label."""
    ds = Dataset()
    _common(ds, name, "SM", dicom_uid(name, "study"), dicom_uid(name, "series"))
    ds.SOPInstanceUID = dicom_uid(name, part)
    ds.InstanceNumber = number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME" if part == "tiles" else "LABEL", "NONE"]
    ds.NumberOfFrames = frames
    return ds


def _slide_instance(ds: Dataset) -> DicomInstance:
    data = _part10(ds, VLWholeSlideMicroscopyImageStorage)
    uids = (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID)
    return DicomInstance(*uids, int(ds.NumberOfFrames), data)


def slide_instance(name: str, frames: int = 2, size: int = 512) -> DicomInstance:
    """A whole-slide microscopy instance of `frames` RGB tiles (a multi-frame instance); at
    the default size it spans two cache blocks, as real ones span many."""
    ds = _slide(name, "tiles", 1, frames)
    ds.TotalPixelMatrixColumns = size * frames
    ds.TotalPixelMatrixRows = size
    _pixels(ds, size, "RGB", bits=8, signed=False)
    ds.PixelData = pattern(int.from_bytes(name.encode()[:4], "big"), 0, frames * size * size * 3)
    return _slide_instance(ds)


def slide_label(name: str, size: int = 8) -> DicomInstance:
    """The slide's label image: a single-frame instance of the same series."""
    ds = _slide(name, "label", 2, 1)
    _pixels(ds, size, "MONOCHROME2", bits=8, signed=False)
    ds.PixelData = bytes((x * 31 + y * 17) % 256 for y in range(size) for x in range(size))
    return _slide_instance(ds)
