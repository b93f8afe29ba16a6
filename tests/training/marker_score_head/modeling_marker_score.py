"""A toy head for the task-contract test: regress a per-cell score (here, a cell type's marker
programme) from the cell embedding.

Written as a user would add a head: a remote-code module beside the model files (single-level
relative imports only), so that `save_pretrained` copies it next to the weights.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .configuration_scrnalf import ScrnaLongformerConfig
from .modeling_scrnalf import ScrnaLongformerModel, ScrnaLongformerPreTrainedModel


@dataclass
class MarkerScoreOutput(ModelOutput):
    """loss: mean squared error; logits: (batch, 1) predicted score; cell_embedding: (batch, d)."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cell_embedding: torch.FloatTensor | None = None


class ScrnaLongformerForMarkerScore(ScrnaLongformerPreTrainedModel):
    """(batch, G) expression -> (batch, 1) score."""

    def __init__(self, config: ScrnaLongformerConfig):
        super().__init__(config)
        self.scrna_longformer = ScrnaLongformerModel(config)
        self.regressor = nn.Linear(config.d_model, 1)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        expression: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> MarkerScoreOutput:
        cell_embedding = self.scrna_longformer(expression, attention_mask=attention_mask).cell_embedding
        logits = self.regressor(cell_embedding)
        loss = None if labels is None else nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
        return MarkerScoreOutput(loss=loss, logits=logits, cell_embedding=cell_embedding)
