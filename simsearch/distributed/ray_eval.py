"""`simsearch eval --ray`: one Ray task per category, each the very `evaluate_category` a local run
calls (a fresh index in a temporary folder on the worker, its threshold folds, its test images), so the
JSON is the same. Dataset paths (and --workdir, if given) must be readable on every worker node."""
from __future__ import annotations

import os
from typing import Iterator

from .cluster import largest_node_cpus, ray_session


def _evaluate(category, threads: int, options: dict):
    os.environ["SIMSEARCH_THREADS"] = str(threads)  # the CPUs Ray gave this task
    from ..evaluation.runner import evaluate_category
    return evaluate_category(category, **options)


def evaluate_on_ray(address: str | None, categories: list, **options) -> Iterator:
    """CategoryResults of `categories` (evaluation.datasets.Category), in their order, computed as Ray tasks
    all submitted at once. `options`: evaluate_category's keywords (progress is not sent: it stays local)."""
    options.pop("progress", None)
    with ray_session(address) as ray:
        node_cpus = largest_node_cpus(ray)
        threads = max(1, node_cpus // max(1, min(len(categories), node_cpus)))
        task = ray.remote(num_cpus=threads, max_retries=2)(_evaluate)  # a lost worker's category runs again
        pending = [task.remote(category, threads, options) for category in categories]
        for ref in pending:
            yield ray.get(ref)
