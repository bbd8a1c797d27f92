"""DICOM image sets (AWS HealthImaging) through the kernel: one `<SOPInstanceUID>.dcm` each.

The fake Grand Challenge lists each image set's instances (`dicom/instances/`, once per
frame) with requests signed for its fake HealthImaging, which checks the SigV4-style
headers, refuses expired ones and anything carrying the Grand Challenge token, and can be
switched between honouring Range or not and sending Content-Length or not.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mount, Mounter, no_new_requests

from fsmount.demo.healthimaging import SESSION_TOKEN, SIGNATURE_LIFETIME

pytestmark = pytest.mark.fuse

SLUG = "demo-dicom"
SET_DIR = "images/dicom-image-set"
TIMEOUT = 4  # --timeout of the outage test
SLACK = 8.0  # scheduling margin of a loaded 2-core machine


@contextlib.contextmanager
def healthimaging(gc, **knobs: object) -> Iterator[None]:
    """The fake HealthImaging with some knobs set for the block, well-behaved after."""
    for name, value in knobs.items():
        setattr(gc.healthimaging, name, value)
    try:
        yield
    finally:
        gc.reset_faults()


def image_sets(gc) -> dict[str, list[str]]:
    """Item pk -> its set's distinct instance UIDs, in the order the endpoint first lists them."""
    out = {}
    for item in gc.data.items(gc.data.archive(SLUG)):
        for civ in item.values:
            if civ.image is not None and civ.image.image_set is not None:
                out[item.pk] = [i.sop_instance_uid for i in civ.image.image_set.instances()]
    return out


GAVE_UP = r"(ConnectError|RemoteProtocolError|HTTP 503).*giving up"  # faults these tests make
SIZE_FAILED = r"size of grand-challenge demo-dicom/"


def dicom_mount(mounter: Mounter, *extra: str, cache: Path | None = None) -> Path:
    """A mount of demo-dicom alone (`mounter.mounts[-1]`); returns the archive's directory."""
    mount = mounter.start("--archive", SLUG, *extra, scenario=False, cache_dir=cache)
    return mount.path / "grand-challenge" / SLUG


def read_all(root: Path, rels: list[str], parallel: bool = False) -> dict[str, bytes]:
    """The bytes of each file; read in threads of their own when `parallel`."""
    if not parallel:
        return {rel: (root / rel).read_bytes() for rel in rels}
    found: dict[str, bytes] = {}

    def read(rel: str) -> None:
        found[rel] = (root / rel).read_bytes()

    threads = [threading.Thread(target=read, args=(rel,)) for rel in rels]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return found


@pytest.mark.parametrize(
    ("honour_range", "send_length"),
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["no-range-no-length", "range-no-length", "no-range-length", "range-length"],
)
def test_dcm_files_appear_where_the_recipe_puts_them_and_every_byte_matches(
    mounter: Mounter, services, honour_range: bool, send_length: bool
) -> None:
    gc = services.gc
    expected = gc.expected_archive(SLUG)
    dcm = sorted(rel for rel in expected if rel.endswith(".dcm"))
    assert len(dcm) == 6 and all(f"/{SET_DIR}/" in rel for rel in dcm)
    with healthimaging(gc, honour_range=honour_range, send_length=send_length):
        root = dicom_mount(mounter)
        gc.log.reset()
        files = {
            os.path.relpath(os.path.join(top, name), root)
            for top, _, names in os.walk(root)
            for name in names
        }
        assert files == set(expected)
        sizes = {rel: os.stat(root / rel).st_size for rel in dcm}  # each: one whole fetch
        assert sizes == {rel: expected[rel].size for rel in dcm}
        assert gc.log.count("healthimaging") == len(dcm)
        # The fetch that told the size kept the bytes: reading them costs nothing more.
        with no_new_requests(gc.log, "healthimaging", "instances"):
            for rel in dcm:
                assert (root / rel).read_bytes() == expected[rel].bytes(), rel
        assert gc.log.count("instances") == len(image_sets(gc))


def test_pydicom_reads_each_file_and_its_uid_is_its_name(shared_mount: Mount, services) -> None:
    pydicom = pytest.importorskip("pydicom")
    root = shared_mount.path / "grand-challenge" / SLUG
    set_ids = {
        item.pk: civ.image.image_set.image_set_id
        for item in services.gc.data.items(services.gc.data.archive(SLUG))
        for civ in item.values
        if civ.image is not None and civ.image.image_set is not None
    }
    frames = {}
    for pk, uids in image_sets(services.gc).items():
        for uid in uids:
            path = root / pk / SET_DIR / f"{uid}.dcm"
            ds = pydicom.dcmread(path)
            assert ds.SOPInstanceUID == uid
            # The provenance every image file carries, plus the image set's.
            assert os.getxattr(path, "user.fsmount.image-set").decode() == set_ids[pk]
            assert os.getxattr(path, "user.fsmount.item").decode() == pk
            assert os.getxattr(path, "user.fsmount.socket") == b"dicom-image-set"
            assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
            frames[uid] = int(ds.get("NumberOfFrames", 1))
    assert sorted(frames.values()) == [1, 1, 1, 1, 1, 2]


# Run in a process of its own: SimpleITK holds the GIL while it reads, and the fakes serve the
# mount from threads of the test process.
SERIES_READER = """
import sys, SimpleITK as sitk
reader = sitk.ImageSeriesReader()
names = reader.GetGDCMSeriesFileNames(sys.argv[1])
reader.SetFileNames(names)
image = reader.Execute()
print(len(names), *image.GetSize(), *image.GetSpacing())
"""


def test_simpleitk_reads_the_series_from_the_mounted_directory(mounter: Mounter, services):
    pytest.importorskip("SimpleITK")
    root = dicom_mount(mounter)
    ct = next(pk for pk, uids in image_sets(services.gc).items() if len(uids) == 4)
    done = subprocess.run(
        [sys.executable, "-c", SERIES_READER, str(root / ct / SET_DIR)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["4", "16", "16", "4", "0.68", "0.68", "1.25"]


def test_ls_of_an_image_set_costs_one_instances_request_and_no_download(
    mounter: Mounter, services
) -> None:
    gc = services.gc
    root = dicom_mount(mounter)
    sets = image_sets(gc)
    gc.log.reset()
    # Walking the archive and its items never asks for instances.
    assert sorted(os.listdir(root)) == sorted(sets)
    for pk in sets:
        assert "images" in os.listdir(root / pk)
        assert os.listdir(root / pk / "images") == ["dicom-image-set"]
    assert gc.log.count("instances") == 0
    for number, (pk, uids) in enumerate(sets.items(), start=1):
        listing = subprocess.run(
            ["ls", str(root / pk / SET_DIR)], capture_output=True, text=True, check=True
        )
        assert listing.stdout.split() == sorted(f"{uid}.dcm" for uid in uids)
        assert gc.log.count("instances") == number
    assert gc.log.count("healthimaging") == 0
    with no_new_requests(gc.log, "instances", "healthimaging", "image", "images"):
        found = subprocess.run(
            ["find", str(root), "-name", "*.dcm"], capture_output=True, text=True, check=True
        )
        assert len(found.stdout.split()) == sum(map(len, sets.values()))


def test_a_multi_frame_instance_appears_once(mounter: Mounter, services) -> None:
    gc = services.gc
    root = dicom_mount(mounter)
    (slide,) = (
        civ.image.image_set
        for item in gc.data.items(gc.data.archive(SLUG))
        for civ in item.values
        if civ.image is not None and civ.image.image_set is not None
        if len(civ.image.image_set.entries) != len(civ.image.image_set.instances())
    )
    listed = [entry.sop_instance_uid for entry in slide.entries]
    assert len(listed) == 3 and len(set(listed)) == 2  # the 2-frame instance, once per frame
    pk = next(pk for pk, uids in image_sets(gc).items() if uids[0] == listed[0])
    names = os.listdir(root / pk / SET_DIR)  # readdir order: the endpoint's, deduplicated
    assert names == [f"{listed[0]}.dcm", f"{listed[1]}.dcm"]
    tiles = (root / pk / SET_DIR / names[0]).read_bytes()
    assert tiles == slide.entries[0].data and len(tiles) > 1 << 20  # more than one block


def test_expired_signatures_are_asked_for_again_once_per_image_not_per_file(
    mounter: Mounter, services
) -> None:
    gc = services.gc
    expected = gc.expected_archive(SLUG)
    sets = image_sets(gc)
    root = dicom_mount(mounter)
    gc.log.reset()
    try:
        first = {pk: f"{pk}/{SET_DIR}/{uids[0]}.dcm" for pk, uids in sets.items()}
        assert read_all(root, list(first.values())) == {
            r: expected[r].bytes() for r in first.values()
        }
        assert gc.log.count("instances") == len(sets)  # one answer per image so far
        # Every signature handed out so far is now older than HealthImaging accepts.
        gc.healthimaging.advance_clock(SIGNATURE_LIFETIME + 60)
        gc.log.reset()
        rest = [f"{pk}/{SET_DIR}/{uid}.dcm" for pk, uids in sets.items() for uid in uids[1:]]
        assert len(rest) == 4
        got = read_all(root, rest, parallel=True)
        assert got == {rel: expected[rel].bytes() for rel in rest}
        assert gc.log.count("instances") == len(sets), gc.log.counts()  # once per image
        # Each image's first request was refused (our clock still calls it fresh); the
        # files that asked after the new answer came never were.
        assert len(rest) + len(sets) <= gc.log.count("healthimaging") <= 2 * len(rest)
        with no_new_requests(gc.log, "instances"):  # the new answer serves what follows
            for rel in rest:
                assert (root / rel).read_bytes() == expected[rel].bytes()
    finally:
        gc.reset_faults()


def largest_dcm(gc) -> tuple[str, bytes]:
    """The 2-frame instance (more than one cache block): path under the archive, bytes."""
    expected = gc.expected_archive(SLUG)
    rel = max((r for r in expected if r.endswith(".dcm")), key=lambda r: expected[r].size)
    return rel, expected[rel].bytes()


@pytest.mark.parametrize("honour_range", [True, False], ids=["range", "no-range"])
def test_a_cut_fetch_resumes_where_range_is_honoured_and_starts_again_where_not(
    mounter: Mounter, services, honour_range: bool
) -> None:
    gc = services.gc
    rel, data = largest_dcm(gc)
    root = dicom_mount(mounter)
    os.listdir((root / rel).parent)
    with healthimaging(gc, honour_range=honour_range):
        gc.log.reset()
        gc.healthimaging.faults.configure(cut_next=1)  # a body without length, cut once
        assert os.stat(root / rel).st_size == len(data)
        (cut,) = gc.healthimaging.faults.events("cut")
        assert 0 < cut.delivered < len(data)
        requests = gc.log.entries("healthimaging")
        assert [e.headers.get("range") for e in requests] == ["bytes=0-", f"bytes={cut.delivered}-"]
        with no_new_requests(gc.log, "healthimaging"):
            assert (root / rel).read_bytes() == data


def test_a_half_fetched_instance_is_never_served(mounter: Mounter, services) -> None:
    gc = services.gc
    rel, data = largest_dcm(gc)
    root = dicom_mount(mounter, "--timeout", str(TIMEOUT))
    mounter.mounts[-1].expect_logs(GAVE_UP, SIZE_FAILED)
    os.listdir((root / rel).parent)
    with healthimaging(gc):  # no Range, no length: a cut body cannot be told from a short one
        gc.healthimaging.faults.configure(cut_rate=1.0)
        started = time.monotonic()
        with pytest.raises(OSError) as err:
            os.stat(root / rel)
        assert err.value.errno in (errno.EIO, errno.ETIMEDOUT)
        assert time.monotonic() - started < TIMEOUT + SLACK
        assert gc.healthimaging.faults.events("cut")
    assert os.stat(root / rel).st_size == len(data)
    assert (root / rel).read_bytes() == data


@pytest.mark.parametrize("kind", ["503", "refused"])
def test_a_healthimaging_outage_fails_reads_in_time_and_they_recover(
    mounter: Mounter, services, kind: str
) -> None:
    gc = services.gc
    expected = gc.expected_archive(SLUG)
    root = dicom_mount(mounter, "--timeout", str(TIMEOUT))
    mounter.mounts[-1].expect_logs(GAVE_UP, SIZE_FAILED)
    cached, uncached = (
        f"{pk}/{SET_DIR}/{uid}.dcm" for pk, uids in image_sets(gc).items() for uid in uids[:1]
    )
    os.listdir((root / uncached).parent)
    assert (root / cached).read_bytes() == expected[cached].bytes()
    outage = (
        gc.refusing_connections(gc.healthimaging.server) if kind == "refused" else healthimaging(gc)
    )
    try:
        with outage:
            gc.healthimaging.faults.configure(outage=kind == "503")
            started = time.monotonic()
            with pytest.raises(OSError) as err:
                (root / uncached).read_bytes()
            assert err.value.errno in (errno.EIO, errno.ETIMEDOUT)
            assert time.monotonic() - started < TIMEOUT + SLACK
            assert (root / cached).read_bytes() == expected[cached].bytes()
    finally:
        gc.reset_faults()
    assert (root / uncached).read_bytes() == expected[uncached].bytes()  # no remount


def test_sizes_and_bytes_are_kept_across_remounts(mounter: Mounter, services, tmp_path) -> None:
    gc = services.gc
    expected = gc.expected_archive(SLUG)
    cache = tmp_path / "dicom-cache"
    root = dicom_mount(mounter, cache=cache)
    listing = subprocess.run(["ls", "-lR", str(root)], capture_output=True, text=True, check=True)
    assert mounter.mounts[-1].stop() == 0
    first = root
    root = dicom_mount(mounter, cache=cache)
    gc.log.reset()
    again = subprocess.run(["ls", "-lR", str(root)], capture_output=True, text=True, check=True)
    assert again.stdout.replace(str(root), "") == listing.stdout.replace(str(first), "")
    for rel, payload in expected.items():
        assert (root / rel).read_bytes() == payload.bytes()
    assert gc.log.count("healthimaging") == 0, gc.log.counts()
    assert gc.log.count("instances") == len(image_sets(gc))  # the listings, nothing more


def test_no_grand_challenge_token_or_aws_signature_leaks(mounter: Mounter, services) -> None:
    gc = services.gc
    gc.log.reset()
    root = dicom_mount(mounter, "--log-level", "debug")
    mount = mounter.mounts[-1]
    for rel, payload in gc.expected_archive(SLUG).items():
        assert (root / rel).read_bytes() == payload.bytes()
    entries = gc.log.entries("healthimaging")
    assert len(entries) == 6
    for entry in entries:
        assert entry.headers["authorization"].startswith("AWS4-HMAC-SHA256 ")
        assert gc.token not in repr(entry) and "bearer" not in repr(entry).lower()
    assert gc.healthimaging.token_seen == 0
    logs = mount.logs()
    assert "DEBUG" in logs
    signatures = {e.headers["authorization"].rpartition("Signature=")[2] for e in entries}
    for secret in (gc.token, SESSION_TOKEN, *signatures):
        assert secret not in logs
