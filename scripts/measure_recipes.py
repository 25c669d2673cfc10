"""Runs recipes over seeds (and method on / off) and records their held-out results.

  python scripts/measure_recipes.py --plan=anchor --out=/tmp/recipes [--parallel=8]
  python scripts/measure_recipes.py --plan=anchor,pre_dpo,ppo --out=DIR --print_only

Each job is one `launch/train.py` run (its own process, its own workdir under
--out, log in <workdir>.log); up to --parallel run at once. When they finish,
every `metrics.jsonl` of each workdir (the main stage, and stages kept in
sub-folders: `sft_warmstart/`, `guiding_reference/`) is read, and the first and
last logged value of every `eval/*` metric are recorded. `summary.json` holds
the per-job values and, per group (one arm of a comparison), mean ± std over
its seeds of first, last and last − first; the table is printed.

A rerun with the same --out resumes each workdir (a finished run returns at
once), so an interrupted plan can be completed and re-summarised.

Plans (what is compared, and why it is the setting the method targets):
  quickstart, lora, online_dpo   configs/quickstart.py, configs/grpo_lora_arithmetic.py,
             configs/online_dpo_arithmetic.py, seeds 0-2 (the README's tables; the
             offline RPO row is the `rpo` arm of pre_dpo_rpo).
  ppo        configs/ppo_arithmetic.py, seeds 0-2 (the README's PPO row), and GRPO
             (configs/quickstart.py) from each PPO run's SFT stage; --parallel <= 3.
  anchor     ACNCHOR (rl.anchor) against plain GRPO from a weak SFT start
             (100 SFT steps, so that many groups fail entirely: the groups
             the injection changes), seeds 0-2 per arm.
  pre_dpo    Pre-DPO (a 60-step first round as guiding reference) against the
             recipe's DPO run on configs/dpo_arithmetic.py (loss=dpo), seeds 0-2.
  pre_dpo_rpo  the same with the recipe's default RPO loss (DPO + NLL of the chosen
             answer), whose first round does not degrade the model.
  iterative  configs/iterative_dpo_arithmetic.py, seeds 0-2.
  distill    configs/distill_arithmetic.py: on-policy GKD (128 prompts x 1 sample,
             learning rate 1e-4) against GRPO at the same budget (16 prompts x 8,
             learning rates 3e-5 and 1e-4), seeds 0-2 of the student; one teacher
             (seed 0), trained first in OUT/teacher_run, serves every seed.
"""

import argparse
import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)


def _jobs(config: str, group: str, *flags: str):
  return [(f"{group}_s{s}", group, config, (f"--config.seed={s}", *flags)) for s in SEEDS]


PLANS = {
    # The README's result tables.
    "quickstart": _jobs("configs/quickstart.py", "quickstart"),
    "lora": _jobs("configs/grpo_lora_arithmetic.py", "grpo_lora"),
    "online_dpo": _jobs("configs/online_dpo_arithmetic.py", "online_dpo"),
    # GRPO (the quickstart) from each PPO run's own SFT stage: jobs start in this order,
    # so with --parallel <= 3 each ppo_s<k>/sft_warmstart is finished before it is read.
    "ppo": (_jobs("configs/ppo_arithmetic.py", "ppo")
            + [(f"grpo_same_sft_s{s}", "grpo_same_sft", "configs/quickstart.py",
                (f"--config.seed={s}", f"--config.trainer.init_from=OUT/ppo_s{s}/sft_warmstart"))
               for s in SEEDS]),
    "anchor": (_jobs("configs/quickstart.py:sft_steps=100", "grpo_weak_sft")
               + _jobs("configs/quickstart.py:sft_steps=100", "anchor_weak_sft",
                       "--config.rl.anchor.enabled=True")),
    "pre_dpo": (_jobs("configs/dpo_arithmetic.py:loss=dpo", "dpo")
                + _jobs("configs/dpo_arithmetic.py:loss=dpo", "pre_dpo",
                        "--config.preference.guiding_steps=60")),
    "pre_dpo_rpo": (_jobs("configs/dpo_arithmetic.py:loss=rpo", "rpo")
                    + _jobs("configs/dpo_arithmetic.py:loss=rpo", "pre_rpo",
                            "--config.preference.guiding_steps=60")),
    "iterative": _jobs("configs/iterative_dpo_arithmetic.py", "iterative_dpo"),
    "distill": (_jobs("configs/distill_arithmetic.py:teacher=OUT/teacher_run/teacher", "gkd")
                + _jobs("configs/distill_arithmetic.py:arm=grpo,lr=3e-5", "grpo_lr3e-5")
                + _jobs("configs/distill_arithmetic.py:arm=grpo", "grpo_lr1e-4")),
}
# Run first, one at a time, before a plan's jobs: what they share ("OUT" is --out).
PREPARE = {
    "distill": [("teacher_run", "teacher", "configs/distill_arithmetic.py:steps=1,sft_steps=1",
                 ("--config.seed=0",))],
}


def run_job(out: pathlib.Path, job) -> dict:
  name, _, config, flags = job
  workdir = out / name
  # "OUT/" in a plan's config argument or flags is a path under --out.
  config, *flags = [x.replace("OUT/", f"{out}/") for x in (config, *flags)]
  cmd = [sys.executable, str(ROOT / "launch" / "train.py"), f"--config={ROOT / config}",
         f"--workdir={workdir}", "--config.trainer.progress=False", *flags]
  t0 = time.time()
  with open(f"{workdir}.log", "w") as log:
    rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
  print(f"[{time.strftime('%H:%M:%S')}] {name}: rc={rc} in {time.time() - t0:.0f} s", flush=True)
  # The record names paths relative to the repository and to --out (OUT), not this machine's.
  command = " ".join(cmd[1:]).replace(f"{ROOT}/", "").replace(str(out), "OUT")
  return dict(rc=rc, seconds=time.time() - t0, command=command)


def eval_ends(metrics_path: pathlib.Path) -> dict:
  """{metric: (step, value) of its first and last logged eval} of one metrics.jsonl."""
  first, last = {}, {}
  with open(metrics_path) as f:
    for line in f:
      row = json.loads(line)
      for k, v in row.items():
        if k.startswith("eval/") and isinstance(v, (int, float)):
          first.setdefault(k, (row["step"], v))
          last[k] = (row["step"], v)
  return {k: dict(first_step=first[k][0], first=first[k][1], last_step=last[k][0],
                  last=last[k][1]) for k in first}


def job_results(workdir: pathlib.Path) -> dict:
  """Eval ends of every metrics.jsonl under `workdir`, keyed by its folder ('.' = main)."""
  return {str(p.parent.relative_to(workdir)): eval_ends(p)
          for p in sorted(workdir.rglob("metrics.jsonl"))}


def summarise(jobs, results) -> dict:
  """Per group and stage: mean ± std over seeds of each eval metric's first, last, gain."""
  groups = {}
  for name, group, _, _ in jobs:
    for stage, metrics in results[name]["eval"].items():
      for k, v in metrics.items():
        groups.setdefault(group, {}).setdefault(stage, {}).setdefault(k, []).append(v)
  summary = {}
  for group, stages in groups.items():
    for stage, metrics in stages.items():
      for k, vs in metrics.items():
        first = np.array([v["first"] for v in vs])
        last = np.array([v["last"] for v in vs])
        summary.setdefault(group, {}).setdefault(stage, {})[k] = {
            "seeds": len(vs), "first": [float(first.mean()), float(first.std())],
            "last": [float(last.mean()), float(last.std())],
            "gain": [float((last - first).mean()), float((last - first).std())],
            "per_seed_first": first.tolist(), "per_seed_last": last.tolist()}
  return summary


def table(summary) -> str:
  lines = ["| group | stage | metric | first | last | last − first | seeds |",
           "|---|---|---|---|---|---|---|"]
  for group, stages in summary.items():
    for stage, metrics in stages.items():
      for k, s in sorted(metrics.items()):
        f, l, g = s["first"], s["last"], s["gain"]
        lines.append(f"| {group} | {stage} | {k} | {f[0]:.3f} ± {f[1]:.3f} | "
                     f"{l[0]:.3f} ± {l[1]:.3f} | {g[0]:+.3f} ± {g[1]:.3f} | {s['seeds']} |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--plan", required=True, help=f"comma-separated, of {sorted(PLANS)}")
  p.add_argument("--out", required=True)
  p.add_argument("--parallel", type=int, default=max(1, (os.cpu_count() or 2) // 2))
  p.add_argument("--print_only", action="store_true", help="summarise finished workdirs only")
  args = p.parse_args()
  unknown = [x for x in args.plan.split(",") if x not in PLANS]
  if unknown:
    raise SystemExit(f"--plan: unknown {unknown}; choose from {sorted(PLANS)}")
  jobs = [j for x in args.plan.split(",") for j in PLANS[x]]
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  results = {}
  if not args.print_only:
    for job in [j for x in args.plan.split(",") for j in PREPARE.get(x, [])]:
      if run_job(out, job)["rc"] != 0:
        raise SystemExit(f"{job[0]} failed: see {out / job[0]}.log")
    print(f"{len(jobs)} runs, {args.parallel} at a time, in {out}", flush=True)
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
      for job, res in zip(jobs, pool.map(lambda j: run_job(out, j), jobs), strict=True):
        results[job[0]] = res
  failed = [j[0] for j in jobs if results.get(j[0], {}).get("rc", 0) != 0
            or not (out / j[0]).exists()]
  if failed:
    print(f"failed or missing (their logs: {out}/<name>.log): {failed}", flush=True)
  jobs = [j for j in jobs if j[0] not in failed]
  for name, *_ in jobs:
    results.setdefault(name, {})["eval"] = job_results(out / name)
  summary = summarise(jobs, results)
  with open(out / "summary.json", "w") as f:
    json.dump(dict(jobs=results, failed=failed, summary=summary), f, indent=1, sort_keys=True)
  print(table(summary))
  if failed:
    raise SystemExit(1)


if __name__ == "__main__":
  main()
