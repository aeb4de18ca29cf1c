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
        args.out,
        seed=args.seed,
        n_glioma=args.glioma,
        n_meningioma=args.meningioma,
        test_fraction=args.test_fraction,
        size=args.size,
        progress=not args.quiet,
        variation=args.variation,
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
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(total=len(files), unit="file", desc="upload", disable=not progress) as bar,
    ):
        for _ in pool.map(
            lambda p: landing.write(p.relative_to(source).as_posix(), p.read_bytes()), files
        ):
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
    """Generate the data set (the default variation unless --variation says otherwise) straight
    into the landing zone, unless it holds scans."""
    import tempfile

    from mri_assets.core.phantoms import write_dataset

    location = args.landing or Settings.from_env().landing
    landing = open_landing(location)
    if landing_has_scans(landing):
        print(f"{location} already holds scans; leaving it as it is")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        summary = write_dataset(
            tmp, seed=args.seed, progress=not args.quiet, variation=args.variation
        )
        upload_tree(Path(tmp), landing, progress=not args.quiet)
    print(f"landed {summary.files} generated images ({args.variation} variation) in {location}")
    return 0


def open_store(settings: Settings):
    from mri_assets.core.store import ModelStore

    return ModelStore(settings.model_store_dir)


def cmd_predict(args: argparse.Namespace) -> int:
    """Classify files with the deployed model; reads only the model store, never DuckDB."""
    from mri_assets.core.images import ImageRejected, decode_image
    from mri_assets.core.inference import predict_probabilities

    settings = Settings.from_env()
    store = open_store(settings)
    deployed = store.deployed()
    if deployed is None:
        print(
            f"error: no model is deployed in {settings.model_store_dir}; materialize "
            "deployed_model in Dagster (or run `make dev`) first",
            file=sys.stderr,
        )
        return 2
    model, preprocessing = store.load_version(deployed["version"])
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    decoded: dict[str, object] = {}
    for path in args.files:
        try:
            decoded[path] = decode_image(Path(path).read_bytes(), settings.max_image_pixels).pixels
        except (OSError, ImageRejected) as error:
            decoded[path] = error
    readable = [path for path in args.files if not isinstance(decoded[path], Exception)]
    probabilities = dict(
        zip(
            readable,
            predict_probabilities(
                model, preprocessing, [decoded[p] for p in readable], device=settings.device
            ),
            strict=True,
        )
    )
    for path in args.files:  # answers come in the order the files were given
        if path not in probabilities:
            report_failure(path, decoded[path], args.json)
            continue
        scores = {
            name: round(float(p), 4) for name, p in zip(names, probabilities[path], strict=True)
        }
        label = max(scores, key=scores.get)
        if args.json:
            print(json.dumps({"path": path, "label": label, "scores": scores}))
        else:
            print(f"{path}\t{label}\t" + "\t".join(f"{k}={v:.4f}" for k, v in scores.items()))
    return 1 if len(readable) < len(args.files) else 0


def report_failure(path: str, error: Exception, as_json: bool) -> None:
    reason = getattr(error, "reason", None) or type(error).__name__
    detail = getattr(error, "detail", None) or str(error)
    if as_json:
        print(json.dumps({"path": path, "error": reason, "detail": detail}))
    print(f"error: {path}: {reason}: {detail}", file=sys.stderr)


def cmd_status(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    store = open_store(settings)
    deployed = store.deployed()
    if deployed is None:
        print(f"no model deployed yet (model store: {settings.model_store_dir})")
        return 0
    record = store.training_record(deployed["version"])
    print(f"deployed: {deployed['version']}")
    print(f"  ROC AUC {format_auc(deployed['auc'])} on test set {deployed['test_set_version']}")
    print(f"  since {deployed['deployed_at']} ({deployed['action']}): {deployed['reason']}")
    print(
        f"  trained on train set {record.get('train_set_version')} "
        f"({record.get('n_train')} images, strategy {record.get('config', {}).get('strategy')}, "
        f"best epoch {record.get('best_epoch')})"
    )
    print("history (newest first):")
    for entry in reversed(store.deployment_history()):
        print(
            f"  {entry['deployed_at']}  {entry['action']:<8} {entry['version']}  "
            f"AUC {format_auc(entry['auc'])}"
        )
    return 0


def format_auc(auc: float | None) -> str:
    return "n/a" if auc is None else f"{auc:.4f}"


def cmd_rollback(args: argparse.Namespace) -> int:
    """Point the deployment back at an earlier version, then mirror it into DuckDB."""
    from mri_assets.core.store import ModelStoreError

    settings = Settings.from_env()
    store = open_store(settings)
    try:
        entry = store.rollback(args.version)
    except ModelStoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"rolled back: {entry['version']} is deployed")
    mirror_deployments(settings, store)
    return 0


def mirror_deployments(settings: Settings, store) -> None:
    """Best effort: a busy DuckDB file is caught up by the next deployed_model run instead."""
    import duckdb

    from mri_assets.core.catalog import exclusive_lock, sync_deployments

    path = settings.duckdb_path
    try:
        with exclusive_lock(path), duckdb.connect(str(path)) as conn:
            added = sync_deployments(conn, store.deployment_history())
        print(f"recorded {added} deployment row(s) in {path}")
    except duckdb.Error as error:
        print(f"note: DuckDB not updated now ({error}); the next deployed_model run records it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mri-assets", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    make = commands.add_parser("make-dataset", help="write a synthetic MRI data set to a folder")
    make.add_argument("out", help="folder to write train/ and test/ into")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--glioma", type=int, default=346, help="number of gliomas (default 346)")
    make.add_argument(
        "--meningioma", type=int, default=329, help="number of meningiomas (default 329)"
    )
    make.add_argument("--test-fraction", type=float, default=0.25)
    make.add_argument("--size", type=int, default=256, help="image side in pixels")
    add_variation_option(make)
    make.add_argument("--quiet", action="store_true", help="no progress bar")
    make.set_defaults(run=cmd_make_dataset)

    upload = commands.add_parser("upload", help="copy a folder tree into the landing zone")
    upload.add_argument("source")
    upload.add_argument(
        "--landing", help="local folder or s3://bucket/prefix (default MRI_LANDING)"
    )
    upload.add_argument("--quiet", action="store_true")
    upload.set_defaults(run=cmd_upload)

    seed = commands.add_parser(
        "seed-landing", help="land the default generated data set unless the landing zone has scans"
    )
    seed.add_argument("--landing", help="local folder or s3://bucket/prefix (default MRI_LANDING)")
    seed.add_argument("--seed", type=int, default=0)
    add_variation_option(seed)
    seed.add_argument("--quiet", action="store_true")
    seed.set_defaults(run=cmd_seed_landing)

    predict = commands.add_parser("predict", help="classify image files with the deployed model")
    predict.add_argument("files", nargs="+", metavar="FILE")
    predict.add_argument("--json", action="store_true", help="one JSON object per line")
    predict.set_defaults(run=cmd_predict)

    status = commands.add_parser("status", help="the deployed model, its metrics and history")
    status.set_defaults(run=cmd_status)

    rollback = commands.add_parser("rollback", help="deploy an earlier model version again")
    rollback.add_argument(
        "version", nargs="?", help="default: the version deployed before the current one"
    )
    rollback.set_defaults(run=cmd_rollback)
    return parser


def add_variation_option(parser: argparse.ArgumentParser) -> None:
    # The names are phantoms.VARIATIONS' keys, spelled out so that --help needs no numpy import.
    parser.add_argument(
        "--variation",
        choices=("default", "hard"),
        default="default",
        help="`default`: the data set the tests and benchmarks use; `hard`: slices that vary "
        "more (rotations up to 20 degrees, flips, contrast gamma, noise, bias, overlapping "
        "lesions, RGB/RGBA/palette files)",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
