"""Training and evaluation: fine-tuning and masked-gene pretraining through `transformers.Trainer`,
metrics through `evaluate`, baselines on the same splits, cross-validated comparisons, the demo.

Where to look: ``cells`` (reading, checking and splitting labelled cells), ``finetune``,
``pretrain``, ``metrics``, ``baselines``, ``compare``, ``transfer``, ``predict``, ``demo``.
Modules are imported lazily by the CLI; import them directly (``from scrnalf_hf.training.compare
import compare``).
"""
