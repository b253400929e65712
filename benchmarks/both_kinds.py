"""One benchmark on this machine as it is, then as an AVX2-only CPU: both kinds from one command.

    python benchmarks/both_kinds.py [--only native|avx2] -- benchmarks/plasticity_bench.py ARGS

The second run sets ``machine.AVX2_RESTRICTION``: ATen, oneDNN and MKL each capped at AVX2, and
numba compiling for an AVX2 CPU. All of them, because a library left out stays on AVX-512 (MKL
runs the fp32 matrix products, 1.6-1.7x faster there), and the figure is then neither kind's.
The first run clears those variables, so "native" is the CPU's own kind whatever the shell
exported. The runs never overlap: on 2 cores a second busy process slows both. Each must print
one JSON object (every benchmark here does, with its ``machine``); prints ``{"native": ...,
"avx2": ...}``. A failed run stops this one with its exit code; its stderr (progress, errors)
passes through as it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

from machine import AVX2_RESTRICTION

KINDS = ("native", "avx2")


def kind_env(kind: str) -> dict[str, str]:
    """This process's environment with the restriction cleared ("native") or set ("avx2")."""
    env = {k: v for k, v in os.environ.items() if k not in AVX2_RESTRICTION}
    return {**env, **AVX2_RESTRICTION} if kind == "avx2" else env


def run(kind: str, command: list[str]) -> Any:
    print(f"both_kinds: {kind}: {' '.join(command)}", file=sys.stderr, flush=True)
    res = subprocess.run([sys.executable, *command], env=kind_env(kind), stdout=subprocess.PIPE,
                         text=True)
    if res.returncode != 0:
        print(f"both_kinds: the {kind} run exited with {res.returncode}", file=sys.stderr)
        raise SystemExit(res.returncode)
    try:
        return json.loads(res.stdout)
    except json.JSONDecodeError:
        sys.stderr.write(res.stdout)  # what it printed instead (a --help, say)
        print(f"both_kinds: the {kind} run printed no JSON object", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=KINDS, help="run one kind")
    parser.add_argument("command", nargs="+", help="the benchmark script and its arguments")
    args = parser.parse_args()
    kinds = (args.only,) if args.only else KINDS
    print(json.dumps({kind: run(kind, args.command) for kind in kinds}, indent=1))


if __name__ == "__main__":
    main()
