"""``vc check`` (placeholder until host.py lands)."""
