"""The conversion benchmark runs end to end on small simulated files and reports its figures."""

import json

import pytest

from scrnalf_hf.benchmark.convert import benchmark_convert, benchmark_convert_run


def test_benchmark_convert_reports_speed_and_peak_memory(tmp_path):
    result = benchmark_convert(3000, 100, tmp_path, chunk_size=1000)
    assert result["n_cells"] == 3000 and result["cells_per_s"] > 0 and result["cells_per_cpu_s"] > 0
    assert result["peak_rss_mb"] >= result["rss_after_imports_mb"] > 0
    assert result["output_mb"] > 0
    assert (tmp_path / "simulated_3000x100_seed0.h5ad").exists()  # kept for reuse
    assert not (tmp_path / "converted_3000x100").exists()


@pytest.mark.slow  # two fresh processes
def test_convert_benchmark_compares_peak_memory_between_two_sizes(tmp_path):
    results = benchmark_convert_run(tmp_path, n_cells=2000, n_genes=100, compare_cells=500)
    assert results["smaller"]["n_cells"] == 500 and results["n_cells"] == 2000
    assert results["peak_rss_ratio"] == round(results["peak_rss_mb"] / results["smaller"]["peak_rss_mb"], 3)
    assert json.loads((tmp_path / "convert.json").read_text())["peak_rss_ratio"] == results["peak_rss_ratio"]
    assert "Peak memory at 500 cells" in (tmp_path / "convert.md").read_text()


@pytest.mark.slow  # two fresh processes
def test_predict_benchmark_streams_two_sizes_and_reports_their_peak_memory(tmp_path):
    from scrnalf_hf.benchmark.predict import benchmark_predict

    results = benchmark_predict(tmp_path, n_cells=1200, n_genes=100, compare_cells=300, batch_size=256)
    assert [run["n_cells"] for run in results["runs"]] == [300, 1200]
    assert all(run["cells_per_s"] > 0 and run["peak_rss_mb"] > 0 for run in results["runs"])
    assert results["peak_rss_ratio"] == round(results["runs"][1]["peak_rss_mb"] / results["runs"][0]["peak_rss_mb"], 3)
    assert "### predict, streamed" in (tmp_path / "predict.md").read_text()
    assert not list((tmp_path / "predict_work").glob("predicted_*"))  # outputs removed after measuring
