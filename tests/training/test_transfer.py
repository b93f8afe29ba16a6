"""``scrnalf transfer``: pretrain (also on another file's cells, aligned to the panel), then
fine-tune pretrained and from scratch next to logistic regression, on the same held-out cells."""

import json

from helpers import marker_adata, write_h5ad

from scrnalf_cli import main


def test_transfer_writes_a_learning_curve_of_three_methods(tmp_path, capsys):
    data = write_h5ad(marker_adata(n_cells=90), tmp_path)
    extra = marker_adata(n_cells=40, seed=3)
    extra = extra[:, ::-1].copy()  # other gene order
    extra.var_names = [name.lower() for name in extra.var_names]  # and other spelling: matched by symbol
    extra_path = write_h5ad(extra, tmp_path, "extra.h5ad")
    output = tmp_path / "curve"
    assert main(["transfer", "--train-file", str(data), "--label-key", "cell_type", "--output-dir", str(output),
                 "--fractions", "0.5,1", "--pretrain-epochs", "1", "--finetune-epochs", "2",
                 "--pretrain-file", str(extra_path)]) == 0
    rows = json.loads((output / "transfer.json").read_text())
    assert sorted((r["fraction"], r["method"]) for r in rows) == [
        (fraction, method) for fraction in (0.5, 1.0) for method in ("logreg", "pretrained", "scratch")
    ]
    assert all(0 <= r["macro_f1"] <= 1 for r in rows)
    assert (output / "learning_curve.png").stat().st_size > 0 and (output / "pretrained" / "model.safetensors").is_file()
    assert "pretraining tiny on 112 unlabelled cells" in capsys.readouterr().err  # 72 training cells + 40 of the extra file
