#!/usr/bin/env python3
"""Runs golden-suite cases and stores their values as the new golden values.

    python tools/make_golden.py --all                    # every case this machine can run
    python tools/make_golden.py --name retrieval_hstu    # one case (repeatable)
    python tools/make_golden.py --list

Cases and the tolerance policy: tests/functional/golden.py; configs in
tests/functional/configs/<name>.yaml; values written to tests/functional/golden/<name>.json.
Multi-rank cases start gloo ranks with torchrun. GPU cases (``gpu``) run only where CUDA is
available: regenerate them on the GPU machine. ML-100K is read from $MEGATRON_GR_ML100K
(default ../shared/data/ml-100k). Regenerate only after a change that is meant to alter the
training numerics, and say so in the commit message.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    import torch

    from tests.functional.golden import CASES, PENDING, golden_path, run_all

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", action="append", default=[], help="a case to regenerate (repeatable)")
    parser.add_argument("--all", action="store_true", help="every case (GPU cases only where CUDA is available)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args()
    if args.list:
        for case in CASES:
            print(f"{case.name}: {case.ranks} rank(s)" + (", GPU" if case.gpu else "") + (f", resumed at step {case.resume_at}" if case.resume_at else ""))
        for name, note in PENDING.items():
            print(f"{name}: pending ({note})")
        return 0
    known = {case.name: case for case in CASES}
    unknown = [name for name in args.name if name not in known]
    if unknown:
        parser.error(f"no case {', '.join(unknown)}; cases: {', '.join(known)}")
    names = list(args.name)
    if args.all:
        names += [case.name for case in CASES if case.name not in names and (not case.gpu or torch.cuda.is_available())]
    if not names:
        parser.error("give --name NAME or --all")
    gpu_here = torch.cuda.is_available()
    for name in names:
        if known[name].gpu and not gpu_here:
            parser.error(f"{name} is a GPU case: run it on a machine with CUDA")
    with tempfile.TemporaryDirectory() as tmp:
        records = run_all(names, Path(tmp))
    for name in names:
        path = golden_path(name)
        path.write_text(json.dumps(records[name], indent=1) + "\n")
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
