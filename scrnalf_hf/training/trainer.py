"""The one `transformers.Trainer` subclass every task trains with."""

from __future__ import annotations

import logging
from contextlib import contextmanager

from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..modeling_scrnalf import ScrnaLongformerEmbeddings, ScrnaLongformerForCellClassification


class TrainingBar(ProgressCallback):
    """One progress bar over the training steps, and nothing else: no bar per evaluation and
    no dictionary of figures per log (those come with ``--log_level info``)."""

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        pass

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


class ScrnaTrainer(Trainer):
    """Trainer for every scRNA longformer head.

    Eight differences from `Trainer`, each for a reason:

    - **The loss is the model's.** The heads' losses are means over the batch and take no
      ``num_items_in_batch``, so Trainer scales them for gradient accumulation itself.
    - **Label smoothing stays in the model.** Trainer's own ``--label_smoothing_factor`` takes
      the labels away from the model and scores the logits without ``config.class_weights``, so
      a comparison with ``--class-weighting balanced`` would weight the baselines but not the
      transformer. The factor is moved into ``config.label_smoothing`` instead, where the
      classification loss applies it together with the class weights (and the saved config
      records it).
    - **The token embeddings get a larger step** (``embedding_lr_multiplier``): gene and value
      embeddings are unit-scale (they are not normalised; see ``ScrnaLongformerEmbeddings``),
      while the layers' weights start at 0.02. Adam moves every weight by about the learning
      rate per step, so at a rate the layers tolerate (3e-3) the embeddings, which carry the
      gene-specific signal, change by 0.3% per step and a few hundred cells train too slowly;
      a rate that suits the embeddings makes the layers diverge.
    - **Evaluation may batch differently** (``eval_data_collator``): masked gene modelling hides
      new genes in every training epoch but the same genes of a cell in every evaluation, so
      that evaluation losses are comparable between epochs.
    - **Streamed cells are split once** (datasets with ``shards_itself``, e.g.
      :class:`~scrnalf_hf.data.soma.SomaCellStream`): ``tiledbsoma_ml`` already gives each rank and
      DataLoader worker its own cells; accelerate's ``prepare`` would split them again (or send
      rank 0's cells to every rank), so their DataLoader is built here, unprepared, and Trainer
      moves each batch to the device as usual.
    - **FSDP runs on CPU processes too**: accelerate switches to FSDP only for accelerator
      devices (``MULTI_GPU``, ``MULTI_XPU``, ...); several CPU processes with ``--fsdp`` would
      silently train plain data parallel. FSDP2's ``fully_shard`` works on a CPU mesh over gloo,
      so the FSDP plugin is installed there as well (what the two-process CPU test exercises).
    - **No FSDP checkpoints on CPU processes**: saving a Trainer checkpoint of sharded CPU
      parameters fails (safetensors is handed DTensors) or hangs, so FSDP on CPU refuses a
      save strategy other than ``no``; the final export gathers full weights on every rank.
    - **Quiet unless asked**: below ``--log_level info`` the progress display is one bar over
      the training steps (:class:`TrainingBar`), not a bar per evaluation and a printed
      dictionary per epoch.
    """

    def __init__(self, *args, embedding_lr_multiplier: float = 1.0, eval_data_collator=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator
        if self.args.get_process_log_level() > logging.INFO:
            self.callback_handler.remove_callback(PrinterCallback)  # the dictionaries printed without tqdm
            if not self.args.disable_tqdm:
                self.callback_handler.remove_callback(ProgressCallback)
                self.add_callback(TrainingBar)
        self.model_accepts_loss_kwargs = False
        self.embedding_lr_multiplier = float(embedding_lr_multiplier)
        model = self.accelerator.unwrap_model(self.model)
        single_label = isinstance(model, ScrnaLongformerForCellClassification) and model.config.problem_type in (
            None, "single_label_classification"
        )
        if single_label:
            # Set even when 0: a checkpoint fine-tuned again must not keep its earlier smoothing.
            model.config.label_smoothing = float(self.args.label_smoothing_factor)
        elif self.args.label_smoothing_factor > 0:
            raise ValueError(
                f"--label_smoothing_factor applies to single-label cell classification only, not to "
                f"{type(model).__name__}; drop it or set it to 0."
            )
        self.label_smoother = None

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if self.args.fsdp_plugin_args is None or state.distributed_type != DistributedType.MULTI_CPU:
            return
        if self.args.fsdp_plugin_args["fsdp_version"] != 2:
            raise ValueError("FSDP on CPU processes needs FSDP2: set \"version\": 2 in --fsdp_config (FSDP1 shards CUDA devices only).")
        if self.args.save_strategy != "no":
            # Trainer's FSDP checkpoints (accelerate's state dicts) failed or hung on CPU processes
            raise ValueError(
                "FSDP on CPU processes trains and exports the model but saves no Trainer checkpoints; pass "
                "--save-strategy no --load-best-model-at-end false (or train on GPUs)."
            )
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        state.distributed_type = DistributedType.FSDP
        self.is_fsdp_enabled = True

    @contextmanager
    def _evaluation_batches(self):
        if self.eval_data_collator is None:
            yield
            return
        training, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            yield
        finally:
            self.data_collator = training

    def get_eval_dataloader(self, eval_dataset=None):
        with self._evaluation_batches():
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        with self._evaluation_batches():
            return super().get_test_dataloader(test_dataset)

    def _get_dataloader(self, dataset, description, batch_size, sampler_fn=None, is_training=False, dataloader_key=None):
        if not getattr(dataset, "shards_itself", False):
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, dataloader_key)
        workers = self.args.dataloader_num_workers
        batches = dataset.batches(batch_size, shuffle=is_training, seed=self.args.seed, num_workers=workers)
        return _EpochDataLoader(
            batches, batch_size=None, collate_fn=self.data_collator, num_workers=workers,
            pin_memory=self.args.dataloader_pin_memory, persistent_workers=False,
            # tiledbsoma's threads make fork() unsafe (GNU OpenMP aborts); tiledbsoma_ml spawns too
            multiprocessing_context="spawn" if workers else None,
            prefetch_factor=self.args.dataloader_prefetch_factor if workers else None,
        )

    def num_examples(self, dataloader) -> int:
        stream = getattr(dataloader.dataset, "stream", None)
        if getattr(stream, "shards_itself", False):
            return len(stream)  # cells per epoch over every rank, not batches
        return super().num_examples(dataloader)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.embedding_lr_multiplier == 1.0 or any(g.get("embedding_group") for g in optimizer.param_groups):
            return optimizer
        opt_model = self.model if model is None else model
        embedding_ids = {
            id(p) for module in opt_model.modules() if isinstance(module, ScrnaLongformerEmbeddings) for p in module.parameters()
        }
        moved_groups = []
        for group in optimizer.param_groups:
            moved = [p for p in group["params"] if id(p) in embedding_ids]
            if moved:
                group["params"] = [p for p in group["params"] if id(p) not in embedding_ids]
                settings = {k: v for k, v in group.items() if k not in ("params", "initial_lr")}
                settings["lr"] = group["lr"] * self.embedding_lr_multiplier
                moved_groups.append({**settings, "params": moved, "embedding_group": True})
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        for group in moved_groups:
            optimizer.add_param_group(group)
        return optimizer


def full_state_dict(model) -> dict:
    """The full (unsharded) weights of an FSDP2 ``model`` on rank 0 (empty on the others); every rank
    must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    reshard(model)
    # full_state_dict + cpu_offload: gathered on every rank, kept on rank 0 only (no full copy per rank)
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def reshard(model) -> None:
    """Shard every FSDP2 unit of ``model`` again. A forward without backward (evaluation) leaves the
    root's and accelerate's tail units gathered (they keep their full weights after forward); their
    ``state_dict`` would then hold the gathered buffers, which FSDP frees at the next reshard."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class _EpochDataLoader(DataLoader):
    """A DataLoader that passes Trainer's ``set_epoch`` on to its dataset (a new shuffle per epoch)."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


__all__ = ["ScrnaTrainer"]
