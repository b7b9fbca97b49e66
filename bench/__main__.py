"""Run benchmarks and print their figures; results are also written to bench/results/.

Usage: python -m bench [--list] [NAME ...]   (default: every benchmark)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

BENCHMARKS = {
    "artifacts": "bench.artifacts",
    "ingest": "bench.ingest",
    "rollout": "bench.rollout",
    "agent": "bench.agent",
    "drift": "bench.drift",
    "fl": "bench.fl",
}


def main(argv: list[str] | None = None) -> int:
    # TensorFlow's C++ logging goes straight to stderr; keep the figures readable.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run: {', '.join(BENCHMARKS)}")
    parser.add_argument("--list", action="store_true", help="list benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, module in BENCHMARKS.items():
            print(f"{name:<12} {importlib.import_module(module).__doc__.strip().splitlines()[0]}")
        return 0
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(
            f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}"
        )
    results_dir = Path(__file__).parent / "results"
    results_dir.mkdir(exist_ok=True)
    for name in args.names or list(BENCHMARKS):
        module = importlib.import_module(BENCHMARKS[name])
        print(f"\n=== {name}: {module.__doc__.strip().splitlines()[0]}", flush=True)
        t0 = time.perf_counter()
        result = module.run()
        result["_meta"] = {
            "benchmark": name,
            "seconds": round(time.perf_counter() - t0, 2),
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "python": platform.python_version(),
            "machine": platform.machine(),
        }
        (results_dir / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
        print(
            f"--- {name} took {result['_meta']['seconds']} s; figures in bench/results/{name}.json"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
