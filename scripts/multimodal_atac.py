"""RNA + ATAC measured on simulated multiome cells: classification and the cost of peak attention.

1. Classification of ``cell_type`` from ATAC alone, from RNA alone and from both, each beside
   logistic regression on the same features, on the same stratified folds. Cells come from
   ``simulate_multiome`` (peaks near genes whose programme drives their accessibility; see
   ``scrnalf_hf.data.simulation``), written to a ``.h5mu`` file and read back with
   ``scrnalf_hf.data.atac.read_atac`` (cells matched by id). Features:

   - ATAC: binarised accessibility (0/1 per peak). The transformer is the classifier over peak
     tokens (vocabulary = the peak panel) with the genomic peak graph (``build_peak_graph``);
   - RNA: the processor's normalised expression; the transformer uses the gene graph of the
     training cells (``ScrnaLongformerProcessor.build_gene_graph``);
   - both: the RNA model with an ``atac`` modality (``config.modalities={"atac": P}``): the peak
     encoder over the peak graph, fused with RNA (``ScrnaLongformerCrossModalFusion``); logistic
     regression gets the two feature blocks side by side.

   Transformers train with ``ScrnaTrainer`` and the classification task's recipe (learning rate
   3e-3, embeddings 10x, label smoothing 0.1) for ``--num-train-epochs`` epochs.

2. Cost of peak attention: one forward, and one forward + backward, of the ATAC encoder
   (``ScrnaLongformerPeakEncoder``, the preset's width, ``peak_knn_k`` neighbours) at each
   ``--timing-peaks`` size on ``--timing-batch`` cells, each size in a fresh process: median wall
   time of 3 runs after the first, and the peak resident memory of the first forward + backward
   above the process's resident set just before it (sampled every 2 ms; eager kernels, which
   materialise the gathered neighbour keys and values, so an upper bound), plus the time to
   build the peak graph.

Writes ``OUTPUT_DIR/atac.json`` and ``OUTPUT_DIR/atac.md``. Simulated data: the figures show that
the mechanics work and how the cost grows, not how well real chromatin predicts cell types.

    python scripts/multimodal_atac.py --output-dir benchmarks/multimodal/atac
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SIMULATION = {"n_cell_types": 6, "nb_theta": 20.0, "dropout": 0.1}
RECIPE = {"learning_rate": 3e-3, "label_smoothing_factor": 0.1, "embedding_lr_multiplier": 10.0}
INPUTS = ("atac", "rna", "rna+atac")


class CellInputs(torch.utils.data.Dataset):
    """Rows of named (n_cells, ...) arrays as the model's keyword arguments."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = {name: torch.as_tensor(values) for name, values in arrays.items()}

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        return {name: values[row] for name, values in self.arrays.items()}


def simulated_cells(n_cells: int, n_genes: int, n_peaks: int, seed: int, folder: Path):
    """``(expression, accessibility, peaks, labels, label_names, processor)`` of simulated cells,
    read back from a ``.h5mu`` file as a user's would be."""
    from scrnalf_hf import ScrnaLongformerProcessor
    from scrnalf_hf.data.atac import read_atac
    from scrnalf_hf.data.simulation import simulate_multiome

    path = folder / "multiome.h5mu"
    simulate_multiome(n_cells, n_genes, n_peaks, seed=seed, **SIMULATION).write_h5mu(path)
    rna, peaks = read_atac(path)
    processor = ScrnaLongformerProcessor.from_anndata(rna)
    expression = processor(rna, return_tensors="np")["expression"].astype(np.float32)
    labels = rna.obs["cell_type"].cat.codes.to_numpy().astype(np.int64)
    return expression, peaks.accessibility, peaks, labels, list(rna.obs["cell_type"].cat.categories), processor


def build_model(kind: str, preset: str, n_genes: int, peaks, label_names: list[str], gene_graph, seed: int):
    """The transformer classifier of one input kind, its graphs set."""
    from scrnalf_hf import ScrnaLongformerConfig, ScrnaLongformerForCellClassification
    from scrnalf_hf.data.atac import build_peak_graph

    torch.manual_seed(seed)
    labels = {"id2label": dict(enumerate(label_names)), "label2id": {n: i for i, n in enumerate(label_names)}}
    common = {**labels, "kernel_implementation": "eager"}
    if kind == "atac":  # the vocabulary is the peak panel, the graph the genomic peak graph
        config = ScrnaLongformerConfig.from_preset(preset, n_genes=len(peaks.names), **common)
        model = ScrnaLongformerForCellClassification(config)
        model.scrna_longformer.set_gene_graph(build_peak_graph(peaks.coordinates, config.knn_k))
        return model
    modalities = {"modalities": {"atac": len(peaks.names)}, "peak_names": peaks.names} if kind == "rna+atac" else {}
    config = ScrnaLongformerConfig.from_preset(preset, n_genes=n_genes, **modalities, **common)
    model = ScrnaLongformerForCellClassification(config)
    model.scrna_longformer.set_gene_graph(gene_graph)
    if kind == "rna+atac":
        model.fusion.peak_encoder.set_peak_graph(build_peak_graph(peaks.coordinates, config.peak_knn_k))
    return model


def model_inputs(kind: str, expression: np.ndarray, accessibility: np.ndarray, rows: np.ndarray) -> dict:
    if kind == "atac":
        return {"expression": accessibility[rows]}
    if kind == "rna":
        return {"expression": expression[rows]}
    return {"expression": expression[rows], "peak_accessibility": accessibility[rows]}


def train_and_predict(model, train: dict, evaluate: dict, epochs: float, seed: int, folder: Path) -> np.ndarray:
    from transformers import TrainingArguments

    from scrnalf_hf.training.trainer import ScrnaTrainer

    arguments = TrainingArguments(
        output_dir=str(folder), num_train_epochs=epochs, per_device_train_batch_size=32, per_device_eval_batch_size=64,
        learning_rate=RECIPE["learning_rate"], label_smoothing_factor=RECIPE["label_smoothing_factor"],
        save_strategy="no", report_to=[], seed=seed, use_cpu=True, disable_tqdm=True, log_level="warning",
    )
    trainer = ScrnaTrainer(
        model=model, args=arguments, train_dataset=CellInputs(train),
        embedding_lr_multiplier=RECIPE["embedding_lr_multiplier"],
    )
    trainer.train()
    logits = trainer.predict(CellInputs(evaluate)).predictions[0]  # (n_cells, n_classes); then cell embeddings
    return logits.argmax(-1)


def logistic_regression(train_features: np.ndarray, train_labels, eval_features: np.ndarray, seed: int) -> np.ndarray:
    from scrnalf_hf.training.baselines import CLASSIFICATION_BASELINES, fit_baseline

    return fit_baseline("logreg", CLASSIFICATION_BASELINES, train_features, train_labels, eval_features, seed=seed).predictions


def classification(args) -> dict:
    from scrnalf_hf.data.splits import cross_validation_folds
    from scrnalf_hf.training.metrics import classification_metrics

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        expression, accessibility, peaks, labels, label_names, processor = simulated_cells(
            args.n_cells, args.n_genes, args.n_peaks, args.seed, scratch
        )
        features = {"atac": accessibility, "rna": expression, "rna+atac": np.hstack([expression, accessibility])}
        folds = cross_validation_folds(len(labels), args.cv, seed=args.seed, labels=labels)
        scores = {kind: {"transformer": [], "logreg": []} for kind in INPUTS}
        started = time.perf_counter()
        for fold, (train_rows, eval_rows) in enumerate(folds):
            from scrnalf_hf import ScrnaLongformerConfig

            knn_k = ScrnaLongformerConfig.from_preset(args.preset).knn_k
            gene_graph = processor.build_gene_graph(expression[train_rows], knn_k, seed=args.seed)
            for kind in INPUTS:
                model = build_model(kind, args.preset, expression.shape[1], peaks, label_names, gene_graph, args.seed)
                train = {**model_inputs(kind, expression, accessibility, train_rows), "labels": labels[train_rows]}
                predicted = train_and_predict(
                    model, train, model_inputs(kind, expression, accessibility, eval_rows), args.num_train_epochs,
                    args.seed, scratch / f"{kind}{fold}",
                )
                baseline = logistic_regression(features[kind][train_rows], labels[train_rows], features[kind][eval_rows], args.seed)
                for method, prediction in (("transformer", predicted), ("logreg", baseline)):
                    metrics = classification_metrics(labels[eval_rows], prediction, len(label_names), per_class=False)
                    scores[kind][method].append({"fold": fold, "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]})
                print(f"fold {fold} {kind}: macro-F1 transformer {scores[kind]['transformer'][-1]['macro_f1']:.3f}, "
                      f"logreg {scores[kind]['logreg'][-1]['macro_f1']:.3f}", flush=True)
    return {"folds": args.cv, "seconds": round(time.perf_counter() - started), "scores": scores,
            "n_classes": len(label_names), "majority_fraction": float(np.bincount(labels).max() / len(labels))}


def probe(n_peaks: int, preset: str, batch: int, repeats: int = 3) -> dict:
    """Time and peak memory of the ATAC encoder over ``n_peaks`` peaks (run in a fresh process)."""
    from scrnalf_hf import ScrnaLongformerConfig
    from scrnalf_hf.data.atac import PeakCoordinates, build_peak_graph
    import psutil

    from scrnalf_hf.machine import PeakMemory, tree_rss
    from scrnalf_hf.modeling_scrnalf import ScrnaLongformerPeakEncoder

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    start = np.sort(rng.choice(3_000_000_000 // 500, n_peaks, replace=False)) * 500  # ~ a genome's worth of positions
    coordinates = PeakCoordinates(np.array([f"chr{1 + s * 22 // 3_000_000_000}" for s in start]), start, start + 500)
    began = time.perf_counter()
    graph = build_peak_graph(coordinates, ScrnaLongformerConfig.from_preset(preset).knn_k)
    graph_seconds = time.perf_counter() - began
    config = ScrnaLongformerConfig.from_preset(
        preset, modalities={"atac": n_peaks}, peak_knn_k=graph.shape[1], kernel_implementation="eager", hidden_dropout=0.0
    )
    encoder = ScrnaLongformerPeakEncoder(config)
    encoder.set_peak_graph(graph)
    accessibility = (torch.rand(batch, n_peaks) < 0.1).float()
    measured = torch.ones(batch, n_peaks, dtype=torch.bool)

    def forward_backward():
        encoder(accessibility, measured).cell_embedding.sum().backward()

    def forward():
        with torch.no_grad():
            encoder(accessibility, measured)

    # memory of the first pass, before the allocator holds freed blocks that a second one would reuse
    before = tree_rss(psutil.Process())
    with PeakMemory(interval=0.002) as peak:
        forward_backward()
    peak_bytes = max(0, peak.bytes - before)
    encoder.zero_grad(set_to_none=True)
    timings = {}
    for name, step in (("forward", forward), ("forward_backward", forward_backward)):
        seconds = []
        for _ in range(repeats):
            began = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - began)
        timings[name] = statistics.median(seconds)
    return {
        "n_peaks": n_peaks, "batch": batch, "d_model": config.d_model, "depth": config.depth, "peak_knn_k": config.peak_knn_k,
        "graph_build_seconds": graph_seconds, "forward_seconds": timings["forward"],
        "forward_backward_seconds": timings["forward_backward"], "peak_memory_mib": peak_bytes / 2**20,
        "threads": torch.get_num_threads(),
    }


def timing(args) -> list[dict]:
    rows = []
    for n_peaks in args.timing_peaks:
        command = [sys.executable, __file__, "--probe", str(n_peaks), "--preset", args.preset,
                   "--timing-batch", str(args.timing_batch)]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(f"{n_peaks} peaks: {rows[-1]}", flush=True)
    return rows


def _mean(values: list[float]) -> float:
    return float(np.mean(values))


def report(results: dict) -> str:
    lines = [
        "# RNA + ATAC on simulated multiome cells",
        "",
        "Simulated data (`simulate_multiome`): the figures show that the mechanics work and how the cost grows, "
        "not how well real chromatin accessibility predicts cell types.",
        "",
        f"Command: `{results['command']}`",
        "",
        "Machine: {cpu}, {threads} torch threads, torch {torch}, Python {python}, 1-minute load average "
        "{load_average_1min} at the start.".format(**results["machine"]),
        "",
    ]
    if "classification" in results:
        c = results["classification"]
        s = results["settings"]
        lines += [
            f"## Classification of `cell_type` ({c['n_classes']} classes; {s['n_cells']} cells, {s['n_genes']} genes, "
            f"{s['n_peaks']} peaks; {c['folds']}-fold stratified CV, held-out cells; `{s['preset']}` preset, "
            f"{s['num_train_epochs']} epochs; {c['seconds']} s)",
            "",
            f"Majority class: {c['majority_fraction']:.3f} of the cells.",
            "",
            "| input | transformer macro-F1 (per fold) | mean | logistic regression macro-F1 (per fold) | mean |",
            "| --- | --- | --- | --- | --- |",
        ]
        for kind in INPUTS:
            row = c["scores"][kind]
            model = [f["macro_f1"] for f in row["transformer"]]
            baseline = [f["macro_f1"] for f in row["logreg"]]
            lines.append(
                f"| {kind} | {' / '.join(f'{v:.3f}' for v in model)} | {_mean(model):.3f} | "
                f"{' / '.join(f'{v:.3f}' for v in baseline)} | {_mean(baseline):.3f} |"
            )
        lines += [""]
    if "timing" in results:
        first = results["timing"][0]
        lines += [
            f"## Peak attention cost (ATAC encoder: d_model {first['d_model']}, depth {first['depth']}, "
            f"{first['peak_knn_k']} neighbours per peak, batch {first['batch']}, eager kernels, {first['threads']} threads)",
            "",
            "| peaks | peak graph build (s) | forward (s) | forward + backward (s) | peak memory above baseline, forward + backward (MiB) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for row in results["timing"]:
            lines.append(
                f"| {row['n_peaks']:,} | {row['graph_build_seconds']:.3f} | {row['forward_seconds']:.3f} | "
                f"{row['forward_backward_seconds']:.3f} | {row['peak_memory_mib']:.0f} |"
            )
        if len(results["timing"]) > 1:
            low, high = results["timing"][0], results["timing"][-1]
            ratio = high["n_peaks"] / low["n_peaks"]
            lines += [
                "",
                f"{ratio:.0f}x the peaks: forward {high['forward_seconds'] / low['forward_seconds']:.1f}x the time, "
                f"forward + backward {high['forward_backward_seconds'] / low['forward_backward_seconds']:.1f}x, "
                f"memory {high['peak_memory_mib'] / max(low['peak_memory_mib'], 1e-9):.1f}x (linear would be {ratio:.0f}x).",
            ]
        lines += [""]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("benchmarks/multimodal/atac"))
    parser.add_argument("--n-cells", type=int, default=600)
    parser.add_argument("--n-genes", type=int, default=200)
    parser.add_argument("--n-peaks", type=int, default=2000)
    parser.add_argument("--cv", type=int, default=3)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--num-train-epochs", type=float, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timing-peaks", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--timing-batch", type=int, default=2)
    parser.add_argument("--skip-classification", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--probe", type=int, help=argparse.SUPPRESS)  # internal: one timing run in this process
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args.probe, args.preset, args.timing_batch)))
        return
    from scrnalf_hf.machine import describe_machine

    results = {
        "command": "python scripts/multimodal_atac.py " + " ".join(sys.argv[1:]),
        "machine": {**describe_machine(), "python": platform.python_version()},
        "settings": {key: getattr(args, key) for key in ("n_cells", "n_genes", "n_peaks", "cv", "preset", "num_train_epochs", "seed")},
        "simulation": SIMULATION,
        "recipe": RECIPE,
        "simulated": True,
    }
    if not args.skip_classification:
        results["classification"] = classification(args)
    if not args.skip_timing:
        results["timing"] = timing(args)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "atac.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.output_dir / "atac.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
