"""benchmarks/lora_bench.py --smoke: every LoRA workload and variant runs on CPU at tiny
shapes and writes its record."""
import json
import os

import numpy as np


def test_lora_bench_smoke_writes_every_record(tmp_path):
  from benchmarks import lora_bench
  results = lora_bench.main(["--smoke", "--repeats=1", f"--out={tmp_path}"])
  got = {(r["workload"], r["variant"]) for r in results}
  assert got == {(w, v) for w, vs in lora_bench.WORKLOADS.items() for v in vs}
  files = [f for _, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".json")]
  assert len(files) == len(got)
  for r in results:
    assert np.isfinite(r["step"]["median_s"]) and r["step"]["median_s"] > 0
  records = [json.load(open(os.path.join(d, f))) for d, _, fs in os.walk(tmp_path)
             for f in fs if f.endswith(".json")]
  ranks = {(rec["results"]["workload"], rec["results"]["variant"]): rec["config"]["lora_rank"]
           for rec in records}
  assert ranks[("w1", "full")] == 0 and ranks[("w1", "lora")] == 64
  assert all(rec["config"]["size"] == "smoke" for rec in records)
