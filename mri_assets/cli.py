"""The ``mri-assets`` command: make data, upload it, and use the deployed model."""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mri_assets.core.calibration import Temperature, not_recorded
from mri_assets.core.store import ModelStore, ModelStoreError
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


def open_store(settings: Settings) -> ModelStore:
    """The model store: local, or in the MRI_STORE bucket with the local folder as its cache."""
    return ModelStore(settings.model_store_dir, settings.remote("models"))


def cmd_predict(args: argparse.Namespace) -> int:
    """Classify files with the deployed model; reads only the model store, never DuckDB.

    Probabilities are calibrated (the version's temperature); each answer carries the
    out-of-distribution score and flag, or says why the version has none."""
    from mri_assets.core.images import ImageRejected, decode_image
    from mri_assets.core.serving import ServedModel

    settings = Settings.from_env()
    store = open_store(settings)
    deployed = store.deployed()
    if deployed is None:
        print(
            f"error: no model is deployed in {store.location}; materialize "
            "deployed_model in Dagster (or run `make dev`) first",
            file=sys.stderr,
        )
        return 2
    served = ServedModel.load(store, deployed["version"])
    decoded: dict[str, object] = {}
    for path in args.files:
        try:
            decoded[path] = decode_image(Path(path).read_bytes(), settings.max_image_pixels).pixels
        except (OSError, ImageRejected) as error:
            decoded[path] = error
    readable = [path for path in args.files if not isinstance(decoded[path], Exception)]
    scores = served.score([decoded[p] for p in readable], device=settings.device)
    answers = {path: prediction_answer(served, scores, row) for row, path in enumerate(readable)}
    explained = explain_to(args.explain, served, readable, decoded, answers, settings.device)
    note_missing_statistics(served)
    for path in args.files:  # answers come in the order the files were given
        if path not in answers:
            report_failure(path, decoded[path], args.json)
            continue
        answer = {**answers[path], **({"saliency": explained[path]} if path in explained else {})}
        if args.json:
            print(json.dumps({"path": path, **answer}))
        else:
            print(f"{path}\t{answer['label']}\t" + "\t".join(text_cells(answer)))
    return 1 if len(readable) < len(args.files) else 0


def prediction_answer(served, scores, row: int) -> dict:
    """What predict says about one image: label, calibrated scores, OOD score and flag."""
    probabilities = {
        name: round(float(p), 4)
        for name, p in zip(served.class_names, scores.probabilities[row], strict=True)
    }
    answer = {
        "label": max(probabilities, key=probabilities.get),
        "scores": probabilities,
        "model_version": served.version,
    }
    if scores.ood_scores is None:
        answer.update(ood_score=None, ood_flag=None)
    else:
        answer.update(
            ood_score=round(float(scores.ood_scores[row]), 3),
            ood_flag=bool(scores.ood_flags[row]),
            ood_threshold=round(served.statistics.ood.threshold, 3),
        )
    return answer


def text_cells(answer: dict) -> list[str]:
    cells = [f"{name}={p:.4f}" for name, p in answer["scores"].items()]
    if answer["ood_score"] is None:
        cells.append("ood=n/a")
    else:
        verdict = "OUT-OF-DISTRIBUTION" if answer["ood_flag"] else "in-distribution"
        cells.append(f"ood={answer['ood_score']:.2f}/{answer['ood_threshold']:.2f} {verdict}")
    if "saliency" in answer:
        cells.append(f"saliency={answer['saliency']}")
    return cells


def note_missing_statistics(served) -> None:
    """Say once, on stderr, when the deployed version serves without calibration or OOD."""
    statistics = served.statistics
    if statistics.temperature.reason:
        print(
            f"note: probabilities not calibrated: {statistics.temperature.reason}", file=sys.stderr
        )
    if statistics.ood is None:
        print(f"note: no out-of-distribution score: {statistics.ood_unavailable}", file=sys.stderr)


def explain_to(out_dir, served, readable, decoded, answers, device) -> dict[str, str]:
    """With --explain: a Grad-CAM overlay per readable file in ``out_dir``; path -> PNG path."""
    from mri_assets.core.saliency import grad_cam, overlay_png

    if not out_dir or not readable:
        return {}
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    images = [decoded[path] for path in readable]
    predicted = [served.class_names.index(answers[path]["label"]) for path in readable]
    maps = grad_cam(served.model, served.preprocessing, images, predicted, device=device)
    written = {}
    for number, (path, image, saliency) in enumerate(zip(readable, images, maps, strict=True)):
        # Numbered, so two inputs with one file name (a/x.png, b/x.png) do not collide.
        target = folder / f"{number + 1:04d}-{Path(path).stem}.gradcam.png"
        target.write_bytes(overlay_png(image, saliency))
        written[path] = str(target)
    return written


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
        print(f"no model deployed yet (model store: {store.location})")
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
    for line in served_statistics(deployed["version"], record):
        print(f"  {line}")
    print("history (newest first):")
    for entry in reversed(store.deployment_history()):
        print(
            f"  {entry['deployed_at']}  {entry['action']:<8} {entry['version']}  "
            f"AUC {format_auc(entry['auc'])}"
        )
    return 0


def served_statistics(version: str, record: dict) -> list[str]:
    """What `predict` and `predictions` apply to this version's scores, as its training record
    stores it (core/serving.ModelStatistics.to_record): the temperature and the OOD threshold."""
    missing = not_recorded(version)
    temperature = Temperature.from_record(record.get("calibration"), missing)
    if temperature.reason:
        calibration = f"none (temperature 1): {temperature.reason}"
    else:
        calibration = (
            f"temperature {temperature.value:.4g}, fitted on {temperature.fitted_on} "
            "validation images"
        )
    ood = record.get("ood") or {}
    if ood.get("available"):
        flag = (
            f"Mahalanobis distance above {ood['threshold']:.4g} (the {ood['percentile']:g}th "
            f"percentile of {ood['fitted_on']} out-of-fold train and validation scores)"
        )
    else:
        flag = f"none: {ood.get('reason') or missing}"
    return [f"calibration: {calibration}", f"out-of-distribution flag: {flag}"]


def format_auc(auc: float | None) -> str:
    return "n/a" if auc is None else f"{auc:.4f}"


def cmd_rollback(args: argparse.Namespace) -> int:
    """Point the deployment back at an earlier version, then mirror it into DuckDB."""
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
    """Best effort: a busy or unreachable catalogue is caught up by the next deployed_model run."""
    import duckdb

    from mri_assets.core import warehouse
    from mri_assets.core.catalog import sync_deployments

    try:
        with warehouse.connect(settings.catalog, settings.duckdb_path) as conn:
            added = sync_deployments(conn, store.deployment_history())
        where = settings.catalog.describe() if settings.catalog.shared else settings.duckdb_path
        print(f"recorded {added} deployment row(s) in {where}")
    except (duckdb.Error, warehouse.CatalogueUnavailable) as error:
        print(f"note: catalogue not updated now ({error}); the next deployed_model run records it")


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
    predict.add_argument(
        "--explain",
        metavar="OUT_DIR",
        help="write a Grad-CAM overlay (what the prediction looked at) per file into OUT_DIR",
    )
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
    try:
        return args.run(args)
    except Exception as error:
        if not isinstance(error, ModelStoreError):
            raise
        # An unreachable MRI_STORE, a lost race: the message says what to do; no traceback.
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
