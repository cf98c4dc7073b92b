"""In-memory image datasets and per-batch augmentation in torch, for the training harness.

Datasets are held as ``uint8`` tensors ``[N, C, H, W]`` (on the training device if asked), and a
batch is augmented and normalized in torch when it is drawn, so nothing runs in worker processes
and the same code runs on CPU and GPU. Three sources:

* ``cifar10`` / ``cifar100``: the official python pickles (``cifar-10-batches-py/data_batch_1..5,
  test_batch``; ``cifar-100-python/train, test`` with ``fine_labels``), read from a directory and
  optionally downloaded from the official archive.
* ``folder``: one sub-folder per class of image files (read with PIL), either split into
  ``train/`` and ``test/`` (or ``val/``) folders or split here with a fixed seed.
* ``cifar10_subset``: 500 training and 100 test photographs per CIFAR-10 class, bundled with
  the repository (``datasets/cifar10-subset``, JPEG bytes in an ``.npz``), the offline default
  of ``kalmannorm demo``.
* ``digits``: scikit-learn's bundled 8x8 grey-level digits, offline.

CIFAR follows the released BKN code (``docs/method.md`` section 6; tensorpack's cifar example):
4-pixel zero padding of the raw image + random 32x32 crop + horizontal flip, then per-pixel mean
subtraction and division by 128.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .extras import require
from .records import atomic_path

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "DATASETS",
    "ImageData",
    "crop_at",
    "random_crop",
    "random_flip",
    "augment_batch",
    "epoch_batches",
    "eval_batches",
    "load_dataset",
    "load_cifar",
    "load_image_folder",
    "load_digits",
    "load_cifar10_subset",
    "write_cifar_batch",
]

log = logging.getLogger(__name__)

_CIFAR = {
    10: dict(
        folder="cifar-10-batches-py",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        train=[f"data_batch_{i}" for i in range(1, 6)],
        test=["test_batch"],
        labels="labels",
        meta=("batches.meta", "label_names"),
    ),
    100: dict(
        folder="cifar-100-python",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        train=["train"],
        test=["test"],
        labels="fine_labels",
        meta=("meta", "fine_label_names"),
    ),
}
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class ImageData:
    """A classification dataset held in memory, with its normalization and augmentation.

    A pixel is normalized as ``(x - mean) / scale``; training batches are first zero-padded by
    ``pad`` pixels (on the raw ``uint8`` image), randomly cropped back, and flipped horizontally
    with probability 1/2 if ``flip``.

    Attributes:
        name: dataset name.
        train_x, test_x: ``uint8 [N, C, H, W]``.
        train_y, test_y: ``int64 [N]``.
        classes: class names, index = label.
        mean: ``float32``, broadcastable to ``[C, H, W]`` (per pixel or per channel).
        scale: ``float32``, broadcastable to ``[C, H, W]``.
        pad: padding of the random crop (0 disables cropping).
        flip: random horizontal flips.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: List[str]
    mean: Tensor
    scale: Tensor
    pad: int = 0
    flip: bool = False
    info: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise ValueError(f"{split}_x must be uint8 [N, C, H, W] (got {x.dtype} {tuple(x.shape)})")
            if y.shape != (x.shape[0],):
                raise ValueError(f"{split}_y must have shape [{x.shape[0]}] (got {tuple(y.shape)})")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    def to(self, device: Union[str, torch.device]) -> "ImageData":
        """The same dataset with every tensor on ``device``."""
        return replace(
            self, **{k: getattr(self, k).to(device) for k in
                     ("train_x", "train_y", "test_x", "test_y", "mean", "scale")}
        )

    def subset(self, train: Optional[int] = None, test: Optional[int] = None, seed: int = 0) -> "ImageData":
        """Keep ``train`` / ``test`` examples (a fixed random choice per ``seed``; ``None`` keeps all).

        Normalization statistics are kept from the full training set.
        """
        changes = {}
        for split, limit in (("train", train), ("test", test)):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if limit is None or limit >= x.shape[0]:
                continue
            if limit < 1:
                raise ValueError(f"limit on the {split} set must be positive (got {limit})")
            g = torch.Generator().manual_seed(seed)
            keep = torch.randperm(x.shape[0], generator=g)[:limit].sort().values.to(x.device)
            changes[f"{split}_x"], changes[f"{split}_y"] = x[keep], y[keep]
        return replace(self, **changes) if changes else self

    def normalize(self, x: Tensor) -> Tensor:
        """``uint8 [N, C, H, W]`` -> ``float32 (x - mean) / scale``."""
        return (x.float() - self.mean) / self.scale

    def train_batch(self, index: Tensor, generator: Optional[torch.Generator] = None,
                    augment: bool = True) -> Tuple[Tensor, Tensor]:
        """Normalized, augmented training batch for row indices ``index``."""
        index = index.to(self.train_x.device)
        x = self.train_x[index]
        if augment:
            x = augment_batch(x, self.pad, self.flip, generator)
        return self.normalize(x), self.train_y[index]

    def test_batch(self, index: Tensor) -> Tuple[Tensor, Tensor]:
        """Normalized test batch (no augmentation) for row indices ``index``."""
        index = index.to(self.test_x.device)
        return self.normalize(self.test_x[index]), self.test_y[index]

    def describe(self) -> Dict[str, object]:
        """JSON-ready summary for run records."""
        return dict(
            name=self.name, train_size=int(self.train_x.shape[0]), test_size=int(self.test_x.shape[0]),
            num_classes=self.num_classes, image_shape=list(self.image_shape), pad=self.pad,
            flip=self.flip, **self.info,
        )


# ----------------------------------------------------------------------------------- augmentation
def crop_at(x: Tensor, pad: int, offsets: Tensor) -> Tensor:
    """Crop each image of ``x`` zero-padded by ``pad`` at its own ``(top, left)`` offset.

    ``out[i] = F.pad(x, [pad] * 4)[i, :, top_i : top_i + H, left_i : left_i + W]``; offsets lie in
    ``[0, 2 * pad]`` (``pad`` is the unshifted position).

    Shape:
        ``x``: ``[N, C, H, W]``; ``offsets``: ``[N, 2]`` integer -> ``[N, C, H, W]``
    """
    n, c, h, w = x.shape
    if offsets.shape != (n, 2):
        raise ValueError(f"expected offsets of shape [{n}, 2] (got {tuple(offsets.shape)})")
    if pad == 0:
        return x
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))  # [N, C, H + 2p, W + 2p]
    offsets = offsets.to(x.device, torch.long)
    rows = offsets[:, :1] + torch.arange(h, device=x.device)  # [N, H]
    cols = offsets[:, 1:] + torch.arange(w, device=x.device)  # [N, W]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chans, rows[:, None, :, None], cols[:, None, None, :]]


def random_crop(x: Tensor, pad: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Zero-pad by ``pad`` and crop back to the input size at a uniform random offset per image."""
    if pad == 0:
        return x
    offsets = torch.randint(0, 2 * pad + 1, (x.shape[0], 2), generator=generator)
    return crop_at(x, pad, offsets)


def random_flip(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Flip each image horizontally (last dimension) with probability 1/2."""
    mask = torch.rand(x.shape[0], generator=generator) < 0.5
    mask = mask.to(x.device)[:, None, None, None]
    return torch.where(mask, x.flip(-1), x)


def augment_batch(x: Tensor, pad: int, flip: bool, generator: Optional[torch.Generator] = None) -> Tensor:
    """Random crop with ``pad`` pixels of zero padding, then random horizontal flip if ``flip``.

    Random numbers come from ``generator`` (a CPU generator; the indices move to ``x.device``).
    """
    x = random_crop(x, pad, generator)
    return random_flip(x, generator) if flip else x


# --------------------------------------------------------------------------------------- batching
def epoch_batches(
    num_examples: int, batch_size: int, generator: torch.Generator, *, rank: int = 0,
    world_size: int = 1, shuffle: bool = True,
) -> List[Tensor]:
    """Index batches of one training epoch for one rank; incomplete batches are dropped.

    Every rank draws the same permutation from an identically seeded ``generator``, keeps every
    ``world_size``-th index starting at ``rank`` (``num_examples // world_size`` each, so ranks get
    disjoint shards of equal size), and cuts its shard into full batches of ``batch_size``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive (got {batch_size})")
    order = torch.randperm(num_examples, generator=generator) if shuffle else torch.arange(num_examples)
    per_rank = num_examples // world_size
    shard = order[rank::world_size][:per_rank]
    steps = per_rank // batch_size
    if steps == 0:
        raise ValueError(
            f"the training set gives {per_rank} examples per rank, fewer than one batch of {batch_size}"
        )
    return list(shard[: steps * batch_size].view(steps, batch_size).unbind(0))


def eval_batches(num_examples: int, batch_size: int, *, rank: int = 0, world_size: int = 1) -> List[Tensor]:
    """Index batches covering this rank's share of ``range(num_examples)`` (every example once overall)."""
    shard = torch.arange(rank, num_examples, world_size)
    return list(shard.split(batch_size))


# ---------------------------------------------------------------------------------------- loaders
def _md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download_cifar(root: str, spec: dict) -> None:
    os.makedirs(root, exist_ok=True)
    archive = os.path.join(root, os.path.basename(spec["url"]))
    if not os.path.exists(archive) or _md5(archive) != spec["md5"]:
        log.info("downloading %s to %s", spec["url"], archive)
        with atomic_path(archive) as tmp:
            urllib.request.urlretrieve(spec["url"], tmp)
            if _md5(tmp) != spec["md5"]:
                raise RuntimeError(f"checksum mismatch for {spec['url']} (expected md5 {spec['md5']})")
    with tarfile.open(archive, "r:gz") as tar:
        try:
            tar.extractall(root, filter="data")
        except TypeError:  # Python without extraction filters (< 3.8.17 / 3.9.17 ...)
            tar.extractall(root)


def _unpickle(path: str) -> dict:
    with open(path, "rb") as f:
        obj = pickle.load(f, encoding="bytes")
    # The official files were written by Python 2: keys are bytes. Accept str keys too.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def write_cifar_batch(path: str, data: np.ndarray, labels: Sequence[int], *, label_key: str = "labels") -> None:
    """Write one batch in the official CIFAR python format (bytes keys, ``data`` uint8 ``[n, 3072]``).

    Used by tests and to export data; ``label_key`` is ``"labels"`` (CIFAR-10) or ``"fine_labels"``.
    """
    np = require("numpy", "writing CIFAR batches")
    data = np.ascontiguousarray(data, dtype=np.uint8).reshape(len(labels), 3072)
    obj = {b"batch_label": b"written by kalmannorm", b"data": data, label_key.encode(): list(map(int, labels))}
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _find_cifar_dir(root: str, spec: dict) -> Optional[str]:
    for candidate in (os.path.join(root, spec["folder"]), root):
        if all(os.path.isfile(os.path.join(candidate, name)) for name in spec["train"] + spec["test"]):
            return candidate
    return None


def load_cifar(root: str = "data", num_classes: int = 10, *, download: bool = False) -> ImageData:
    """CIFAR-10 or CIFAR-100 from the official python format, normalized as the released code.

    Args:
        root: a directory holding ``cifar-10-batches-py/`` (``cifar-100-python/``) or the batch
            files themselves.
        num_classes: 10 or 100.
        download: fetch and unpack the official archive into ``root`` if the files are missing.
    """
    if num_classes not in _CIFAR:
        raise ValueError(f"CIFAR has 10 or 100 classes (got {num_classes})")
    np = require("numpy", "the CIFAR loader")
    spec = _CIFAR[num_classes]
    folder = _find_cifar_dir(root, spec)
    if folder is None and download:
        _download_cifar(root, spec)
        folder = _find_cifar_dir(root, spec)
    if folder is None:
        raise FileNotFoundError(
            f"CIFAR-{num_classes} not found in {root!r}: expected {spec['folder']}/ with "
            f"{', '.join(spec['train'] + spec['test'])}; pass download=True (--download) to fetch it"
        )

    def read(names: List[str]) -> Tuple[Tensor, Tensor]:
        xs, ys = [], []
        for name in names:
            batch = _unpickle(os.path.join(folder, name))
            if spec["labels"] not in batch:
                raise ValueError(f"{os.path.join(folder, name)} has no {spec['labels']!r} entry")
            xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[spec["labels"]], dtype=np.int64))
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    train_x, train_y = read(spec["train"])
    test_x, test_y = read(spec["test"])
    meta_file, meta_key = spec["meta"]
    classes = [str(i) for i in range(num_classes)]
    if os.path.isfile(os.path.join(folder, meta_file)):
        names = _unpickle(os.path.join(folder, meta_file)).get(meta_key)
        if names is not None and len(names) == num_classes:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return ImageData(
        name=f"cifar{num_classes}", train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
        classes=classes, mean=train_x.float().mean(0), scale=torch.tensor(128.0), pad=4, flip=True,
    )


def _class_dirs(root: str) -> List[str]:
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))


def _list_images(folder: str) -> List[str]:
    return sorted(
        os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(_IMAGE_EXTENSIONS)
    )


def load_image_folder(
    root: str, *, image_size: Optional[int] = None, test_fraction: float = 0.2, seed: int = 0,
    channels: Optional[int] = None,
) -> ImageData:
    """Images in one folder per class (``root/<class>/*.png``), read with PIL into memory.

    If ``root`` has ``train/`` and ``test/`` (or ``val/``) folders, each holding one folder per
    class, those are the splits; otherwise a fraction ``test_fraction`` of every class (at least
    one image) is held out, chosen with ``seed``. Normalization is per channel (training-set mean
    and standard deviation); augmentation pads by ``size // 8`` and flips.

    Args:
        root: dataset directory.
        image_size: resize every image to ``image_size x image_size``; without it all images must
            have the same size.
        test_fraction: held-out share when there is no test folder. Default: 0.2.
        seed: seed of that split. Default: 0.
        channels: 1 (grey) or 3 (RGB). Default: 1 if every image is grey-level, else 3.
    """
    Image = require("PIL.Image", "reading image folders")
    np = require("numpy", "reading image folders")

    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    splits = {}
    test_name = next((s for s in ("test", "val") if os.path.isdir(os.path.join(root, s))), None)
    if os.path.isdir(os.path.join(root, "train")) and test_name:
        classes = _class_dirs(os.path.join(root, "train"))
        unknown = set(_class_dirs(os.path.join(root, test_name))) - set(classes)
        if unknown:
            raise ValueError(f"{test_name}/ has classes missing from train/: {sorted(unknown)}")
        for split, sub in (("train", "train"), ("test", test_name)):
            splits[split] = [(p, i) for i, c in enumerate(classes)
                             for p in _list_images(os.path.join(root, sub, c))
                             if os.path.isdir(os.path.join(root, sub, c))]
    else:
        classes = _class_dirs(root)
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1) (got {test_fraction})")
        rng = np.random.default_rng(seed)
        splits = {"train": [], "test": []}
        for i, c in enumerate(classes):
            files = _list_images(os.path.join(root, c))
            order = rng.permutation(len(files))
            n_test = max(1, int(round(test_fraction * len(files)))) if len(files) > 1 else 0
            splits["test"] += [(files[j], i) for j in sorted(order[:n_test])]
            splits["train"] += [(files[j], i) for j in sorted(order[n_test:])]
    if len(classes) < 2:
        raise ValueError(f"expected at least two class folders in {root!r} (found {classes})")
    for split in ("train", "test"):
        if not splits[split]:
            raise ValueError(f"no images found for the {split} split under {root!r}")

    grey_modes = {"1", "L", "LA", "I", "I;16", "F"}
    if channels is None:
        modes = set()
        for path, _ in splits["train"] + splits["test"]:
            with Image.open(path) as im:
                modes.add(im.mode)
        channels = 1 if modes <= grey_modes else 3
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3 (got {channels})")

    def read(items: List[Tuple[str, int]]) -> Tuple[Tensor, Tensor]:
        arrays = []
        for path, _ in items:
            with Image.open(path) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                if image_size is not None:
                    im = im.resize((image_size, image_size), Image.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
            a = a.reshape(a.shape[0], a.shape[1], channels)
            if arrays and a.shape != arrays[0].shape:
                raise ValueError(
                    f"{path} has size {a.shape[1]}x{a.shape[0]}, unlike {items[0][0]} "
                    f"({arrays[0].shape[1]}x{arrays[0].shape[0]}); pass image_size to resize"
                )
            arrays.append(a)
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        return x, torch.tensor([label for _, label in items], dtype=torch.long)

    train_x, train_y = read(splits["train"])
    test_x, test_y = read(splits["test"])
    if train_x.shape[1:] != test_x.shape[1:]:
        raise ValueError(
            f"train and test images differ in size ({tuple(train_x.shape[1:])} vs "
            f"{tuple(test_x.shape[1:])}); pass image_size to resize"
        )
    xf = train_x.float()
    mean = xf.mean(dim=(0, 2, 3)).view(-1, 1, 1)
    std = xf.std(dim=(0, 2, 3)).clamp_min(1.0).view(-1, 1, 1)
    return ImageData(
        name="folder", train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
        classes=classes, mean=mean, scale=std, pad=max(1, train_x.shape[-1] // 8), flip=True,
        info=dict(root=os.path.abspath(root)),
    )


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """scikit-learn's bundled handwritten digits: 1,797 grey images of 8x8, values 0..16.

    A stratified ``test_fraction`` is held out with ``seed``. Per-pixel mean subtraction and
    division by 8 (half the range, as CIFAR's /128); augmentation pads by 1 pixel and never flips
    (digits are not mirror-symmetric).
    """
    require("sklearn", "the digits dataset")
    np = require("numpy", "the digits dataset")
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    images = bunch.images.astype(np.uint8)[:, None]  # [N, 1, 8, 8]
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, bunch.target, test_size=test_fraction, random_state=seed, stratify=bunch.target
    )
    train_x = torch.from_numpy(np.ascontiguousarray(x_tr))
    return ImageData(
        name="digits", train_x=train_x, train_y=torch.from_numpy(y_tr.astype(np.int64)),
        test_x=torch.from_numpy(np.ascontiguousarray(x_te)), test_y=torch.from_numpy(y_te.astype(np.int64)),
        classes=[str(i) for i in range(10)], mean=train_x.float().mean(0), scale=torch.tensor(8.0),
        pad=1, flip=False,
    )


_SUBSET_FILE = os.path.join("datasets", "cifar10-subset", "cifar10_subset.npz")


def _find_subset() -> Optional[str]:
    """The bundled subset in the source checkout this package runs from, if any."""
    here = os.path.dirname(os.path.abspath(__file__))
    for _ in range(5):
        candidate = os.path.join(here, _SUBSET_FILE)
        if os.path.isfile(candidate):
            return candidate
        here = os.path.dirname(here)
    return None


def load_cifar10_subset(path: Optional[str] = None) -> ImageData:
    """The CIFAR-10 subset bundled with the repository: 5,000 training and 1,000 test photographs.

    The first 500 training and 100 test images of each class of a JPEG copy of CIFAR-10, stored
    as the JPEG files' bytes (``datasets/cifar10-subset/README.md`` gives the provenance and the
    script that regenerates it); decoded with Pillow and normalized as :func:`load_cifar`.

    Args:
        path: the ``.npz`` file, or a directory holding ``cifar10_subset.npz``; default: the
            copy in the source checkout.
    """
    if path is not None and os.path.isdir(path):
        path = os.path.join(path, os.path.basename(_SUBSET_FILE))
    path = path or _find_subset()
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(
            f"the bundled CIFAR-10 subset was not found ({path or _SUBSET_FILE}); it ships with "
            "the source repository (datasets/cifar10-subset); pass its path as data_dir "
            "(--data-dir), or train on the full data with --dataset cifar10 --download"
        )
    import io

    Image = require("PIL.Image", "the bundled CIFAR-10 subset")
    np = require("numpy", "the bundled CIFAR-10 subset")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    with np.load(path) as z:
        classes = [str(c) for c in z["classes"]]
        splits = {}
        for split in ("train", "test"):
            data, offsets = z[f"{split}_jpeg"], z[f"{split}_offsets"]
            images = np.stack([
                np.asarray(Image.open(io.BytesIO(data[a:b].tobytes())).convert("RGB"))
                for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())
            ])  # [N, 32, 32, 3]
            splits[split] = (torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
                             torch.from_numpy(z[f"{split}_labels"].astype(np.int64)))
    (train_x, train_y), (test_x, test_y) = splits["train"], splits["test"]
    return ImageData(
        name="cifar10_subset", train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
        classes=classes, mean=train_x.float().mean(0), scale=torch.tensor(128.0), pad=4, flip=True,
        info=dict(file=os.path.basename(path), sha256=digest),
    )


DATASETS = ("digits", "cifar10_subset", "cifar10", "cifar100", "folder")
DEFAULT_DATA_DIR = "data"  # where the CIFAR loaders look without a data directory
# packages of the train extra each dataset's loader imports
DATASET_REQUIRES = {"digits": ("numpy", "sklearn"), "cifar10": ("numpy",), "cifar100": ("numpy",),
                    "folder": ("numpy", "PIL"), "cifar10_subset": ("numpy", "PIL")}


def load_dataset(
    name: str, root: Optional[str] = None, *, download: bool = False, image_size: Optional[int] = None,
) -> ImageData:
    """Load a dataset by name: ``digits``, ``cifar10_subset`` (both offline), ``cifar10``,
    ``cifar100`` or ``folder``.

    ``root`` is the data directory (default ``data`` for CIFAR; required for ``folder``; for
    ``cifar10_subset`` the ``.npz`` file or its directory, default the bundled copy).
    """
    if name == "digits":
        return load_digits()
    if name == "cifar10_subset":
        return load_cifar10_subset(root)
    if name in ("cifar10", "cifar100"):
        return load_cifar(root or DEFAULT_DATA_DIR, 10 if name == "cifar10" else 100, download=download)
    if name == "folder":
        if root is None:
            raise ValueError("dataset 'folder' needs a data directory (data_dir / --data-dir)")
        return load_image_folder(root, image_size=image_size)
    raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
