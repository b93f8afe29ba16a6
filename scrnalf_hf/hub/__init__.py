"""Publishing: model and dataset cards, Hub-ready folders, ``push_to_hub``, the cell-type
pipeline, and a local Hub server that stands in for huggingface.co in tests.

Importing this package registers the ``cell-type-classification`` pipeline with transformers.
"""

from transformers import AutoModelForSequenceClassification
from transformers.pipelines import PIPELINE_REGISTRY

from .cards import TrainingRun, render_dataset_card, render_model_card, write_dataset_card, write_model_card
from .folder import export_hub_folder, save_hub_folder
from .local_hub import LocalHub
from .pipeline_scrnalf import TASK as CELL_TYPE_TASK
from .pipeline_scrnalf import CellTypeClassificationPipeline
from .push import HubFolderError, HubPushError, push_to_hub, validate_hub_folder

PIPELINE_REGISTRY.register_pipeline(
    CELL_TYPE_TASK, pipeline_class=CellTypeClassificationPipeline, pt_model=AutoModelForSequenceClassification
)

__all__ = [
    "CELL_TYPE_TASK",
    "CellTypeClassificationPipeline",
    "HubFolderError",
    "HubPushError",
    "LocalHub",
    "TrainingRun",
    "export_hub_folder",
    "push_to_hub",
    "render_dataset_card",
    "render_model_card",
    "save_hub_folder",
    "validate_hub_folder",
    "write_dataset_card",
    "write_model_card",
]
