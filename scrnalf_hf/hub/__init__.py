"""Publishing: model and dataset cards, Hub-ready folders and ``push_to_hub``.

Each head's pipeline is registered with transformers by its task declaration
(:mod:`scrnalf_hf.training.tasks`); the offline Hub server for tests is in
:mod:`scrnalf_hf.testing`.
"""

from .cards import TrainingRun, render_dataset_card, render_model_card, write_dataset_card, write_model_card
from .folder import export_hub_folder, load_saved_model, save_hub_folder
from .push import HubFolderError, HubPushError, push_to_hub, validate_hub_folder

__all__ = [
    "HubFolderError",
    "HubPushError",
    "TrainingRun",
    "export_hub_folder",
    "load_saved_model",
    "push_to_hub",
    "render_dataset_card",
    "render_model_card",
    "save_hub_folder",
    "validate_hub_folder",
    "write_dataset_card",
    "write_model_card",
]
