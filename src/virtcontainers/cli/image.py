"""``vc image`` (placeholder until the image builder lands)."""
