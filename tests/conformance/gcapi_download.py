"""The official "download archive items" recipe, with gcapi 0.16.1, for one archive.

Run with the interpreter of a venv holding gcapi (its httpx pin clashes with ours):

    GRAND_CHALLENGE_AUTHORIZATION=<token> SSL_CERT_FILE=<ca.pem> \\
        $GCAPI_PYTHON gcapi_download.py --base-url https://127.0.0.1:PORT/api/v1/ \\
        --archive demo-medical --output OUT

It writes `OUT/<item-pk>/<relative_path>` per value, exactly as the recipe does: this output is
what fsmount's mount is compared with. With `--image PK` instead of `--archive`, it runs
`images.download(pk=PK, output_directory=OUT)` alone (a DICOM image set: one
`<SOPInstanceUID>.dcm` per listed instance). It imports nothing from fsmount on purpose.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import gcapi


def download_archive(client: gcapi.Client, slug: str, output: Path) -> int:
    """Download every item of the archive; returns the number of items seen."""
    archive = client.archives.detail(slug=slug)
    count = 0
    for item in client.archive_items.iterate_all(params={"archive": archive.pk}):
        item_dir = output / item.pk
        item_dir.mkdir(parents=True, exist_ok=True)
        for value in item.values:
            client.download_socket_value(value, output_directory=item_dir)
        count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", required=True)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--archive")
    which.add_argument("--image")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    warnings.simplefilter("error", UserWarning)  # a version warning: the fake drifted
    client = gcapi.Client(base_url=args.base_url, token=os.environ["GRAND_CHALLENGE_AUTHORIZATION"])
    if args.image:
        written = client.images.download(pk=args.image, output_directory=args.output)
        print(f"downloaded {len(written)} files of image {args.image}")
        return
    items = download_archive(client, args.archive, args.output)
    print(f"downloaded {items} items of {args.archive}")


if __name__ == "__main__":
    main()
