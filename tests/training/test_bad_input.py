"""Bad input is rejected with a clear message before any training starts, and the command line
turns it into one line on stderr and a non-zero exit (the traceback only with --debug)."""

import pytest
from helpers import marker_adata, write_h5ad

from scrnalf_cli import main
from scrnalf_hf.data import open_cells
from scrnalf_hf.training.arguments import training_arguments
from scrnalf_hf.training.compare import compare
from scrnalf_hf.training.finetune import read_targets
from scrnalf_hf.training.tasks import CLASSIFICATION


def _finetune(path, output, *extra):
    return main(["--debug", "finetune", "--train-file", str(path), "--label-key", "cell_type", "--preset", "tiny",
                 "--output-dir", str(output), "--num_train_epochs", "1", "--disable_tqdm", "true", *extra])


def _cells(adata):
    cells = open_cells(adata, label_key="cell_type", progress=False)
    return cells, read_targets(CLASSIFICATION, cells, "cell_type")


def test_unknown_label_key_names_the_stored_columns(tmp_path, capsys):
    path = write_h5ad(marker_adata(n_cells=30), tmp_path)
    command = ["finetune", "--train-file", str(path), "--label-key", "celltype", "--preset", "tiny", "--output-dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=r"obs column 'celltype' not found; available columns: \['cell_type'\]"):
        main(["--debug", *command])
    assert main(command) == 1
    error = capsys.readouterr().err
    assert error.startswith("scrnalf finetune: error: obs column 'celltype'") and "Traceback" not in error
    assert len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_label_with_a_single_cell_is_named(tmp_path):
    adata = marker_adata(n_cells=30)
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.add_categories(["lonely"])
    adata.obs.iloc[0, 0] = "lonely"
    path = write_h5ad(adata, tmp_path)
    with pytest.raises(ValueError, match=r"'lonely' \(1 cell\) has fewer"):
        _finetune(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # the documented way out works: drop the rare class
    cells = open_cells(path, label_key="cell_type", progress=False)
    targets = read_targets(CLASSIFICATION, cells, "cell_type", min_cells_per_label=2)
    assert "lonely" not in targets.names and int(targets.usable.sum()) == 29


def test_more_classes_than_cells_in_a_fold(tmp_path):
    # 6 classes × 5 cells: 5-fold CV leaves 6 cells per fold (fine); 10-fold leaves 3 < 6 classes
    cells, targets = _cells(marker_adata(n_cells=30, n_genes=48, n_types=6))
    with pytest.raises(ValueError, match=r"every class needs at least 10 cells"):
        compare(CLASSIFICATION, cells, targets, "logreg", tmp_path / "cmp", training_arguments(CLASSIFICATION, tmp_path), n_folds=10)
    # single held-out split: 20% of 32 cells = 6 test cells, fewer than the 8 classes
    path = write_h5ad(marker_adata(n_cells=32, n_genes=64, n_types=8), tmp_path)
    with pytest.raises(ValueError, match=r"each test split would hold about 6 cells .* but there are 8 classes"):
        _finetune(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_model_whose_gene_panel_does_not_overlap_the_data(trained_tiny_folder, tmp_path):
    adata = marker_adata(n_cells=60)
    adata.var_names = [f"OTHER{i}" for i in range(adata.n_vars)]
    path = write_h5ad(adata, tmp_path)
    output = tmp_path / "out"
    with pytest.raises(ValueError, match=r"gene overlap too low: 0/60 panel genes"):
        main(["--debug", "finetune", "--train-file", str(path), "--label-key", "cell_type", "--model", str(trained_tiny_folder),
              "--output-dir", str(output), "--num_train_epochs", "1"])
    assert not any(output.glob("checkpoint-*"))


def test_unknown_method_and_preset_without_model_are_rejected(tmp_path):
    cells, targets = _cells(marker_adata(n_cells=30))
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['svm'\]"):
        compare(CLASSIFICATION, cells, targets, "logreg,svm", tmp_path, training_arguments(CLASSIFICATION, tmp_path))
    path = write_h5ad(marker_adata(n_cells=30), tmp_path)
    with pytest.raises(ValueError, match="give --preset"):
        main(["--debug", "finetune", "--train-file", str(path), "--label-key", "cell_type", "--output-dir", str(tmp_path / "o")])


@pytest.mark.parametrize("fraction", ["-0.1", "1.0"])
def test_validation_fraction_outside_zero_to_one_is_named(tmp_path, fraction):
    path = write_h5ad(marker_adata(n_cells=60), tmp_path)
    with pytest.raises(ValueError, match=rf"validation_fraction must lie in \[0, 1\) .*got {fraction}"):
        _finetune(path, tmp_path / "out", "--validation_fraction", fraction)
    assert not any((tmp_path / "out").glob("checkpoint-*"))


def test_zero_epochs_train_nothing_and_write_no_model(tmp_path):
    path = write_h5ad(marker_adata(n_cells=60), tmp_path)
    with pytest.raises(ValueError, match="--num_train_epochs must be positive, got 0"):
        _finetune(path, tmp_path / "out", "--num_train_epochs", "0")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_options_of_one_task_are_refused_by_another(tmp_path):
    path = write_h5ad(marker_adata(n_cells=60), tmp_path)
    with pytest.raises(ValueError, match="--label-key does not apply to masked gene modelling"):
        main(["--debug", "pretrain", "--train-file", str(path), "--label-key", "cell_type", "--preset", "tiny",
              "--output-dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="unknown task 'protien'"):
        main(["--debug", "finetune", "--task", "protien", "--train-file", str(path), "--preset", "tiny",
              "--output-dir", str(tmp_path / "out")])
