"""The bundled CIFAR-10 subset (the demo's offline real photographs) and the demo's summary."""
import importlib.util
import io
import os
import tarfile

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from kalmannorm.harness.cli import DEMO_BKN, DEMO_BN_FULL, DEMO_BN_M2, demo_configs, micro_batch_gap  # noqa: E402
from kalmannorm.harness.data import load_cifar10_subset, load_dataset  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAKER = os.path.join(ROOT, "datasets", "cifar10-subset", "make_subset.py")


def load_maker():
    spec = importlib.util.spec_from_file_location("make_subset", MAKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_subset_round_trip_from_an_archive(tmp_path):
    maker = load_maker()
    archive = tmp_path / "cifar.tar.gz"
    blobs = {}
    with tarfile.open(archive, "w:gz") as tar:
        for split, n in (("train", 3), ("test", 2)):
            for k, cls in enumerate(maker.CLASSES):
                for i in range(n):
                    data = jpeg(hash((split, k, i)) % 2**31)
                    blobs[(split, cls, i)] = data
                    info = tarfile.TarInfo(f"{split}/{cls}/{i:04d}.jpg")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "subset.npz"
    meta = maker.make_subset(str(archive), str(out), train_per_class=2, test_per_class=1)
    assert (meta["train"], meta["test"]) == (20, 10)
    with np.load(out, allow_pickle=False) as z:  # no pickles inside
        assert list(z["train_files"][:3]) == ["train/airplane/0000.jpg", "train/airplane/0001.jpg",
                                              "train/automobile/0000.jpg"]
    data = load_cifar10_subset(str(out))
    assert data.train_x.dtype == torch.uint8 and data.train_x.shape == (20, 3, 32, 32)
    assert data.test_y.tolist() == list(range(10))
    assert data.classes == list(maker.CLASSES)
    # pixels are exactly Pillow's decoding of the archive's bytes, in class-then-file order
    expected = np.asarray(Image.open(io.BytesIO(blobs[("train", "automobile", 1)])).convert("RGB"))
    assert np.array_equal(data.train_x[3].permute(1, 2, 0).numpy(), expected)
    assert data.train_y[3] == 1


def test_missing_subset_names_the_way_out(tmp_path):
    with pytest.raises(FileNotFoundError, match="--dataset cifar10 --download"):
        load_cifar10_subset(str(tmp_path / "nothing.npz"))


def test_bundled_subset_is_balanced_real_cifar():
    data = load_dataset("cifar10_subset")
    assert data.train_x.shape == (5000, 3, 32, 32) and data.test_x.shape == (1000, 3, 32, 32)
    assert torch.bincount(data.train_y).tolist() == [500] * 10
    assert torch.bincount(data.test_y).tolist() == [100] * 10
    # CIFAR-10's channel means (0.491, 0.482, 0.447), within the JPEG copy's tolerance
    means = data.train_x.float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(means, torch.tensor([0.491, 0.482, 0.447]), atol=0.02)
    assert data.describe()["sha256"] == \
        "0778c65404ece6fbb56252d86c6f69dbad1dde0bbb0139d16b421f1c21976651"


def row(label, mean, std=0.01, seeds=3):
    return dict(label=label, test_error_mean=mean, test_error_std=std, seeds=seeds)


def test_micro_batch_gap_reports_recovery_or_its_absence():
    full, m2 = row(DEMO_BN_FULL, 0.30), row(DEMO_BN_M2, 0.40)
    text = micro_batch_gap([full, m2, row(DEMO_BKN, 0.35)])
    assert "+10.0 points" in text and "recovers 50% of the gap" in text
    text = micro_batch_gap([full, m2, row(DEMO_BKN, 0.45)])
    assert "does NOT recover" in text and "5.0 points worse" in text
    assert "no gap" in micro_batch_gap([row(DEMO_BN_FULL, 0.4), row(DEMO_BN_M2, 0.35),
                                        row(DEMO_BKN, 0.3)])


def test_demo_runs_the_five_norms_on_real_photographs(tmp_path):
    configs = demo_configs(seeds=(0, 1), out=str(tmp_path))
    assert len(configs) == 10
    assert {c.dataset for c in configs} == {"cifar10_subset"}
    assert [c.norm for c in configs[:5]] == ["batchnorm", "ghost_batchnorm", "groupnorm",
                                             "batchrenorm", "bkn"]
    assert all(c.micro_batch == 2 for c in configs if c.norm in ("ghost_batchnorm", "bkn"))
