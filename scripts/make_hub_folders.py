"""Build the Hub-ready folders scrna-longformer-{tiny,default,large} from training runs.

Each run folder is where `scrnalf finetune` / `scrnalf pretrain` saved the model and processor,
with its all_results.json etc. (the files scrnalf_hf.hub.cards documents). The folder for each
preset gets the weights, config, processor, remote code, the cell-type pipeline and a model card
filled from that run; publish it afterwards with `scrnalf push`.

    python scripts/make_hub_folders.py --run tiny=runs/tiny --run default=runs/default \
        --org my-lab --output-dir hub_folders
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scrnalf_hf import ScrnaLongformerConfig
from scrnalf_hf.hub import export_hub_folder, validate_hub_folder

PRESETS = ("tiny", "default", "large")
# Fields that define a preset's size; a run must match them to be published under its name.
SIZE_FIELDS = ("d_model", "depth", "n_heads", "mlp_ratio")


def check_run_matches_preset(run_dir: Path, preset: str) -> None:
    """Refuse to publish a run under a preset name whose size it does not have."""
    config = json.loads((run_dir / "config.json").read_text())
    expected = ScrnaLongformerConfig.from_preset(preset)
    mismatched = {
        f: (config.get(f), getattr(expected, f)) for f in SIZE_FIELDS if config.get(f) != getattr(expected, f)
    }
    if mismatched:
        details = ", ".join(f"{f}={found} (preset {want})" for f, (found, want) in mismatched.items())
        raise SystemExit(f"{run_dir} is not a {preset!r} model: {details}.")


def parse_run(text: str) -> tuple[str, Path]:
    preset, _, folder = text.partition("=")
    if preset not in PRESETS or not folder:
        raise argparse.ArgumentTypeError(f"--run takes PRESET=RUN_DIR with PRESET in {PRESETS}, got {text!r}.")
    if not (Path(folder) / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{folder} has no config.json; pass the folder the run saved its model to.")
    return preset, Path(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=parse_run, action="append", required=True, help="PRESET=RUN_DIR, repeatable")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--org", required=True, help="namespace of the repos the cards will name")
    parser.add_argument("--license", default="mit")
    parser.add_argument("--benchmark-file", type=Path, default=None, help="scrnalf benchmark JSON (cells/s)")
    args = parser.parse_args(argv)

    for preset, run_dir in args.run:
        check_run_matches_preset(run_dir, preset)
        name = f"scrna-longformer-{preset}"
        folder = export_hub_folder(
            run_dir,
            args.output_dir / name,
            repo_id=f"{args.org}/{name}",
            license=args.license,
            benchmark_file=args.benchmark_file,
        )
        validate_hub_folder(folder)
        print(f"{folder}  (publish: scrnalf push --model-dir {folder} --repo-id {args.org}/{name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
