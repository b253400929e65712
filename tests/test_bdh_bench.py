"""benchmarks/bdh_bench.py's `sparse` command: BDH's activation densities and its decoder's
product dense against CSR (a quick run: it checks the script, and measures nothing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_sparse_reports_densities_and_the_product_at_each() -> None:
    res = subprocess.run([sys.executable, str(BENCHMARKS / "bdh_bench.py"), "sparse", "--quick"],
                         capture_output=True, text=True, timeout=300, check=True)
    out = json.loads(res.stdout)
    assert out["machine"]["cpu_capability"]
    steps = [row["step"] for row in out["density"]]
    assert steps == [0, 1, 2]
    for row in out["density"]:
        # the gated product x * y is non-zero only where x is: never denser than x
        assert 0.0 < row["gated_nonzero"] <= row["x_nonzero"] <= 1.0
    shares = [p["nonzero"] for p in out["decoder_product"]["by_density"]]
    assert out["density"][0]["gated_nonzero"] in shares
    assert out["density"][-1]["gated_nonzero"] in shares
    assert shares == sorted(shares, reverse=True) and 0.02 in shares
    for p in out["decoder_product"]["by_density"]:
        assert set(p) == {"nonzero", "forward_dense_us", "forward_csr_us", "weight_grad_dense_us",
                          "weight_grad_csr_us", "input_grad_dense_us", "input_grad_sampled_us",
                          "to_csr_us"}
        assert all(v > 0 for v in p.values())
    progress = [json.loads(line) for line in res.stderr.splitlines() if line.startswith("{")]
    assert progress == out["density"]  # each density row also went to stderr as it was taken
    assert "Traceback" not in res.stderr and "beta" not in res.stderr
