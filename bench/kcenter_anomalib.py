"""Time anomalib's KCenterGreedy on a saved (N, D) float32 .npy, for bench/perf.py's coreset step.

Runs in bench/.venv-anomalib:  bench/.venv-anomalib/bin/python bench/kcenter_anomalib.py VECTORS.npy RATIO
Prints one JSON line: seconds (projection + selection, as anomalib's PatchCore runs it), the number
selected, the selected positions and torch's thread count.
"""
from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # the sampler draws a tqdm bar per pick

import numpy as np
import torch
from anomalib.models.components.sampling import KCenterGreedy


def main() -> None:
    path, ratio = sys.argv[1], float(sys.argv[2])
    vectors = torch.from_numpy(np.load(path).astype(np.float32))
    torch.manual_seed(0)
    start = time.perf_counter()
    indices = KCenterGreedy(embedding=vectors, sampling_ratio=ratio).select_coreset_idxs()
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "selected": len(indices), "indices": [int(i) for i in indices],
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
