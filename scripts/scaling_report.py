"""Rewrite scaling.md and scaling.png of ``scrnalf scaling`` output folders from their scaling.json
(e.g. for a run stopped before its last fits: its table then lists what was not measured).

    python scripts/scaling_report.py benchmarks/scaling/*/
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from scrnalf_hf.training.scaling import write_results


def main(folders: list[str]) -> None:
    for folder in map(Path, folders):
        record = json.loads((folder / "scaling.json").read_text())
        write_results(record, folder, plot=True)
        print(f"{folder}: {len(record['rows'])} fits, unfinished: {len(record['unfinished'])}")


if __name__ == "__main__":
    main(sys.argv[1:])
