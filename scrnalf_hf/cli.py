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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scrnalf", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_presets(subparsers)
    _add_push(subparsers)
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
