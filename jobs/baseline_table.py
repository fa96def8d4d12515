"""The baseline comparison's tables as markdown, from its record (comparison.json) and MLflow.

    python jobs/baseline_table.py --name baselines                       # to stdout
    python jobs/baseline_table.py --name baselines --storage-path DIR --tracking-uri URI --out table.md

Test (mean ± std over the seeds) is the reported figure, validation beside it, and the
configuration stage 1 chose on validation. The logic lives in lora_diffusion.analysis.table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_diffusion.analysis.table import write_tables
from lora_diffusion.core.errors import UserError
from lora_diffusion.engine import options
from lora_diffusion.engine.storage import SweepStorage


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="baselines", help="the comparison's --name")
    p.add_argument("--storage-path", help="as given to the comparison (default: the engine's)")
    p.add_argument("--tracking-uri", help="as given to the comparison (default: the engine's)")
    p.add_argument("--out", help="write the markdown here (default: stdout)")
    args = p.parse_args(argv)
    try:
        text = write_tables(SweepStorage(options.storage_location(args.storage_path)),
                            args.tracking_uri or options.default_tracking_uri(), args.name)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
