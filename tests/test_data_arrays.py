"""Array data (digits, npz, Omniglot), transforms, class subsets, DataLoader workers."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from deepmetric.data import (
    DatasetCountWarning,
    DatasetError,
    MissingFileError,
    build_dataset,
    build_transform,
    class_disjoint_split,
    subset_classes,
)
from fake_layouts import make_cub, write_image

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT = REPO / ".." / "shared" / "data" / "omniglot" / "images_background.npz"


# ---------------------------------------------------------------------------------- digits
def test_digits_zero_shot_split() -> None:
    train, test = build_dataset("digits", split="train"), build_dataset("digits", split="test")
    assert train.counts() == {"images": 901, "classes": 5}
    assert test.counts() == {"images": 896, "classes": 5}
    assert train.class_ids.tolist() == [0, 1, 2, 3, 4]
    assert test.class_ids.tolist() == [5, 6, 7, 8, 9]
    assert int(test.labels.max()) == 4 and test.labels.dtype == torch.long
    image, label = test[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert int(test.class_ids[label]) >= 5
    assert len(build_dataset("digits", split="all")) == 1797
    big = build_dataset("digits", split="test", size=16, classes=(8, 10))
    assert big[0][0].shape == (1, 16, 16) and big.class_ids.tolist() == [8, 9]


# ------------------------------------------------------------------------------------- npz
def test_npz_class_range_invert_and_resize(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.random((6, 3, 10, 10)) > 0.2  # (C, N, H, W) bool, True = paper
    labels = np.repeat(np.arange(6)[:, None], 3, axis=1)  # (C, N)
    np.savez(tmp_path / "chars.npz", images=images, labels=labels)

    ds = build_dataset("npz", tmp_path / "chars.npz", classes=(2, 5), invert=True)
    assert ds.counts() == {"images": 9, "classes": 3}
    assert ds.class_ids.tolist() == [2, 3, 4]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    first = ds[0][0]
    assert first.shape == (1, 10, 10)
    assert torch.equal(first[0] > 0.5, torch.from_numpy(~images[2, 0]))  # ink is bright

    small = build_dataset("npz", tmp_path, "all", file="chars.npz", size=4)
    assert small[0][0].shape == (1, 4, 4) and len(small) == 18
    # without classes the file has no split: half the classes each, disjoint
    train = build_dataset("npz", tmp_path, "train", file="chars.npz")
    test = build_dataset("npz", tmp_path, "test", file="chars.npz")
    assert train.num_classes == test.num_classes == 3 and len(train) == len(test) == 9
    assert not set(train.class_ids.tolist()) & set(test.class_ids.tolist())
    assert train.generated_split == {"by": "classes", "test_classes": 3, "seed": 0}

    # (N, H, W, 3) uint8 with (N,) labels
    np.savez(
        tmp_path / "rgb.npz",
        x=rng.integers(0, 255, (4, 5, 5, 3), dtype=np.uint8),
        y=np.array([3, 1, 3, 1]),
    )
    rgb = build_dataset("npz", tmp_path / "rgb.npz", "all", images_key="x", labels_key="y")
    assert rgb[0][0].shape == (3, 5, 5) and rgb.class_ids.tolist() == [1, 3]


def test_npz_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match=r"nothing\.npz"):
        build_dataset("npz", tmp_path / "nothing.npz")
    np.savez(tmp_path / "a.npz", images=np.zeros((3, 4, 4)), labels=np.zeros(2, dtype=int))
    with pytest.raises(DatasetError, match="do not match"):
        build_dataset("npz", tmp_path / "a.npz")
    with pytest.raises(DatasetError, match="no array 'pixels'"):
        build_dataset("npz", tmp_path / "a.npz", images_key="pixels")
    np.savez(tmp_path / "b.npz", images=np.zeros((2, 4, 4)), labels=np.zeros(2, dtype=int))
    with pytest.raises(DatasetError, match=r"no sample has a class id in \[5, 9\)"):
        build_dataset("npz", tmp_path / "b.npz", classes=(5, 9))
    (tmp_path / "c.npz").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="cannot read"):
        build_dataset("npz", tmp_path / "c.npz")


def test_omniglot_validation_classes() -> None:
    if not OMNIGLOT.is_file():
        pytest.skip(f"Omniglot npz absent ({OMNIGLOT}); see ../shared/data/omniglot/README.md")
    ds = build_dataset("npz", OMNIGLOT, classes=(764, 964), invert=True, size=28)
    assert ds.counts() == {"images": 4000, "classes": 200}
    assert torch.bincount(ds.labels).tolist() == [20] * 200
    assert ds.class_ids.tolist() == list(range(764, 964))
    image, _ = ds[0]
    assert image.shape == (1, 28, 28)
    assert float(image.mean()) < 0.5  # ink bright on a dark background


# ------------------------------------------------------------------------------ transforms
def test_presets_shapes_and_normalisation() -> None:
    im = Image.new("RGB", (300, 260), (128, 117, 104))  # R, G, B = the BGR means reversed
    bn_test = build_transform("bninception", train=False)(im)
    assert bn_test.shape == (3, 227, 227)
    assert torch.allclose(bn_test, torch.zeros_like(bn_test), atol=1e-3)  # BGR minus means
    red = Image.new("RGB", (256, 256), (255, 0, 0))
    bgr = build_transform("bninception", train=False)(red)[:, 100, 100]
    assert torch.allclose(bgr, torch.tensor([-104.0, -117.0, 127.0]), atol=1e-3)
    assert build_transform("bninception", train=True)(im).shape == (3, 227, 227)
    imagenet = build_transform("imagenet", train=False)(red)
    assert imagenet.shape == (3, 224, 224)
    assert abs(float(imagenet[0, 5, 5]) - (1 - 0.485) / 0.229) < 1e-4
    assert build_transform("imagenet", train=True, size=64, scale=(0.5, 1))(im).shape == (3, 64, 64)
    assert build_transform("imagenet", train=False, size=64)(im).shape == (3, 64, 64)
    with pytest.raises(ValueError, match="unknown transform preset"):
        build_transform("resnet", train=True)
    with pytest.raises(TypeError, match="unknown options"):
        build_transform("imagenet", train=True, colour=True)


def test_small_preset_accepts_tensors_and_pil() -> None:
    x = torch.rand(1, 8, 8)
    out = build_transform("small", train=False)(x)
    assert out.shape == (1, 8, 8) and torch.allclose(out, (x - 0.5) / 0.5)
    assert build_transform("small", train=True, size=28, augment=True)(x).shape == (1, 28, 28)
    assert build_transform("small", train=False, channels=3)(x).shape == (3, 8, 8)
    pil = Image.fromarray(np.full((28, 28, 3), 255, dtype=np.uint8))
    out = build_transform("small", train=False)(pil)
    assert out.shape == (1, 28, 28) and torch.allclose(out, torch.ones_like(out))
    uint8 = build_transform("small", train=False)(torch.zeros(1, 4, 4, dtype=torch.uint8))
    assert torch.allclose(uint8, -torch.ones(1, 4, 4))
    # the imagenet preset takes a one-channel tensor too (repeated to RGB)
    assert build_transform("imagenet", train=False)(x).shape == (3, 224, 224)


def test_transform_by_name_and_own_callable(tmp_path: Path) -> None:
    ds = build_dataset("digits", split="test", transform="small")
    assert float(ds[0][0].min()) == -1.0
    ds = build_dataset("digits", split="test", transform=lambda t: t.sum())
    assert ds[0][0].dim() == 0


# ---------------------------------------------------------------------------- class splits
def test_class_disjoint_split_and_subset() -> None:
    train = build_dataset("digits", split="train")
    tr, va = class_disjoint_split(train.labels, val_fraction=0.4, seed=3)
    assert len(va) == 2 and len(tr) == 3
    assert set(tr.tolist()).isdisjoint(va.tolist())
    assert sorted(tr.tolist() + va.tolist()) == [0, 1, 2, 3, 4]
    tr2, va2 = class_disjoint_split(train.labels.numpy(), 0.4, seed=3)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)  # deterministic
    assert len(class_disjoint_split([0, 1], 0.01)[1]) == 1  # at least one validation class
    assert len(class_disjoint_split([0, 1], 0.0)[1]) == 0
    with pytest.raises(ValueError):
        class_disjoint_split([0, 1], 1.0)

    val = subset_classes(train, va)
    assert val.num_classes == 2
    assert val.labels.unique().tolist() == [0, 1]
    assert val.class_ids.tolist() == train.class_ids[va].tolist()
    n = int(sum((train.labels == c).sum() for c in va))
    assert val.counts() == {"images": n, "classes": 2}
    image, label = val[0]
    parent_index = int(val.indices[0])
    assert torch.equal(image, train[parent_index][0])
    assert int(val.class_ids[label]) == int(train.class_ids[train.labels[parent_index]])
    # a new transform for the subset (e.g. the test pipeline)
    val_t = subset_classes(train, va, transform=build_transform("small", train=False))
    assert float(val_t[0][0].min()) == -1.0
    with pytest.raises(ValueError, match="classes must lie in"):
        subset_classes(train, [7])


def test_subset_keeps_roles(tmp_path: Path) -> None:
    rows = [(1, 1), (1, 0), (2, 1), (2, 0), (3, 0)]  # (label, is_query)
    for k in range(len(rows)):
        write_image(tmp_path / f"{k}.png", seed=k)
    lines = ["label,path,split,is_query,is_gallery"] + [
        f"{lab},{k}.png,validation,{q},{1 - q}" for k, (lab, q) in enumerate(rows)
    ]
    (tmp_path / "df.csv").write_text("\n".join(lines) + "\n")
    test = build_dataset("csv", tmp_path, "test")
    sub = subset_classes(test, [1, 2])
    assert sub.is_query.tolist() == [True, False, False]
    assert sub.class_ids.tolist() == [2, 3] and sub.labels.tolist() == [0, 0, 1]


# ------------------------------------------------------------------------------- DataLoader
def test_dataloader_two_workers(tmp_path: Path) -> None:
    root = make_cub(tmp_path, {1: 3, 2: 3, 3: 2})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetCountWarning)
        ds = build_dataset(
            "cub", root, "train", transform=build_transform("imagenet", True, size=32)
        )
    loader = DataLoader(ds, batch_size=3, num_workers=2, shuffle=False)
    labels = []
    for images, batch_labels in loader:
        assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32
        labels.append(batch_labels)
    assert torch.equal(torch.cat(labels), ds.labels)

    digits = subset_classes(build_dataset("digits", split="test", transform="small"), [0, 1])
    loader = DataLoader(digits, batch_size=64, num_workers=2)
    got = torch.cat([y for _, y in loader])
    assert torch.equal(got, digits.labels)
