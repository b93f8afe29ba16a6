"""transformers' own common model and config tests (``ModelTesterMixin``, ``ConfigTester``) for the bare
model and every head, with the kNN kernel eager and compiled (on the C kernels where the CPU has
AVX-512) and with dense and linear attention.

Mixin tests that do not apply are skipped with their reason beside them; ``SKIPPED`` collects
them, and ``PYTHONPATH=tests python tests/modeling/test_transformers_common.py`` prints the list
(the mixin's own skips, such as GPU-only tests, are listed with ours in COMMON_SKIPS.md beside
this file). The compiled kNN variant compiles every graph on first use (about three
minutes on 2 cores with a cold compile cache), so it is marked slow.
"""

import copy
import tempfile
import unittest
from unittest import mock

import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_MAPPING_NAMES,
)
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as transformers_logging

import transformers_common

try:
    transformers_common.load()
except transformers_common.TransformersTestsUnavailable as error:
    pytest.fail(str(error), pytrace=False)

from transformers_common_tests.test_configuration_common import ConfigTester  # noqa: E402
from transformers_common_tests.test_modeling_common import ModelTesterMixin  # noqa: E402

from scrnalf_hf import (  # noqa: E402
    ScrnaLongformerConfig,
    ScrnaLongformerForCellClassification,
    ScrnaLongformerForMaskedGeneModeling,
    ScrnaLongformerForProteinPrediction,
    ScrnaLongformerForTrajectory,
    ScrnaLongformerModel,
)
from scrnalf_hf.kernels_scrnalf import C_KNN_ATTENTION, c_kernels_available  # noqa: E402

SKIPPED: dict[str, str] = {}


def skip_common(reason: str):
    """Skip a mixin test that does not apply to this model, recording why in ``SKIPPED``."""

    def decorator(test):
        SKIPPED[test.__name__] = reason
        return unittest.skip(reason)(test)

    return decorator


class ScrnaLongformerModelTester:
    """Small configs and inputs, in the shape transformers' testers give them. ``seq_length`` is
    the token count (CLS + genes) of hidden states."""

    def __init__(
        self,
        parent,
        batch_size=3,
        n_genes=12,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        knn_k=4,
        num_labels=3,
        attention_type="knn",
        kernel_implementation="eager",
        n_proteins=5,
    ):
        self.parent = parent
        # a protein panel: the protein head needs one, and the cell classifier then fuses RNA
        # and proteins, so the common tests cover the multimodal path too
        self.n_proteins = n_proteins
        self.batch_size = batch_size
        self.n_genes = n_genes
        self.seq_length = n_genes + 1
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.knn_k = knn_k
        self.num_labels = num_labels
        self.attention_type = attention_type
        self.kernel_implementation = kernel_implementation
        self.is_training = True

    def get_config(self) -> ScrnaLongformerConfig:
        return ScrnaLongformerConfig(
            n_genes=self.n_genes,
            d_model=self.hidden_size,
            depth=self.num_hidden_layers,
            n_heads=self.num_attention_heads,
            knn_k=self.knn_k,
            num_labels=self.num_labels,
            attention_type=self.attention_type,
            kernel_implementation=self.kernel_implementation,
            modalities={"protein": self.n_proteins},
            protein_names=[f"PROT{p}" for p in range(self.n_proteins)],
        )

    def prepare_config_and_inputs_for_common(self):
        expression = torch.rand(self.batch_size, self.n_genes) * 3
        attention_mask = torch.ones(self.batch_size, self.n_genes, dtype=torch.long)
        attention_mask[1:, ::5] = 0  # some genes unmeasured in some cells
        return self.get_config(), {"expression": expression, "attention_mask": attention_mask}

    def masked_positions(self, expression: torch.Tensor) -> torch.Tensor:
        """A fixed mask: every third gene of every cell."""
        masked = torch.zeros_like(expression, dtype=torch.bool)
        masked[:, 1::3] = True
        return masked

    def protein_inputs(self) -> dict:
        """CLR-like protein levels of every cell, one protein unmeasured in the second cell, and
        every other protein hidden (masked-modality training)."""
        protein_mask = torch.ones(self.batch_size, self.n_proteins, dtype=torch.long)
        protein_mask[1, 0] = 0
        masked = torch.zeros(self.batch_size, self.n_proteins, dtype=torch.bool)
        masked[:, ::2] = True
        return {
            # fixed values: the mixin compares outputs of inputs prepared twice
            "protein_expression": torch.randn(self.batch_size, self.n_proteins, generator=torch.Generator().manual_seed(0)),
            "protein_mask": protein_mask,
            "masked_proteins": masked,
        }


class ScrnaLongformerCommonTests(ModelTesterMixin):
    """The mixin with our tester; subclasses pick the attention type and kernel implementation."""

    all_model_classes = (
        ScrnaLongformerModel,
        ScrnaLongformerForMaskedGeneModeling,
        ScrnaLongformerForCellClassification,
        ScrnaLongformerForTrajectory,
        ScrnaLongformerForProteinPrediction,
    )
    tester_settings: dict = {}
    # The mixin dates a model by a copyright line in its configuration file (we have none) and
    # skips this check for models before 2023 unless asked: ask.
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        # transformers' common tests recognise base models and classification heads by their names
        # in its own model mappings (to leave base models out of training tests, to check loading
        # across heads and label counts, the problem types...): list ours there for each test.
        for mapping, name in (
            (MODEL_MAPPING_NAMES, "ScrnaLongformerModel"),
            (MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES, "ScrnaLongformerForCellClassification"),
        ):
            patcher = mock.patch.dict(mapping, {ScrnaLongformerConfig.model_type: name})
            patcher.start()
            self.addCleanup(patcher.stop)
        self.model_tester = ScrnaLongformerModelTester(self, **self.tester_settings)
        self.config_tester = ConfigTester(
            self, config_class=ScrnaLongformerConfig, n_genes=12, d_model=16, n_heads=2, depth=2, knn_k=4
        )

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs = copy.deepcopy(inputs_dict)
        if model_class is ScrnaLongformerForMaskedGeneModeling:
            inputs["masked_positions"] = self.model_tester.masked_positions(inputs["expression"])
            if return_labels:
                inputs["labels"] = inputs["expression"].clone()
        elif model_class is ScrnaLongformerForCellClassification:
            # a multimodal classifier reads RNA and proteins
            proteins = self.model_tester.protein_inputs()
            inputs.update(protein_expression=proteins["protein_expression"], protein_mask=proteins["protein_mask"])
            if return_labels:
                inputs["labels"] = torch.zeros(self.model_tester.batch_size, dtype=torch.long)
        elif model_class is ScrnaLongformerForTrajectory and return_labels:
            inputs["labels"] = torch.linspace(0.0, 1.0, self.model_tester.batch_size)
        elif model_class is ScrnaLongformerForProteinPrediction:
            inputs.update(self.model_tester.protein_inputs())
            if return_labels:
                inputs["labels"] = torch.linspace(-1.0, 1.0, self.model_tester.batch_size * self.model_tester.n_proteins).view(
                    self.model_tester.batch_size, self.model_tester.n_proteins
                )
        return inputs

    def export_variants(self, config):
        """Both kernel implementations: the compiled one records the C kernels' custom ops where
        the CPU has AVX-512."""
        return {
            implementation: ScrnaLongformerConfig(**{**config.to_dict(), "kernel_implementation": implementation})
            for implementation in ("eager", "compiled")
        }

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_load_with_mismatched_shapes(self):
        """The mixin's test for our classifier: it calls AutoModel with token ids, our models take
        expression values. Loading a checkpoint into other shapes (another label count, another
        gene panel) fails, unless the mismatched weights may be re-initialised."""
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        logger = transformers_logging.get_logger("transformers.modeling_utils")
        with tempfile.TemporaryDirectory() as folder:
            ScrnaLongformerForCellClassification(config).save_pretrained(folder)
            with self.assertRaises(RuntimeError):
                AutoModelForSequenceClassification.from_pretrained(folder, num_labels=42)
            with CaptureLogger(logger) as captured:
                model = AutoModelForSequenceClassification.from_pretrained(
                    folder, num_labels=42, ignore_mismatched_sizes=True
                )
            self.assertIn("Reinit due to size mismatch", captured.out)
            self.assertEqual(model(**inputs_dict).logits.shape, (self.model_tester.batch_size, 42))
            smaller_panel = ScrnaLongformerConfig(**{**config.to_dict(), "vocab_size": 10})
            self.assertEqual(smaller_panel.n_genes, 10)
            with self.assertRaises(RuntimeError):
                AutoModel.from_pretrained(folder, config=smaller_panel)
            with CaptureLogger(logger) as captured:
                model = AutoModel.from_pretrained(folder, config=smaller_panel, ignore_mismatched_sizes=True)
            self.assertIn("Reinit due to size mismatch", captured.out)
            self.assertEqual(model(torch.rand(2, 10)).last_hidden_state.shape, (2, 11, self.model_tester.hidden_size))

    @skip_common(
        "the gene vocabulary is the model's gene panel, tied to the (G, k) gene graph buffer and to "
        "the processor's gene ids; a panel is changed by building a new model and set_gene_graph, "
        "not by resizing embeddings"
    )
    def test_resize_tokens_embeddings(self):
        pass

    @skip_common("as test_resize_tokens_embeddings: the gene panel is not resized")
    def test_resize_embeddings_untied(self):
        pass

    @skip_common("as test_resize_tokens_embeddings: the gene panel is not resized")
    def test_resize_embeddings_untied_no_reinit_on_post_init(self):
        pass

    @skip_common(
        "expects attention rows = hidden-state sequence length (1 + G); our weights are the gene rows "
        "in neighbour-table form (batch, heads, G, k + 1): test_attention_outputs_in_neighbour_table_form "
        "checks the same properties"
    )
    def test_attention_outputs(self):
        pass

    def test_attention_outputs_in_neighbour_table_form(self):
        """What test_attention_outputs checks, for (batch, heads, G, k + 1) weights: one per layer,
        asked for by argument or by config, rows that sum to 1, and attentions placed last with
        hidden states just before them."""
        if not self.has_attentions:
            self.skipTest(reason="linear attention has no attention weights")
        tester = self.model_tester
        config, inputs_dict = tester.prepare_config_and_inputs_for_common()
        expected_shape = [tester.batch_size, tester.num_attention_heads, tester.n_genes, tester.knn_k + 1]
        for model_class in self.all_model_classes:
            inputs = self._prepare_for_class(inputs_dict, model_class)
            model = model_class(copy.deepcopy(config)).eval()
            with torch.no_grad():
                plain = model(**inputs)
                by_argument = model(**inputs, output_attentions=True)
                with_hidden = model(**inputs, output_attentions=True, output_hidden_states=True)
            config_model = model_class(ScrnaLongformerConfig(**{**config.to_dict(), "output_attentions": True})).eval()
            config_model.load_state_dict(model.state_dict())
            with torch.no_grad():
                by_config = config_model(**inputs)
            for outputs in (by_argument, by_config, with_hidden):
                self.assertEqual(len(outputs.attentions), tester.num_hidden_layers)
                for weights in outputs.attentions:
                    self.assertListEqual(list(weights.shape), expected_shape)
                    torch.testing.assert_close(weights.sum(-1), torch.ones(expected_shape[:-1]))
            for got, expected in zip(by_config.attentions, by_argument.attentions):
                torch.testing.assert_close(got, expected)
            self.assertEqual(len(by_argument), len(plain) + 1)
            self.assertEqual(len(with_hidden), len(plain) + 2)
            self.assertEqual(list(with_hidden.keys())[-2:], ["hidden_states", "attentions"])


class ScrnaLongformerKnnEagerTest(ScrnaLongformerCommonTests, unittest.TestCase):
    tester_settings = {"attention_type": "knn", "kernel_implementation": "eager"}

    def test_export_of_the_compiled_model_records_the_c_kernel(self):
        """Where the C kernels run, torch.export records their custom op; elsewhere the PyTorch
        kNN kernel's ops."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        config = ScrnaLongformerConfig(**{**config.to_dict(), "kernel_implementation": "compiled"})
        model = ScrnaLongformerModel(config).eval()
        program = self.check_torch_export(model, ScrnaLongformerModel)
        targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
        uses_c_kernel = model.attention_function(False) is C_KNN_ATTENTION
        self.assertEqual(uses_c_kernel, c_kernels_available())
        self.assertEqual("scrnalf.knn_attention_c.default" in targets, uses_c_kernel)


@pytest.mark.slow
class ScrnaLongformerKnnCompiledTest(ScrnaLongformerCommonTests, unittest.TestCase):
    tester_settings = {"attention_type": "knn", "kernel_implementation": "compiled"}


class ScrnaLongformerDenseTest(ScrnaLongformerCommonTests, unittest.TestCase):
    tester_settings = {"attention_type": "dense", "kernel_implementation": "eager"}


class ScrnaLongformerLinearTest(ScrnaLongformerCommonTests, unittest.TestCase):
    tester_settings = {"attention_type": "linear", "kernel_implementation": "eager"}
    has_attentions = False  # linear attention builds no attention matrix


if __name__ == "__main__":
    for name, reason in sorted(SKIPPED.items()):
        print(f"{name}: {reason}")
