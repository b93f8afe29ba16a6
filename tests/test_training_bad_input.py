"""Bad input is rejected with a clear message before any training starts."""

import pytest

from scrnalf_hf.cli import main
from scrnalf_hf.training.cells import load_labelled_cells
from scrnalf_hf.training.compare import compare
from test_training_metrics_baselines import marker_adata


def _write(adata, tmp_path, name="cells.h5ad"):
    path = tmp_path / name
    adata.write_h5ad(path)
    return path


def _finetune(path, output, *extra):
    main(["finetune", "--train-file", str(path), "--label-key", "cell_type", "--preset", "tiny",
          "--output-dir", str(output), "--num_train_epochs", "1", "--disable_tqdm", "true", *extra])


def test_unknown_label_key_names_the_available_columns(tmp_path):
    path = _write(marker_adata(n_cells=30), tmp_path)
    with pytest.raises(ValueError, match=r"label key 'celltype' is not a column of obs; available columns: \['cell_type'\]"):
        main(["finetune", "--train-file", str(path), "--label-key", "celltype", "--preset", "tiny",
              "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_label_with_a_single_cell_is_named(tmp_path):
    adata = marker_adata(n_cells=30)
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.add_categories(["lonely"])
    adata.obs.iloc[0, 0] = "lonely"
    path = _write(adata, tmp_path)
    with pytest.raises(ValueError, match=r"'lonely' \(1 cell\) has fewer"):
        _finetune(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # the documented way out works: drop the rare class
    cells = load_labelled_cells(path, "cell_type", min_cells_per_label=2)
    assert "lonely" not in cells.label_names and cells.n_cells == 29


def test_more_classes_than_cells_in_a_fold(tmp_path):
    # 6 classes × 5 cells: 5-fold CV leaves 6 cells per fold (fine); 10-fold leaves 3 < 6 classes
    cells = load_labelled_cells(marker_adata(n_cells=30, n_genes=48, n_types=6), "cell_type")
    with pytest.raises(ValueError, match=r"every class needs at least 10 cells"):
        compare(cells, "logreg", tmp_path / "cmp", n_folds=10)
    # single held-out split: 20% of 30 cells = 6 test cells, fewer than the 8 classes
    path = _write(marker_adata(n_cells=32, n_genes=64, n_types=8), tmp_path)
    with pytest.raises(ValueError, match=r"each test split would hold about 6 cells .* but there are 8 classes"):
        _finetune(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_model_whose_gene_panel_does_not_overlap_the_data(trained_tiny_folder, tmp_path):
    adata = marker_adata(n_cells=60)
    adata.var_names = [f"OTHER{i}" for i in range(adata.n_vars)]
    path = _write(adata, tmp_path)
    output = tmp_path / "out"
    with pytest.raises(ValueError, match=r"gene overlap too low: 0/60 panel genes"):
        main(["finetune", "--train-file", str(path), "--label-key", "cell_type", "--model", str(trained_tiny_folder),
              "--output-dir", str(output), "--num_train_epochs", "1"])
    assert not output.exists() or not any(output.glob("checkpoint-*"))


def test_unknown_method_and_preset_without_model_are_rejected(tmp_path):
    cells = load_labelled_cells(marker_adata(n_cells=30), "cell_type")
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['svm'\]"):
        compare(cells, "logreg,svm", tmp_path)
    path = _write(marker_adata(n_cells=30), tmp_path)
    with pytest.raises(ValueError, match="give --preset"):
        main(["finetune", "--train-file", str(path), "--label-key", "cell_type", "--output-dir", str(tmp_path / "o")])


@pytest.mark.parametrize("fraction", ["-0.1", "1.0"])
def test_validation_fraction_outside_zero_to_one_is_named(tmp_path, fraction):
    path = _write(marker_adata(n_cells=60), tmp_path)
    with pytest.raises(ValueError, match=rf"validation_fraction must lie in \[0, 1\) .*got {fraction}"):
        _finetune(path, tmp_path / "out", "--validation_fraction", fraction)
    assert not (tmp_path / "out").exists()
