"""benchmarks/async_step.py --smoke: the actor–learner benchmark runs on 8 CPU devices
(2 actor + 6 learner, lag 1; and the one-jit step on all 8) and writes its records."""
import json
import os

import numpy as np


def test_async_step_smoke_records_both_modes(tmp_path):
  from benchmarks import async_step
  common = ["--smoke", "--repeats=2", "--prompts=24", f"--out={tmp_path}"]
  res = async_step.main(common + ["--mode=async", "--actor_devices=2", "--lag=1"])
  assert (res["actor_devices"], res["learner_devices"]) == (2, 6)
  assert res["actor_mesh"] == [1, 2, 1] and res["learner_mesh"] == [1, 6, 1]
  assert res["metrics_last"]["async/staleness"] == 1.0
  for part in ("step", "actor_rollout", "learner_update"):
    assert np.isfinite(res[part]["median_s"]) and res[part]["median_s"] > 0
  assert res["ideal_overlapped_step_s"] == max(res["actor_rollout"]["median_s"],
                                               res["learner_update"]["median_s"])
  sync = async_step.main(common + ["--mode=sync"])
  assert sync["mesh"] == [1, 8, 1] and "async/staleness" not in sync["metrics_last"]
  files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".json"))
  assert files == ["async_step_async_2a6l_k1.json", "async_step_sync_8.json"]
  rec = json.load(open(tmp_path / files[0]))
  assert rec["config"]["prompts"] == 24 and rec["results"]["lag"] == 1
