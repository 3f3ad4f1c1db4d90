"""simsearch past one machine, on Ray (the optional `[ray]` extra): `index add --ray` (ray_ingest.py),
`eval --ray` (ray_eval.py) and a bank sharded across actors (sharded.py). Nothing here imports ray at
module level: ray is loaded only where a Ray code path runs (cluster.py)."""
