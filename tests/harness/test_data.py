"""Data: CIFAR pickle round trips, image folders, augmentation, batching."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from kalmannorm.harness.data import (
    crop_at, epoch_batches, eval_batches, load_cifar, load_dataset, load_digits,
    load_image_folder, random_flip, write_cifar_batch,
)


def _images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def test_cifar10_round_trip(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data, labels = _images(3, i), [(i + j) % 10 for j in range(3)]
        write_cifar_batch(str(folder / name), data, labels)
        batches[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f, protocol=2)
    # The official format: bytes keys, data uint8 [n, 3072], labels a list.
    with open(folder / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert raw[b"data"].dtype == np.uint8 and raw[b"data"].shape == (3, 3072)
    assert isinstance(raw[b"labels"], list)

    ds = load_cifar(str(tmp_path), 10)
    assert ds.train_x.shape == (15, 3, 32, 32) and ds.test_x.shape == (3, 3, 32, 32)
    expected = np.concatenate([batches[f"data_batch_{k}"][0] for k in range(1, 6)]).reshape(15, 3, 32, 32)
    assert torch.equal(ds.train_x, torch.from_numpy(expected))
    assert ds.train_y.tolist() == sum((batches[f"data_batch_{k}"][1] for k in range(1, 6)), [])
    assert ds.test_y.tolist() == batches["test_batch"][1]
    assert ds.classes == [f"c{i}" for i in range(10)]
    assert ds.pad == 4 and ds.flip
    # Per-pixel mean of the training set, /128.
    assert torch.allclose(ds.mean, torch.from_numpy(expected).float().mean(0))
    x, _ = ds.test_batch(torch.arange(3))
    assert torch.allclose(x, (ds.test_x.float() - ds.mean) / 128)
    # The batch directory itself works as root too.
    assert torch.equal(load_cifar(str(folder), 10).test_x, ds.test_x)


def test_cifar100_round_trip(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    write_cifar_batch(str(folder / "train"), _images(4, 0), [0, 99, 5, 42], label_key="fine_labels")
    write_cifar_batch(str(folder / "test"), _images(2, 1), [7, 8], label_key="fine_labels")
    ds = load_dataset("cifar100", str(tmp_path))
    assert ds.num_classes == 100 and ds.train_y.tolist() == [0, 99, 5, 42] and ds.test_y.tolist() == [7, 8]
    assert torch.equal(ds.test_x, torch.from_numpy(_images(2, 1).reshape(2, 3, 32, 32)))


def test_cifar_missing_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="download"):
        load_cifar(str(tmp_path), 10)


def _write_pngs(root, classes, per_class, size, mode="RGB"):
    from PIL import Image

    rng = np.random.default_rng(0)
    written = {}
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            a = rng.integers(0, 256, size=shape, dtype=np.uint8)
            path = os.path.join(root, c, f"{i}.png")
            Image.fromarray(a, mode).save(path)
            written[path] = a
    return written


def test_image_folder_with_split_folders(tmp_path):
    train = _write_pngs(str(tmp_path / "train"), ["cat", "dog"], 3, 8)
    _write_pngs(str(tmp_path / "test"), ["cat", "dog"], 1, 8)
    ds = load_image_folder(str(tmp_path))
    assert ds.classes == ["cat", "dog"]
    assert ds.train_x.shape == (6, 3, 8, 8) and ds.test_x.shape == (2, 3, 8, 8)
    assert ds.train_y.tolist() == [0, 0, 0, 1, 1, 1]
    first = train[str(tmp_path / "train" / "cat" / "0.png")]
    assert torch.equal(ds.train_x[0], torch.from_numpy(first).permute(2, 0, 1))
    assert ds.mean.shape == (3, 1, 1) and ds.pad == 1


def test_image_folder_split_here_grey_and_resize(tmp_path):
    _write_pngs(str(tmp_path), ["a", "b", "c"], 5, 12, mode="L")
    ds = load_image_folder(str(tmp_path), image_size=16, test_fraction=0.2)
    assert ds.in_channels == 1 and ds.image_shape == (1, 16, 16)
    assert ds.train_x.shape[0] == 12 and ds.test_x.shape[0] == 3
    assert sorted(ds.test_y.tolist()) == [0, 1, 2]


def test_image_folder_size_mismatch(tmp_path):
    _write_pngs(str(tmp_path / "a"), ["x"], 2, 8)
    _write_pngs(str(tmp_path / "b"), ["y"], 2, 10)
    os.rename(tmp_path / "b" / "y", tmp_path / "y")
    os.rename(tmp_path / "a" / "x", tmp_path / "x")
    with pytest.raises(ValueError, match="image_size"):
        load_image_folder(str(tmp_path))


def test_crop_is_shifted_window_of_padded_image():
    x = torch.randint(0, 256, (5, 3, 6, 7), dtype=torch.uint8)
    offsets = torch.tensor([[0, 0], [4, 4], [2, 2], [1, 3], [4, 0]])
    out = crop_at(x, 2, offsets)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i, (top, left) in enumerate(offsets.tolist()):
        assert torch.equal(out[i], padded[i, :, top:top + 6, left:left + 7])
    assert torch.equal(out[2], x[2])  # offset == pad: the image itself


def test_random_flip_is_identity_or_mirror():
    x = torch.randn(64, 2, 4, 5)
    y = random_flip(x, torch.Generator().manual_seed(0))
    same = [torch.equal(y[i], x[i]) for i in range(64)]
    mirrored = [torch.equal(y[i], x[i].flip(-1)) for i in range(64)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 10 < sum(mirrored) < 54


def test_train_batch_augments_then_normalizes():
    ds = load_digits()
    g = torch.Generator().manual_seed(0)
    x, y = ds.train_batch(torch.arange(8), g)
    assert x.shape == (8, 1, 8, 8) and x.dtype == torch.float32
    assert torch.equal(y, ds.train_y[:8])
    plain, _ = ds.train_batch(torch.arange(8), augment=False)
    assert torch.allclose(plain, (ds.train_x[:8].float() - ds.mean) / 8)


def test_digits_split():
    ds = load_digits()
    assert ds.train_x.shape == (1437, 1, 8, 8) and ds.test_x.shape == (360, 1, 8, 8)
    assert not ds.flip and ds.num_classes == 10
    assert int(ds.train_x.max()) == 16


def test_epoch_batches_drop_last_and_shard():
    batches = epoch_batches(103, 10, torch.Generator().manual_seed(1))
    assert len(batches) == 10 and all(len(b) == 10 for b in batches)
    assert len(set(torch.cat(batches).tolist())) == 100
    shards = [epoch_batches(103, 8, torch.Generator().manual_seed(1), rank=r, world_size=2) for r in range(2)]
    a, b = (set(torch.cat(s).tolist()) for s in shards)
    assert len(a) == len(b) == 48 and not a & b
    covered = torch.cat([torch.cat(eval_batches(11, 3, rank=r, world_size=2)) for r in range(2)])
    assert sorted(covered.tolist()) == list(range(11))
    with pytest.raises(ValueError, match="fewer than one batch"):
        epoch_batches(5, 8, torch.Generator())


def test_subset_and_unknown_dataset():
    ds = load_digits().subset(100, 50, seed=3)
    assert ds.train_x.shape[0] == 100 and ds.test_x.shape[0] == 50
    with pytest.raises(ValueError, match="digits, cifar10_subset, cifar10, cifar100, folder"):
        load_dataset("mnist")


def test_real_cifar10_from_the_shared_copy(tmp_path_factory):
    """The loader on the real data: data/ if made, else written from ../shared (~30 s)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    root = os.path.join(repo, "data")
    if not os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
        tool = os.path.join(repo, "..", "shared", "tools", "make_cifar10.py")
        if not os.path.exists(tool):
            pytest.skip("no CIFAR-10 copy in data/ and no ../shared/tools/make_cifar10.py")
        root = str(tmp_path_factory.mktemp("cifar"))
        subprocess.run([sys.executable, tool, root], check=True, capture_output=True)
    ds = load_cifar(root, 10)
    assert ds.train_x.shape == (50000, 3, 32, 32) and ds.test_x.shape == (10000, 3, 32, 32)
    assert torch.bincount(ds.train_y).tolist() == [5000] * 10
    assert torch.bincount(ds.test_y).tolist() == [1000] * 10
    # per-channel means of the JPEG copy (shared/data/README.md: 0.4913 0.4821 0.4465)
    means = ds.train_x[:5000].float().mean((0, 2, 3)) / 255
    torch.testing.assert_close(means, torch.tensor([0.4913, 0.4821, 0.4465]), atol=0.01, rtol=0)
