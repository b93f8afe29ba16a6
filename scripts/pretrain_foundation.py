"""A foundation checkpoint: masked gene modelling on one or many sources, and a Hub-ready folder
whose card states the data, the compute and the pretraining loss curve.

    accelerate launch scripts/pretrain_foundation.py --source lab_a.h5ad --source lab_b_dataset \\
        --species human --preset default --output-dir runs/foundation --logging-steps 50

Every flag that is not ``--source`` / ``--species`` is ``scrnalf pretrain``'s (TrainingArguments
included; the loss is logged every 10 steps unless ``--logging-steps`` says otherwise), and the
training is ``scrnalf pretrain``'s own (:func:`train_from_arguments`).

Sources:

- ``.h5ad`` files and ``scrnalf convert`` folders are read (the usual matrix: ``layers["counts"]``,
  ``.raw``, then ``X``), brought to log1p-normalised values (counts scaled to 10,000 per cell, then
  log1p, as the processor does; log-normalised sources as given) and joined on the **union** of
  their genes (a gene a source lacks is 0 in its cells) into one temporary ``.h5ad``. Genes are
  matched by Ensembl id when every source has ids, else by symbol. Each process of a distributed
  run builds the same file for itself (deterministic; the inputs this suits are small).
- One SOMA URI streams as ``scrnalf pretrain --soma-uri`` does. Combining SOMA experiments with each
  other or with files is not built: such a mix is refused.

Species per source: ``--species`` (once for all sources, or once per source in order), else the
source's ``obs["species"]`` / ``var["species"]``, else "not recorded".

Besides ``pretrain``'s folder (weights, config, processor, remote code, card), the main process
writes ``foundation.json`` (sources, cells, species, device, device hours, cells/s, loss per logged
step), ``foundation_loss.png`` and a "Pretraining data and compute" section at the end of the card.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scrnalf_hf.training.arguments import parse_arguments
from scrnalf_hf.training.finetune import train_from_arguments

TARGET_SUM = 1e4  # the processor's default counts per cell before log1p
FOUNDATION_FILE = "foundation.json"
# pretrain logs once per epoch; a loss curve needs points within epochs
LOSS_LOGGING = ["--logging-strategy", "steps", "--logging-steps", "10"]
LOSS_PLOT = "foundation_loss.png"
DEMONSTRATION_NOTE = (
    "This checkpoint demonstrates the pipeline on small and simulated data; it is not a biological "
    "foundation model."
)


@dataclass
class Source:
    """One source of cells: where it is, how many cells it holds and their species."""

    location: str
    kind: str  # "h5ad", "convert folder" or "soma"
    n_cells: int
    species: str


def is_soma_uri(location: str) -> bool:
    """A SOMA experiment: a URI with a scheme, or a local folder holding a TileDB group."""
    if "://" in location:
        return True
    return Path(location, "__tiledb_group.tdb").exists() or Path(location, "__group").is_dir()


def check_sources(locations: list[str], species: list[str]) -> None:
    """One-line errors for sources that cannot be read, before anything is written."""
    if not locations:
        raise ValueError("give at least one --source (.h5ad file, `scrnalf convert` folder or SOMA URI).")
    if len(species) not in (0, 1, len(locations)):
        raise ValueError(f"give --species once for all sources or once per source ({len(locations)}), got {len(species)}.")
    for location in locations:
        if "://" not in location and not Path(location).exists():
            raise FileNotFoundError(f"source {location} does not exist.")
    soma = [location for location in locations if is_soma_uri(location)]
    if soma and len(locations) > 1:
        raise ValueError(
            f"a SOMA source ({soma[0]}) cannot be combined with other sources yet; pretrain from one SOMA URI alone."
        )


def _source_species(given: str | None, obs: pd.DataFrame, var: pd.DataFrame | None) -> str:
    if given:
        return given
    for frame in (obs, var):
        if frame is not None and "species" in frame.columns:
            return ", ".join(sorted(map(str, pd.unique(frame["species"].astype(str)))))
    return "not recorded"


def read_log1p(location: str, index: int, species: str | None) -> tuple[ad.AnnData, Source]:
    """One file source as log1p-normalised values.

    Returns:
        AnnData ``X``: (n_cells, n_genes) CSR float32 log1p values; ``var``: ``gene_symbols`` and,
        where the source has them, ``gene_ids``; ``obs_names`` prefixed ``s{index}:`` so that cells
        of different sources never share a name. And the :class:`Source` record.
    """
    from scrnalf_hf.data.cells import open_cells

    cells = open_cells(location, obs_keys=("species",), progress=False)
    indices = cells.dataset.data.column("indices").combine_chunks()
    values = cells.dataset.data.column("values").combine_chunks()
    matrix = sp.csr_matrix(
        (values.values.to_numpy(zero_copy_only=False).astype(np.float32), indices.values.to_numpy(zero_copy_only=False),
         indices.offsets.to_numpy()),
        shape=(cells.n_cells, cells.genes.n_genes),
    )
    if cells.input_kind == "counts":
        # library sizes count every gene of the cell, as the processor's normalisation does
        library = np.asarray(cells.dataset["library_size"], dtype=np.float32)
        scale = np.divide(TARGET_SUM, library, out=np.zeros_like(library), where=library > 0)
        matrix = sp.diags(scale) @ matrix
        matrix.data = np.log1p(matrix.data)
    var = pd.DataFrame({"gene_symbols": cells.genes.gene_symbols})
    if cells.genes.gene_ids is not None:
        var["gene_ids"] = cells.genes.gene_ids
    obs_columns = {"species": cells.dataset["species"]} if "species" in cells.dataset.column_names else {}
    obs = pd.DataFrame(obs_columns, index=[f"s{index}:{cell}" for cell in cells.cell_ids()])
    file_var = ad.read_h5ad(location, backed="r").var if Path(location).is_file() else None
    kind = "convert folder" if Path(location).is_dir() else "h5ad"
    record = Source(location, kind, cells.n_cells, _source_species(species, obs, file_var))
    return ad.AnnData(X=matrix.tocsr().astype(np.float32), obs=obs[[]], var=var), record


def combine_sources(parts: list[ad.AnnData], path: Path) -> tuple[int, str]:
    """Joins the sources on the union of their genes into one ``.h5ad`` at ``path``.

    Returns:
        The number of genes of the union and what matched them (``"gene_ids"`` or ``"gene_symbols"``).
    """
    key = "gene_ids" if all("gene_ids" in part.var for part in parts) else "gene_symbols"
    keyed = []
    for part in parts:
        part = part.copy()
        if key == "gene_symbols":  # ids of only some sources would leave genes without one
            part.var = part.var[["gene_symbols"]]
        names = part.var[key].astype(str)
        # symbols differ in case between annotations (e.g. MT-CO1 / mt-Co1); Ensembl ids do not
        part.var_names = (names.str.upper() if key == "gene_symbols" else names).to_numpy()
        keyed.append(part[:, ~part.var_names.duplicated()])
    joined = ad.concat(keyed, join="outer", fill_value=0.0, merge="first")
    joined.X = sp.csr_matrix(joined.X, dtype=np.float32)
    joined.write_h5ad(path)
    return joined.n_vars, key


def loss_curve(output_dir: Path) -> list[dict]:
    """Training loss per logged step, from the Trainer's ``log_history``: ``[{step, epoch, loss}]``."""
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [{"step": int(e["step"]), "epoch": float(e["epoch"]), "loss": float(e["loss"])} for e in history if "loss" in e]


def plot_loss(curve: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot([point["step"] for point in curve], [point["loss"] for point in curve], "o-", markersize=3)
    axis.set_xlabel("optimiser step")
    axis.set_ylabel("masked-gene loss (training)")
    axis.grid(alpha=0.3)
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def device_description(world_size: int) -> dict:
    """The accelerator the run trained on: type, name and count (one per process)."""
    import torch

    if torch.cuda.is_available():
        return {"type": "cuda", "name": torch.cuda.get_device_name(0), "count": world_size}
    return {"type": "cpu", "name": "CPU", "count": world_size}


def card_section(record: dict) -> str:
    """The "Pretraining data and compute" section appended to the model card (Markdown)."""
    rows = "\n".join(
        f"| `{source['location']}` | {source['kind']} | {source['n_cells']:,} | {source['species']} |"
        for source in record["sources"]
    )
    compute = record["compute"]
    final = record["loss_curve"][-1]["loss"] if record["loss_curve"] else float("nan")
    if record["n_genes_union"] is None:  # one SOMA experiment, streamed as `pretrain --soma-uri` reads it
        genes = "streamed from the SOMA experiment."
    else:
        genes = (f"joined on the union of their genes ({record['n_genes_union']:,} genes, matched by "
                 f"`{record['genes_matched_by']}`), log1p-normalised.")
    return (
        "\n## Pretraining data and compute\n\n"
        f"**{DEMONSTRATION_NOTE}**\n\n"
        "| source | kind | cells | species |\n| --- | --- | --- | --- |\n"
        f"{rows}\n\n"
        f"{record['n_cells']:,} cells in all, {genes}\n\n"
        f"Compute: {compute['device_count']} × {compute['device_name']} ({compute['device_type']}), "
        f"{compute['train_hours']:.4f} h of training wall time = {compute['device_hours']:.4f} device hours, "
        f"{compute['train_cells_per_second']:.1f} training cells/s. Final logged training loss {final:.4f} "
        f"({len(record['loss_curve'])} logged steps; `{FOUNDATION_FILE}` holds every one).\n\n"
        f"![pretraining loss]({LOSS_PLOT})\n"
    )


def write_foundation_outputs(output_dir: Path, sources: list[Source], union: tuple[int | None, str | None],
                             world_size: int) -> dict:
    """``foundation.json``, the loss plot and the card's section, from the finished run's files."""
    summary = json.loads((output_dir / "training_summary.json").read_text())
    device = device_description(world_size)
    curve = loss_curve(output_dir)
    record = {
        "note": DEMONSTRATION_NOTE,
        "sources": [vars(source) for source in sources],
        "n_cells": sum(source.n_cells for source in sources),
        "n_train_cells": summary["n_train_cells"],
        "n_genes_union": union[0],
        "genes_matched_by": union[1],
        "n_parameters": summary["n_parameters"],
        "compute": {
            "device_type": device["type"],
            "device_name": device["name"],
            "device_count": device["count"],
            "train_hours": summary["train_seconds"] / 3600,
            "device_hours": summary["train_seconds"] / 3600 * device["count"],
            "train_cells_per_second": summary["train_cells_per_second"],
        },
        "loss_curve": curve,
    }
    (output_dir / FOUNDATION_FILE).write_text(json.dumps(record, indent=2) + "\n")
    plot_loss(curve, output_dir / LOSS_PLOT, f"{record['n_cells']:,} cells, {len(sources)} source(s): demonstration")
    card = output_dir / "README.md"
    card.write_text(card.read_text() + card_section(record))
    return record


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    # no abbreviations: a prefix of a pretrain flag must reach pretrain, not be taken for one of these
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False, allow_abbrev=False)
    parser.add_argument("--source", action="append", default=[], help=".h5ad, convert folder or SOMA URI (repeat)")
    parser.add_argument("--species", action="append", default=[], help="species of every source, or of each in order")
    return parser.parse_known_args(argv)


def main(argv: list[str]) -> dict:
    own, rest = parse(argv)
    rest = [*LOSS_LOGGING, *rest]  # before the caller's flags, which override it
    check_sources(own.source, own.species)
    given = [flag for flag in rest if flag.split("=")[0] in ("--train-file", "--train_file", "--soma-uri", "--soma_uri")]
    if given:
        raise ValueError(f"{given[0].split('=')[0]} is chosen by this script; name every input with --source instead.")
    species = own.species * len(own.source) if len(own.species) == 1 else own.species or [None] * len(own.source)
    with tempfile.TemporaryDirectory(prefix="scrnalf-foundation-") as workdir:
        if is_soma_uri(own.source[0]):
            rest = ["--soma-uri", own.source[0], *rest]
            data_args, model_args, training_args = parse_arguments(rest, "pretrain")
            from scrnalf_hf.data.soma import open_soma

            n_cells = open_soma(
                own.source[0], measurement=data_args.measurement, layer=data_args.soma_layer, obs_filter=data_args.obs_filter,
            ).n_cells
            sources, union = [Source(own.source[0], "soma", n_cells, species[0] or "not recorded")], (None, None)
        else:
            parts, sources = zip(*(read_log1p(loc, i, sp_) for i, (loc, sp_) in enumerate(zip(own.source, species))))
            combined = Path(workdir) / "foundation_cells.h5ad"
            union = combine_sources(list(parts), combined)
            rest = ["--train-file", str(combined), "--input-kind", "log1p", "--dataset-name",
                    f"foundation ({len(sources)} sources)", *rest]
            data_args, model_args, training_args = parse_arguments(rest, "pretrain")
        train_from_arguments(data_args, model_args, training_args)
    if training_args.process_index != 0:  # only the main process writes
        return {}
    return write_foundation_outputs(Path(training_args.output_dir), list(sources), union, training_args.world_size)


if __name__ == "__main__":
    started = time.perf_counter()
    try:
        record = main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"pretrain_foundation.py: error: {error}")
    if record:
        print(f"foundation: {record['n_cells']:,} cells from {len(record['sources'])} source(s), "
              f"{record['compute']['device_hours']:.4f} device hours, {time.perf_counter() - started:.0f} s in all")
