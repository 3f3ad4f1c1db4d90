"""`simsearch` command line: a thin layer over `Engine` (typer + rich).

Results go to stdout (one JSON object per line with --json); progress and messages go to stderr.
The exit code is 0 unless something failed (an anomaly is a result, not an error).
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.text import Text

from .errors import BadInput, SimsearchError, exit_code
from .version import __version__

# The engine (faiss, OpenCV, SQLAlchemy) and the models (torch or ONNX Runtime) load inside the commands that
# use them, so that `simsearch --help`, `--version` and the like start at once.

# Plain (click) help: typer's rich panels label every flag as taking a value (`--json <bool>`), and cost start-up.
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Find defects by similarity to good images.")
index_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Build and inspect the index of good images.")
app.add_typer(index_app, name="index")
bundle_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                         help="Bundles: checksummed copies of an index for a line PC.")
app.add_typer(bundle_app, name="bundle")

# Paths and messages are printed as they are: never read as rich markup or emoji codes (`part[v2].png`,
# `[bold]part.png` and `a:smile:.png` are file names), never re-wrapped, never highlighted.
err = Console(stderr=True, soft_wrap=True, markup=False, emoji=False, highlight=False)
out = Console(soft_wrap=True, markup=False, emoji=False, highlight=False)

IndexDir = Annotated[Path, typer.Option("--index", envvar="SIMSEARCH_INDEX", help="Index directory.")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")]
FoldOrder = Annotated[str, typer.Option(help="With folds: 'capture' (contiguous runs in file-name order, so a fold "
                                             "is mostly one batch) or 'interleaved' (every K-th image).")]
RecalibrateFlag = Annotated[bool, typer.Option(help="Measure the calibration again on the new bank, in the same "
                                                    "commit (when the index is calibrated).")]
# Embedder options shared by `index add` (fixed at creation) and `eval` (for its fresh indexes).
BackboneOpt = Annotated[Optional[str], typer.Option(help="timm model name (default tf_efficientnet_lite1).")]
ScaleOpt = Annotated[Optional[float], typer.Option(help="A fixed resize factor before tiling, instead of the "
                                                   "short side (1.0 = native resolution).")]
ShortSideOpt = Annotated[Optional[int], typer.Option(help="Resize each image so its shorter side has this many "
                                                      "pixels (default 192).")]
TileSizeOpt = Annotated[Optional[int], typer.Option(help="Tile side in pixels, a multiple of 32 (default 256).")]
IndexKindOpt = Annotated[Optional[str], typer.Option(help="auto (exact below 200,000 patch vectors, then ivf-sq8), "
                                                      "flat, ivf-flat, ivf-sq8, ivf-pq or hnsw (the fastest queries "
                                                      "on a large bank; more memory than flat, slow to build and "
                                                      "to remove from).")]
NprobeOpt = Annotated[Optional[int], typer.Option(help="How widely an approximate bank searches: IVF lists per patch "
                                                  "(default: 2 x the square root of the number of lists, at least "
                                                  "32), or hnsw's efSearch (default 128).")]
TwoStageOpt = Annotated[Optional[str], typer.Option(help="Search in two stages (nearest reference images first, the "
                                                     "whole bank only for the patches that matter): auto (the "
                                                     "default: from 200,000 patch vectors), on or off.")]


LOG_LEVELS = ("debug", "info", "warning", "error")


def show_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"simsearch {__version__}\n")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=show_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    log_level: Annotated[str, typer.Option(help="Messages on stderr from this level up: debug, info, warning "
                                                "or error.")] = "info",
):
    """Find defects by similarity to good images."""
    import logging

    if log_level not in LOG_LEVELS:
        fail(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}", 2)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("simsearch")
    logger.handlers[:] = [handler]
    logger.setLevel(log_level.upper())
    logger.propagate = False


def say(kind: str, message: str, style: str = "yellow") -> None:
    """`kind: message` on stderr, only the kind coloured."""
    err.print(Text.assemble((f"{kind}:", style), " ", str(message)))


def fail(message: str, code: int = 1) -> None:
    say("error", message, "red")
    raise typer.Exit(code)


@contextmanager
def user_errors():
    """A SimsearchError becomes one line on stderr and the exit code errors.exit_code gives its class;
    anything else is a bug and keeps its traceback."""
    try:
        yield
    except SimsearchError as exc:
        fail(str(exc), exit_code(exc))


@contextmanager
def staged_progress(prefix: str = ""):
    """Progress bars on stderr (only on a terminal), one per stage: update(stage, done, total), the engine's
    progress convention (records.Progress)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal) as bar:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(f"{prefix}{stage}", total=total)
            bar.update(tasks[stage], completed=done, total=total)
        yield update


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


@index_app.command("add")
def index_add(
    paths: Annotated[list[str], typer.Argument(help="Image files, folders (recursive) or globs.")],
    index: IndexDir = Path("index"),
    holdout: Annotated[float, typer.Option(help="Fraction kept out of the bank for calibration.")] = 0.0,
    coreset: Annotated[Optional[float], typer.Option(help="Keep this fraction of new patch vectors.")] = None,
    backbone: BackboneOpt = None,
    weights: Annotated[Optional[str], typer.Option(help="Local weights file: .safetensors or .pth, or a head "
                                                        "from `simsearch finetune` (told apart by its metadata).")] = None,
    scale: ScaleOpt = None,
    short_side: ShortSideOpt = None,
    tile_size: TileSizeOpt = None,
    tile_stride: Annotated[Optional[int], typer.Option(help="Tile step in pixels.")] = None,
    dims: Annotated[Optional[int], typer.Option(help="Reduce patch vectors to this many dimensions.")] = None,
    index_kind: IndexKindOpt = None,
    nprobe: NprobeOpt = None,
    two_stage: TwoStageOpt = None,
    recalibrate: RecalibrateFlag = True,
    ray: Annotated[Optional[str], typer.Option("--ray", help="Embed on a Ray cluster: 'local' (this machine's "
                                                             "cores) or its address (ray://HOST:10001). Needs "
                                                             "simsearch[ray]; workers read the same paths.")] = None,
    ray_actors: Annotated[Optional[int], typer.Option(help="With --ray: embedding actors (default: one per CPU "
                                                          "of the largest node).")] = None,
    as_json: JsonFlag = False,
):
    """Add good images to the bank (creates the index on first use)."""
    from .engine import Engine

    options = {k: v for k, v in dict(backbone=backbone, weights=weights, scale=scale, short_side=short_side,
                                     tile_size=tile_size, tile_stride=tile_stride, dims=dims, index_kind=index_kind,
                                     nprobe=nprobe, two_stage=two_stage).items()
               if v is not None}
    dir_existed, index_existed = index.exists(), Engine.exists(index)
    try:
        with user_errors():
            with Engine.open_or_create(index, **options) as engine, staged_progress() as update:
                embedding = None
                if ray is not None:
                    from .distributed.ray_ingest import RayEmbedding
                    embedding = RayEmbedding.for_index(engine, ray, ray_actors)
                report = engine.add(paths, holdout=holdout, coreset=coreset, progress=update, recalibrate=recalibrate,
                                    embedding=embedding)
    except typer.Exit:
        if not index_existed:  # a first add that failed leaves no empty index behind
            Engine.discard_new(index, remove_directory=not dir_existed)
        raise
    if as_json:
        emit_json({"added": report.added, "held_out": report.held_out,
                   "skipped": [{"path": p, "reason": r} for p, r in report.skipped],
                   "vectors_added": report.vectors_added, "generation": report.generation,
                   "calibration": report.calibration})
        return
    out.print(f"added {len(report.added)} images ({report.vectors_added} patch vectors), "
              f"held out {len(report.held_out)} for calibration, skipped {len(report.skipped)}; "
              f"bank generation {report.generation}")
    for path, reason in report.skipped:
        out.print(f"  skipped {path}: {reason}")
    if report.calibration:
        say("warning", f"calibration: {report.calibration}")


def on_index(index: Path, action):
    """Open the index, run `action(engine)` and return its result; user errors become one line."""
    from .engine import Engine

    with user_errors():
        with Engine.open(index) as engine:
            return action(engine)


@index_app.command("info")
def index_info(index: IndexDir = Path("index"), as_json: JsonFlag = False):
    """Show the index's configuration, contents and calibration."""
    info = on_index(index, lambda engine: engine.info())
    if as_json:
        emit_json(info)
        return
    width = max(map(len, info))
    for key, value in info.items():  # plain lines: a table would cut a long path short, or wrap it
        if key == "config":
            value = ", ".join(f"{k}={v}" for k, v in value.items() if k != "extra")
        elif key == "calibration" and value:
            value = (f"#{value['id']}: image threshold {value['image_threshold']:.4g}, pixel threshold "
                     f"{value['pixel_threshold']:.4g}, {value['n_good']} good images; {value['method']}")
        out.print(f"{key:<{width}}  {value}")


ImageRefs = Annotated[list[str], typer.Argument(help="Image paths or sha256 (prefix of >= 8).")]


def print_removal(result: dict, as_json: bool, what: str) -> None:
    if as_json:
        emit_json(result)
        return
    out.print(f"{what} {len(result['held_out' if what == 'held out' else 'removed'])} images "
              f"({result['vectors_removed']} vectors left the bank); bank generation {result['generation']}")
    if result["calibration"]:
        say("warning", f"calibration: {result['calibration']}")


@index_app.command("remove")
def index_remove(refs: ImageRefs, index: IndexDir = Path("index"), recalibrate: RecalibrateFlag = True,
                 as_json: JsonFlag = False):
    """Remove images (their vectors and rows go together)."""
    print_removal(on_index(index, lambda engine: engine.remove(refs, recalibrate=recalibrate)), as_json, "removed")


@index_app.command("holdout")
def index_holdout(refs: ImageRefs, index: IndexDir = Path("index"), recalibrate: RecalibrateFlag = True,
                  as_json: JsonFlag = False):
    """Move bank images into the calibration set (out of the bank, kept to calibrate on)."""
    print_removal(on_index(index, lambda engine: engine.hold_out(refs, recalibrate=recalibrate)), as_json,
                  "held out")


@index_app.command("check")
def index_check(index: IndexDir = Path("index"), as_json: JsonFlag = False):
    """Compare the catalog with the FAISS files; exit 1 if they disagree. Changes nothing."""
    report = on_index(index, lambda engine: engine.check())
    if as_json:
        emit_json(report)
    else:
        out.print(f"generation {report['generation']}: {report['catalog_vectors']} vectors in the catalog, "
                  f"{report['bank_vectors']} in the bank, {report['reference_images']} reference images")
        for problem in report["problems"]:
            out.print(f"  problem: {problem}")
        out.print("consistent" if report["ok"] else "inconsistent: run `simsearch index repair`")
    if not report["ok"]:
        raise typer.Exit(1)


@index_app.command("repair")
def index_repair(index: IndexDir = Path("index"), as_json: JsonFlag = False):
    """Make the FAISS files agree with the catalog (re-embedding from the image files where needed)."""
    from .engine import Engine

    with user_errors():
        with Engine.open(index) as engine, staged_progress() as update:
            result = engine.repair(progress=update)
    if as_json:
        emit_json(result)
    else:
        for action in result["actions"] or ["nothing to repair"]:
            out.print(action)
        out.print("consistent" if result["after"]["ok"] else
                  "still inconsistent: " + "; ".join(result["after"]["problems"]))
    if not result["after"]["ok"]:
        raise typer.Exit(1)


@app.command()
def calibrate(
    good: Annotated[Optional[list[str]], typer.Argument(help="Good images NOT in the bank (default: the "
                                                             "calibration images: held out, or given before).")] = None,
    index: IndexDir = Path("index"),
    folds: Annotated[Optional[int], typer.Option(help="Calibrate on the bank itself: each of K folds of its images "
                                                      "scored against the bank without them.")] = None,
    fold_order: FoldOrder = "capture",
    target_fpr: Annotated[float, typer.Option(help="Target false-positive rate on good parts.")] = 0.01,
    defects: Annotated[Optional[list[str]], typer.Option(help="Labelled defective images (F1 threshold).")] = None,
    min_region_area: Annotated[Optional[int], typer.Option(help="Smallest region in pixels.")] = None,
    as_json: JsonFlag = False,
):
    """Choose thresholds (and the limits of the foreign-image check) from good images outside the bank, or
    from folds of the bank (--folds)."""
    from .engine import Engine

    with user_errors():
        with Engine.open(index) as engine, staged_progress() as update:
            cal = engine.calibrate(good or None, folds=folds, target_fpr=target_fpr, defects=defects or None,
                                   min_region_area=min_region_area, progress=update, fold_order=fold_order)
    if as_json:
        emit_json(vars(cal))
        return
    out.print(f"calibration #{cal.id} on {cal.n_good} good images (bank generation {cal.generation})")
    out.print(f"  image threshold {cal.image_threshold:.4f}  pixel threshold {cal.pixel_threshold:.4f}  "
              f"min region {cal.min_region_area} px")
    out.print(f"  {cal.method}")
    if cal.fold_spread:
        spread = cal.fold_spread
        out.print(f"  per fold: thresholds {min(spread['thresholds']):.4f} to {max(spread['thresholds']):.4f}, "
                  f"good images above the threshold {100 * min(spread['false_alarms']):.1f}% to "
                  f"{100 * max(spread['false_alarms']):.1f}%")
    if cal.border_profile:
        rings = ", ".join(f"{f:.2f}" for f in cal.border_profile[:3])
        out.print(f"  border levels: good images scored {rings} x the interior on the outermost rings of patches; "
                  "image scores are divided by them there")
    if cal.f1_threshold is not None:
        out.print(f"  F1-best threshold on {cal.n_defect} defective + {cal.n_good} good images: "
                  f"{cal.f1_threshold:.4f} (F1 {cal.f1:.3f}); verdicts use the target-rate threshold")


VERDICTS = {None: "-", True: "ANOMALOUS", False: "ok"}


def verdict_word(result) -> str:
    """ANOMALOUS / ok, FOREIGN for an image unlike the bank's (no verdict), - without a calibration."""
    return "FOREIGN" if result.comparable is False else VERDICTS[result.is_anomalous]


@app.command()
def query(
    images: Annotated[list[str], typer.Argument(help="Image files, folders (recursive) or globs.")],
    index: IndexDir = Path("index"),
    heatmap_dir: Annotated[Optional[Path], typer.Option(help="Write a heatmap overlay PNG per image here.")] = None,
    as_json: JsonFlag = False,
):
    """Score images against the bank: verdict, score, regions and their nearest good patches."""
    from .engine import Engine
    from .images import expand_paths, load_image
    from .records import query_record
    from .report import write_heatmap

    failures = 0
    taken: set[str] = set()
    files: list[str] = []  # each input expanded on its own: a missing file is reported, the rest answered
    for item in images:
        try:
            found, skipped = expand_paths([item])
        except SimsearchError as exc:
            failures = max(failures, exit_code(exc))
            say("error", exc, "red")
            continue
        files += found
        for path, reason in skipped:
            say("skipped", f"{path}: {reason}")
    with user_errors():
        if not files and not failures:
            raise BadInput(f"no image files in {', '.join(images)}")
        engine = Engine.open(index)
    with engine:
        _cal, warning = engine.current_calibration()
        if warning:
            say("warning", warning)
        if not as_json:
            out.print("verdict     score  similarity  regions  image")
        for path in files:
            try:
                img = load_image(path)
                result = engine.query(img)
                if heatmap_dir is not None:
                    result.heatmap = write_heatmap(result, img.rgb, heatmap_dir, result.pixel_threshold, taken)
            except SimsearchError as exc:
                failures = max(failures, exit_code(exc))
                say("error", exc, "red")
                continue
            if as_json:
                emit_json(query_record(result))
            else:
                sim = "-" if result.similarity is None else f"{result.similarity:.3f}"
                out.print(f"{verdict_word(result):<9} {result.score:8.4f}  {sim:>10}  {len(result.regions):>7}  "
                          f"{result.image}")
                if result.comparable is False:
                    say("foreign", f"{result.image}: {result.warning}")
    if failures:
        raise typer.Exit(failures)


@app.command()
def watch(
    folder: Annotated[Path, typer.Argument(help="The hot folder: images dropped here (or below) are scored.")],
    out_file: Annotated[Path, typer.Option("--out", help="JSON-lines output: one line per image, appended.")],
    index: IndexDir = Path("index"),
    move_to: Annotated[Optional[Path], typer.Option(help="Move each image here once its line is written.")] = None,
    settle: Annotated[float, typer.Option(help="Seconds a file's size and mtime must stay unchanged before it is "
                                               "read (a writer may still be at it).")] = 0.5,
    poll: Annotated[bool, typer.Option(help="Poll the folder instead of waiting for OS events (network shares "
                                            "send none).")] = False,
):
    """Score each image dropped into FOLDER once, as `query --json` would, into --out; stop with Ctrl-C or
    SIGTERM. A restart scores only what --out does not hold yet."""
    from .engine import Engine
    from .watch import OutputLog, Watcher, check_arguments, stop_on_signals

    with user_errors():
        check_arguments(folder, move_to, settle)
        engine = Engine.open(index)
    with engine, user_errors():
        _cal, warning = engine.current_calibration()
        if warning:
            say("warning", warning)
        output = OutputLog(out_file)
        try:
            watcher = Watcher(engine, folder, output, move_to=move_to, settle=settle, poll=poll)
            err.print(f"watching {watcher.folder} into {output.path} ({len(output.done)} images already there); "
                      "Ctrl-C to stop")
            with stop_on_signals() as stop:
                try:
                    watcher.run(stop)
                finally:
                    err.print(watcher.tally.summary(output.path))
        finally:
            output.close()


@app.command()
def search(
    image: Annotated[str, typer.Argument(help="Image to look up.")],
    index: IndexDir = Path("index"),
    top_k: Annotated[int, typer.Option(help="How many reference images.")] = 5,
    as_json: JsonFlag = False,
):
    """The reference images most similar to IMAGE overall: the cosine of their pooled (mean) patch vectors
    (1 = the same look) and the L2 distance between them. Not query's similarity, which compares patches."""
    from .engine import Engine

    with user_errors():
        with Engine.open(index) as engine:
            hits = engine.search(image, top_k)
    if as_json:
        emit_json({"image": image, "results": hits})
        return
    out.print("  cosine  distance  reference image")
    for hit in hits:
        out.print(f"{hit['cosine']:8.4f}  {hit['distance']:8.4f}  {hit['image']}")


@app.command("export")
def export_command(
    out_dir: Annotated[Path, typer.Option("--out", help="The bundle folder to write (must not exist).")],
    index: IndexDir = Path("index"),
    as_json: JsonFlag = False,
):
    """Write a bundle: the index with its ONNX model and a manifest of checksums, for `simsearch query` on a
    line PC without torch (see README, "Deploying to a line PC")."""
    from . import bundle

    manifest = on_index(index, lambda engine: bundle.export(engine, out_dir))
    total = sum(f["bytes"] for f in manifest["files"].values())
    if as_json:
        emit_json({"bundle": str(out_dir), **manifest})
        return
    out.print(f"wrote {out_dir}: {len(manifest['files'])} files, {total / 2**20:.1f} MiB, fingerprint "
              f"{manifest['fingerprint']}, bank generation {manifest['generation']}", markup=False)


@bundle_app.command("verify")
def bundle_verify(bundle_dir: Annotated[Path, typer.Argument(help="The bundle folder.")], as_json: JsonFlag = False):
    """Check every file of a bundle against its manifest; exit 3 (damaged) naming the first that differs."""
    from . import bundle

    with user_errors():
        manifest = bundle.verify(bundle_dir)
    if as_json:
        emit_json({"bundle": str(bundle_dir), "ok": True, "files": len(manifest["files"]),
                   "fingerprint": manifest["fingerprint"], "generation": manifest["generation"]})
        return
    out.print(f"{bundle_dir}: {len(manifest['files'])} files match the manifest (fingerprint "
              f"{manifest['fingerprint']}, bank generation {manifest['generation']})", markup=False)


@app.command("finetune")
def finetune_command(
    goods: Annotated[list[str], typer.Argument(help="Good images: files, folders (recursive) or globs.")],
    out_file: Annotated[Path, typer.Option("--out", help="The head file to write (.safetensors).")],
    defects: Annotated[Optional[list[str]], typer.Option(help="Labelled defective images (repeatable), each with "
                                                              "a mask: MVTec's ground_truth/<defect>/<stem>_mask.png "
                                                              "or <stem>_mask.png beside it.")] = None,
    loss: Annotated[str, typer.Option(help="triplet (batch-hard) or softmax (normalised softmax, good vs "
                                           "defect cells).")] = "triplet",
    steps: Annotated[int, typer.Option(help="Training steps.")] = 200,
    batch: Annotated[int, typer.Option(help="Good crops per step (each with a shifted twin and a defective copy).")] = 8,
    crop: Annotated[int, typer.Option(help="Crop side in pixels at the index's scale, a multiple of 32.")] = 128,
    margin: Annotated[float, typer.Option(help="Triplet margin, in units of the typical good-to-good distance.")] = 0.5,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Random seed: the same inputs and seed give the same file.")] = 0,
    backbone: BackboneOpt = None,
    weights: Annotated[Optional[str], typer.Option(help="Base backbone weights file (default: the embedded "
                                                        "ones).")] = None,
    scale: ScaleOpt = None,
    short_side: ShortSideOpt = None,
    as_json: JsonFlag = False,
):
    """Fine-tune a projection head on good images (off by default; see README). Use it with
    `simsearch index add GOOD... --weights OUT` on a new index."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as RichProgress

    from .embedders import require_torch
    with user_errors():
        require_torch("`simsearch finetune`")
    from .finetune import FinetuneSettings, finetune_files

    embedder = {k: v for k, v in dict(scale=scale, short_side=short_side).items() if v is not None}
    with user_errors():
        settings = FinetuneSettings(loss=loss, steps=steps, batch=batch, crop=crop, margin=margin, lr=lr, seed=seed)
        with RichProgress(TextColumn("fine-tuning"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), console=err, transient=True,
                          disable=not err.is_terminal) as bar:
            task = bar.add_task("fine-tuning", total=steps, loss="-")
            info, trained = finetune_files(
                goods, out_file, defects=defects or (), settings=settings, backbone=backbone, weights=weights,
                progress=lambda done, total, value: bar.update(task, completed=done, loss=f"{value:.4f}"),
                **embedder)
    tail = trained.losses[-max(1, len(trained.losses) // 10):]
    record = {"out": str(out_file), "sha256": info.sha256, "loss": loss, "steps": steps, "seed": seed,
              "seconds": round(trained.seconds, 2), "first_loss": trained.losses[0],
              "final_loss_mean": float(sum(tail) / len(tail)), "images": info.training["images"],
              "real_defect_images": info.training["real_defect_images"], "base_fingerprint": info.base_fingerprint,
              "defects_seen": trained.kinds_seen}
    if as_json:
        emit_json(record)
        return
    out.print(f"wrote {out_file}: {loss} head on {record['images']} good images"
              + (f" and {record['real_defect_images']} labelled defective ones" if record["real_defect_images"] else "")
              + f", {steps} steps in {record['seconds']:.1f} s; loss {record['first_loss']:.4f} at the first step, "
                f"{record['final_loss_mean']:.4f} over the last {len(tail)}")
    out.print(f"use it on a new index: simsearch index add GOOD... --weights {out_file} --index NEW_DIR")


@app.command("eval")
def eval_command(
    dataset: Annotated[Path, typer.Argument(help="MVTec-layout folder (or one category folder).")],
    category: Annotated[Optional[list[str]], typer.Option(help="Only these categories (repeatable).")] = None,
    method: Annotated[str, typer.Option(help="patchcore (the engine), histogram-iforest, pooled-ocsvm, "
                                             "image-knn, autoencoder, vae or ganomaly.")] = "patchcore",
    folds: Annotated[int, typer.Option(help="Folds for the threshold from train/good.")] = 5,
    fold_order: FoldOrder = "capture",
    target_fpr: Annotated[float, typer.Option(help="Target false-positive rate for the threshold.")] = 0.01,
    report: Annotated[Optional[Path], typer.Option(help="Write report.html (plots, per-defect rows, worst-case "
                                                        "overlays), report.md and images.csv here.")] = None,
    scale: ScaleOpt = None,
    short_side: ShortSideOpt = None,
    tile_size: TileSizeOpt = None,
    backbone: BackboneOpt = None,
    index_kind: IndexKindOpt = None,
    nprobe: NprobeOpt = None,
    two_stage: TwoStageOpt = None,
    coreset: Annotated[Optional[float], typer.Option(help="Keep this fraction of train/good's patch vectors "
                                                      "(greedy k-center coreset).")] = None,
    workdir: Annotated[Optional[Path], typer.Option(help="Where the temporary indexes go.")] = None,
    finetune: Annotated[bool, typer.Option("--finetune", help="Fine-tune a head on each category's train/good "
                                                             "(never on test images) and evaluate with it.")] = False,
    ray: Annotated[Optional[str], typer.Option("--ray", help="Run the categories as Ray tasks: 'local' or a "
                                                             "cluster address (needs simsearch[ray]).")] = None,
    finetune_loss: Annotated[str, typer.Option(help="With --finetune: triplet or softmax.")] = "triplet",
    finetune_steps: Annotated[int, typer.Option(help="With --finetune: training steps.")] = 200,
    finetune_seed: Annotated[int, typer.Option(help="With --finetune: random seed.")] = 0,
    as_json: JsonFlag = False,
):
    """Measure accuracy on labelled data: a fresh index per category from train/good, every test image scored."""
    from .embedders import require_torch
    with user_errors():
        require_torch("`simsearch eval`")
    from .evaluation.datasets import category_names, load_category
    from .evaluation.runner import METHODS, evaluate_category, mean_row
    from .evaluation.report_page import write_eval_report
    from .report import eval_table_rows, markdown_table

    from .calibrator import check_fold_order
    if method not in METHODS:
        fail(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    with user_errors():
        check_fold_order(fold_order)
    tuning = None
    if finetune:
        if method != "patchcore":
            fail(f"--finetune applies to the engine (patchcore), not to {method}")
        from .finetune import FinetuneSettings
        with user_errors():
            tuning = FinetuneSettings(loss=finetune_loss, steps=finetune_steps, seed=finetune_seed)
    label = method if tuning is None else f"{method}, fine-tuned: {tuning.loss}, {tuning.steps} steps"
    settings = {k: v for k, v in dict(scale=scale, short_side=short_side, tile_size=tile_size,
                                      backbone=backbone, index_kind=index_kind, nprobe=nprobe,
                                      two_stage=two_stage).items()
                if v is not None}
    results = []
    with user_errors():
        names = category_names(dataset)
        unknown = sorted(set(category or []) - set(names))
        if unknown:
            raise BadInput(f"no such categories in {dataset}: {unknown}; found {names}")
        names = [n for n in names if not category or n in category]

        def evaluated():
            if ray is not None:  # every category at once, as Ray tasks; the results come back in order
                from .distributed.ray_eval import evaluate_on_ray
                yield from evaluate_on_ray(ray, [load_category(dataset, n) for n in names], method=method,
                                           settings=settings, folds=folds, target_fpr=target_fpr, workdir=workdir,
                                           finetune=tuning, coreset=coreset, fold_order=fold_order)
                return
            for position, name in enumerate(names, 1):
                cat = load_category(dataset, name)
                err.print(f"[{position}/{len(names)}] {name}: {len(cat.train)} train, {len(cat.test)} test images")
                with staged_progress(f"{name} ") as update:
                    yield evaluate_category(cat, method=method, settings=settings, folds=folds, target_fpr=target_fpr,
                                            workdir=workdir, progress=update, finetune=tuning, coreset=coreset,
                                            fold_order=fold_order)
        for result in evaluated():
            results.append(result)
            if as_json:
                emit_json(result.to_dict())
            else:
                err.print("  " + "  ".join(f"{k} {v}" for k, v in eval_table_rows([result])[0].items()
                                          if k != "category"))
    mean = mean_row(results)
    if as_json:
        emit_json({"category": "mean", "method": method, "finetune": None if tuning is None else
                   {"loss": tuning.loss, "steps": tuning.steps, "seed": tuning.seed}, **mean})
    else:
        out.print(f"simsearch eval: {dataset} ({label})")
        for line in markdown_table(eval_table_rows(results, mean)):
            out.print(line)
    if report is not None:
        written = write_eval_report(results, mean, report, title=f"simsearch eval: {dataset} ({label})")
        err.print(f"report: {written}")


@app.command()
def serve(
    index: Annotated[Optional[list[str]], typer.Option(
        "--index", help="NAME=DIR of an index to serve (repeatable); DIR alone is named after its folder. "
                        "Default: SIMSEARCH_INDEX or ./index, unless --root is given.")] = None,
    root: Annotated[Optional[Path], typer.Option(help="Serve every index folder inside this folder, by its name.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on; other than 127.0.0.1 only on purpose.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    token_file: Annotated[Optional[Path], typer.Option(help="File holding the token that writes (and, with "
                                                             "--auth-reads, reads) need; default: SIMSEARCH_TOKEN.")] = None,
    auth_reads: Annotated[bool, typer.Option(help="Require the token for queries and other reads too.")] = False,
    expose_paths: Annotated[bool, typer.Option(help="Show server paths of reference images in answers.")] = False,
    max_upload_mb: Annotated[float, typer.Option(help="Largest request body, in MiB.")] = 50.0,
    max_pixels: Annotated[int, typer.Option(help="Largest image, in pixels (checked before decoding).")] = 50_000_000,
    max_images: Annotated[int, typer.Option(help="Most images in one request.")] = 16,
    max_request_pixels: Annotated[int, typer.Option(help="Most pixels of all images in one request together.")
                                  ] = 100_000_000,
    allowed_host: Annotated[Optional[list[str]], typer.Option(
        help="A Host header value to answer (repeatable; '*': any). Default: localhost names, the --host address "
             "and, listening on every address, this machine's name.")] = None,
    workers: Annotated[int, typer.Option(help="Worker processes (each loads each model once).")] = 1,
):
    """Serve indexes over HTTP (API under /v1, OpenAPI at /docs) with the inspection dashboard at /dashboard/."""
    from .engine import Engine

    try:
        from .server.app import ServerSettings
        from .server.app import serve as run_server
    except ImportError as exc:
        fail(f"`simsearch serve` needs the serve extra ({exc.name} is missing): pip install 'simsearch[serve]'")
    named: dict[str, str] = {}
    if not index and root is None:
        index = [os.environ.get("SIMSEARCH_INDEX", "index")]
    for item in index or []:
        name, _, directory = item.rpartition("=")
        directory = Path(directory)
        name = name or directory.resolve().name
        if name in named:
            fail(f"two indexes are named {name!r}; name them with NAME=DIR")
        named[name] = str(directory.resolve())
        if not Engine.exists(directory):
            say("warning", f"{directory} holds no index yet; {name!r} answers 503 until one is built there")
    if root is not None and not root.is_dir():
        fail(f"{root}: no such folder")
    hosts = allowed_host or ["127.0.0.1", "localhost", "::1", host]
    if not allowed_host and host in ("0.0.0.0", "::"):  # every address: this machine's own names too
        import socket
        hosts += [socket.gethostname(), socket.getfqdn()]
    settings = ServerSettings(indexes=named, root=str(root.resolve()) if root else None,
                              token_file=str(token_file) if token_file else None, auth_reads=auth_reads,
                              expose_paths=expose_paths, max_upload_bytes=int(max_upload_mb * 2**20),
                              max_pixels=max_pixels, max_images=max_images, max_request_pixels=max_request_pixels,
                              allowed_hosts=tuple(dict.fromkeys(hosts)))
    with user_errors():
        token = settings.token()
    if token is None and auth_reads:
        fail("--auth-reads needs a token: set SIMSEARCH_TOKEN or give --token-file")
    if token is None:
        say("note", "no token (SIMSEARCH_TOKEN or --token-file): writes are disabled")
    if host not in ("127.0.0.1", "localhost", "::1") and (token is None or not auth_reads):
        say("warning", f"listening on {host} with reads open to anyone who can reach it (--auth-reads requires the "
                       "token for them)")
    err.print(f"dashboard: http://{host}:{port}/dashboard/   API docs: http://{host}:{port}/docs")
    with user_errors():
        run_server(settings, host=host, port=port, workers=workers)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
