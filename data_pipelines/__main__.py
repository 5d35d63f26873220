"""``python -m unimodal.data_pipelines build --recipe NAME --out DIR [--limit N] [--quiet]``,
``python -m unimodal.data_pipelines list``, ``python -m unimodal.data_pipelines check DIR`` and
``python -m unimodal.data_pipelines convert FORMAT SRC --out DIR`` (data_pipelines/convert.py).

``unimodal data ...`` calls ``main`` with the same arguments.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys

from unimodal.data_pipelines.shards import DataBuildError, build, recipe_status


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Build webdataset shards from a recipe.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build a recipe's shards, tokenizer models and manifest")
    b.add_argument("--recipe", required=True, help="recipe name (see `list`)")
    b.add_argument("--out", required=True, help="output folder (created; must not hold other files)")
    b.add_argument("--limit", type=int, default=None,
                   help="at most N samples from each of the recipe's sources (quick builds)")
    b.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    sub.add_parser("list", help="list the recipes and whether they can be built here")
    c = sub.add_parser("check", help="report leaks between a shard folder's train split and its val/test splits")
    c.add_argument("dir", help="shard folder (with manifest.json, or train/ val/ test/ folders of .tar shards)")
    c.add_argument("--json", action="store_true", help="print the whole report as JSON")
    from unimodal.data_pipelines import convert
    convert.add_parser(sub)
    return p


def main(argv: list[str] | None = None, prog: str = "python -m unimodal.data_pipelines") -> int:
    """Run the command; 0 on success, 2 on an error a person can fix (one line on stderr)."""
    args = _parser(prog).parse_args(argv)
    try:
        if args.command == "list":
            for name, ok, reason, desc in recipe_status():
                state = "available" if ok else f"unavailable: {reason}"
                print(f"{name:15s} {state}" + (f"\n{'':15s} {desc}" if desc else ""))
            return 0
        if args.command == "check":
            from unimodal.data_pipelines.check import check, render
            report = check(args.dir)
            print(json.dumps(report, indent=1, ensure_ascii=False) if args.json else render(report))
            return 1 if report["leaks"] else 0
        argv_used = sys.argv[1:] if argv is None else argv
        command = " ".join([prog, *map(shlex.quote, argv_used)])
        if args.command == "convert":
            from unimodal.data_pipelines import convert
            return convert.run(args, command=command)
        manifest = build(args.recipe, args.out, limit=args.limit, progress=not args.quiet,
                         command=command)
    except DataBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = sum(sum(s["samples"].values()) for s in manifest["splits"].values())
    print(f"{args.out}: recipe {manifest['recipe']}, {total} samples, "
          + ", ".join(f"{k} {v['total'] if 'total' in v else sum(v['samples'].values())}"
                      for k, v in manifest["splits"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
