"""scrnalf-hf: the kNN-masked gene-token transformer for single-cell RNA-seq, as a native
Hugging Face model. Importing the package registers it with transformers' Auto classes."""

from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

from .configuration_scrnalf import ScrnaLongformerConfig
from .modeling_scrnalf import (
    ScrnaLongformerForCellClassification,
    ScrnaLongformerForMaskedGeneModeling,
    ScrnaLongformerModel,
    ScrnaLongformerPreTrainedModel,
)
from .processing_scrnalf import GeneAlignment, ScrnaLongformerProcessor

__version__ = "0.1.0"

AutoConfig.register(ScrnaLongformerConfig.model_type, ScrnaLongformerConfig, exist_ok=True)
AutoModel.register(ScrnaLongformerConfig, ScrnaLongformerModel, exist_ok=True)
AutoModelForMaskedLM.register(ScrnaLongformerConfig, ScrnaLongformerForMaskedGeneModeling, exist_ok=True)
AutoModelForSequenceClassification.register(ScrnaLongformerConfig, ScrnaLongformerForCellClassification, exist_ok=True)
AutoFeatureExtractor.register(ScrnaLongformerConfig, ScrnaLongformerProcessor, exist_ok=True)

# save_pretrained then writes auto_map and copies the model files next to the weights.
ScrnaLongformerConfig.register_for_auto_class()
ScrnaLongformerModel.register_for_auto_class("AutoModel")
ScrnaLongformerForMaskedGeneModeling.register_for_auto_class("AutoModelForMaskedLM")
ScrnaLongformerForCellClassification.register_for_auto_class("AutoModelForSequenceClassification")
ScrnaLongformerProcessor.register_for_auto_class("AutoFeatureExtractor")

__all__ = [
    "ScrnaLongformerConfig",
    "ScrnaLongformerPreTrainedModel",
    "ScrnaLongformerModel",
    "ScrnaLongformerForMaskedGeneModeling",
    "ScrnaLongformerForCellClassification",
    "ScrnaLongformerProcessor",
    "GeneAlignment",
]
