"""The ``scrnalf`` console script: argument parsing only; every command calls a library function.

Each subcommand lives in its own ``_add_<name>`` function below so that areas of the package
can add theirs without touching each other's.
"""

from __future__ import annotations

import argparse
import sys


def _add_presets(subparsers) -> None:
    parser = subparsers.add_parser("presets", help="print the parameter counts of the hub_configs presets")
    parser.add_argument("--n-genes", type=int, default=500)
    parser.add_argument("--num-labels", type=int, default=9)
    parser.set_defaults(func=_run_presets)


def _run_presets(args) -> None:
    from .presets import print_preset_table

    print_preset_table(n_genes=args.n_genes, num_labels=args.num_labels)


def _add_push(subparsers) -> None:
    parser = subparsers.add_parser(
        "push", help="publish a Hub-ready model folder in one commit and print the commit id to pin"
    )
    parser.add_argument("--model-dir", required=True, help="Hub-ready folder (weights, config, processor, code, README.md)")
    parser.add_argument("--repo-id", required=True, help="ORG/NAME of the model repo (created if needed)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", default=None, help="branch to commit to (created from main if needed)")
    parser.add_argument("--commit-message", default=None)
    parser.set_defaults(func=_run_push)


def _run_push(args) -> int:
    from .hub.push import HubFolderError, HubPushError, push_to_hub

    try:
        commit = push_to_hub(
            args.model_dir,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
        )
    except (HubFolderError, HubPushError) as error:
        print(f"scrnalf push: error: {error}", file=sys.stderr)
        return 1
    print(f"pushed {args.model_dir} to {args.repo_id}; pin this commit: revision={commit!r}", file=sys.stderr)
    print(commit)
    return 0


def _add_pretrain(subparsers) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        add_help=False,
        help="masked gene modelling on unlabelled cells (--train-file F --preset P --output-dir D [TrainingArguments…]; --help lists all)",
    )
    parser.set_defaults(func=_run_pretrain, accepts_extra_args=True)


def _run_pretrain(args) -> None:
    from .training.pretrain import run_pretrain

    run_pretrain(args.extra_args)


def _add_finetune(subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune",
        add_help=False,
        help="cell classification (--train-file F --label-key K (--preset P | --model M) --output-dir D "
        "[--freeze-encoder] [TrainingArguments…]; --help lists all)",
    )
    parser.set_defaults(func=_run_finetune, accepts_extra_args=True)


def _run_finetune(args) -> None:
    from .training.finetune import run_finetune

    run_finetune(args.extra_args)


def _add_training_data_options(parser) -> None:
    parser.add_argument("--train-file", required=True, help=".h5ad file or a `scrnalf convert` folder")
    parser.add_argument("--label-key", required=True, help="obs column with the cell labels")
    parser.add_argument("--layer", default=None, help="AnnData layer (default: counts layer, .raw, then X)")
    parser.add_argument("--use-raw", action="store_true", help="read .raw.X")
    parser.add_argument("--input-kind", default="auto", choices=["auto", "counts", "log1p"])
    parser.add_argument("--min-cells-per-label", type=int, default=None, help="drop classes with fewer cells")
    parser.add_argument("--dataset-name", default=None)


def _add_compare(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="every method on the same stratified folds -> comparison.json, .md, .png "
        "(extra TrainingArguments flags such as --num_train_epochs apply to the transformer presets)",
    )
    _add_training_data_options(parser)
    parser.add_argument("--methods", default="tiny,default,logreg,random_forest", help="comma-separated presets and baselines")
    parser.add_argument("--cv", type=int, default=5, help="number of stratified folds")
    parser.add_argument("--folds", default=None, help="score only these folds, e.g. 0,1 (default: all)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--class-weighting", default=None, choices=["balanced"], help="for every method alike")
    parser.add_argument("--config-overrides", default=None, help="config fields for every preset, e.g. pooling=cls")
    parser.add_argument(
        "--validation-fraction", type=float, default=0.1,
        help="training cells held out to pick the best epoch (0: train on all of them, score the last epoch)",
    )
    parser.add_argument("--early-stopping-patience", type=int, default=8)
    parser.add_argument(
        "--ensemble", type=int, default=1,
        help="fit each preset this many times per fold (seeds seed, seed+1, ...) and average their class "
        "probabilities; the row is named <preset>×N",
    )
    parser.set_defaults(func=_run_compare, accepts_extra_args=True)


def _run_compare(args) -> None:
    from .training.compare import run_compare

    run_compare(args)


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="the main job on bundled pbmc68k_reduced: fine-tune tiny and default, compare with logistic regression"
    )
    parser.add_argument("--output-dir", default="demo_output")
    parser.add_argument("--label-key", default="louvain", choices=["louvain", "bulk_labels"])
    parser.add_argument("--cv", type=int, default=5, help="stratified folds the split is drawn from")
    parser.add_argument("--folds", default="0", help="folds scored by every method (default: the first)")
    parser.add_argument("--methods", default="tiny,default,logreg,random_forest")
    parser.add_argument("--epochs", type=float, default=None, help="override the demo's epochs per preset")
    parser.add_argument(
        "--class-weighting", default="balanced", choices=["balanced", "none"], help="for every method alike"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=_run_demo)


def _run_demo(args) -> None:
    from .training.demo import run_demo

    run_demo(
        output_dir=args.output_dir, label_key=args.label_key, n_folds=args.cv,
        folds=[int(f) for f in args.folds.split(",")], methods=args.methods, epochs=args.epochs, seed=args.seed,
        class_weighting=None if args.class_weighting == "none" else args.class_weighting,
    )


def _add_model_on_anndata_options(parser) -> None:
    parser.add_argument("--model", required=True, help="model folder or Hub repo id")
    parser.add_argument("--input", required=True, help="input .h5ad")
    parser.add_argument("--output", required=True, help="output .h5ad")
    parser.add_argument("--layer", default=None)
    parser.add_argument("--use-raw", action="store_true")
    parser.add_argument("--batch-size", type=int, default=256)


def _add_predict(subparsers) -> None:
    parser = subparsers.add_parser("predict", help="write predicted labels and confidences into an AnnData")
    _add_model_on_anndata_options(parser)
    parser.set_defaults(func=_run_predict)


def _run_predict(args) -> None:
    from .training.predict import predict_file

    predict_file(args.model, args.input, args.output, layer=args.layer, use_raw=args.use_raw, batch_size=args.batch_size)


def _add_embed(subparsers) -> None:
    parser = subparsers.add_parser("embed", help="write cell embeddings into an AnnData (obsm['X_scrnalf'])")
    _add_model_on_anndata_options(parser)
    parser.set_defaults(func=_run_embed)


def _run_embed(args) -> None:
    from .training.predict import embed_file

    embed_file(args.model, args.input, args.output, layer=args.layer, use_raw=args.use_raw, batch_size=args.batch_size)


def _add_transfer(subparsers) -> None:
    parser = subparsers.add_parser(
        "transfer",
        help="pretrain on unlabelled cells, fine-tune with fractions of the labels; learning curve vs scratch vs logreg",
    )
    _add_training_data_options(parser)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--fractions", default="0.05,0.1,0.25,0.5,1.0", help="fractions of the labelled training cells")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--pretrain-epochs", type=float, default=10)
    parser.add_argument("--finetune-epochs", type=float, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-file", default=None, help="extra unlabelled cells to pretrain on (default: the training cells)")
    parser.set_defaults(func=_run_transfer, accepts_extra_args=True)


def _run_transfer(args) -> None:
    from .training.transfer import run_transfer

    run_transfer(args)


def _add_convert(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="AnnData (.h5ad) -> a datasets folder, one sparse row per cell")
    parser.add_argument("input", help="the .h5ad file (read chunk-wise, memory stays bounded)")
    parser.add_argument("output_dir", help="the dataset folder to create (datasets.load_from_disk opens it)")
    parser.add_argument("--label-key", help="obs column stored as the ClassLabel column 'label'")
    parser.add_argument("--obs-keys", nargs="*", default=[], help="further obs columns to keep")
    parser.add_argument("--species", help="species of all cells, e.g. human")
    parser.add_argument("--species-key", help="obs column holding each cell's species")
    parser.add_argument("--batch-key", help="obs column stored as the 'batch' column")
    parser.add_argument("--layer", help="layer to read ('X' for X); default: layers['counts'], .raw, then X")
    parser.add_argument("--use-raw", action="store_true", help="read .raw.X")
    parser.add_argument(
        "--no-require-counts", dest="require_counts", action="store_false",
        help="the values are log-normalised, not raw integer counts",
    )
    parser.add_argument("--gene-id-key", help="var column holding Ensembl ids")
    parser.add_argument("--allow-empty-genes", action="store_true", help="keep genes that are zero in every cell")
    parser.add_argument("--chunk-size", type=int, default=8192, help="cells read and written at a time")
    parser.add_argument("--num-proc", type=int, default=1, help="worker processes")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR once the new dataset is complete")
    parser.set_defaults(func=_run_convert)


def _run_convert(args) -> None:
    from .data.convert import convert_anndata
    from .hub import write_dataset_card

    dataset = convert_anndata(
        args.input,
        args.output_dir,
        label_key=args.label_key,
        obs_keys=args.obs_keys,
        species=args.species,
        species_key=args.species_key,
        batch_key=args.batch_key,
        layer=args.layer,
        use_raw=args.use_raw,
        require_counts=args.require_counts,
        gene_id_key=args.gene_id_key,
        allow_empty_genes=args.allow_empty_genes,
        chunk_size=args.chunk_size,
        num_proc=args.num_proc,
        overwrite=args.overwrite,
        card_writer=write_dataset_card,
    )
    print(f"wrote {len(dataset):,} cells to {args.output_dir}")


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(item for item in text.split(",") if item)


def _comma_ints(text: str) -> tuple[int, ...]:
    return tuple(int(item) for item in _comma_list(text))


def _add_benchmark(subparsers) -> None:
    parser = subparsers.add_parser(
        "benchmark", help="performance figures next to their baselines (BertModel peer, dense, GEMM roof)"
    )
    benchmarks = parser.add_subparsers(dest="benchmark", required=True)
    settings = {}

    def add(name, help_text):
        sub = benchmarks.add_parser(name, help=help_text)
        sub.add_argument("--output-dir", required=True, help="folder for <name>.json, .md (README table) and .png")
        sub.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
        sub.add_argument("--seed", type=int, default=0)
        settings[name] = ["output_dir", "threads", "seed"]
        return sub

    sub = add("inference", "cells/s of the presets vs knn/dense/linear/BertModel, GFLOP/s vs a GEMM")
    sub.add_argument("--presets", type=_comma_list, default=("tiny", "default"))
    sub.add_argument("--n-genes", type=int, default=2000)
    sub.add_argument("--batch-size", type=int, default=32)
    sub.add_argument("--long-preset", default="default", help="preset timed at --long-n-genes ('none': skip)")
    sub.add_argument("--long-n-genes", type=int, default=16000)
    sub.add_argument("--long-batch-size", type=int, default=4)
    sub.add_argument("--warmup", type=int, default=1)
    sub.add_argument("--repeats", type=int, default=5)
    settings["inference"] += ["presets", "n_genes", "batch_size", "long_preset", "long_n_genes", "long_batch_size", "warmup", "repeats"]

    sub = add("train", "masked-gene-modelling training throughput and one-epoch time")
    sub.add_argument("--preset", default="default")
    sub.add_argument("--n-genes", type=int, default=2000)
    sub.add_argument("--n-cells", type=int, default=10_240, help="simulated cells trained on (>= 10,000 for the epoch estimate)")
    sub.add_argument("--batch-size", type=int, default=32, help="cells per optimiser step")
    sub.add_argument("--micro-batch-size", type=int, default=4, help="cells per forward/backward (gradient accumulation)")
    sub.add_argument("--epoch-cells", type=int, default=100_000)
    sub.add_argument("--baseline-steps", type=int, default=3)
    sub.add_argument("--max-minutes", type=float, default=None, help="stop training at this wall-clock budget")
    settings["train"] += [
        "preset", "n_genes", "n_cells", "batch_size", "micro_batch_size", "epoch_cells", "baseline_steps", "max_minutes"
    ]

    sub = add("memory", "time per cell and peak memory from 1,000 to 16,000 genes")
    sub.add_argument("--preset", default="default")
    sub.add_argument("--gene-counts", type=_comma_ints, default=(1000, 2000, 4000, 8000, 16000))
    sub.add_argument("--tokens-per-batch", type=int, default=64_000, help="batch = this // genes (at least 1)")
    sub.add_argument("--dense-max-genes", type=int, default=4000)
    sub.add_argument("--warmup", type=int, default=1)
    sub.add_argument("--repeats", type=int, default=3)
    settings["memory"] += ["preset", "gene_counts", "tokens_per_batch", "dense_max_genes", "warmup", "repeats"]

    sub = add("convert", "AnnData -> datasets conversion throughput on simulated cells")
    sub.add_argument("--n-cells", type=int, default=200_000)
    sub.add_argument("--n-genes", type=int, default=2000)
    sub.add_argument("--num-proc", type=int, default=1)
    settings["convert"] += ["n_cells", "n_genes", "num_proc"]

    sub = benchmarks.add_parser("report", help="the roadmap targets table from a benchmark folder, into the README")
    sub.add_argument("--output-dir", required=True, help="folder holding inference/memory/train .json")
    sub.add_argument("--readme", default=None, help="README to update between <!-- targets:start/end --> markers")

    parser.set_defaults(func=_run_benchmark, benchmark_settings=settings)


def _run_benchmark(args) -> int:
    from .benchmark import run_benchmark

    if args.benchmark == "report":
        from .benchmark.targets import targets_table, update_readme

        table = targets_table(args.output_dir)
        if not table:
            raise SystemExit(f"scrnalf benchmark report: no inference/memory/train .json in {args.output_dir}.")
        if args.readme:
            try:
                update_readme(args.readme, args.output_dir)
            except (OSError, ValueError) as error:
                raise SystemExit(f"scrnalf benchmark report: {error}") from None
        print(table)
        return 0
    settings = {name: getattr(args, name) for name in args.benchmark_settings[args.benchmark]}
    if settings.get("long_preset") == "none":
        settings["long_preset"] = None
    return run_benchmark(args.benchmark, **settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scrnalf", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_convert(subparsers)
    _add_presets(subparsers)
    _add_push(subparsers)
    _add_pretrain(subparsers)
    _add_finetune(subparsers)
    _add_compare(subparsers)
    _add_demo(subparsers)
    _add_predict(subparsers)
    _add_embed(subparsers)
    _add_transfer(subparsers)
    _add_benchmark(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "accepts_extra_args", False):
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    args.extra_args = rest
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
