"""Gallery index, search, add / remove, fingerprint checks, ONNX and TorchScript export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_runs
from deepmetric.cli import main
from deepmetric.config import ConfigError, load_config
from deepmetric.data import DatasetError
from deepmetric.engine import train
from deepmetric.engine.inference import embed_paths, load_model
from deepmetric.retrieval import IndexFileError, Retriever, export_model, read_gallery

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
TINY = [
    *tiny_runs.TINY,
    "--eval.at_start=false",
    "--eval.every=0",
    "--schedule.name=none",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny digits runs (different seeds, so different weights)."""
    out = []
    n = torch.get_num_threads()
    for seed in (0, 1):
        folder = tmp_path_factory.mktemp(f"run{seed}")
        cfg = load_config(DEMO, [*TINY, "--train.iterations=3", f"--seed={seed}"])
        cfg.output.dir = str(folder)
        train(cfg)
        out.append(folder)
    torch.set_num_threads(n)
    return out[0], out[1]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> Path:
    """24 images in 6 class folders, plus 4 loose query images."""
    root = tmp_path_factory.mktemp("gallery")
    rng = np.random.default_rng(0)
    for c in range(6):
        base = rng.integers(0, 256, size=(16, 16))
        for k in range(4):
            pixels = np.clip(base + rng.integers(-60, 60, size=(16, 16)), 0, 255)
            path = root / "gallery" / f"class_{c}" / f"{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(path)
    for q in range(4):
        pixels = rng.integers(0, 256, size=(16, 16)).astype(np.uint8)
        (root / "queries").mkdir(exist_ok=True)
        Image.fromarray(pixels).save(root / "queries" / f"q{q}.png")
    # a duplicate pixel-for-pixel copy of one gallery image: a tie to order by id
    (root / "gallery" / "class_0" / "copy.png").write_bytes(
        (root / "gallery" / "class_0" / "1.png").read_bytes()
    )
    return root


def brute_force(run: Path, gallery: list[str], queries: list[str], k: int):
    """Top-k by a plain float64 matmul of the model's embeddings, ties by gallery order."""
    cfg, model, _ = load_model(run)
    g = embed_paths(cfg, model, gallery, progress=False).astype(np.float64)
    q = embed_paths(cfg, model, queries, progress=False).astype(np.float64)
    scores = q @ g.T
    order = np.lexsort((np.broadcast_to(np.arange(len(gallery)), scores.shape), -scores), axis=1)
    return [[gallery[j] for j in row[:k]] for row in order], np.take_along_axis(scores, order, 1)


def test_build_and_search_equal_brute_force(runs, gallery: Path, tmp_path: Path) -> None:
    run = runs[0]
    index = Retriever.build(run, gallery / "gallery", progress=False)
    assert index.items.labels[:4] == ["class_0"] * 4  # labels from the class folders
    index.save(tmp_path / "g.index")
    loaded = Retriever.load(tmp_path / "g.index")
    queries = sorted(str(p) for p in (gallery / "queries").iterdir())
    hits = loaded.search(gallery / "queries", k=5)
    expected, scores = brute_force(run, index.items.paths, queries, 5)
    assert hits.queries == queries and hits.paths == expected
    np.testing.assert_allclose(hits.scores, scores[:, :5], atol=1e-5)
    # an exact copy of a gallery image: both copies tie, the one added first comes first
    copy_hits = loaded.search([str(gallery / "gallery" / "class_0" / "1.png")], k=2)
    assert copy_hits.paths[0] == [
        str(gallery / "gallery" / "class_0" / "1.png"),
        str(gallery / "gallery" / "class_0" / "copy.png"),
    ]
    assert copy_hits.scores[0][0] == copy_hits.scores[0][1]
    # embeddings as queries give the same lists
    cfg, model, _ = load_model(run)
    emb = embed_paths(cfg, model, queries, progress=False)
    assert loaded.search(emb, k=5).paths == hits.paths
    assert sorted(p.name for p in (tmp_path / "g.index").iterdir()) == [
        "index.faiss",
        "items.csv",
        "manifest.json",
    ]


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_add_and_remove_equal_a_rebuild(runs, gallery: Path, tmp_path: Path, kind: str) -> None:
    paths, labels = read_gallery(gallery / "gallery")
    options = {"nlist": 2, "nprobe": 2} if kind == "ivf" else {}  # nprobe = nlist: exhaustive
    first = Retriever.build(runs[0], paths[:15], labels=labels[:15], kind=kind, options=options)
    assert first.add(paths[15:], labels=labels[15:], progress=False) == len(paths) - 15
    first.save(tmp_path / "grown")
    whole = Retriever.build(runs[0], paths, labels=labels, kind=kind, options=options)
    queries = gallery / "queries"
    grown = Retriever.load(tmp_path / "grown").search(queries, k=6)
    rebuilt = whole.search(queries, k=6)
    assert grown.paths == rebuilt.paths and grown.labels == rebuilt.labels
    np.testing.assert_allclose(grown.scores, rebuilt.scores, atol=1e-6)

    gone = [paths[0], paths[7], paths[20]]
    shrunk = Retriever.load(tmp_path / "grown")
    assert shrunk.remove(gone) == 3
    shrunk.save()
    kept = [p for p in paths if p not in gone]
    fresh = Retriever.build(
        runs[0], kept, labels=[lab for p, lab in zip(paths, labels) if p in kept], kind=kind
    )
    after = Retriever.load(tmp_path / "grown").search(queries, k=6)
    assert after.paths == fresh.search(queries, k=6).paths
    assert not set(gone) & {p for row in after.paths for p in row}


def test_approximate_index_reports_its_recall(runs, gallery: Path) -> None:
    index = Retriever.build(runs[0], gallery / "gallery", kind="hnsw")
    recall = index.manifest["recall_vs_exact"]
    assert recall["queries"] == 25 and 0.9 <= recall["recall@1"] <= 1.0
    small = Retriever.build(runs[0], gallery / "gallery", kind="ivf", approximate_above=100)
    assert small.manifest["index"]["kind"] == "flat"  # 25 items: exact


def test_fingerprint_mismatch_is_an_error_naming_both(runs, gallery: Path, tmp_path: Path) -> None:
    Retriever.build(runs[0], gallery / "gallery").save(tmp_path / "g")
    index = Retriever.load(tmp_path / "g")
    with pytest.raises(ConfigError, match=r"model weights of .*run0.* but .*run1"):
        index.use_checkpoint(runs[1])
    with pytest.raises(ConfigError, match="preprocessing"):
        index.use_checkpoint(None, ["--data.transform_options.size=20"])
    index.use_checkpoint()  # the recorded one is fine
    with pytest.raises(ValueError, match=r"this index holds 16-d"):
        index.search(np.zeros((2, 8), dtype=np.float32))


def test_cli_build_search_add_remove(runs, gallery: Path, tmp_path: Path, capsys) -> None:
    index = tmp_path / "cli.index"
    images = gallery / "gallery"
    assert (
        main(
            [
                "index",
                "build",
                "--checkpoint",
                str(runs[0]),
                "--images",
                str(images),
                "--out",
                str(index),
            ]
        )
        == 0
    )
    assert "indexed 25 images (25 labelled)" in capsys.readouterr().out
    out = tmp_path / "hits.csv"
    assert (
        main(
            [
                "search",
                "--index",
                str(index),
                "--images",
                str(gallery / "queries"),
                "--k",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    lines = out.read_text().splitlines()
    assert lines[0] == "query,rank,path,score,label" and len(lines) == 1 + 4 * 3
    out_json = tmp_path / "hits.json"
    assert (
        main(
            [
                "search",
                "--index",
                str(index),
                "--images",
                str(gallery / "queries"),
                "--k",
                "2",
                "--out",
                str(out_json),
            ]
        )
        == 0
    )
    data = json.loads(out_json.read_text())
    assert len(data) == 4 and len(data[0]["results"]) == 2 and "label" in data[0]["results"][0]
    assert (
        main(
            [
                "search",
                "--index",
                str(index),
                "--images",
                str(gallery / "queries" / "q0.png"),
                "--k",
                "2",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "q0.png" in printed and "  1. " in printed and "[class_" in printed

    new = tmp_path / "new"
    new.mkdir()
    (new / "n.png").write_bytes((gallery / "queries" / "q1.png").read_bytes())
    assert main(["index", "add", "--index", str(index), "--images", str(new)]) == 0
    assert "added 1 items; " in capsys.readouterr().out
    assert main(["index", "remove", "--index", str(index), "--ids", str(new / "n.png")]) == 0
    assert "holds 25" in capsys.readouterr().out


def test_bad_inputs_are_one_line_errors_and_change_nothing(runs, gallery, tmp_path, capsys) -> None:
    index = tmp_path / "g"
    Retriever.build(runs[0], gallery / "gallery").save(index)
    before = {p.name: p.read_bytes() for p in index.iterdir()}

    def fails(*args: str, match: str) -> None:
        assert main(list(args)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err, err
        assert {p.name: p.read_bytes() for p in index.iterdir()} == before  # nothing overwritten

    # an id added twice
    fails(
        "index",
        "add",
        "--index",
        str(index),
        "--images",
        str(gallery / "gallery" / "class_1"),
        match="is already in the index",
    )
    # an id that is not there
    fails(
        "index",
        "remove",
        "--index",
        str(index),
        "--ids",
        "nope.png",
        match="not in the index: nope.png",
    )
    # another model
    fails(
        "search",
        "--index",
        str(index),
        "--images",
        str(gallery / "queries"),
        "--checkpoint",
        str(runs[1]),
        match="built with the model weights of",
    )
    # a query image that cannot be read
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    fails("search", "--index", str(index), "--images", str(bad), match=f"cannot read image {bad}")
    # a build over an existing non-index folder
    other = tmp_path / "other"
    other.mkdir()
    assert (
        main(
            [
                "index",
                "build",
                "--checkpoint",
                str(runs[0]),
                "--images",
                str(gallery / "gallery"),
                "--out",
                str(other),
            ]
        )
        == 2
    )
    assert "is not a deepmetric index" in capsys.readouterr().err

    # a corrupt and a missing file, in a copy
    broken = tmp_path / "broken"
    broken.mkdir()
    for name, data in before.items():
        (broken / name).write_bytes(data)
    (broken / "index.faiss").write_bytes(before["index.faiss"][:100])
    assert main(["search", "--index", str(broken), "--images", str(gallery / "queries")]) == 2
    assert f"{broken / 'index.faiss'}: not a readable faiss index" in capsys.readouterr().err
    (broken / "items.csv").unlink()
    with pytest.raises(IndexFileError, match=r"items\.csv: missing"):
        Retriever.load(broken)
    with pytest.raises(IndexFileError, match="index not found"):
        Retriever.load(tmp_path / "nowhere")


def test_interrupted_write_keeps_the_old_index(runs, gallery, tmp_path, monkeypatch) -> None:
    import faiss

    index = tmp_path / "g"
    retriever = Retriever.build(runs[0], gallery / "gallery")
    retriever.save(index)
    before = {p.name: p.read_bytes() for p in index.iterdir()}
    retriever.remove([retriever.items.paths[0]])

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(faiss, "write_index", disk_full)
    with pytest.raises(OSError, match="No space left"):
        retriever.save()
    assert {p.name: p.read_bytes() for p in index.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]  # no temporary folder left


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_reproduces_pytorch(runs, gallery, tmp_path, fmt, capsys) -> None:
    out = tmp_path / f"model.{fmt}"
    assert main(["export", "--checkpoint", str(runs[0]), "--format", fmt, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "preprocessing: grayscale float / 255 -> resize 16x16 (bilinear)" in printed
    cfg, model, _ = load_model(runs[0])
    paths, _ = read_gallery(gallery / "gallery")
    from deepmetric.engine.builders import build_transforms

    _, tf = build_transforms(cfg)
    from deepmetric.data import open_image

    batch = torch.stack([tf(open_image(p)) for p in paths[:5]])
    with torch.no_grad():
        expected = model(batch).numpy()
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
        meta = json.loads(session.get_modelmeta().custom_metadata_map["deepmetric"])
    else:
        files = {"deepmetric.json": ""}
        with pytest.warns(FutureWarning):  # torch.jit is deprecated, still works
            module = torch.jit.load(str(out), _extra_files=files)
        got = module(batch).detach().numpy()
        meta = json.loads(files["deepmetric.json"])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert meta["embedding_dim"] == 16 and meta["input"]["shape"] == ["batch", 1, 16, 16]
    assert meta["preprocessing"]["steps"][-1] == {"op": "normalize", "mean": [0.5], "std": [0.5]}


def test_export_check_refuses_a_wrong_graph(runs, tmp_path, monkeypatch) -> None:
    import deepmetric.retrieval.export as export

    monkeypatch.setattr(
        export, "_torchscript_runner", lambda path: lambda x: np.zeros((len(x), 16))
    )
    with pytest.raises(export.ExportError, match="differs from PyTorch"):
        export_model(runs[0], "torchscript", tmp_path / "m.pt")
    assert not list(tmp_path.iterdir())  # nothing written
    with pytest.raises(ConfigError, match="is a folder"):
        export_model(runs[0], "onnx", tmp_path)


def test_unreadable_gallery_image_stops_the_build(runs, gallery, tmp_path) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "a.png").write_bytes((gallery / "queries" / "q0.png").read_bytes())
    (images / "b.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DatasetError, match=r"cannot read image .*b\.jpg"):
        Retriever.build(runs[0], images)


def test_datasets_export_writes_a_folder_the_loader_reads(tmp_path: Path, capsys) -> None:
    out = tmp_path / "digits"
    assert main(["datasets", "export", "--dataset", "digits", "--out", str(out)]) == 0
    assert "wrote 896 images of 5 classes" in capsys.readouterr().out
    from deepmetric.data import build_dataset

    back = build_dataset("folder", out, "all")
    test = build_dataset("digits", split="test")
    assert back.class_names == ["5", "6", "7", "8", "9"] and len(back) == 896
    assert back.labels.tolist() == sorted(test.labels.tolist())  # written class by class
    first = np.asarray(Image.open(out / "5" / "000000.png"), dtype=np.float64) / 255
    np.testing.assert_allclose(first, test.load_image(0)[0].numpy(), atol=0.5 / 255)
    assert main(["datasets", "export", "--dataset", "digits", "--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
