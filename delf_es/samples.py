"""Sample photos that ship with installed packages (no download)."""

from __future__ import annotations

from pathlib import Path

from delf_es.model.weights import package_file


def sample_pair() -> tuple[Path, Path]:
    """Two views of one scene: the Middlebury 2014 'motorcycle' stereo pair shipped
    in scikit-image's data folder (see scikit-image's data/README.txt for its licence)."""
    return (
        package_file("skimage", "data/motorcycle_left.png"),
        package_file("skimage", "data/motorcycle_right.png"),
    )


#: scikit-image's bundled colour photos (indexed by the demo as the "database")
DATABASE_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
                   "brick.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "retina.jpg")


def database_photos() -> list[Path]:
    return [package_file("skimage", f"data/{name}") for name in DATABASE_PHOTOS]
