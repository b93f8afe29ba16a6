"""Smoke tests of the benchmark commands at tiny sizes: they run, write JSON + Markdown + plot,
and compare against their baselines. (The benchmarks themselves are commands, not tests.)"""

import json

import pytest

from scrnalf_hf.benchmark.harness import forward_flops
from scrnalf_cli import main
from scrnalf_hf.configuration_scrnalf import ScrnaLongformerConfig


@pytest.fixture(autouse=True)
def passive_openmp(monkeypatch):
    """With the variable set, run_benchmark runs in this process instead of a child."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")


def test_inference_benchmark_writes_figures_with_every_baseline(tmp_path):
    status = main(
        [
            "benchmark",
            "inference",
            "--output-dir",
            str(tmp_path),
            "--presets",
            "tiny",
            "--n-genes",
            "120",
            "--batch-size",
            "2",
            "--long-preset",
            "none",
            "--warmup",
            "0",
            "--repeats",
            "1",
            "--threads",
            "1",
        ]
    )
    assert status == 0
    results = json.loads((tmp_path / "inference.json").read_text())
    (section,) = results["sections"]
    assert set(section["models"]) == {
        "knn (simulated graph)",
        "knn, eager kernels (simulated graph)",
        "knn (window graph)",
        "linear",
        "dense (same graph)",
        "BertModel SDPA peer",
    }
    # warm-up 0: no first call is timed apart from the repeats
    assert section["models"]["knn (simulated graph)"]["first_call_s"] is None
    assert section["gemm"]["gflops_median"] > 0
    assert section["models"]["BertModel SDPA peer"]["speedup_vs_bert"] == pytest.approx(1.0)
    assert results["machine"]["threads"] == 1
    assert "| knn (window graph) |" in (tmp_path / "inference.md").read_text()
    assert (tmp_path / "inference.png").stat().st_size > 0
    assert "| knn (window graph) |" in (tmp_path / "PERFORMANCE.md").read_text()


def test_memory_benchmark_reports_growth_between_panel_sizes(tmp_path, monkeypatch):
    from scrnalf_hf.benchmark import benchmark_memory, memory

    # The real probe starts a fresh Python per (model, size); the next test runs it in-process.
    monkeypatch.setattr(memory, "_peak_memory_in_subprocess", lambda name, preset, n_genes, *rest: n_genes / 100)
    results = benchmark_memory(
        tmp_path,
        gene_counts=(120, 240),
        tokens_per_batch=240,
        models=("knn (window graph)",),
        warmup=0,
        repeats=1,
        threads=1,
    )
    assert [row["n_genes"] for row in results["rows"]] == [120, 240]
    growth = results["growth"]["knn (window graph)"]
    assert growth["genes_ratio"] == 2 and growth["memory_ratio"] == pytest.approx(2.0)
    assert (tmp_path / "memory.png").exists() and (tmp_path / "memory.md").exists()


def test_memory_probe_prints_the_forward_peak_in_mb(tmp_path, capsys):
    from argparse import Namespace

    from scrnalf_hf.benchmark.memory import _probe

    _probe(
        Namespace(
            probe="knn (window graph)",
            preset="tiny",
            n_genes=200,
            batch_size=2,
            graph_path=str(tmp_path / "none.pt"),
            threads=1,
        )
    )
    assert json.loads(capsys.readouterr().out)["peak_forward_mb"] >= 0


def test_train_benchmark_extrapolates_an_epoch_from_constant_steps(tmp_path):
    from scrnalf_hf.benchmark import benchmark_train

    results = benchmark_train(
        tmp_path, preset="tiny", n_genes=120, n_cells=96, batch_size=16, epoch_cells=1000, baseline_steps=1, threads=1
    )
    assert results["steps"] == 6 and results["cells_trained"] == 96
    assert results["epoch"]["steps"] == 63
    assert set(results["baselines"]) == {"dense", "bert"}
    assert results["knn"]["last_over_first"] > 0
    assert results["gemm_gflops"]["before"] > 0 and results["gemm_gflops"]["after"] > 0
    assert "GFLOP/s before training" in (tmp_path / "train.md").read_text()
    assert (tmp_path / "train.json").exists() and (tmp_path / "train.png").exists()


def test_default_preset_forward_costs_about_0_4_gflop_per_cell_at_2000_genes():
    config = ScrnaLongformerConfig.from_preset("default", n_genes=2000)
    knn, dense = forward_flops(config, "knn"), forward_flops(config, "dense")
    assert 0.38e9 < knn < 0.42e9  # projections and FFN dominate; kNN pairs add ~1%
    assert dense > knn + 2 * 2 * 2 * 2001**2 * 64 * 0.99  # dense adds 4·T²·d per layer


def test_targets_table_judges_each_target_and_fills_the_readme(tmp_path):
    from scrnalf_hf.benchmark.targets import END, START, targets_table, update_readme

    def models(cells, speedup, fraction):
        row = {"cells_per_s": cells, "speedup_vs_bert": speedup, "fraction_of_gemm": fraction}
        return {"knn (simulated graph)": row, "knn (window graph)": dict(row, cells_per_s=cells * 2)}

    inference = {
        "sections": [
            {"preset": "tiny", "n_genes": 2000, "batch_size": 32, "models": models(1200.0, 5.0, 0.3)},
            {"preset": "default", "n_genes": 2000, "batch_size": 32, "models": models(90.0, 4.5, 0.2)},
        ]
    }
    (tmp_path / "inference.json").write_text(json.dumps(inference))
    table = targets_table(tmp_path)
    assert "| tiny preset, 2,000 genes: ≥ 1,000 cells/s | simulated graph 1,200; window graph 2,400 | yes |" in table
    assert "| default preset, 2,000 genes: ≥ 100 cells/s | simulated graph 90.0; window graph 180.0 | **no** |" in table
    assert "(%) | simulated graph 20.0; window graph 20.0 | **no** |" in table

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{START}\nold numbers\n{END}\noutro\n")
    update_readme(readme, tmp_path)
    text = readme.read_text()
    assert "old numbers" not in text and "1,200" in text and text.startswith("intro") and text.endswith("outro\n")
