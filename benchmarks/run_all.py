"""Run every ``bench_*.py`` in this folder, one after the other, each printing its comparable line(s).

python benchmarks/run_all.py [--quick]     # --quick scales the slow ones down for a smoke run
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

QUICK_ARGS = {
    "bench_coco_eval.py": ["--images", "500", "--repeats", "1"],
    "bench_matcher.py": ["--runs", "7"],
    "bench_deform_attn.py": ["--quick"],
    "bench_models.py": ["--runs", "2"],
    "bench_onnx.py": ["--runs", "1", "--arch", "detr", "--sizes", "512x512"],
    "bench_train_real.py": ["--steps", "2", "--warmup", "1", "--max-size", "320"],
}


# The full run adds the rows that are options of a script: bf16 where the CPU has it, and peak memory.
FULL_ARGS = {"bench_models.py": ["--bf16", "--memory"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    args = parser.parse_args()
    failed = []
    for script in sorted(Path(__file__).parent.glob("bench_*.py")):
        extra = QUICK_ARGS.get(script.name, []) if args.quick else FULL_ARGS.get(script.name, [])
        print(f"# {script.name}", flush=True)
        if subprocess.run([sys.executable, str(script), *extra]).returncode != 0:
            failed.append(script.name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
