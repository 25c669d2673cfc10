"""Collects the JSON records of one run folder into the side-by-side table.

  python -m benchmarks.report RECORD_DIR [RECORD_DIR ...] [--smoke]

Reads floors.json, w*.json (jaxrl_llm) and peer_*.json (TRL, tunix) and prints
one table per workload with each peer's ratio peer time / jaxrl_llm time
(above 1: jaxrl_llm is faster), against the untagged jaxrl_llm record (the
library as it is; tagged records are variants). A later folder's record replaces an earlier
one of the same file name. No JAX import (runs anywhere).
"""

from __future__ import annotations

import glob
import json
import os
import sys

from benchmarks.record import print_table


def load(dirs):
  recs = {}
  for d in dirs:
    for path in sorted(glob.glob(os.path.join(d, "*.json"))):
      with open(path) as f:
        recs[os.path.basename(path)[:-5]] = json.load(f)
  return recs


def med(rec):
  return rec["results"]["step"]["median_s"]


def main():
  args = [a for a in sys.argv[1:] if a != "--smoke"]
  recs = load(args or ["benchmarks/results"])
  if "--smoke" in sys.argv:  # tables of CPU smoke records (checks the script itself)
    for r in recs.values():
      r["smoke"] = False
  any_rec = next(iter(recs.values()), None)
  if any_rec is None:
    print("no records")
    return
  dev = next((r["device"] for r in recs.values() if "device" in r), {})
  print(f"device: {dev.get('device_kind')}  jax {dev.get('jax')}  commit {any_rec.get('commit')}"
        f"  date {any_rec.get('date')}")
  fl = recs.get("floors", {}).get("results", {})
  if fl:
    print_table("floors", ["bf16 matmul TFLOP/s", "copy GB/s"],
                [[fl.get("matmul_tflops"), fl.get("copy_gb_per_s")]])

  # W1 / W4: ours vs peers, ratio = peer time / our time.
  for wl, ours_prefix, peers, unit, count in (
      ("W1 GRPO step (0.5B, 64x8 seqs, 256+512 tokens)", "w1_grpo_step",
       ("peer_trl_grpo", "peer_tunix_grpo"), "seq/s", 512),
      ("W4 DPO step (0.5B, 32 pairs x 1024 tokens)", "w4_dpo_step",
       ("peer_trl_dpo", "peer_tunix_dpo"), "pairs/s", 32)):
    ours = {k: v for k, v in recs.items() if k.startswith(ours_prefix) and not v.get("smoke")}
    rows = []
    # Ratios are against the untagged record: the library as it is.
    best = med(ours[ours_prefix]) if ours_prefix in ours else None
    for _, r in sorted(ours.items()):
      t = med(r)
      label = "jaxrl_llm " + str(r["results"].get("variant", r["config"].get("microbatches", "")))
      rows.append([label, t, count / t, r["results"].get("peak_gib"), ""])
    for k in peers:
      r = recs.get(k)
      if r is None or r.get("smoke"):
        rows.append([k[5:], None, None, None, "not measured"])
        continue
      t = med(r)
      ratio = (t / best) if best else None
      rows.append([k[5:], t, count / t, r["results"].get("peak_gib"),
                   f"peer/ours = {ratio:.2f}" if ratio else ""])
    print_table(wl, ["system", "step s (median)", unit, "peak GiB", "ratio"], rows)

  w2 = {k: v for k, v in recs.items() if k.startswith("w2_train_step") and not v.get("smoke")}
  if w2:
    print_table("W2 train step (1.5B, 16x2048 tokens)",
                ["variant", "step s", "tokens/s", "TFLOP/s", "MFU", "peak GiB"],
                [[r["results"]["variant"], med(r), r["results"]["tokens_per_s"],
                  r["results"]["achieved_tflops"], r["results"].get("mfu"),
                  r["results"].get("peak_gib")] for _, r in sorted(w2.items())])
  w3 = [v for k, v in sorted(recs.items()) if k.startswith("w3_decode") and not v.get("smoke")]
  for r in w3:
    rows = []
    for v in r["results"]:
      if "error" in v:
        rows.append([v["variant"], None, None, None, None, v["error"][:50]])
      else:
        exact = "decode_step_ms" in v
        rows.append([v["variant"], v["full"]["median_s"], v["tokens_per_s"],
                     v.get("decode_step_ms", v.get("step_ms_upper")),
                     v.get("bw_fraction", v.get("bw_fraction_lower")),
                     "" if exact else "bounds: total/512 incl. prefill"])
    print_table("W3 decode (0.5B, prompt 256, 512 new)",
                ["variant", "total s", "tokens/s", "step ms", "bw fraction", "note"], rows)
  w5 = {k: v for k, v in recs.items() if k.startswith("w5_ragged") and not v.get("smoke")}
  if w5:
    rows = []
    for _, r in sorted(w5.items()):
      x = r["results"]
      rows.append([x["variant"], x.get("step", {}).get("median_s"),
                   x.get("rollout", {}).get("median_s"), x.get("useful_tokens_per_s"),
                   x.get("ideal_rollout_s"), x.get("rollout_over_ideal"), x.get("peak_gib")])
    print_table("W5 ragged GRPO step (0.5B, 64x8 seqs, prompt 256, budget 1024)",
                ["variant", "step s", "rollout s", "useful tok/s", "ideal rollout s",
                 "rollout/ideal", "peak GiB"], rows)


if __name__ == "__main__":
  main()
