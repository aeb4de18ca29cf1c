"""The ``mri-assets`` command: make data, upload it, and use the deployed model."""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mri_assets.settings import Settings


def open_landing(location: str):
    """A landing zone for a local folder or an s3:// location (standard AWS environment)."""
    from mri_assets.core.landing import LocalLanding, S3Landing

    if location.startswith("s3://"):
        import boto3

        return S3Landing(boto3.client("s3"), location)
    return LocalLanding(Path(location).expanduser().resolve())


def landing_has_scans(landing) -> bool:
    return any(True for split in ("train", "test") for _ in landing.list_objects(split))


def cmd_make_dataset(args: argparse.Namespace) -> int:
    from mri_assets.core.phantoms import write_dataset

    summary = write_dataset(
        args.out, seed=args.seed, n_glioma=args.glioma, n_meningioma=args.meningioma,
        test_fraction=args.test_fraction, size=args.size, progress=not args.quiet,
    )
    print(f"wrote {summary.files} images to {summary.root}: {json.dumps(summary.counts)}")
    return 0


def upload_tree(source: Path, landing, progress: bool = True) -> int:
    """Copy every file under ``source`` to the same relative key in the landing zone."""
    from tqdm import tqdm

    files = sorted(p for p in source.rglob("*") if p.is_file())
    if not files:
        raise SystemExit(f"error: {source} holds no files to upload")
    workers = 16 if landing.location.startswith("s3://") else 4
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=len(files), unit="file", desc="upload", disable=not progress
    ) as bar:
        for _ in pool.map(lambda p: landing.write(p.relative_to(source).as_posix(), p.read_bytes()), files):
            bar.update()
    return len(files)


def cmd_upload(args: argparse.Namespace) -> int:
    source = Path(args.source)
    if not source.is_dir():
        print(f"error: {source} is not a folder", file=sys.stderr)
        return 2
    location = args.landing or Settings.from_env().landing
    count = upload_tree(source, open_landing(location), progress=not args.quiet)
    print(f"uploaded {count} files to {location}")
    return 0


def cmd_seed_landing(args: argparse.Namespace) -> int:
    """Generate the default data set straight into the landing zone, unless it holds scans."""
    import tempfile

    from mri_assets.core.phantoms import write_dataset

    location = args.landing or Settings.from_env().landing
    landing = open_landing(location)
    if landing_has_scans(landing):
        print(f"{location} already holds scans; leaving it as it is")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        summary = write_dataset(tmp, seed=args.seed, progress=not args.quiet)
        upload_tree(Path(tmp), landing, progress=not args.quiet)
    print(f"landed {summary.files} generated images in {location}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mri-assets", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    make = commands.add_parser("make-dataset", help="write a synthetic MRI data set to a folder")
    make.add_argument("out", help="folder to write train/ and test/ into")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--glioma", type=int, default=346, help="number of gliomas (default 346)")
    make.add_argument("--meningioma", type=int, default=329, help="number of meningiomas (default 329)")
    make.add_argument("--test-fraction", type=float, default=0.25)
    make.add_argument("--size", type=int, default=256, help="image side in pixels")
    make.add_argument("--quiet", action="store_true", help="no progress bar")
    make.set_defaults(run=cmd_make_dataset)

    upload = commands.add_parser("upload", help="copy a folder tree into the landing zone")
    upload.add_argument("source")
    upload.add_argument("--landing", help="local folder or s3://bucket/prefix (default MRI_LANDING)")
    upload.add_argument("--quiet", action="store_true")
    upload.set_defaults(run=cmd_upload)

    seed = commands.add_parser(
        "seed-landing", help="land the default generated data set unless the landing zone has scans"
    )
    seed.add_argument("--landing", help="local folder or s3://bucket/prefix (default MRI_LANDING)")
    seed.add_argument("--seed", type=int, default=0)
    seed.add_argument("--quiet", action="store_true")
    seed.set_defaults(run=cmd_seed_landing)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
