"""The eval resize that model.json records by default: here, apart from description.py, so that
eca_flax.data (which grain's worker processes import) imports no JAX."""


def default_resize_size(image_size: int) -> int:
    """Eval resize of the shorter side: 256 for 224 (the original's ratio), rounded."""
    return round(image_size * 256 / 224)
