"""Image-folder datasets: one subfolder per class, as torchvision's `ImageFolder` reads them.

Two layouts are understood:

    root/<class>/<image>                       split here, stratified by class, deterministically
    root/train/<class>/<image> + root/test/<class>/<image>   the split the folders give

Files are listed in sorted order and every file's header is read once up front, so an unreadable
file, an empty class or a one-class dataset is reported before any feature is extracted.
`load_images` turns paths, PIL images or arrays into the (n, size, size, 3) arrays the programs take.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxprobe.errors import InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """Labelled image files with a train/test split. Row i: paths[i], labels[i], is_test[i]."""

    root: Path
    classes: tuple[str, ...]
    paths: tuple[Path, ...]
    labels: np.ndarray       # (n,) int class index into `classes`
    is_test: np.ndarray      # (n,) bool

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def train_index(self) -> np.ndarray:
        return np.flatnonzero(~self.is_test)

    @property
    def test_index(self) -> np.ndarray:
        return np.flatnonzero(self.is_test)

    def describe(self) -> dict:
        """What identifies the data in a feature-cache key: relative paths, sizes and mtimes."""
        files = [(str(p.relative_to(self.root)), p.stat().st_size, p.stat().st_mtime_ns) for p in self.paths]
        return {"root": str(self.root.resolve()), "files": files}


def _class_images(folder: Path, extensions: Sequence[str]) -> dict[str, list[Path]]:
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    return {c.name: sorted(f for f in c.rglob("*") if f.is_file() and f.suffix.lower() in extensions)
            for c in classes}


def _check_classes(found: dict[str, list[Path]], folder: Path) -> None:
    if not found:
        raise InputError(f"{folder} has no class subfolders: expected {folder}/<class>/<image> "
                         "(or train/ and test/ folders laid out that way)")
    empty = [c for c, files in found.items() if not files]
    if empty:
        raise InputError(f"class folder(s) {', '.join(empty)} under {folder} hold no images "
                         f"({', '.join(IMAGE_EXTENSIONS)}); remove them or add images")
    if len(found) < 2:
        raise InputError(f"{folder} has a single class ({next(iter(found))}): a classifier needs at least two "
                         "class subfolders")


def _check_readable(paths: Sequence[Path]) -> None:
    from PIL import Image, UnidentifiedImageError

    for path in paths:
        try:
            with Image.open(path) as im:
                im.verify()
        except (OSError, UnidentifiedImageError, SyntaxError) as err:
            raise InputError(f"cannot read image {path}: {err}; delete or replace the file") from err


def _stratified_test_mask(labels: np.ndarray, classes: Sequence[str], test_fraction: float,
                          seed: int) -> np.ndarray:
    """Per class, round(test_fraction * n_c) images (at least one, never all) go to the test side,
    chosen by a generator seeded with (seed, class name): the split of one class does not change
    when other classes are added or removed."""
    is_test = np.zeros(len(labels), bool)
    for c, name in enumerate(classes):
        rows = np.flatnonzero(labels == c)
        n_test = min(max(1, round(test_fraction * len(rows))), len(rows) - 1)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        is_test[rng.permutation(rows)[:n_test]] = True
    return is_test


def load_image_folder(root: str | Path, *, test_fraction: float = 0.25, seed: int = 0,
                      extensions: Sequence[str] = IMAGE_EXTENSIONS, check: bool = True) -> ImageDataset:
    """An image-folder dataset. With train/ and test/ subfolders their split is kept (the classes
    must agree); otherwise each class is split with `test_fraction` of its images held out.
    check: open every file's header now (an unreadable file is an error naming it)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"image folder {root} does not exist")
    extensions = tuple(e.lower() for e in extensions)
    if (root / "train").is_dir() and (root / "test").is_dir():
        train, test = _class_images(root / "train", extensions), _class_images(root / "test", extensions)
        _check_classes(train, root / "train")
        _check_classes(test, root / "test")
        if set(train) != set(test):
            raise InputError(f"train/ and test/ under {root} name different classes: only in train: "
                             f"{sorted(set(train) - set(test))}, only in test: {sorted(set(test) - set(train))}")
        classes = tuple(train)
        rows = [(p, i, False) for i, c in enumerate(classes) for p in train[c]]
        rows += [(p, i, True) for i, c in enumerate(classes) for p in test[c]]
        paths, labels, is_test = zip(*rows)
        labels, is_test = np.array(labels), np.array(is_test)
    else:
        if not 0.0 < test_fraction < 1.0:
            raise InputError(f"test_fraction must be between 0 and 1, got {test_fraction}")
        found = _class_images(root, extensions)
        _check_classes(found, root)
        small = [c for c, files in found.items() if len(files) < 2]
        if small:
            raise InputError(f"class(es) {', '.join(small)} have a single image: a train/test split needs at "
                             "least two per class")
        classes = tuple(found)
        paths = tuple(p for c in classes for p in found[c])
        labels = np.concatenate([np.full(len(found[c]), i) for i, c in enumerate(classes)])
        is_test = _stratified_test_mask(labels, classes, test_fraction, seed)
    if check:
        _check_readable(paths)
    return ImageDataset(root, classes, tuple(paths), labels, is_test)


def validation_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """(n,) bool: a stratified `fraction` of the given (training) rows held out for early stopping;
    classes with fewer than two rows keep all of them for training."""
    mask = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        n_val = min(round(fraction * len(rows)), len(rows) - 1)
        if n_val > 0:
            rng = np.random.default_rng([seed, 1, zlib.crc32(str(c).encode())])
            mask[rng.permutation(rows)[:n_val]] = True
    return mask


def load_images(images: Any, size: int) -> np.ndarray:
    """Paths, PIL images or arrays -> (n, size, size, 3) float32 in [0, 1] (resized, centre-cropped)."""
    from PIL import Image

    if isinstance(images, np.ndarray) and images.ndim == 4:
        arr = images.astype(np.float32)
        if arr.max() > 1.0:
            arr = arr / 255.0
        if arr.shape[1:3] != (size, size):
            import jax  # resizing arrays only; the folder readers stay jax-free

            arr = np.asarray(jax.image.resize(arr, (len(arr), size, size, 3), "bilinear", antialias=True))
        return arr
    out = []
    for item in images:
        im = Image.open(item) if not isinstance(item, Image.Image) else item
        im = im.convert("RGB")
        scale = size / min(im.size)
        im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))), Image.BICUBIC)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        out.append(np.asarray(im.crop((left, top, left + size, top + size)), np.float32) / 255.0)
    if not out:
        raise InputError("no images given")
    return np.stack(out)
