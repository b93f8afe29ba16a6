"""scrnalf-hf: the kNN-masked gene-token transformer for single-cell RNA-seq, as a native Hugging Face
model. Importing the package registers every head declared in :mod:`scrnalf_hf.training.tasks`
with transformers' Auto classes (and their pipelines), and the processor with
``AutoFeatureExtractor``."""

from transformers import AutoConfig, AutoFeatureExtractor, AutoModel

from .configuration_scrnalf import ScrnaLongformerConfig
from .modeling_scrnalf import (
    ScrnaLongformerForCellClassification,
    ScrnaLongformerForMaskedGeneModeling,
    ScrnaLongformerForProteinPrediction,
    ScrnaLongformerForTrajectory,
    ScrnaLongformerModel,
    ScrnaLongformerPreTrainedModel,
)
from .processing_scrnalf import GeneAlignment, ScrnaLongformerProcessor
from .training.tasks import TASKS, Task, get_task, register_task

__version__ = "0.2.0"

AutoConfig.register(ScrnaLongformerConfig.model_type, ScrnaLongformerConfig, exist_ok=True)
AutoModel.register(ScrnaLongformerConfig, ScrnaLongformerModel, exist_ok=True)
AutoFeatureExtractor.register(ScrnaLongformerConfig, ScrnaLongformerProcessor, exist_ok=True)

# save_pretrained then writes auto_map and copies the model files next to the weights; the heads
# were registered by their task declarations.
ScrnaLongformerConfig.register_for_auto_class()
ScrnaLongformerModel.register_for_auto_class("AutoModel")
ScrnaLongformerProcessor.register_for_auto_class("AutoFeatureExtractor")

from . import tl  # noqa: E402 - scanpy-style tools (scrnalf_hf.tl.embed, ...), after the registrations they load through

__all__ = [
    "TASKS",
    "GeneAlignment",
    "ScrnaLongformerConfig",
    "ScrnaLongformerForCellClassification",
    "ScrnaLongformerForMaskedGeneModeling",
    "ScrnaLongformerForProteinPrediction",
    "ScrnaLongformerForTrajectory",
    "ScrnaLongformerModel",
    "ScrnaLongformerPreTrainedModel",
    "ScrnaLongformerProcessor",
    "Task",
    "get_task",
    "register_task",
    "tl",
]
