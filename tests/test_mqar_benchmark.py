"""benchmarks/mqar.py on a CPU with a budget of two steps: every model trains through
`python -m mom_compile.train`, and the table, results.json and the plot report what the runs
recorded."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_tree_commit import tree_commit

from mom_compile.train.metrics import read_metrics

from train_runs import ROOT, env

pytest.importorskip("matplotlib")


def test_cpu_smoke_run_reports_the_runs(tmp_path):
    out = tmp_path / "bench"
    command = [sys.executable, "benchmarks/mqar.py", "--device", "cpu", "--budget-steps", "2", "--seeds", "1",
               "--seq-lens", "64", "--pairs", "8,16", "--batch-size", "2", "--eval-samples", "4", "--vocab",
               "64", "--no-compile", "--jobs-per-gpu", "3", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env(), cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())
    assert sorted(r["model"] for r in rows) == ["gdn", "mom4", "mom8"]
    table = (out / "mqar.md").read_text()
    for row in rows:
        run = out / "runs" / f"{row['model']}-T64-seed0"
        recorded = [r for r in read_metrics(str(run / "metrics.jsonl")) if "eval_accuracy" in r][-1]
        assert row["accuracy_by_pairs"] == recorded["eval_accuracy_by_pairs"] and row["steps"] == 2
        config = json.loads((out / "configs" / f"{row['model']}.json").read_text())
        assert (config["hidden_size"], config["num_hidden_layers"]) == (128, 2)
    for pairs in ("8", "16"):
        line = next(li for li in table.splitlines() if li.startswith(f"| 64 | {pairs} |"))
        cells = [c.strip() for c in line.strip("|").split("|")][2:]
        expected = [f"{next(r for r in rows if r['model'] == m)['accuracy_by_pairs'][pairs]:.3f} ± 0.000"
                    for m in ("gdn", "mom4", "mom8")]
        assert cells == expected
    assert (out / "mqar.png").read_bytes()[:4] == b"\x89PNG"
    assert table.splitlines()[-1] in result.stdout
    # every run records the checkout it trained with, and the table names it
    checkout = tree_commit(Path(ROOT))
    commits = {(out / "runs" / f"{r['model']}-T64-seed0" / "commit.txt").read_text().strip() for r in rows}
    assert commits == {r["commit"] for r in rows} == {checkout}
    assert f"trained at commit {checkout} on CPU" in table
    assert {(out / "runs" / f"{r['model']}-T64-seed0" / "device.txt").read_text() for r in rows} == {"CPU\n"}
    # the same runs are not the results of another budget: a report for 3 steps finds none of them
    budget = command.index("--budget-steps") + 1
    other = [*command[:budget], "3", *command[budget + 1:], "--report"]
    result = subprocess.run(other, capture_output=True, text=True, timeout=600, env=env(), cwd=ROOT)
    assert result.returncode == 1 and "3 of 3 runs missing or failed" in result.stdout, result.stdout
    assert json.loads((out / "results.json").read_text()) == []
