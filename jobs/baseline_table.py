"""The baseline comparison's tables as markdown, from its record (NAME.comparison.json) and MLflow.

    python jobs/baseline_table.py --name baselines                       # to stdout
    python jobs/baseline_table.py --name baselines --storage-path DIR --tracking-uri URI --out table.md
    python jobs/baseline_table.py --name base-sst2 --name base-agnews --readme README.md   # the README's tables

Test (mean ± std over the seeds) is the reported figure, validation beside it, and the
configuration stage 1 chose on validation. The logic lives in lora_diffusion.analysis.table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_diffusion.analysis.table import into_readme, write_tables
from lora_diffusion.core.errors import UserError
from lora_diffusion.engine import options
from lora_diffusion.engine.storage import SweepStorage


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--storage-path", help="as given to the comparison (default: the engine's)")
    p.add_argument("--tracking-uri", help="as given to the comparison (default: the engine's)")
    p.add_argument("--name", action="append", dest="names", metavar="NAME",
                   help="the comparison's --name (repeatable: e.g. one per task, tables one after another; "
                        "default: baselines)")
    p.add_argument("--preamble", default="", help="markdown put before the tables (what ran, the command)")
    p.add_argument("--out", help="write the markdown here (default: stdout)")
    p.add_argument("--readme", help="write the tables between this file's baseline-table markers")
    p.add_argument("--block", help="with --readme: the named markers <!-- baseline-table:BLOCK ... "
                                   "<!-- /baseline-table:BLOCK --> instead of the unnamed ones")
    args = p.parse_args(argv)
    storage = SweepStorage(options.storage_location(args.storage_path))
    try:
        text = args.preamble + "\n".join(write_tables(storage, args.tracking_uri or options.default_tracking_uri(), n)
                                         for n in args.names or ["baselines"])
        if args.readme:
            Path(args.readme).write_text(into_readme(Path(args.readme).read_text(), text, args.block))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(text)
    elif not args.readme:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
