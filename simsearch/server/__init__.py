"""`simsearch serve`: HTTP API and inspection dashboard (needs the `serve` extra: pip install 'simsearch[serve]')."""
