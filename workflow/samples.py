"""Write the sample photos that `make demo` runs the pipeline on.

The photos come from scikit-image's data folder, which its wheel ships; the four used here are
public domain or CC0 as the docstrings in skimage/data/_fetchers.py state. Two of them are also
saved the way phones save pictures: a JPEG stored sideways with an EXIF orientation tag, and a
HEIC file.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from PIL import Image

__all__ = ["write_samples"]

_PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png")
_ORIENTATION_TAG = 0x0112
_ROTATED_90_CW = 6  # EXIF: the stored pixels must be turned 90 degrees clockwise to be upright


def write_samples(folder: Path) -> list[Path]:
    """Copy the sample photos into FOLDER and add a sideways JPEG and a HEIC; return the files."""
    import skimage

    data = Path(skimage.__file__).parent / "data"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in _PHOTOS:
        target = folder / name
        shutil.copyfile(data / name, target)
        written.append(target)

    with Image.open(data / "chelsea.png") as cat:
        upright = cat.convert("RGB")
    # Store the pixels turned the other way, as a phone held sideways does, and set the tag that turns them upright.
    sideways = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[_ORIENTATION_TAG] = _ROTATED_90_CW
    phone = folder / "phone" / "IMG 0001 sideways cat.jpg"
    phone.parent.mkdir(exist_ok=True)
    sideways.save(phone, format="JPEG", quality=92, exif=exif.tobytes())
    written.append(phone)

    from pillow_heif import register_heif_opener

    register_heif_opener()
    with Image.open(data / "coffee.png") as coffee:
        heic = folder / "phone" / "coffee.heic"
        coffee.convert("RGB").save(heic, format="HEIF", quality=85)
    written.append(heic)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "samples")
    for path in write_samples(target):
        print(path)
