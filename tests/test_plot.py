"""inspect --plot: a real PNG whose bars equal numpy histograms of the shard columns (read with pyarrow)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("matplotlib")

from conftest import classifier_table, data_dir, read_output, run_cli, save_teacher, shard_paths, token_table, write_parquet  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BINS = 10


@pytest.fixture(scope="module")
def directories(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot")
    tokens = write_parquet(token_table(19, seed=41), root / "t.parquet")
    corpus = write_parquet(classifier_table(13, seed=42), root / "c.parquet")
    lms = [save_teacher("softlabels.models:token_gru", s, root / f"lm{s}.safetensors") for s in (5, 6, 7)]
    mlp = save_teacher("softlabels.models:digits_mlp", 8, root / "mlp.safetensors")
    made = {}
    for name, corpus_path, teachers, extra in (
        ("ragged_ensemble", tokens, lms, ["--rows-per-shard", 6, "--top-k", 5]),
        ("one_classifier", corpus, [mlp], ["--rows-per-shard", 5, "--top-k", 3]),
    ):
        args = ["generate", corpus_path, "--out", root / name, "--id-column", "id", "--no-progress", *extra]
        for spec in teachers:
            args += ["--teacher", spec]
        assert run_cli(*args).code == 0
        made[name] = root / name
    return made


def _drawn_figure(monkeypatch):
    """Record the Figure that the CLI's save_plot actually draws and saves."""
    import softlabels.plot as plot

    drawn = []
    original = plot.draw

    def recording(report):
        drawn.append(original(report))
        return drawn[-1]

    monkeypatch.setattr(plot, "draw", recording)
    return drawn


def _panels(figure):
    return {axes.get_label(): axes for axes in figure.axes}


def _expected(directory):
    """Per-position captured mass and top-1 ids, per-row statistics: numpy over pyarrow columns."""
    table = read_output(directory)
    mass = np.concatenate([np.exp(np.array(r, dtype=np.float64)).sum(axis=1) for r in table.column("topk_logprobs").to_pylist()])
    top1 = np.concatenate([np.array(r)[:, 0] for r in table.column("topk_ids").to_pylist()])
    rows = {c: np.array(table.column(c).to_pylist(), dtype=np.float64) for c in ("confidence", "entropy", "agreement") if c in table.column_names}
    return table, mass, top1, rows


def _check_histogram(axes, values, upper):
    counts, edges = np.histogram(np.clip(values, 0.0, upper), bins=BINS, range=(0.0, upper))
    bars = list(axes.patches)
    assert [int(round(b.get_height())) for b in bars] == counts.tolist()
    assert [b.get_x() for b in bars] == pytest.approx(edges[:-1].tolist(), abs=1e-9)
    assert [b.get_x() + b.get_width() for b in bars] == pytest.approx(edges[1:].tolist(), abs=1e-9)
    assert sum(counts) == len(values)


@pytest.mark.parametrize("name", ["ragged_ensemble", "one_classifier"])
def test_plot_is_a_png_whose_bars_equal_numpy_histograms_of_the_shards(directories, name, tmp_path, monkeypatch):
    drawn = _drawn_figure(monkeypatch)
    png = tmp_path / "figures.png"
    result = run_cli("inspect", directories[name], "--json", "--plot", png)
    assert result.code == 0, result.err
    json.loads(result.out)  # --json output stays pure JSON with --plot

    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures.png"]  # no .tmp left behind
    from PIL import Image

    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        width, height = image.size
        assert image.format == "PNG" and 800 <= width <= 4000 and 300 <= height <= 3000
    import matplotlib.image

    assert matplotlib.image.imread(str(png)).shape[:2] == (height, width)

    assert len(drawn) == 1
    panels = _panels(drawn[0])
    table, mass, top1, rows = _expected(directories[name])
    ensemble = "agreement" in rows
    expected_panels = {"captured_mass", "confidence", "entropy", "top1_classes"} | ({"agreement"} if ensemble else set())
    assert set(panels) == expected_panels
    assert len(mass) == sum(len(r) for r in table.column("topk_ids").to_pylist()) and table.num_rows == len(rows["confidence"])

    _check_histogram(panels["captured_mass"], mass, 1.0)
    _check_histogram(panels["confidence"], rows["confidence"], 1.0)
    _check_histogram(panels["entropy"], rows["entropy"], float(rows["entropy"].max()))
    if ensemble:
        _check_histogram(panels["agreement"], rows["agreement"], 1.0)

    axes = panels["top1_classes"]
    heights = [int(round(b.get_height())) for b in axes.patches]
    labels = [int(t.get_text()) for t in axes.get_xticklabels()]
    classes, counts = np.unique(top1, return_counts=True)
    by_class = dict(zip(classes.tolist(), counts.tolist()))
    assert heights == sorted(counts.tolist(), reverse=True)[: len(heights)]
    assert len(heights) == min(10, len(classes)) and len(labels) == len(heights)
    assert [by_class[c] for c in labels] == heights  # each bar is labelled with its own class


def test_plot_overwrites_an_existing_file_and_text_output_names_it(directories, tmp_path):
    png = tmp_path / "figures.png"
    png.write_bytes(b"old")
    result = run_cli("inspect", directories["one_classifier"], "--plot", png)
    assert result.code == 0, result.err
    assert png.read_bytes()[:8] == PNG_MAGIC and f"histograms: {png}" in result.out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures.png"]


@pytest.mark.parametrize("target, message", [
    ("missing/sub/figures.png", "does not exist"),
    ("figures.pdf", "ending in .png"),
    (".", "is a directory"),
])
def test_bad_plot_path_is_one_line_exit_1_and_writes_nothing(directories, tmp_path, monkeypatch, target, message):
    monkeypatch.chdir(tmp_path)
    result = run_cli("inspect", directories["one_classifier"], "--plot", target)
    assert result.code == 1
    assert result.err.startswith("error: --plot ") and message in result.err
    assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err
    assert result.out == "" and list(tmp_path.iterdir()) == []


def test_missing_matplotlib_is_one_clear_line(directories, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    png = tmp_path / "figures.png"
    result = run_cli("inspect", directories["one_classifier"], "--plot", png)
    assert result.code == 1
    assert result.err.strip() == "error: --plot needs matplotlib: pip install 'softlabels[plot]'"
    assert not png.exists()
    assert run_cli("inspect", directories["one_classifier"]).code == 0  # inspect itself never needs it


def test_shards_read_by_the_test_are_the_manifest_shards(directories):
    """Guard for the expectations above: read_output's glob sees exactly the manifest's shards."""
    for directory in directories.values():
        manifest = json.loads((directory / "manifest.json").read_text())
        assert sorted(s["file"] for s in manifest["shards"]) == [p.name for p in shard_paths(directory)]
        assert sum(pq.ParquetFile(data_dir(directory) / s["file"]).metadata.num_rows for s in manifest["shards"]) == manifest["totals"]["rows"]
