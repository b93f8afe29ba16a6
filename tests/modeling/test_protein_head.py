"""The multimodal (RNA + protein) model: the protein head's masked-modality loss, RNA-only
inference, the fused classifier, and loading a multimodal checkpoint with its processor through
trust_remote_code without scrnalf_hf."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import AutoModelForTokenClassification

import scrnalf_hf  # noqa: F401  (registers the Auto classes)
from scrnalf_hf import (
    ScrnaLongformerConfig,
    ScrnaLongformerForCellClassification,
    ScrnaLongformerForProteinPrediction,
    ScrnaLongformerProcessor,
)

PROTEINS = ["CD3", "CD4", "CD8", "CD19", "CD14"]


def small_config(**overrides) -> ScrnaLongformerConfig:
    settings = dict(n_genes=24, d_model=16, depth=1, n_heads=2, knn_k=4, hidden_dropout=0.0, kernel_implementation="eager",
                    modalities={"protein": 5}, protein_names=PROTEINS)
    return ScrnaLongformerConfig(**{**settings, **overrides})


def test_rna_only_inference_predicts_every_protein_and_scores_all_measured():
    torch.manual_seed(0)
    model = ScrnaLongformerForProteinPrediction(small_config()).eval()
    expression, labels = torch.rand(4, 24) * 3, torch.randn(4, 5)
    output = model(expression, labels=labels)
    assert output.logits.shape == (4, 5) and output.cell_embedding.shape == (4, 16)
    torch.testing.assert_close(output.loss, (output.logits - labels).pow(2).mean())
    # an unmeasured protein is never scored
    protein_mask = torch.ones(4, 5, dtype=torch.long)
    protein_mask[:, 0] = 0
    partial = model(expression, protein_mask=protein_mask, labels=labels)
    torch.testing.assert_close(partial.loss, (partial.logits - labels)[:, 1:].pow(2).mean())


def test_masked_modality_loss_covers_the_hidden_proteins_and_shown_ones_inform_the_prediction():
    torch.manual_seed(0)
    model = ScrnaLongformerForProteinPrediction(small_config()).eval()
    expression, levels = torch.rand(3, 24) * 3, torch.randn(3, 5)
    hidden = torch.zeros(3, 5, dtype=torch.bool)
    hidden[:, :2] = True
    output = model(expression, protein_expression=levels, masked_proteins=hidden, labels=levels)
    torch.testing.assert_close(output.loss, (output.logits - levels)[:, :2].pow(2).mean())
    rna_only = model(expression).logits
    assert not torch.allclose(output.logits, rna_only)  # the shown proteins reach the prediction
    # hiding every protein is RNA-only inference
    torch.testing.assert_close(model(expression, protein_expression=levels, masked_proteins=torch.ones(3, 5, dtype=torch.bool)).logits,
                               rna_only)
    output.loss.backward()
    assert model.fusion.protein_embeddings.value_input.weight.grad is not None


def test_the_fused_classifier_reads_proteins_and_runs_on_rna_alone():
    torch.manual_seed(0)
    model = ScrnaLongformerForCellClassification(small_config(num_labels=3)).eval()
    expression = torch.rand(2, 24) * 3
    with_proteins = model(expression, protein_expression=torch.randn(2, 5)).logits
    assert with_proteins.shape == (2, 3) and not torch.allclose(with_proteins, model(expression).logits)


def test_a_class_set_by_a_contrast_of_proteins_is_learned_by_the_fused_classifier():
    """The label is which half of the panel is higher and the RNA says nothing about it: a linear
    function of every protein, as logistic regression on the proteins reads it. Attention alone
    fits the training cells and stays at chance on new ones (0.49–0.59 measured); the protein
    summary on the cell token learns it."""
    torch.manual_seed(0)
    config = small_config(num_labels=2, d_model=8, n_heads=1, protein_names=[f"P{i}" for i in range(24)],
                          modalities={"protein": 24})
    model = ScrnaLongformerForCellClassification(config)

    def cells(n):
        levels = torch.randn(n, 24)
        return torch.rand(n, 24) * 3, levels, (levels[:, :12].sum(1) > levels[:, 12:].sum(1)).long()

    expression, levels, labels = cells(256)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(120):
        optimizer.zero_grad()
        model(expression, protein_expression=levels, labels=labels).loss.backward()
        optimizer.step()
    test_expression, test_levels, test_labels = cells(256)
    predicted = model.eval()(test_expression, protein_expression=test_levels).logits.argmax(-1)
    assert (predicted == test_labels).float().mean() > 0.9


def test_protein_inputs_are_checked():
    model = ScrnaLongformerForProteinPrediction(small_config()).eval()
    expression = torch.rand(2, 24)
    with pytest.raises(ValueError, match="protein_expression must have shape"):
        model(expression, protein_expression=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="NaN"):
        model(expression, protein_expression=torch.full((2, 5), float("nan")))
    with pytest.raises(ValueError, match="labels must have shape"):
        model(expression, labels=torch.zeros(2))
    rna_only = ScrnaLongformerForCellClassification(small_config(modalities=None, protein_names=None, num_labels=2))
    with pytest.raises(ValueError, match="reads RNA only"):
        rna_only(expression, protein_expression=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="needs a protein panel"):
        ScrnaLongformerForProteinPrediction(small_config(modalities=None, protein_names=None))
    with pytest.raises(Exception, match="protein_names lists 2 proteins"):  # @strict wraps the ValueError
        small_config(protein_names=["CD3", "CD4"])


def test_processor_clr_normalises_and_aligns_proteins_by_name():
    processor = ScrnaLongformerProcessor(gene_symbols=[f"G{i}" for i in range(4)], protein_names=PROTEINS)
    counts = np.array([[10.0, 0.0, 3.0], [1.0, 5.0, 0.0]])
    batch = processor(np.ones((2, 4)), protein_counts=counts, protein_names=["cd19", "CD3", "CD4"], return_tensors="np")
    # panel order CD3, CD4, CD8, CD19, CD14; CD8 and CD14 are not measured
    np.testing.assert_array_equal(batch["protein_mask"], [[1, 1, 0, 1, 0]] * 2)
    logged = np.log1p(np.array([[0.0, 3.0, 10.0], [5.0, 0.0, 1.0]]))  # CD3, CD4, CD19
    expected = logged - logged.mean(1, keepdims=True)
    np.testing.assert_allclose(batch["protein_expression"][:, [0, 1, 3]], expected, rtol=1e-6)
    assert (batch["protein_expression"][:, [2, 4]] == 0).all()
    with pytest.raises(ValueError, match="1 of the model's 5 panel proteins"):
        processor(np.ones((2, 4)), protein_counts=np.ones((2, 2)), protein_names=["CD3", "CD45"])


LOAD = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    sys.modules["scrnalf_hf"] = None  # any import of the package now fails
    from transformers import AutoFeatureExtractor, AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    processor = AutoFeatureExtractor.from_pretrained(sys.argv[1], trust_remote_code=True)
    inputs = np.load(sys.argv[2])
    batch = processor(inputs["counts"], protein_counts=inputs["proteins"], protein_names=["CD8", "CD3", "CD4", "CD19", "CD14"])
    with torch.no_grad():
        rna_only = model(expression=batch["expression"], attention_mask=batch["attention_mask"]).logits
        both = model(**batch).logits
    np.savez(sys.argv[3], rna_only=rna_only.numpy(), both=both.numpy(), module=type(model).__module__,
             protein_names=processor.protein_names)
    """
)


def test_a_multimodal_checkpoint_loads_with_trust_remote_code_without_the_package(tmp_path):
    torch.manual_seed(0)
    model = ScrnaLongformerForProteinPrediction(small_config()).eval()
    processor = ScrnaLongformerProcessor(gene_symbols=[f"G{i}" for i in range(24)], protein_names=PROTEINS)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForTokenClassification"] == "modeling_scrnalf.ScrnaLongformerForProteinPrediction"
    assert config["modalities"] == {"protein": 5} and config["protein_names"] == PROTEINS
    rng = np.random.default_rng(0)
    counts, proteins = rng.poisson(3.0, (3, 24)).astype(np.float32), rng.poisson(20.0, (3, 5)).astype(np.float32)
    np.savez(tmp_path / "inputs.npz", counts=counts, proteins=proteins)
    (tmp_path / "load.py").write_text(LOAD)
    subprocess.run([sys.executable, str(tmp_path / "load.py"), str(tmp_path / "model"), str(tmp_path / "inputs.npz"),
                    str(tmp_path / "out.npz")], check=True, cwd=tmp_path, capture_output=True)
    loaded = np.load(tmp_path / "out.npz")
    assert "scrnalf_hf" not in str(loaded["module"]) and list(loaded["protein_names"]) == PROTEINS
    batch = processor(counts, protein_counts=proteins, protein_names=["CD8", "CD3", "CD4", "CD19", "CD14"])
    with torch.no_grad():
        np.testing.assert_allclose(loaded["both"], model(**batch).logits.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            loaded["rna_only"], model(expression=batch["expression"], attention_mask=batch["attention_mask"]).logits.numpy(),
            rtol=1e-5, atol=1e-6,
        )
    assert type(AutoModelForTokenClassification.from_pretrained(tmp_path / "model")) is ScrnaLongformerForProteinPrediction
