"""Measures configs/tool_calculator.py: held-out accuracy with the calculator
before and after multi-turn GRPO, and without the calculator.

  nice -n 10 python scripts/measure_tool_calculator.py --out=/tmp/calc

Runs the recipe's three stages through the trainer (stage=sft, stage=rl,
stage=direct; a rerun resumes finished stages from their checkpoints), then
scores greedy decoding on the test split:

  with tool   two-turn rollouts with the in-graph calculator
              (`multiturn.evaluate`), correct when the final turn is the answer
  no tool     the direct-answer SFT model, one greedy turn

greedy and sampled (T = 1), and prints the results as JSON (also written to
<out>/results.json). `--seed` sets every stage's `config.seed`.

  python scripts/measure_tool_calculator.py --summarise=DIR0,DIR1,DIR2 --out=SUMMARY.json

reads the results.json of finished runs (one per seed) and writes each
evaluation's per-seed values and mean ± std over the seeds.
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import time

import jax
import numpy as np

from jaxrl_llm import config as config_lib
from jaxrl_llm import optim, sharding, trainer
from jaxrl_llm.checkpoint import Checkpointer
from jaxrl_llm.data.builders import load_split
from jaxrl_llm.models import decoder
from jaxrl_llm.rl import multiturn
from jaxrl_llm.tokenizers import load_tokenizer
from jaxrl_llm.train_state import param_shardings

ROOT = pathlib.Path(__file__).resolve().parents[1]


def recipe(arg: str):
  spec = importlib.util.spec_from_file_location("tool_calculator",
                                                ROOT / "configs" / "tool_calculator.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return config_lib.from_configdict(module.get_config(arg))


def restore(workdir: str, model_cfg, mesh, rules):
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          decoder.param_shapes(model_cfg),
                          param_shardings(model_cfg, mesh, rules))
  return Checkpointer(workdir, create=False).restore_params(abstract)


def prompt_batches(examples, tok, P: int, batch: int):
  for start in range(0, len(examples), batch):
    chunk = examples[start:start + batch]
    toks = np.full((len(chunk), P), tok.pad_id, np.int32)
    for i, ex in enumerate(chunk):
      ids = [tok.bos_id] + tok.encode(ex["prompt"])
      toks[i, P - len(ids):] = ids
    yield dict(prompt_tokens=toks, prompt_mask=(np.arange(P)[None] >= P - np.asarray(
        [len(tok.encode(ex["prompt"])) + 1 for ex in chunk])[:, None]).astype(np.int32),
               answer=np.asarray([ex["answer"] for ex in chunk]))


def summarise(dirs: list[str], out: str):
  runs = []
  for d in dirs:
    path = os.path.join(d, "results.json")
    if not os.path.exists(path):
      raise SystemExit(f"--summarise: {path} is missing (run that seed to the end first)")
    with open(path) as f:
      runs.append(json.load(f))
  evals = sorted(k for k, v in runs[0].items() if isinstance(v, dict) and "accuracy" in v)
  summary = {}
  for name in evals:
    summary[name] = {}
    for metric in sorted(runs[0][name]):
      values = np.asarray([r[name][metric] for r in runs], np.float64)
      summary[name][metric] = dict(per_seed=values.tolist(), mean=float(values.mean()),
                                   std=float(values.std()))
  record = dict(seeds=[r["seed"] for r in runs], num_test=[r["num_test"] for r in runs],
                minutes=[r["minutes"] for r in runs], summary=summary, runs=runs)
  with open(out, "w") as f:
    json.dump(record, f, indent=1, sort_keys=True)
  for name in evals:
    acc = summary[name]["accuracy"]
    print(f"{name:32s} accuracy {acc['mean']:.3f} ± {acc['std']:.3f}  per seed "
          + " / ".join(f"{v:.3f}" for v in acc["per_seed"]))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default="/tmp/calc")
  parser.add_argument("--sft_steps", type=int, default=300)
  parser.add_argument("--rl_steps", type=int, default=60)
  parser.add_argument("--seed", type=int, default=0, help="config.seed of every stage")
  parser.add_argument("--stages", default="sft,rl,direct",
                      help="stages to train (a finished stage resumes at once); the others "
                      "are only evaluated where their checkpoint exists")
  parser.add_argument("--summarise", default="",
                      help="comma-separated finished --out folders: write their summary to --out")
  args = parser.parse_args()
  if args.summarise:
    return summarise(args.summarise.split(","), args.out)
  common = f"sft={args.out}/sft,data={args.out}/data,sft_steps={args.sft_steps}," \
           f"rl_steps={args.rl_steps}"
  t0 = time.time()
  cfgs = {s: dataclasses.replace(recipe(f"stage={s},{common}"), seed=args.seed)
          for s in ("sft", "rl", "direct")}
  results = {}
  for stage in [s for s in args.stages.split(",") if s]:
    final = trainer.run(cfgs[stage], os.path.join(args.out, stage))
    results[f"{stage}_final_metrics"] = {k: float(v) for k, v in (final or {}).items()
                                         if np.ndim(v) == 0}
  cfg = cfgs["rl"]
  tok = load_tokenizer(cfg.data.tokenizer)
  model_cfg = trainer.model_config(cfg, tok)
  mesh = sharding.make_mesh(cfg.mesh)
  tx = optim.make_optimizer(cfg.optim)
  step = multiturn.build_step(cfg, model_cfg, tx, None, tok, mesh)
  test = list(load_split(cfg.data, "test", workdir=os.path.join(args.out, "rl")))
  batches = list(prompt_batches(test, tok, cfg.data.max_prompt_len, 250))

  def correct(ro):
    out = []
    for row, answer in zip(range(len(ro["answer"])), ro["answer"], strict=True):
      ids = [int(t) for t, m in zip(ro["final_turn"][row], ro["final_turn_mask"][row],
                                    strict=True) if m > 0]
      ended = bool(ids) and ids[-1] == tok.eos_id
      out.append(ended and tok.decode(ids[:-1]).strip() == str(answer))
    return np.asarray(out)

  # No tool: the direct-answer model, one turn (a tool call would end the trajectory).
  for name, workdir, turns in (("with_tool_before_rl", "sft", None),
                               ("with_tool_after_rl", "rl", None),
                               ("no_tool_direct_sft", "direct", 1)):
    try:
      params = restore(os.path.join(args.out, workdir), model_cfg, mesh, cfg.mesh.rules)
    except FileNotFoundError as e:
      results[name] = f"not measured: {e}"
      continue
    results[name] = multiturn.evaluate(step, params, batches, correct, max_turns=turns)
    results[name + "_sampled"] = multiturn.evaluate(step, params, batches, correct,
                                                    max_turns=turns, greedy=False)
  results["num_test"] = len(test)
  results["seed"] = args.seed
  results["minutes"] = (time.time() - t0) / 60
  text = json.dumps(results, indent=1, sort_keys=True)
  print(text)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    f.write(text + "\n")


if __name__ == "__main__":
  main()
