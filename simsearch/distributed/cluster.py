"""Connecting to Ray: `local` starts a cluster on this machine's cores, anything else is an address
(`ray://HOST:10001` for Ray Client, `HOST:6379` or `auto` on a cluster node). A session this code
started is shut down when it ends; one the caller had already started (a test's, a notebook's) is kept."""
from __future__ import annotations

import contextlib
import os

from ..errors import BadInput

RAY_INSTALL = "pip install 'simsearch[ray]'"


def import_ray():
    """The ray module, or a one-line error naming the extra that brings it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise BadInput(f"--ray needs Ray (ray[data]), which this install lacks: {RAY_INSTALL}") from None
    return ray


@contextlib.contextmanager
def ray_session(address: str | None):
    """Ray, initialised for the block: `address` "local", a cluster address, or None (an already
    initialised session, else a local cluster)."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    try:
        if address in (None, "local"):
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise BadInput(f"cannot start or reach Ray at {address!r}: {str(exc).splitlines()[0]}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def largest_node_cpus(ray) -> int:
    """The CPUs of the cluster's largest live node (an actor cannot span nodes)."""
    cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    return max(cpus or [1])
