"""The HTML report: its numbers against brute force, its bounds, a run's and an index's report,
and the page itself in headless Chromium (skipped, saying how to install it, when missing)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_runs
from deepmetric.cli import main
from deepmetric.engine import build_eval_loader
from deepmetric.engine.inference import evaluation_set, load_model
from deepmetric.evaluation import extract_embeddings
from deepmetric.evaluation.verification import FARS, pair_score_counts
from deepmetric.report import (
    ReportOptions,
    gather_report,
    render_html,
    report_index,
    write_report,
)
from deepmetric.report.numbers import (
    class_table,
    far_name,
    pick_random,
    pick_worst,
    project_2d,
    query_results,
    sample_query_rows,
    top_k,
    verification,
)
from deepmetric.report.run import config_diff, metrics_table, read_records
from deepmetric.report.svg import line_chart
from deepmetric.retrieval import Retriever
from evaluation_reference import clustered, ref_order

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
# The demo at 16 x 16, 16-d, 6 iterations; evaluated before training, at 3 and at 6 (curves)
TINY = [
    *tiny_runs.TINY,
    "--output.report=true",
    "--train.iterations=6",
    "--train.log_every=2",
    "--eval.at_start=true",
    "--eval.every=3",
    "--schedule.name=none",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny digits run and its report, as ``deepmetric train`` writes them."""
    folder = tmp_path_factory.mktemp("report") / "run"
    n = torch.get_num_threads()
    assert main(["train", "--config", str(DEMO), *TINY, f"--output.dir={folder}"]) == 0
    torch.set_num_threads(n)
    return folder


def run_embeddings(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N, d) embeddings and (N,) labels of the run's test split, as its report computed them."""
    cfg, model, ckpt = load_model(run)
    dataset = evaluation_set(cfg, "test", ckpt).dataset
    emb, labels = extract_embeddings(model, build_eval_loader(cfg, dataset, False), progress=False)
    return emb.numpy(), labels.numpy()


def brute_force(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Per query (each against all others, float64 scores, ties by index): AP@R, Recall@1,
    R; per class: mean Recall@1 and MAP@R over its queries with R >= 1."""
    scores = x.astype(np.float64) @ x.astype(np.float64).T
    ap, r1, num_relevant = [], [], []
    for i in range(len(x)):
        rel = y[ref_order(scores[i], i)] == y[i]
        r = int(rel.sum())
        num_relevant.append(r)
        top = rel[:r]
        ap.append(float((np.cumsum(top) / np.arange(1, r + 1) * top).sum() / r) if r else 0.0)
        r1.append(float(rel[0]))
    ap_a, r1_a, rel_a = np.array(ap), np.array(r1), np.array(num_relevant)
    classes = np.unique(y[rel_a > 0])
    per_class = {
        int(c): (r1_a[(y == c) & (rel_a > 0)].mean(), ap_a[(y == c) & (rel_a > 0)].mean())
        for c in classes
    }
    return {"ap": ap_a, "recall@1": r1_a, "num_relevant": rel_a, "per_class": per_class}


# ------------------------------------------------------------------------------ numbers


def test_per_query_and_per_class_numbers_equal_brute_force() -> None:
    x, y = clustered(90, 7, 8, seed=3, noise=1.2)
    y[0] = 99  # a class of one image: no relevant item, left out everywhere
    names = [f"c{i}" for i in range(100)]
    results = query_results(x, y, np.arange(len(y)), None)
    ref = brute_force(x, y)
    np.testing.assert_array_equal(results.num_relevant, ref["num_relevant"])
    valid = ref["num_relevant"] > 0
    np.testing.assert_allclose(results.ap[valid], ref["ap"][valid], atol=1e-12)
    np.testing.assert_array_equal(results.recall_at_1[valid], ref["recall@1"][valid])
    assert results.summary["map@r"] == pytest.approx(ref["ap"][valid].mean(), abs=1e-12)
    table = class_table(results, names, max_classes=100)
    assert table.total == len(ref["per_class"]) == 7 and "c99" not in table.names
    for name, r1, mapr in zip(table.names, table.recall_at_1, table.map_at_r):
        assert (r1, mapr) == pytest.approx(ref["per_class"][int(name[1:])], abs=1e-12)
    worst_first = list(zip(table.recall_at_1, table.map_at_r))
    assert worst_first == sorted(worst_first)
    assert len(class_table(results, names, max_classes=3).names) == 3
    # a sample of whole classes: the same numbers for those queries
    part = sample_query_rows(y, 40, seed=0)
    assert len(part) <= 40 and set(np.unique(y[part])).isdisjoint(
        set(np.unique(np.delete(y, part)))
    )
    sampled = query_results(x, y, part, None)
    np.testing.assert_allclose(sampled.ap, results.ap[part], atol=1e-12)


def test_roles_search_the_gallery_only() -> None:
    x, y = clustered(60, 5, 8, seed=4, noise=1.0)
    is_query = np.arange(60) % 3 == 0
    results = query_results(x, y, np.flatnonzero(is_query), np.flatnonzero(~is_query))
    q, g = x[is_query].astype(np.float64), x[~is_query].astype(np.float64)
    for n, (row, label) in enumerate(zip(q, y[is_query])):
        rel = y[~is_query][ref_order(g @ row, None)] == label
        r = int(rel.sum())
        top = rel[:r]
        assert results.ap[n] == pytest.approx(
            (np.cumsum(top) / np.arange(1, r + 1) * top).sum() / r
        )
    hits, _ = top_k(x, results.rows[:3], np.flatnonzero(~is_query), 4)
    assert not is_query[hits].any()


def test_worst_queries_have_the_lowest_ap() -> None:
    x, y = clustered(200, 10, 6, seed=5, noise=1.5)
    results = query_results(x, y, np.arange(len(y)), None)
    worst = pick_worst(results, 12)
    others = np.setdiff1d(np.flatnonzero(results.valid), worst)
    assert results.ap[worst].max() <= results.ap[others].min()
    assert list(results.ap[worst]) == sorted(results.ap[worst])
    drawn = pick_random(results, 12, seed=1)
    assert len(set(drawn)) == 12 and (pick_random(results, 12, seed=1) == drawn).all()
    hits, scores = top_k(x, results.rows[worst], None, 5)
    assert hits.shape == (12, 5) and not (hits == results.rows[worst][:, None]).any()
    assert (np.diff(scores, axis=1) <= 0).all()


def test_two_dimensional_maps() -> None:
    from scipy.spatial.distance import pdist
    from sklearn.decomposition import PCA

    x, y = clustered(120, 3, 10, seed=7, noise=0.3)
    pca = project_2d(x, "pca")
    reference = PCA(2).fit_transform(x.astype(np.float64))
    np.testing.assert_allclose(np.abs(pca), np.abs(reference), atol=1e-6)  # up to the signs
    tsne = project_2d(x, "tsne", seed=0)
    centres = np.stack([tsne[y == c].mean(axis=0) for c in range(3)])
    spread = max(np.linalg.norm(tsne[y == c] - centres[c], axis=1).mean() for c in range(3))
    assert tsne.shape == (120, 2) and pdist(centres).min() > 2 * spread
    with pytest.raises(ValueError, match="pca"):
        project_2d(x, "umap")


def noise_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(40, 30, 3), dtype=np.uint8))


def test_large_sets_are_sampled_within_bounds(tmp_path: Path) -> None:
    x, y = clustered(6000, 1200, 16, seed=6)
    options = ReportOptions(k=3, queries=4, max_queries=500, max_classes=40, max_points=300)
    loaded = []

    def load(i: int) -> Image.Image:
        loaded.append(i)
        return noise_image(i)

    content = gather_report(x, y, load, options=options)
    assert content.classes is not None and len(content.classes.names) == 40
    assert content.classes.total < 1200 and content.metrics.columns[0][1]["num_queries"] <= 500
    assert len(content.embedding_map.points) == 300
    assert [len(g.rows) for g in content.grids] == [4, 4]
    assert all(len(row.items) == 3 for g in content.grids for row in g.rows)
    assert len(content.thumbnails) == len(set(loaded)) <= 300 + 2 * 4 * (3 + 1)
    assert any("randomly drawn classes" in note for note in content.notes)
    size = write_report(content, tmp_path / "r.html").stat().st_size
    assert size < 3_000_000

    # a small thumbnail budget: the map loses its hover images, the grids keep theirs
    tight = dataclasses.replace(options, max_thumbnail_bytes=20_000)
    content = gather_report(x, y, noise_image, options=tight)
    grid_keys = {key for g in content.grids for row in g.rows for key in [row.query, *row.items]}
    assert grid_keys <= set(content.thumbnails) and len(content.thumbnails) < 300
    assert any("no hover image" in note for note in content.notes)


def verification_table(page: str) -> dict[str, float]:
    """{key: exact value} of the rows of the page's verification table that have a key."""
    table = page.split('id="verification-table"')[1].split("</table>")[0]
    return {k: float(v) for k, v in re.findall(r'data-key="([^"]+)" data-value="([^"]*)"', table)}


def test_verification_section_equals_the_pair_counts() -> None:
    x, y = clustered(300, 6, 8, seed=8, noise=1.0)
    options = ReportOptions(k=2, queries=2, max_points=50)
    content = gather_report(x, y, noise_image, options=options)
    counts = pair_score_counts(x, y)
    v = content.verification
    assert v is not None
    # every unordered pair i < j, by brute force (float64 scores)
    i, j = np.triu_indices(len(y), 1)
    scores = np.einsum("nd,nd->n", x[i].astype(np.float64), x[j].astype(np.float64))
    same = y[i] == y[j]
    assert (v.num_positive, v.num_negative) == (same.sum(), (~same).sum())
    assert (sum(v.positive), sum(v.negative)) == (same.sum(), (~same).sum())  # all in a bin

    page = render_html(content)
    table = verification_table(page)
    assert table["roc_auc"] == counts.auc() and f"ROC AUC {counts.auc():.4f}" in page
    assert table["eer"] == counts.eer()[0]
    for far in FARS:
        tar, _ = counts.tar_at_far(far)
        shown = table[f"tar@far={far_name(far)}"]
        assert shown == tar or (np.isnan(tar) and np.isnan(shown))
    assert np.isnan(table["tar@far=1e-5"])  # 37,382 negative pairs cannot resolve 1e-5
    assert 'data-key="tar@far=1e-5" data-value="nan">&#8212;' in page

    # the line at FAR 1e-3: the conservative threshold, accepting TAR of the positives
    tar, threshold = counts.tar_at_far(1e-3)
    line = re.search(r'<line class="threshold"[^>]*data-name="FAR 1e-3" data-score="([^"]+)"', page)
    assert line is not None and float(line.group(1)) == threshold
    assert (scores[~same] >= threshold + 1e-6).mean() <= 1e-3
    assert (scores[same] >= threshold - 1e-6).mean() == pytest.approx(tar, abs=2 / same.sum())
    assert 'data-name="EER" data-score="' in page

    # the ROC drawn: at most 2 x 200 exact ROC points, from 1e-5 (<= 1 / 37,382 negatives)
    far, tar_all, _ = counts.roc()
    assert v.far_min == 1e-5 and v.roc[0][0] == 1e-5 and len(v.roc[0]) <= 400
    for f, t in zip(*v.roc):
        assert f == v.far_min or ((far == f) & (tar_all == t)).any()
    assert len(re.findall(r'<circle class="mark"', page)) == 4  # 1e-1 .. 1e-4

    # roles: every (query, gallery) pair; one class: no negative pairs, a note instead
    is_query = np.arange(len(y)) % 3 == 0
    roles = gather_report(
        x, y, noise_image, query_mask=is_query, gallery_mask=~is_query, options=options
    )
    q, g = is_query, ~is_query
    assert roles.verification.auc == pair_score_counts(x[q], y[q], x[g], y[g]).auc()
    assert roles.verification.num_positive == (y[q][:, None] == y[g][None]).sum()
    single = gather_report(x, np.zeros_like(y), noise_image, options=options)
    assert single.verification is None and 'id="verification"' not in render_html(single)
    assert any("No verification section" in n and "0 negative" in n for n in single.notes)


# ------------------------------------------------------------------------------ a run


def test_run_report_is_written_and_self_contained(run: Path) -> None:
    page = (run / "report.html").read_text()
    info = json.loads((run / "run.json").read_text())
    assert info["config_file"] == str(DEMO) and info["command_line"]["train.iterations"] == 6
    # nothing outside the file: every src/href is inline data or an anchor
    assert re.findall(r'(?:src|href)="(?!data:|#)[^"]*"', page) == []
    assert "<script src" not in page and "@import" not in page
    for section in ("metrics-table", "config-diff", "class-table", "grid-0", "grid-1"):
        assert f'id="{section}"' in page
    assert page.count('class="hit ') == 2 * 10 * 8  # two grids of 10 queries x k = 8


def test_metrics_table_and_config_diff(run: Path, tmp_path: Path) -> None:
    records = read_records(run)
    table = metrics_table(records, "test", 6)
    assert [h for h, _ in table.columns] == ["untrained (iteration 0)", "trained (iteration 6)"]
    start = next(r for r in records if r.get("split") == "test" and r["iteration"] == 0)
    end = next(r for r in records if r.get("split") == "test" and r["iteration"] == 6)
    assert table.columns[0][1] is start and table.columns[1][1] is end
    assert table.keys == ["recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision"]

    cfg, _, _ = load_model(run)
    diff = config_diff(cfg, run)
    rows = {key: (a, b, cli) for key, a, b, cli in diff.rows}
    assert rows["model.embedding_dim"] == (64, 16, True)
    assert rows["data.transform_options.size"] == (32, 16, True)
    assert rows["output.dir"][2] and "optim.lr" not in rows
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "run.json").write_text(json.dumps({"config_file": str(tmp_path / "gone.yaml")}))
    assert "not found" in config_diff(cfg, copy).note and not config_diff(cfg, copy).rows
    assert "run.json not found" in config_diff(cfg, tmp_path).note.replace(str(tmp_path), "")


def test_report_command(run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "r.html"
    argv = ["report", "--checkpoint", str(run), "--out", str(out), "--k", "4", "--queries", "3"]
    assert main(argv) == 0
    assert f"report written to {out}" in capsys.readouterr().out
    page = out.read_text()
    assert page.count('class="hit ') == 2 * 3 * 4 and "PCA of all 896" in page
    for bad, expected in (
        (["report", "--checkpoint", str(run), "--split", "val"], "eval.protocol=test"),
        (["report", "--index", str(tmp_path / "none")], "--images"),
        (["report", "--checkpoint", str(run), "--images", str(tmp_path)], "--index"),
        (["report", "--checkpoint", str(tmp_path / "none")], "checkpoint not found"),
    ):
        assert main(bad) == 2, bad
        err = capsys.readouterr().err.strip()
        assert err.startswith("deepmetric: error:") and expected in err and "\n" not in err


def write_digits(root: Path, labels: np.ndarray, rows: np.ndarray, dataset, folders: bool) -> None:
    for row in rows:
        name = f"{int(labels[row])}/{row}.png" if folders else f"{row}.png"
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = (dataset.load_image(int(row))[0].numpy() * 255).astype(np.uint8)
        Image.fromarray(pixels).save(path)


def test_index_report(run: Path, tmp_path: Path) -> None:
    cfg, _, ckpt = load_model(run)
    dataset = evaluation_set(cfg, "test", ckpt).dataset
    labels = dataset.labels.numpy()
    rows = np.arange(0, len(labels), 9)
    write_digits(tmp_path / "gallery", labels, rows[5:], dataset, folders=True)
    write_digits(tmp_path / "queries", labels, rows[:5], dataset, folders=True)
    write_digits(tmp_path / "loose", labels, rows[:5], dataset, folders=False)
    Retriever.build(run, tmp_path / "gallery", progress=False).save(tmp_path / "g.index")
    options = ReportOptions(k=4, queries=3)
    page = report_index(tmp_path / "g.index", tmp_path / "queries", options=options).read_text()
    assert (tmp_path / "g.index-report.html").is_file()
    assert "worst queries" in page and page.count('class="hit ') == 2 * 3 * 4
    figures = re.findall(r'<figure class="(query|hit \w+)" data-t="[^"]*" data-label="(\w+)"', page)
    query_label = None
    for css, label in figures:
        if css == "query":
            query_label = label
        else:
            assert css == ("hit ok" if label == query_label else "hit bad")
    # queries without labels: grey frames, no "worst" grid
    out = tmp_path / "loose.html"
    page = report_index(tmp_path / "g.index", tmp_path / "loose", out=out, options=options)
    text = page.read_text()
    assert "worst queries" not in text and text.count('class="hit unknown"') == 3 * 4


# ------------------------------------------------------------------------------ the browser

INSTALL = (
    "needs Chromium, its driver and selenium: apt-get install chromium chromium-driver; "
    "pip install selenium"
)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by selenium, 1280 x 900 (a laptop screen), console logged."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip(f"selenium is not installed; {INSTALL}")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip(f"chromium or chromedriver not found; {INSTALL}")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1280,900")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit Service: Selenium Manager never looks for a driver on the network
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


def column(browser, table_id: str, index: int) -> list[str]:
    return browser.execute_script(
        f"return [...document.querySelectorAll('#{table_id} tbody tr')]"
        f".map(r => r.cells[{index}].dataset.value)"
    )


def test_report_in_a_browser(run: Path, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    browser.get((run / "report.html").resolve().as_uri())
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []

    # the metrics shown are metrics.jsonl's, untrained and trained
    records = read_records(run)
    start = next(r for r in records if r.get("split") == "test" and r["iteration"] == 0)
    end = next(r for r in records if r.get("split") == "test" and r["iteration"] == 6)
    shown = browser.execute_script(
        "return [...document.querySelectorAll('#metrics-table tbody tr')].map(r => "
        "[...r.cells].slice(1).map(c => [c.dataset.key, c.dataset.value, c.textContent]))"
    )
    assert len(shown) == 6
    for row in shown:
        for (key, value, text), record in zip(row, (start, end)):
            assert float(value) == record[key] and text == f"{record[key]:.4f}"

    # per-class table: worst first; a click on a heading sorts ascending (worst first), a
    # second click reverses; the values are the brute-force per-class numbers (float64 scores
    # here, float32 in the report: a near-tie may swap two items, hence the tolerance)
    x, y = run_embeddings(run)
    ref = brute_force(x, y)
    cfg, _, ckpt = load_model(run)
    names = evaluation_set(cfg, "test", ckpt).dataset.class_names
    expected = {names[c]: values for c, values in ref["per_class"].items()}
    classes = column(browser, "class-table", 0)
    for name, r1, mapr in zip(
        classes, column(browser, "class-table", 2), column(browser, "class-table", 3)
    ):
        assert (float(r1), float(mapr)) == pytest.approx(expected[name], abs=1e-4)
    worst = min(expected, key=lambda n: expected[n])
    assert classes[0] == worst
    heads = browser.find_elements(By.CSS_SELECTOR, "#class-table th")
    for col, metric in ((3, 1), (2, 0)):  # MAP@R, then Recall@1
        heads[col].click()
        values = [float(v) for v in column(browser, "class-table", col)]
        assert values == sorted(values)
        lowest = min(v[metric] for v in expected.values())
        assert expected[column(browser, "class-table", 0)[0]][metric] == pytest.approx(
            lowest, abs=1e-4
        )
        heads[col].click()
        assert [float(v) for v in column(browser, "class-table", col)] == sorted(values)[::-1]
    heads[1].click()
    sizes = [int(v) for v in column(browser, "class-table", 1)]
    assert sizes == sorted(sizes)

    # the grids: k = 8 loaded images per query, the brute-force neighbours, frames by label
    grids = browser.execute_script(
        "return [...document.querySelectorAll('.grid-row')].map(r => "
        "[...r.querySelectorAll('figure')].map(f => [f.className, f.dataset.t, "
        "f.querySelector('img').naturalWidth]))"
    )
    assert len(grids) == 20
    scores = x.astype(np.float64) @ x.astype(np.float64).T
    for row in grids:
        (query_css, query, query_width), hits = row[0], row[1:]
        assert query_css == "query" and query_width > 0 and len(hits) == 8
        q = int(query)
        reference = ref_order(scores[q], q)[:8]
        for (css, item, width), ref_item in zip(hits, reference):
            assert width > 0  # the embedded image loaded
            assert abs(scores[q, int(item)] - scores[q, ref_item]) < 1e-6  # same rank
            assert css == ("hit ok" if y[int(item)] == y[q] else "hit bad")
    worst_ap = [ref["ap"][int(r[0][1])] for r in grids[:10]]
    assert max(worst_ap) <= np.sort(ref["ap"][ref["num_relevant"] > 0])[10] + 1e-12

    # the map: every point of the 896, the image of a point on hover
    dots = browser.find_elements(By.CSS_SELECTOR, "svg.map circle")
    assert len(dots) == len(y)
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", dots[0])
    ActionChains(browser).move_to_element(dots[0]).perform()
    tip = browser.find_element(By.ID, "tip")
    assert tip.is_displayed()
    assert tip.find_element(By.TAG_NAME, "span").text == dots[0].get_attribute("data-label")
    assert tip.find_element(By.TAG_NAME, "img").get_attribute("src").startswith("data:image/jpeg")

    # screenshots: the first screen of a laptop, and the whole page
    browser.execute_script("window.scrollTo(0, 0)")
    top = tmp_path / "report.png"
    assert browser.save_screenshot(str(top))
    with Image.open(top) as image:
        assert len(image.convert("L").getcolors(1 << 16) or []) > 50  # not a blank page
    shutil.copy(top, "/tmp/report-screenshot.png")
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_verification_in_a_browser(run: Path, browser, tmp_path: Path) -> None:
    browser.get((run / "report.html").resolve().as_uri())
    drawn = browser.execute_script(
        """const s = document.getElementById("verification");
        const box = e => { const r = e.getBoundingClientRect();
                           return [r.left, r.top, r.width, r.height]; };
        return {
          charts: [...s.querySelectorAll("svg.chart")].map(box),
          curve: s.querySelector(".roc-curve").getTotalLength(),
          marks: [...s.querySelectorAll("circle.mark")].map(box),
          bars: [...s.querySelectorAll("polygon.bars")].map(box),
          frame: box(s.querySelector("svg.histogram rect.frame")),
          lines: [...s.querySelectorAll("line.threshold")].map(
            l => [l.dataset.name, Number(l.dataset.score), box(l)]),
          auc: Number(s.querySelector('[data-key="roc_auc"]').dataset.value),
        };"""
    )
    x, y = run_embeddings(run)
    counts = pair_score_counts(x, y)
    expected = verification(counts)
    assert drawn["auc"] == pytest.approx(counts.auc(), abs=1e-6)
    # ROC and histograms side by side on a laptop screen, both drawn
    (roc, hist) = drawn["charts"]
    assert roc[2] > 500 and roc[3] > 250 and roc[1] == hist[1] and hist[0] > roc[0] + roc[2]
    assert drawn["curve"] > 300  # px of curve
    finite = [t for _, t, _ in expected.tar_at_far if np.isfinite(t)]
    assert len(drawn["marks"]) == len(finite) == 5  # 358,400 negative pairs resolve 1e-5
    assert len(drawn["bars"]) == 2 and min(b[3] for b in drawn["bars"]) > 50  # px tall
    # each threshold line where its score lies on the score axis
    left, _, width, _ = drawn["frame"]
    e0, e1 = expected.edges[0], expected.edges[-1]
    assert {name for name, _, _ in drawn["lines"]} == {"EER", "FAR 1e-3"}
    for name, score, (x0, _, _, height) in drawn["lines"]:
        assert score == pytest.approx(dict(expected.thresholds)[name], abs=1e-6)
        assert (x0 - left) / width == pytest.approx((score - e0) / (e1 - e0), abs=3e-3)
        assert height > 200
    section = browser.find_element("id", "verification")
    browser.execute_script("arguments[0].scrollIntoView()", section)
    shot = tmp_path / "verification.png"
    assert section.screenshot(str(shot))
    with Image.open(shot) as image:
        assert len(image.convert("L").getcolors(1 << 16) or []) > 50  # not a blank panel
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_a_curve_of_one_point_is_drawn_as_a_dot() -> None:
    """A run that logged its loss once (10 iterations, log_every 10) showed an empty chart."""
    one = line_chart([("loss", [10], [0.8])], title="t", x_label="x", y_label="y")
    assert one.count("<circle") == 1 and "iteration 10, 0.8000" in one
    two = line_chart([("loss", [10, 20], [0.8, 0.7])], title="t", x_label="x", y_label="y")
    assert "<circle" not in two and two.count("<polyline") == 1
