"""Inputs of the committed ``scrnalf scaling`` runs (benchmarks/scaling/): simulated datasets at
named difficulty settings, and the bundled pbmc68k_reduced as an .h5ad.

    python scripts/scaling.py simulate --setting standard --n-cells 32500 --output data/sim_standard.h5ad
    python scripts/scaling.py pbmc --output data/pbmc68k_reduced.h5ad
    python scripts/scaling.py table     # benchmarks/scaling/*/scaling.json -> the packaged recommend table
    python scripts/scaling.py readme    # the measured part of benchmarks/scaling/README.md (between markers)

Simulated data measure mechanics and speed, not biology (see scrnalf_hf.data.simulation).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Difficulty settings of the simulator (scrnalf_hf.data.simulation.SimulationSettings fields).
SETTINGS = {
    # the simulator's defaults: 6 types, markers raised by e^1.1, 500 genes of which 452 carry no marker
    "standard": {"n_genes": 500},
    # lower separability and more classes: markers raised by e^0.6, 10 types
    "hard": {"n_genes": 500, "n_cell_types": 10, "marker_log_fold_change": 0.6},
    # the standard signal among three times as many genes: 1,452 of 1,500 genes carry no marker
    "noisy": {"n_genes": 1500},
}


def describe(setting: str, n_cells: int, seed: int) -> str:
    fields = ", ".join(f"{k}={v}" for k, v in SETTINGS[setting].items())
    return (f"simulated cells (setting '{setting}': {fields}, other SimulationSettings at their defaults, seed {seed}), "
            f"written by 'python scripts/scaling.py simulate --setting {setting} --n-cells {n_cells} --seed {seed} --output data/sim_{setting}.h5ad'; "
            "simulated data measure mechanics and speed, not biology")


START, END = "<!-- studies:start -->", "<!-- studies:end -->"


def write_readme(benchmarks: Path, output: Path) -> None:
    """Each study's scaling.md (command, tables, crossovers, what was not measured) and its plot,
    between the markers of ``output``; the hand-written text around them is kept."""
    parts = []
    for path in sorted(benchmarks.glob("*/scaling.json")):
        folder = path.parent
        parts += [f"### `{folder.name}`", "", (folder / "scaling.md").read_text().strip(), "",
                  f"![{folder.name}]({folder.name}/scaling.png)", ""]
    text = output.read_text() if output.exists() else f"{START}\n{END}\n"
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    output.write_text(f"{before}{START}\n" + "\n".join(parts) + f"\n{END}{after}")
    print(f"{len(parts) // 6} studies -> {output}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    simulate = sub.add_parser("simulate", help="write a simulated .h5ad (raw counts, obs['cell_type'])")
    simulate.add_argument("--setting", choices=sorted(SETTINGS), required=True)
    simulate.add_argument("--n-cells", type=int, required=True)
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument("--output", required=True)
    pbmc = sub.add_parser("pbmc", help="write scanpy's bundled pbmc68k_reduced as an .h5ad")
    pbmc.add_argument("--output", required=True)
    table = sub.add_parser("table", help="gather benchmarks/scaling/*/scaling.json into the packaged recommend table")
    table.add_argument("--benchmarks", default=str(REPO / "benchmarks" / "scaling"))
    table.add_argument("--output", default=str(REPO / "scrnalf_hf" / "training" / "scaling_measurements.json"))
    readme = sub.add_parser("readme", help="write every study's table into benchmarks/scaling/README.md between markers")
    readme.add_argument("--benchmarks", default=str(REPO / "benchmarks" / "scaling"))
    readme.add_argument("--output", default=str(REPO / "benchmarks" / "scaling" / "README.md"))
    args = parser.parse_args(argv)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    if args.what == "readme":
        write_readme(Path(args.benchmarks), Path(args.output))
        return
    if args.what == "simulate":
        from scrnalf_hf.data.simulation import write_simulated_h5ad

        write_simulated_h5ad(args.output, args.n_cells, seed=args.seed, **SETTINGS[args.setting])
        print(describe(args.setting, args.n_cells, args.seed))
    elif args.what == "pbmc":
        from scrnalf_hf.data.bundled import load_pbmc68k_reduced

        load_pbmc68k_reduced().write_h5ad(args.output)
    else:
        from scrnalf_hf.training.recommend import build_table

        studies = build_table(args.benchmarks, root=REPO)
        Path(args.output).write_text(json.dumps(studies, indent=1) + "\n")
        print(f"{len(studies)} studies -> {args.output}")


if __name__ == "__main__":
    main()
