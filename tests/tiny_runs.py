"""What the tests' training runs share: the repository's presets and the settings of a tiny,
fast digits run (each test file adds its own)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
FOLDER = ROOT / "configs" / "folder.yaml"

#: 16 x 16 images, 16-d embeddings, batches of P x K = 5 x 2, one thread, no progress bar and
#: no report (a test that wants one sets --output.report=true after these).
TINY = [
    "--data.transform_options.size=16",
    "--model.embedding_dim=16",
    "--sampler.p=5",
    "--sampler.k=2",
    "--train.progress=false",
    "--train.threads=1",
    "--output.report=false",
]
