"""The conversion benchmark runs end to end on a small simulated file and reports its figures."""

from scrnalf_hf.data.benchmark import benchmark_convert


def test_benchmark_convert_reports_speed_and_peak_memory(tmp_path):
    result = benchmark_convert(3000, 100, tmp_path, chunk_size=1000)
    assert result["n_cells"] == 3000 and result["cells_per_s"] > 0 and result["cells_per_cpu_s"] > 0
    assert result["peak_rss_mb"] >= result["rss_after_imports_mb"] > 0
    assert result["output_mb"] > 0
    assert (tmp_path / "simulated_3000x100_seed0.h5ad").exists()  # kept for reuse
    assert not (tmp_path / "converted_3000x100").exists()
