"""Writes the tutorial notebooks in `notebooks/` from the cell sources in this file.

This file is the source of the notebooks: edit a cell here, then run

  python scripts/make_notebooks.py           # rewrite every notebook
  python scripts/make_notebooks.py --check   # exit 1 if a notebook is out of date

The notebooks are written without outputs (execution_count null), ready for
Colab; `tests/notebooks_test.py` executes them on CPU with tiny settings and
checks that they match this file.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import nbformat

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
REPO = "jaxrl-llm/jaxrl_llm"
COLAB = f"https://colab.research.google.com/github/{REPO}/blob/main/notebooks"
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"


def md(text: str) -> nbformat.NotebookNode:
  return nbformat.v4.new_markdown_cell(text.strip("\n"))


def code(text: str) -> nbformat.NotebookNode:
  return nbformat.v4.new_code_cell(text.strip("\n"))


def header(name: str, title: str, intro: str, runtime: str) -> list[nbformat.NotebookNode]:
  """Title + Colab badge, the guarded install cell and the hardware note."""
  return [
      md(f"""
# {title}

[![Open In Colab]({BADGE})]({COLAB}/{name}.ipynb)

{intro.strip()}
"""),
      code("""
# Install jaxrl_llm when it is not importable yet (Colab); skipped in a clone
# where `pip install -e .` already made it importable.
try:
  import jaxrl_llm  # noqa: F401
except ImportError:
  %pip install -q "jaxrl_llm @ git+https://github.com/jaxrl-llm/jaxrl_llm"
"""),
      md(f"""
**Hardware.** {runtime.strip()}

JAX uses whatever backend it finds: on Colab, *Runtime → Change runtime type*
picks a CPU, GPU or TPU runtime and the code does not change (a multi-device
runtime shards the batch over all its devices). The test suite runs this
notebook on CPU with `JAXRL_NOTEBOOK_TEST=1`, which shrinks it further.
"""),
  ]


# ---------------------------------------------------------------------------
# 01: the model and the sampler.
# ---------------------------------------------------------------------------
NB01 = header("01_model_and_sampling", "01 · The model and the sampler", """
A tour of the two pieces every other notebook builds on:

* **the model**: a pure function `forward(cfg, params, tokens) -> logits`, with
  parameters in a plain dict and one table that gives every parameter its shape
  and *logical axes* (what sharding reads);
* **checkpoints**: `save_hf` / `load_hf` write and read Hugging Face
  safetensors directories (the same files `transformers` loads);
* **the sampler**: `sample(...)`, one prefill plus a `lax.while_loop` decode over
  a preallocated KV cache, jitted once with its options bound; greedy,
  temperature, top-k and top-p;
* **per-token log-probs**: what the sampler reports, and how to recompute them
  with a plain forward pass (what RL training does).

The model here is untrained (random weights), so its text is gibberish: the
point is the mechanics. Notebook 02 trains one.
""", "A CPU runtime is enough: everything here takes well under a minute.") + [
    code("""
import functools
import json
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from jaxrl_llm import testing, tokenizers
from jaxrl_llm.models import (forward, hidden_states, init_params, load_hf, param_table,
                              save_hf, token_logprobs)
from jaxrl_llm.sampling import process_logits, sample

print("jax", jax.__version__, "on", jax.devices())
"""),
    md("""
## 1. A tokenizer and a model config

`load_tokenizer("builtin")` is the small character-level SentencePiece model that
ships with the package (digits, operators, letters; `pad=0`, `bos=1`, `eos=2`).
`testing.tiny_config` gives a 2-layer decoder of the Qwen3 family (grouped-query
attention with 4 query heads sharing 2 key/value heads, RMSNorm on q and k) small
enough for a laptop. A real checkpoint's config comes from `load_hf` instead.
"""),
    code("""
tok = tokenizers.load_tokenizer("builtin")
ids = tok.encode("12+34=", add_bos=True)
print("vocab", tok.vocab_size, "| '12+34=' ->", ids, "->", repr(tok.decode(ids)))

cfg = testing.tiny_config("qwen3", vocab_size=tok.vocab_size)
print(cfg)
print(f"{cfg.num_params():,} parameters")
"""),
    md("""
Every parameter has one row in `param_table(cfg)`: its shape and its **logical
axes**. Layers are stacked on a leading `layers` axis (the forward pass runs
them with `lax.scan`, so compile time does not grow with depth). Sharding maps
logical names to mesh axes (`("data", "fsdp", "tensor")`) through rules in the
config, so the model code never names a device axis.

Shape letters used in names throughout the library: B batch, T time, D model
dim, N query heads, K kv heads, H head dim, F MLP dim, V vocab, L layers.
"""),
    code("""
for name, (shape, axes) in param_table(cfg).items():
  print(f"{name:18s} {str(shape):18s} {axes}")
"""),
    md("""
## 2. Parameters and a forward pass

`init_params(cfg, rng)` returns a nested dict of arrays. Library helpers are
not jitted; you jit at the call site (here the initialiser, so it runs as one
compiled program instead of one dispatch per op). `forward` returns logits
`[B, T, V]`: position `t` holds the distribution of token `t + 1`.
"""),
    code("""
params = jax.jit(functools.partial(init_params, cfg))(jax.random.key(0))
print(jax.tree.map(lambda x: x.shape, params))

tokens_BT = jnp.asarray([tok.encode("12+34=", add_bos=True)])
logits_BTV = jax.jit(functools.partial(forward, cfg))(params, tokens_BT)
probs = jax.nn.softmax(logits_BTV[0, -1].astype(jnp.float32))
print("logits", logits_BTV.shape, "| next-token probabilities sum to", float(probs.sum()))
"""),
    md("""
## 3. Save and load a Hugging Face checkpoint

`save_hf(cfg, params, path)` writes `config.json`, `generation_config.json` and
`model.safetensors` (sharded files plus an index for big models), into a
temporary directory renamed at the end, so an interrupted save never looks
complete. `load_hf(path)` reads the config and the weights back (and reads
checkpoints of Llama, Qwen2 and Qwen3 models from the Hub the same way).
"""),
    code("""
ckpt_dir = pathlib.Path(tempfile.mkdtemp()) / "tiny-qwen3"
save_hf(cfg, params, ckpt_dir, extra_config={"bos_token_id": tok.bos_id,
                                             "eos_token_id": tok.eos_id,
                                             "pad_token_id": tok.pad_id})
for f in sorted(ckpt_dir.iterdir()):
  print(f"{f.name:24s} {f.stat().st_size:>9,} bytes")
hf_config = json.loads((ckpt_dir / "config.json").read_text())
print({k: hf_config[k] for k in ("architectures", "hidden_size", "num_hidden_layers",
                                 "num_attention_heads", "num_key_value_heads")})

cfg2, params2 = load_hf(ckpt_dir)
same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, params2)
print("config round-trips:", cfg2.family == cfg.family and cfg2.num_params() == cfg.num_params(),
      "| weights identical:", all(jax.tree.leaves(same)))
"""),
    md("""
## 4. Sampling

Prompts are **left-padded** so that every row's last prompt token sits in the
same column and generation starts at column `P` for all rows; `prompt_mask`
marks the real tokens. (The data pipeline does this for you: `make_batch`,
`DataIterator`.)

`sample` is a pure function. Bind its options with `functools.partial` and jit it
once: `max_new_tokens`, `greedy`, `temperature`, `top_k`, `top_p`, the stop tokens.
It returns a `SampleOutput` with `tokens_BL`, `mask_BL` (1 on completion tokens,
the stop token included), `lengths_B`, `logprobs_BL` and `finished_B` (False when
the row hit `max_new_tokens` without a stop token).
"""),
    code("""
def left_pad(texts):
  rows = [tok.encode(t, add_bos=True) for t in texts]
  P = max(map(len, rows))
  tokens = np.full((len(rows), P), tok.pad_id, np.int32)
  mask = np.zeros((len(rows), P), np.int32)
  for i, r in enumerate(rows):
    tokens[i, P - len(r):], mask[i, P - len(r):] = r, 1
  return tokens, mask

prompts = ["3+4=", "12+7=", "45-23=", "8*9="]
prompt_tokens, prompt_mask = left_pad(prompts)
print(prompt_tokens)

MAX_NEW = 8
common = dict(max_new_tokens=MAX_NEW, stop_tokens=(tok.eos_id,), pad_id=tok.pad_id)
greedy = jax.jit(functools.partial(sample, cfg, greedy=True, **common))
nucleus = jax.jit(functools.partial(sample, cfg, temperature=1.0, top_p=0.9, **common))

def show(out):
  for p, row, n, fin in zip(prompts, out.tokens_BL, out.lengths_B, out.finished_B):
    print(f"{p:8s} -> {tok.decode(row[:int(n)])!r:12s} length {int(n)}, finished {bool(fin)}")

out_greedy = greedy(params, prompt_tokens, prompt_mask, jax.random.key(0))
print("greedy:"); show(out_greedy)
out_p = nucleus(params, prompt_tokens, prompt_mask, jax.random.key(1))
print("top-p 0.9:"); show(out_p)
"""),
    md("""
Two properties worth checking, because RL depends on them:

* **padding does not change the result**: a prompt decoded alone gives the same
  greedy tokens as in the padded batch (padding is masked out of attention and
  rotary positions start at the first real token);
* **a key fixes the sample**: the same PRNG key reproduces the same completions,
  another key gives others.
"""),
    code("""
n = len(tok.encode(prompts[1], add_bos=True))  # row 1 without its left padding
alone = greedy(params, prompt_tokens[1:2, -n:], prompt_mask[1:2, -n:], jax.random.key(0))
print("padded row == alone:", bool(jnp.array_equal(alone.tokens_BL[0], out_greedy.tokens_BL[1])))
again = nucleus(params, prompt_tokens, prompt_mask, jax.random.key(1))
other = nucleus(params, prompt_tokens, prompt_mask, jax.random.key(2))
print("same key, same samples:", bool(jnp.array_equal(again.tokens_BL, out_p.tokens_BL)),
      "| another key differs:", not bool(jnp.array_equal(other.tokens_BL, out_p.tokens_BL)))
"""),
    md("""
### What temperature, top-k and top-p do

`process_logits` is the function the sampler applies before drawing a token:
logits are divided by the temperature τ, then top-k keeps the k largest and
top-p (nucleus) keeps the smallest set of most likely tokens whose probability
reaches p. Excluded tokens get logit −1e30 (probability 0) and the rest is
renormalised:

$$\\pi_{\\text{sample}}(y) = \\frac{\\exp(z_y/\\tau)\\,[y \\in \\mathcal{K}]}
{\\sum_{y' \\in \\mathcal{K}} \\exp(z_{y'}/\\tau)}.$$
"""),
    code("""
z = logits_BTV[0, -1]
order = jnp.argsort(-z)[:20]
fig, ax = plt.subplots(figsize=(9, 3))
width = 0.25
for i, (label, kw) in enumerate([("τ=1", {}), ("τ=1, top-p 0.5", dict(top_p=0.5)),
                                 ("τ=0.5", dict(temperature=0.5))]):
  p = jax.nn.softmax(process_logits(z[None], **kw)[0])[order]
  ax.bar(np.arange(20) + (i - 1) * width, p, width, label=label)
ax.set_xticks(np.arange(20), [repr(tok.decode([int(t)])) if tok.decode([int(t)]) else f"<{int(t)}>"
                              for t in order], rotation=60)
ax.set_ylabel("probability"); ax.set_title("next token after '12+34=' (20 most likely)")
ax.legend(); plt.tight_layout(); plt.show()
"""),
    md("""
## 5. Per-token log-probs

RL losses need $\\log \\pi(y_t \\mid x, y_{<t})$ for every sampled token. The
sampler records them as it goes (`logprobs_BL`, under the distribution it
actually sampled from). Training recomputes them with one forward pass over
prompt + completion: `hidden_states` then `token_logprobs`, which forms the
logits chunk by chunk and takes the log-softmax in float32 (bf16 log-probs lose
the small differences that importance ratios depend on).

Position `P − 1 + t` of the concatenated row predicts completion token `t`.
Segment ids (0 on padding) keep padding out of attention.
"""),
    code("""
@jax.jit
def completion_logprobs(params, prompt_tokens, prompt_mask, completion, completion_mask):
  P, L = prompt_tokens.shape[1], completion.shape[1]
  tokens = jnp.concatenate([prompt_tokens, completion], axis=1)
  segments = jnp.concatenate([prompt_mask, completion_mask > 0], axis=1).astype(jnp.int32)
  h_BTD = hidden_states(cfg, params, tokens, segment_ids_BT=segments)
  return token_logprobs(cfg, params, h_BTD[:, P - 1:P + L - 1], completion)

for name, out in [("greedy", out_greedy), ("top-p 0.9", out_p)]:
  recomputed = completion_logprobs(params, prompt_tokens, prompt_mask, out.tokens_BL, out.mask_BL)
  gap = jnp.abs(recomputed - out.logprobs_BL) * out.mask_BL
  print(f"{name:10s} max |sampler − recomputed| = {float(gap.max()):.2e}")
"""),
    md("""
For greedy decoding the sampler reports the plain log-softmax, so the two agree
to float precision. With top-p they differ: the sampler's log-probs are under
the *truncated, renormalised* distribution, so
$\\log \\pi_{\\text{sample}}(y_t) = \\log \\pi(y_t) - \\log \\sum_{y \\in \\mathcal{K}} \\pi(y)
\\ge \\log \\pi(y_t)$. An RL step computes its importance ratio from the
recomputed log-probs, so a truncated sampler is slightly off-policy. That is why
`RLConfig` samples with `top_p=1.0` by default, and why truncated importance
sampling (`RLConfig.tis_cap`) exists for samplers that differ from the trainer.
"""),
    code("""
recomputed = completion_logprobs(params, prompt_tokens, prompt_mask, out_p.tokens_BL, out_p.mask_BL)
fig, axes = plt.subplots(1, len(prompts), figsize=(12, 2.8), sharey=True)
for i, ax in enumerate(axes):
  n = int(out_p.lengths_B[i])
  t = np.arange(n)
  ax.plot(t, out_p.logprobs_BL[i, :n], "o-", label="sampler (top-p)")
  ax.plot(t, recomputed[i, :n], "x--", label="forward pass")
  ax.set_title(f"{prompts[i]} → {tok.decode(out_p.tokens_BL[i, :n])!r}", fontsize=9)
  ax.set_xlabel("completion token")
axes[0].set_ylabel("log-prob"); axes[0].legend(fontsize=8); plt.tight_layout(); plt.show()
"""),
    md("""
## Next

* **02** trains this kind of model on arithmetic: SFT, then GRPO with the one-jit
  RL step.
* The sampler runs *inside* that step (`RLStep.rollout`), so the same jitted
  program samples, scores, and updates.
"""),
]

# ---------------------------------------------------------------------------
# 02: GRPO quickstart.
# ---------------------------------------------------------------------------
NB02 = header("02_grpo_quickstart", "02 · GRPO quickstart: arithmetic from scratch", """
The quickstart of the README, in a notebook: a small decoder learns 1-2 digit
addition and subtraction in two stages,

1. **SFT warm-start**: supervised fine-tuning on problems and their answers, so
   that the policy emits answers at all (RL needs some successes to learn from);
2. **GRPO**: the policy samples G answers per problem, an exact-match verifier
   scores them, and the policy gradient pushes up the answers that beat their
   group's average. Rollout, reward, advantages and the update are **one jitted
   step** (`jaxrl_llm.rl.rl_step.RLStep`).

`trainer.run(config, workdir)` is the same function `launch/train.py` calls; it
writes metrics (`metrics.jsonl`, TensorBoard) and checkpoints to the workdir,
evaluates on held-out problems and prints a before/after table. We then plot the
metrics and look at what the model answers.
""", """
With `TINY = True` (the default) the run is shrunk to a 0.02M-parameter model on
1-digit problems and takes about a minute on a 2-core CPU. With `TINY = False`
it is the real quickstart, `configs/quickstart.py` (0.8M parameters, 400 SFT +
150 GRPO steps): about 8-10 minutes on 2 CPU cores.
""") + [
    code("""
TINY = True  # False: the full quickstart config (configs/quickstart.py)
"""),
    code("""
import json
import os
import tempfile

import jax
import matplotlib.pyplot as plt
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from jaxrl_llm import config as config_lib
from jaxrl_llm import sharding, tokenizers, trainer
from jaxrl_llm.checkpoint import Checkpointer
from jaxrl_llm.data import load_split, make_batch, tasks
from jaxrl_llm.models import decoder
from jaxrl_llm.sampling import sample
from jaxrl_llm.train_state import param_shardings

logging.set_verbosity(logging.ERROR)  # keep the notebook output to the training log
tfds.disable_progress_bar()  # the synthetic datasets are built on first use
FAST = os.environ.get("JAXRL_NOTEBOOK_TEST") == "1"  # set by the test suite
print("jax", jax.__version__, "on", jax.devices())
"""),
    md("""
## 1. The config

Configs are `ml_collections.ConfigDict`s with one section per concern (model,
data, rl, optim, eval, checkpoint, trainer), converted once into frozen,
validated dataclasses by `config.from_configdict`; a typo in a field name or an
unknown algorithm name fails there, naming the field and the valid choices.
`default_configdict(rl_preset="grpo")` starts from every default, with the GRPO
preset in the `rl` section:

* `rl.advantage = "grpo"`: for the G answers $y_1..y_G$ to one prompt with
  rewards $r_i$, $A_i = (r_i - \\mathrm{mean}(r)) / (\\mathrm{std}(r) + \\varepsilon)$;
* `rl.policy_loss = "ppo_clip"`: per token,
  $-\\min(\\rho_t A_i,\\ \\mathrm{clip}(\\rho_t, 1-\\epsilon, 1+\\epsilon) A_i)$ with
  $\\rho_t = \\pi_\\theta(y_t) / \\pi_{\\text{old}}(y_t)$;
* `rl.aggregation = "seq_mean_token_mean"`: mean over each answer's tokens,
  then over answers;
* `rl.kl_coef = 0.04`: β of the k3 KL to the reference policy (the quickstart
  sets 0, which skips the reference forward pass).

`config_lib.arithmetic_rl_recipe` builds the recipe of `configs/quickstart.py`
(that file lives in the repository, not in the installed package); the `TINY`
block shrinks it.
"""),
    code("""
# configs/quickstart.py's recipe: 400 SFT warm-start steps, then 150 GRPO steps of
# 32 prompts x 8 completions, lr 3e-5, kl_coef 0 (no reference forward).
c = config_lib.arithmetic_rl_recipe(rl_preset="grpo", sft_steps=400, rl_steps=150)
print({"rl": {k: c.rl[k] for k in ("advantage", "policy_loss", "group_size", "kl_coef")},
       "optim.learning_rate": c.optim.learning_rate})
if TINY:
  c.model.builtin = "nano"          # 2 layers, d=32: 0.02M parameters
  # 1-digit problems, 30% of them held out (a 10% test split would hold ~15).
  c.data.task_options = (("max_digits", 1), ("test_fraction", 0.3))
  c.data.num_train, c.data.num_test = 20000, 500
  c.data.batch_size = 16
  c.trainer.sft_warmstart.num_steps = 200  # a weak start leaves room for RL
  c.trainer.sft_warmstart.batch_size = 32
  c.trainer.num_steps = 200
  c.trainer.log_every = 1
  c.optim.learning_rate = 5e-4      # a barely warmed-up policy can move faster
  c.eval.num_examples = c.eval.batch_size = 128
  c.checkpoint.save_interval_steps = 100
if FAST:
  c.trainer.sft_warmstart.num_steps = 60
  c.trainer.num_steps = 30
  c.eval.num_examples = c.eval.batch_size = 32
  c.eval.every_steps = 0
cfg = config_lib.from_configdict(c)
print(cfg.rl)
"""),
    md("""
## 2. Train

The log shows the memory plan of each stage, the held-out evaluation before
and after it (`eval/accuracy`: greedy; `eval/sample_accuracy`: one sample at the
RL temperature, the quantity GRPO optimises) and a progress line. Calling
`trainer.run` again with the same workdir resumes from its last checkpoint
instead of starting over (this cell makes a fresh workdir each time).
"""),
    code("""
workdir = tempfile.mkdtemp(prefix="quickstart-")
final = trainer.run(cfg, workdir)
"""),
    md("""
## 3. What happened

Every step appends one JSON line to `<workdir>/metrics.jsonl` (the SFT stage
to `<workdir>/sft_warmstart/metrics.jsonl`). The ones to watch in an RL run:

* `reward/mean` and `rl/accuracy`: the training reward and the fraction of
  sampled answers that are correct (equal here: the reward is exact match);
* `rl/zero_adv_group_frac`: groups whose G answers all scored the same; their
  advantages are 0, so they teach nothing (DAPO's dynamic sampling drops them);
* `rl/response_length` (and `_correct` / `_incorrect`): the answer length in
  tokens, EOS included (notebook 05 is about how it drifts);
* `rl/entropy`, `grad/global_norm`, `rl/clip_frac_*`: health of the update.
"""),
    code("""
def read_metrics(run_dir):
  \"\"\"{metric: (steps, values)} from a run's metrics.jsonl (lines of one step merged).\"\"\"
  by_step = {}
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      by_step.setdefault(row.pop("step"), {}).update(row)
  out = {}
  for step in sorted(by_step):
    for k, v in by_step[step].items():
      out.setdefault(k, ([], []))
      out[k][0].append(step)
      out[k][1].append(v)
  return {k: (np.array(s), np.array(v)) for k, (s, v) in out.items()}


def smooth(x, n=10):
  n = max(1, min(n, len(x)))
  return np.convolve(x, np.ones(n) / n, mode="valid")


sft_m = read_metrics(os.path.join(workdir, "sft_warmstart"))
rl_m = read_metrics(workdir)
fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
axes[0].plot(*sft_m["loss/nll"]); axes[0].set_title("stage 1: SFT loss (NLL per token)")
s, r = rl_m["reward/mean"]
axes[1].plot(s, r, alpha=0.3, label="per step")
axes[1].plot(s[len(s) - len(smooth(r)):], smooth(r), label="moving average")
axes[1].set_title("stage 2: GRPO training reward"); axes[1].legend()
for key, label in [("eval/accuracy", "greedy"), ("eval/sample_accuracy", "sampled (T=1)")]:
  axes[2].plot(*rl_m[key], "o-", label=label)
axes[2].set_title("held-out accuracy during GRPO"); axes[2].legend()
for key in ("rl/response_length", "rl/response_length_correct", "rl/response_length_incorrect"):
  s, v = rl_m[key]
  axes[3].plot(s[len(s) - len(smooth(v)):], smooth(v), label=key.split("/")[1])
axes[3].set_title("response length (tokens, smoothed)"); axes[3].legend(fontsize=8)
for ax in axes:
  ax.set_xlabel("step")
plt.tight_layout(); plt.show()
"""),
    md("""
## 4. Look at the answers

The trainer checkpoints with Orbax. `Checkpointer.restore_params` reads just the
weights (onto a mesh of our choosing), here those of both stages, and the jitted
sampler answers held-out problems greedily.
"""),
    code("""
tok = tokenizers.load_tokenizer(cfg.data.tokenizer)
model_cfg = trainer.model_config(cfg, tok)
mesh = sharding.make_mesh(cfg.mesh)
abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        decoder.param_shapes(model_cfg),
                        param_shardings(model_cfg, mesh, cfg.mesh.rules))
sft_params = Checkpointer(os.path.join(workdir, "sft_warmstart"), create=False).restore_params(
    abstract)
rl_params = Checkpointer(workdir, create=False).restore_params(abstract)

test = list({ex["prompt"]: ex for ex in load_split(cfg.data, "test", workdir=workdir)}.values())
test = test[:16]  # distinct held-out problems
batch = make_batch(test, cfg.data, "rl", tokenizer=tok)
greedy = jax.jit(lambda p, t, m: sample(model_cfg, p, t, m, jax.random.key(0), greedy=True,
                                        max_new_tokens=cfg.rl.max_new_tokens,
                                        stop_tokens=(tok.eos_id,), pad_id=tok.pad_id))
answers, correct = {}, {}
for name, p in [("SFT", sft_params), ("GRPO", rl_params)]:
  out = jax.device_get(greedy(p, batch["prompt_tokens"], batch["prompt_mask"]))
  answers[name] = [tok.decode(row[:n]) for row, n in zip(out.tokens_BL, out.lengths_B)]
  # Correct = exact match, and the answer ended with EOS (not cut off).
  correct[name] = [bool(fin) and tasks.arithmetic_correct(ex["answer"], text)
                   for ex, text, fin in zip(test, answers[name], out.finished_B)]
print(f"{'problem':10s} {'answer':>7s} {'SFT':>8s} {'GRPO':>8s}")
for i, ex in enumerate(test):
  marks = ["✓" if correct[k][i] else "✗" for k in ("SFT", "GRPO")]
  print(f"{ex['prompt']:10s} {ex['answer']:>7s} {answers['SFT'][i]:>6s} {marks[0]} "
        f"{answers['GRPO'][i]:>6s} {marks[1]}")
"""),
    md("""
## 5. The GRPO stage again, training LoRA adapters only

`model.lora` freezes every weight and trains low-rank adapters instead: on each
chosen projection $W$ the model computes $xW + s\\,(xA)B$ with $A$ of shape
(in, r), $B$ of shape (r, out), $s = \\alpha / r$, and $B = 0$ at the start, so
training starts from the base model. The optimizer holds state for the adapters
alone, the KL reference is the frozen base with the adapters switched off (no
second copy of the weights), and `model.lora.adapter_only_checkpoints = True`
makes checkpoints hold only the adapters (off here: the whole state is saved).
The memory plan printed by the run shows the split. The run below starts from
the same SFT checkpoint as the run above (`trainer.init_from`), with rank-8
adapters on all seven projections (q, k, v, o, gate, up, down). Adapters take a
larger learning rate than full fine-tuning, because their update to $W$ is the
product of two small matrices. [docs/lora.md](../docs/lora.md) covers PiSSA
initialisation, a quantized base and PEFT import and export.
"""),
    code("""
lora_c = c.copy_and_resolve_references()
lora_c.model.lora.rank = 8
lora_c.model.lora.alpha = 16.0       # s = alpha / rank = 2
lora_c.rl.kl_coef = 0.01             # KL to the frozen base with adapters off
lora_c.optim.learning_rate = 3 * c.optim.learning_rate
lora_c.trainer.init_from = os.path.join(workdir, "sft_warmstart")  # the same SFT start
lora_cfg = config_lib.from_configdict(lora_c)
lora_workdir = tempfile.mkdtemp(prefix="quickstart-lora-")
lora_final = trainer.run(lora_cfg, lora_workdir)
print(f"{'held-out metric':22s} {'full-parameter GRPO':>20s} {'LoRA GRPO':>10s}")
for k in ("eval/accuracy", "eval/sample_accuracy"):
  print(f"{k:22s} {final[k]:20.3f} {lora_final[k]:10.3f}")
"""),
    md("""
## What to expect

* **TINY** (a 0.02M-parameter model, a short warm-start, a large RL learning
  rate): on a 2-core CPU this notebook's training reward rose from about 0.22
  to 0.29 (moving average) over the 200 GRPO steps, held-out greedy accuracy
  from 0.30 to 0.38 and sampled accuracy from 0.23 to 0.25. With 128 held-out
  problems and a model this small, these move by several points from one
  machine or seed to another: the run shows the pipeline working end to end
  more than it measures anything.
* **`TINY = False`** (the quickstart): after SFT, held-out greedy accuracy
  0.89 ± 0.09 and sampled accuracy 0.82 ± 0.13 over seeds 0-2 (seed 0: 0.77
  and 0.67); GRPO's 150 steps then change them by −0.02 ± 0.005 and
  +0.01 ± 0.02 (the README's table): no gain at this size and budget.

Next: **03** trains with preferences instead of a verifier (DPO, online DPO, a
reward model); **04** plugs a new advantage estimator and policy loss into the
same step; **05** compares GRPO with Dr. GRPO on response length.
"""),
]

# ---------------------------------------------------------------------------
# 03: offline DPO, a Bradley-Terry reward model, online DPO.
# ---------------------------------------------------------------------------
NB03 = header("03_dpo_and_reward_models", "03 · Preferences: DPO, reward models, online DPO", """
Learning from *which of two answers is better* instead of from a verifier:

1. **offline DPO** on a fixed set of preference pairs (`PreferenceStep`): the
   policy is its own reward model, no sampling during training;
2. **a reward model** trained with the Bradley–Terry loss on the same pairs
   (`RewardModelStep`): a scalar head on the decoder that scores any answer;
3. **online DPO** (`OnlineDPOStep`): the policy samples several answers per
   prompt, the reward model scores them, the best and the worst become a
   preference pair, and a DPO update follows, all in one jitted step.

The data is the synthetic task `preference_arithmetic`: for an arithmetic
prompt, the *chosen* answer is the exact result and the *rejected* one a
plausible wrong result (off by 1-3 or with its digits shuffled). Since the rule
is known, we can check what each method really learned.
""", """
A CPU runtime is enough: a 0.08M-parameter model, a short SFT warm-start and
four short training runs, about a minute on 2 CPU cores.
""") + [
    code("""
import dataclasses
import functools
import os
import tempfile

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from jaxrl_llm import optim, sharding, testing, tokenizers
from jaxrl_llm.data import DataConfig, DataIterator, load_split, make_batch, tasks
from jaxrl_llm.preference import reward_model as rm_lib
from jaxrl_llm.preference.online import OnlineDPOConfig, OnlineDPOStep, jit_online_dpo_step
from jaxrl_llm.preference.step import PreferenceConfig, PreferenceStep, jit_preference_step
from jaxrl_llm.preference.step import pair_logprobs
from jaxrl_llm.rewards import registry
from jaxrl_llm.sft import sft_step
from jaxrl_llm.train_state import create_train_state

logging.set_verbosity(logging.ERROR)
tfds.disable_progress_bar()  # the synthetic datasets are built on first use
FAST = os.environ.get("JAXRL_NOTEBOOK_TEST") == "1"  # set by the test suite
SFT_STEPS, DPO_STEPS, RM_STEPS, ONLINE_STEPS = (30, 10, 10, 5) if FAST else (150, 50, 120, 50)
print("jax", jax.__version__, "on", jax.devices())
"""),
    md("""
## 1. Preference data

`DataConfig(source="preference_arithmetic")` builds the dataset on first use (a
TFDS builder, read without TensorFlow). `DataIterator` yields batches of
left-padded prompts and right-padded `chosen` / `rejected` completions (EOS
included), with masks.
"""),
    code("""
workdir = tempfile.mkdtemp(prefix="preferences-")  # the built datasets go here
# 1-digit problems; 30% of them are held out (the test split), never trained on.
OPTIONS = dict(max_digits=1, test_fraction=0.3)
pref_data = DataConfig(source="preference_arithmetic", num_train=5000, num_test=500,
                       task_options=tuple(OPTIONS.items()), max_prompt_len=8,
                       max_completion_len=4, batch_size=32)
train_pairs = load_split(pref_data, "train", workdir=workdir)
for ex in list(train_pairs)[:4]:
  print(f"{ex['prompt']:6s} chosen {ex['chosen']!r:5s} rejected {ex['rejected']!r}")

tok = tokenizers.load_tokenizer("builtin")
pref_batches = DataIterator(pref_data, "train", tokenizer=tok, workdir=workdir)
print({k: v.shape for k, v in next(pref_batches).items()})
test_pairs = make_batch(list(load_split(pref_data, "test", workdir=workdir))[:256], pref_data,
                        tokenizer=tok)
print(len({int(t) for t in test_pairs["prompt_id"]}), "held-out pairs over",
      len({tuple(row) for row in test_pairs["prompt_tokens"]}), "distinct held-out prompts")
"""),
    md("""
## 2. A policy to start from

Preference methods start from a supervised (SFT) model: DPO's implicit reward
is measured *relative to* that reference, and online DPO needs a policy whose
samples are sometimes right. A short SFT of a 2-layer Llama-style model
(d = 64, 0.08M parameters) on 1-digit problems gives one that is right about
half of the time.
"""),
    code("""
model_cfg = testing.tiny_config("llama", vocab_size=tok.vocab_size, hidden_size=64,
                               intermediate_size=128)
mesh = sharding.make_mesh(sharding.MeshConfig())
sft_data = DataConfig(source="arithmetic", max_prompt_len=8, max_answer_len=4, seq_len=64,
                      batch_size=16)
problems = tasks.generate("arithmetic", "train", 20000, seed=0, **OPTIONS)  # train split only

tx = optim.make_optimizer(optim.OptimConfig(learning_rate=3e-3, grad_clip_norm=1.0))
state, shardings = create_train_state(model_cfg, tx, jax.random.key(0), mesh)
step = jax.jit(functools.partial(sft_step, cfg=model_cfg, tx=tx, mesh=mesh),
               in_shardings=(shardings, None, None), out_shardings=(shardings, None),
               donate_argnums=(0,))
batches = DataIterator(sft_data, "train", mode="sft", tokenizer=tok, examples=problems)
for _ in range(SFT_STEPS):
  state, m = step(state, sharding.shard_batch(next(batches), mesh), jax.random.key(0))
sft_params = jax.device_get(state.params)
print(f"SFT NLL after {SFT_STEPS} steps: {float(m['loss/nll']):.3f}")


def run_steps(step_fn, state, batches, n, *args):
  \"\"\"n jitted steps; metrics fetched once at the end (the host never blocks the loop).\"\"\"
  history = []
  for i in range(n):
    state, metrics = step_fn(state, sharding.shard_batch(next(batches), mesh),
                             jax.random.key(i), *args)
    history.append(metrics)
  history = jax.device_get(history)
  return state, {k: np.array([h[k] for h in history]) for k in history[0]}
"""),
    md("""
## 3. Offline DPO

With $c = \\log\\frac{\\pi_\\theta(y_w|x)}{\\pi_{\\text{ref}}(y_w|x)}$ and
$r = \\log\\frac{\\pi_\\theta(y_l|x)}{\\pi_{\\text{ref}}(y_l|x)}$ (sums over the
completion tokens), DPO (Rafailov et al. 2023) minimises

$$\\ell = -\\log\\sigma\\big(\\beta\\,(c - r)\\big).$$

$\\beta c$ and $\\beta r$ are the *implicit rewards* of the two answers:
`pref/accuracy` is the fraction of pairs where the chosen one is ahead,
`pref/margin` = β(c − r). The reference is the SFT model, passed to the step
as an argument (`reference="on_the_fly"`; it can also be precomputed once and
stored with the data). `PreferenceConfig.losses` takes any weighted mix of the
pairwise losses of `preference.losses` (ipo, simpo, rpo, ...).
"""),
    code("""
pref_cfg = PreferenceConfig(losses=(("dpo", 1.0),), beta=0.1)
tx = optim.make_optimizer(optim.OptimConfig(learning_rate=3e-4, grad_clip_norm=1.0))
state, shardings = create_train_state(model_cfg, tx, jax.random.key(0), mesh, params=sft_params)
ref_params = jax.device_put(sft_params, shardings.params)
dpo_step = jit_preference_step(PreferenceStep(model_cfg, pref_cfg, tx, mesh), shardings,
                               shardings.params)
state, dpo_m = run_steps(dpo_step, state, pref_batches, DPO_STEPS, ref_params)
dpo_params = state.params


@jax.jit
def heldout_pairs(params, ref):
  \"\"\"Implicit-reward accuracy and mean log π(chosen), log π(rejected) on held-out pairs.\"\"\"
  (c, r), (rc, rr) = pair_logprobs(model_cfg, params, test_pairs), pair_logprobs(
      model_cfg, ref, test_pairs)
  cm, rm = test_pairs["chosen_mask"], test_pairs["rejected_mask"]
  chosen, rejected = jnp.sum(c * cm, 1), jnp.sum(r * rm, 1)
  h = (chosen - jnp.sum(rc * cm, 1)) - (rejected - jnp.sum(rr * rm, 1))
  return jnp.mean(h > 0), jnp.mean(chosen), jnp.mean(rejected)


_, lc0, lr0 = heldout_pairs(ref_params, ref_params)
acc, lc, lr = heldout_pairs(dpo_params, ref_params)
print(f"held-out pairs: implicit-reward accuracy {float(acc):.2f} (0.5 = chance)")
print(f"  log π(chosen)   {float(lc0):6.2f} (SFT) -> {float(lc):6.2f} (DPO)")
print(f"  log π(rejected) {float(lr0):6.2f} (SFT) -> {float(lr):6.2f} (DPO)")

fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
axes[0].plot(dpo_m["loss/dpo"]); axes[0].set_title("DPO loss")
axes[1].plot(dpo_m["pref/accuracy"]); axes[1].set_title("pref/accuracy (training pairs)")
axes[2].plot(dpo_m["pref/logps_chosen"], label="log π(chosen)")
axes[2].plot(dpo_m["pref/logps_rejected"], label="log π(rejected)")
axes[2].set_title("sequence log-probs"); axes[2].legend()
for ax in axes:
  ax.set_xlabel("step")
plt.tight_layout(); plt.show()
"""),
    md("""
What to look for: the loss falls and the implicit-reward accuracy rises, on
training pairs and on held-out ones. The right panel shows a known DPO effect:
the *gap* between chosen and rejected grows, but both log-probs can fall, the
rejected one faster ("likelihood displacement"). DPO only constrains the
difference; adding an NLL term on the chosen answer (`losses=(("rpo", 1.0),)`,
RPO) keeps the chosen answer's probability up.

## 4. A reward model (Bradley–Terry)

A reward model puts a scalar head on the decoder trunk and reads it at the last
completion token: $R(x, y) = h_T(x, y)\\cdot w$. The Bradley–Terry loss asks the
chosen answer to score higher:

$$\\ell = -\\log\\sigma\\big(R(x, y_w) - R(x, y_l)\\big).$$

`num_heads > 1` trains a cheap ensemble on one trunk (the heads differ by
initialisation), whose spread can drive exploration (SEA selection in online
DPO). We start the trunk from the SFT model.
"""),
    code("""
rm_tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-3, grad_clip_norm=1.0))
rm_state, rm_shardings = rm_lib.create_reward_model_state(
    model_cfg, rm_tx, jax.random.key(1), mesh, num_heads=1, trunk_params=sft_params)
rm_step = rm_lib.RewardModelStep(model_cfg, rm_tx, num_heads=1, mesh=mesh)
rm_state, rm_m = run_steps(rm_lib.jit_reward_model_step(rm_step, rm_shardings), rm_state,
                           pref_batches, RM_STEPS)
rm_params = rm_state.params

chosen_KN, rejected_KN = jax.jit(rm_step.pair_scores)(rm_params, test_pairs)
print(f"held-out Bradley–Terry accuracy: {float(jnp.mean(chosen_KN > rejected_KN)):.2f}")

fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
axes[0].plot(rm_m["loss/bt"]); axes[0].set_title("Bradley–Terry loss")
axes[1].plot(rm_m["rm/accuracy"]); axes[1].set_title("rm/accuracy (training pairs)")
axes[2].hist(np.asarray(chosen_KN[0]), bins=30, alpha=0.6, label="chosen (correct)")
axes[2].hist(np.asarray(rejected_KN[0]), bins=30, alpha=0.6, label="rejected (wrong)")
axes[2].set_title("held-out reward scores"); axes[2].legend()
axes[0].set_xlabel("step"); axes[1].set_xlabel("step")
plt.tight_layout(); plt.show()
"""),
    md("""
## 5. Online DPO

Each step of `OnlineDPOStep`: sample G = 8 answers per prompt from the current
policy, score them, pair the best with the worst (`selection="best_worst"`; a
group whose scores all tie gives no pair and is masked out), and take a DPO step
on those pairs against the reference. Unlike offline DPO, the pairs come from
the policy itself, so they follow it as it changes.

We run it twice from the SFT model, with two reward functions:

* the **verifier** (exact match), the gold reward of this task;
* the **reward model** from section 4. Its weights are an argument of the step
  (`reward_params`), traced into the one jitted program rather than baked in as
  constants. The verifier's verdict is logged next to it (`reward/correct`) but
  never optimised: it tells us whether raising the learned reward also makes
  the answers right.
"""),
    code("""
verifier = registry.build_reward_fn((("correct", 1.0),), tok)
rm_fn = rm_lib.reward_model_fn(model_cfg, num_heads=1)


def rm_reward(inputs, rm_params):
  rewards_B, comps = rm_fn(inputs, rm_params)
  _, checked = verifier(inputs)  # logged, never optimised
  return rewards_B, {**comps, "correct": checked["correct"]}


online_cfg = OnlineDPOConfig(num_samples=8, max_new_tokens=4, preference=pref_cfg)
prompt_data = dataclasses.replace(sft_data, batch_size=32)
online_tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-3, grad_clip_norm=1.0))


def online_dpo(reward_fn, reward_params=None, reward_shardings=None):
  state, shardings = create_train_state(model_cfg, online_tx, jax.random.key(0), mesh,
                                        params=sft_params)
  step = OnlineDPOStep(model_cfg, online_cfg, online_tx, reward_fn, eos_id=tok.eos_id,
                       pad_id=tok.pad_id, mesh=mesh)
  fn = jit_online_dpo_step(step, shardings, shardings.params, reward_shardings)
  prompts = DataIterator(prompt_data, "train", mode="rl", tokenizer=tok, examples=problems)
  return run_steps(fn, state, prompts, ONLINE_STEPS, ref_params, reward_params)[1]


online = {"verifier": online_dpo(verifier),
          "reward model": online_dpo(rm_reward, rm_params, rm_shardings.params)}
for name, h in online.items():
  print(f"reward = {name:12s}: correct samples {h['reward/correct'][0]:.0%} (first step) -> "
        f"{h['reward/correct'][-10:].mean():.0%} (last 10 steps), valid pairs "
        f"{h['online/valid_pair_frac'].mean():.0%}")

fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
for name, h in online.items():
  axes[0].plot(h["reward/correct"], label=f"reward = {name}")
  axes[2].plot(h["online/valid_pair_frac"], label=f"reward = {name}")
axes[1].plot(online["reward model"]["reward/mean"], color="C1")
axes[0].set_title("samples correct (verifier)"); axes[0].legend()
axes[1].set_title("reward-model score (reward = reward model)")
axes[2].set_title("groups giving a valid pair")
for ax in axes:
  ax.set_xlabel("step")
plt.tight_layout(); plt.show()
"""),
    md("""
## What to expect, and what to try

At this size (a 0.08M-parameter model, tens of steps, 46 distinct held-out
prompts) the numbers are noisy and move with the settings; the mechanics are
the point. What this notebook printed on a 2-core CPU:

* offline DPO: held-out implicit-reward accuracy 0.72 (0.5 is chance), while
  the log-prob of the *chosen* answers fell too (−0.8 → −2.2; rejected −7.1 →
  −11.0). DPO only constrains the difference ("likelihood displacement");
  `losses=(("rpo", 1.0),)` adds an NLL term on the chosen answer that keeps its
  probability up;
* the reward model: about 80% of training pairs and 78% of held-out pairs
  ranked correctly;
* online DPO with the verifier: correct samples 68% at the first step, 76% over
  the last 10 of 50 steps. With the reward model as the reward, the samples'
  reward-model score stayed high while the verifier's verdict fell to about
  25%: a reward model that is right four times out of five is wrong in places,
  and the policy finds them (reward over-optimisation). That is why RLHF keeps
  a KL anchor and trains ensembles (`num_heads`, `aggregation="worst_case"`),
  and why a verifier is preferred when one exists.

Variations, each a one-line change: `selection="sea"` with an ensemble reward
model (`num_heads=4` and `reward_model_fn(..., with_members=True)`);
`losses=(("ipo", 1.0),)` or a weighted mix in `PreferenceConfig`; more
`RM_STEPS` for a better reward model.
"""),
]


# ---------------------------------------------------------------------------
# 04: a custom advantage estimator and a custom policy loss.
# ---------------------------------------------------------------------------
NB04 = header("04_custom_estimator_and_loss",
              "04 · Your own advantage estimator and policy loss", """
The RL step looks its algorithms up by name: `RLConfig.advantage` in the
registry of advantage estimators, `RLConfig.policy_loss` in the registry of
policy losses. The entries are plain JAX functions, and one call adds a new one:
`advantages.register_advantage_estimator(name, fn)` or
`policy_losses.register_policy_loss(name, fn)`. So a new algorithm is a function
with the right signature and one registration; the rest of the step (rollout,
reward, aggregation, micro-batching, sharding, the single jit) is reused as is.
The function's own hyper-parameters go in the config, in
`RLConfig.advantage_kwargs` / `RLConfig.loss_kwargs`. We write:

* **an estimator**, the group *win rate*: how often an answer beats the other
  answers to the same prompt, a rank-based advantage that ignores the reward's
  scale, with a `margin` option: rewards closer than the margin count as a tie;
* **a loss**, SPO's quadratic trust-region penalty (Xie et al. 2024, "Simple
  Policy Optimization") in place of PPO's clipping, with its own trust-region
  width `eps`;

then test them on hand-made inputs, register them, pass their options through
the config, and train with them.
""", "A CPU runtime is enough: an untrained 0.02M-parameter model and two short "
     "runs, well under a minute on 2 CPU cores.") + [
    code("""
import dataclasses
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from jaxrl_llm import config as config_lib
from jaxrl_llm import optim, sharding, tokenizers
from jaxrl_llm.data import DataConfig, DataIterator, tasks
from jaxrl_llm.rewards import RewardInputs, verifiers
from jaxrl_llm.rl import advantages, policy_losses
from jaxrl_llm.rl import config as rl_config
from jaxrl_llm.rl import rl_step
from jaxrl_llm.train_state import create_train_state

FAST = os.environ.get("JAXRL_NOTEBOOK_TEST") == "1"  # set by the test suite
RL_STEPS = 15 if FAST else 40
print("jax", jax.__version__, "on", jax.devices())
"""),
    md("""
## 1. An advantage estimator

Outcome estimators have the signature

```python
fn(rewards_B, group_size, *, valid_B=None, **options) -> adv_B
```

with the G answers of a prompt stored next to each other (row `p·G + g`), and
rows where `valid_B` is 0 (groups dropped by dynamic sampling, padding) left out
of every statistic and given advantage 0. The step broadcasts `adv_B` to the
tokens of each answer. `options` are the estimator's own keyword parameters
(here `margin`); section 3 shows how the config fills them in.

The **win rate** of answer i among the n valid answers of its group, with a
margin m ≥ 0:

$$A_i = \\frac{1}{n-1}\\sum_{j \\ne i} s(r_i - r_j) \\in [-1, 1], \\qquad
s(d) = \\begin{cases}\\mathrm{sign}(d) & |d| > m\\\\ 0 & \\text{otherwise.}\\end{cases}$$

With the default m = 0, s is the sign: A is 0 when all rewards tie, sums to 0
over a group like GRPO's advantage, and only the *order* of the rewards matters:
any increasing transform of the reward gives the same advantages. A margin
m > 0 counts rewards closer than m as a tie, which keeps a noisy reward (a reward
model's score, say) from ranking answers on noise. The advantages still sum to 0
over a group (s is odd) and adding a constant to every reward changes nothing,
but the margin is in reward units, so rescaling the reward now matters.
"""),
    code("""
def win_rate(rewards_B, group_size, *, valid_B=None, margin=0.0):
  \"\"\"A_i = (1/(n−1)) Σ_{j≠i} s(r_i − r_j), s(d) = sign(d) if |d| > margin else 0.\"\"\"
  rewards_B = jnp.asarray(rewards_B, jnp.float32)
  valid_B = jnp.ones_like(rewards_B) if valid_B is None else (jnp.asarray(valid_B) != 0)
  r_PG = rewards_B.reshape(-1, group_size)
  v_PG = valid_B.astype(jnp.float32).reshape(-1, group_size)
  d_PGG = r_PG[:, :, None] - r_PG[:, None, :]
  wins_PGG = jnp.where(jnp.abs(d_PGG) > margin, jnp.sign(d_PGG), 0.0) * v_PG[:, None, :]
  n_P1 = jnp.sum(v_PG, axis=1, keepdims=True)
  adv_PG = jnp.sum(wins_PGG, axis=2) / jnp.maximum(n_P1 - 1.0, 1.0)
  return (adv_PG * v_PG).reshape(-1)

r = jnp.array([0.1, 0.5, 0.5, 0.9,    # a group with a tie
               1.0, 1.0, 1.0, 1.0])   # a solved group: no signal
print("win rate:        ", win_rate(r, 4))
print("of r ** 3:       ", win_rate(r ** 3, 4))
print("0.9 invalid:     ", win_rate(r, 4, valid_B=jnp.array([1, 1, 1, 0, 1, 1, 1, 1])))
print("margin 0.45:     ", np.round(win_rate(r, 4, margin=0.45), 3))  # only 0.1 vs 0.9 counts
print("grpo, for scale: ", np.round(advantages.grpo(r, 4), 2))
"""),
    md("""
## 2. A policy loss

Policy losses have the signature

```python
fn(logp_BT, old_logp_BT, adv_BT, mask_BT, **options) -> (loss_BT, metrics)
```

per token: `logp_BT` is differentiated, `old_logp_BT` and `adv_BT` are constants,
`loss_BT` is 0 on masked tokens and `metrics` holds per-token arrays (the step
averages `clip_low_BT` and `clip_high_BT` into `rl/clip_frac_low/high` when a loss
returns them). The step aggregates `loss_BT` itself (`RLConfig.aggregation`).

**SPO** replaces PPO's clip by a quadratic penalty on the ratio
$\\rho_t = \\pi_\\theta(y_t)/\\pi_{\\text{old}}(y_t)$:

$$\\ell_t = -\\Big(\\rho_t A_t - \\frac{|A_t|}{2\\epsilon}(\\rho_t - 1)^2\\Big).$$

Its gradient equals the policy gradient at ρ = 1; the objective peaks at
ρ = 1 + ε·sign(A), the edge of the trust region, and beyond it the gradient
pulls the ratio back, where PPO's clipped objective is flat and gives no
gradient at all. As in the library's
losses, the log-ratio is masked before `exp` so padding cannot overflow.

The width ε is SPO's own option, the keyword parameter `eps`. It is a different
knob from PPO's clip range (`RLConfig.eps_low` / `eps_high`), so it gets its own
name rather than borrowing `eps_high`.
"""),
    code("""
def spo(logp_BT, old_logp_BT, adv_BT, mask_BT, *, eps=0.2):
  \"\"\"SPO (Xie et al. 2024): ℓ = −(ρA − |A|/(2ε)·(ρ − 1)²), ε = eps.\"\"\"
  on_BT = jnp.asarray(mask_BT) != 0
  old_logp_BT = jax.lax.stop_gradient(old_logp_BT)
  adv_BT = jax.lax.stop_gradient(adv_BT)
  ratio_BT = jnp.exp(jnp.where(on_BT, logp_BT - old_logp_BT, 0.0))
  loss_BT = -(ratio_BT * adv_BT - jnp.abs(adv_BT) / (2 * eps) * (ratio_BT - 1.0) ** 2)
  outside = lambda x: (on_BT & x).astype(loss_BT.dtype)
  metrics = {"ratio_BT": jnp.where(on_BT, ratio_BT, 0.0),
             "clip_low_BT": outside(ratio_BT < 1.0 - eps),   # outside the trust region
             "clip_high_BT": outside(ratio_BT > 1.0 + eps)}
  return jnp.where(on_BT, loss_BT, 0.0), metrics

# On-policy (ρ = 1) SPO and PPO have the same gradient: the plain policy gradient.
logp = jnp.log(jnp.array([[0.2, 0.5, 0.9]]))
adv, mask = jnp.array([[1.0, -0.5, 2.0]]), jnp.array([[1.0, 1.0, 0.0]])
grad = lambda fn, **options: jax.grad(
    lambda lp: jnp.sum(fn(lp, logp, adv, mask, **options)[0]))(logp)
print("d loss / d logp, spo:     ", grad(spo, eps=0.2))
print("d loss / d logp, ppo_clip:", grad(policy_losses.ppo_clip, eps_high=0.2))

rho = jnp.linspace(0.5, 1.5, 101)[None, :]
fig, axes = plt.subplots(1, 2, figsize=(9, 3), sharey=True)
for ax, a in zip(axes, (1.0, -1.0)):
  args = (jnp.log(rho), jnp.zeros_like(rho), jnp.full_like(rho, a), jnp.ones_like(rho))
  ax.plot(rho[0], -spo(*args, eps=0.2)[0][0], label="SPO, ε = 0.2")
  ax.plot(rho[0], -spo(*args, eps=0.1)[0][0], ":", label="SPO, ε = 0.1")
  ax.plot(rho[0], -policy_losses.ppo_clip(*args, eps_high=0.2)[0][0], "--", label="PPO clip")
  ax.axvspan(0.8, 1.2, alpha=0.1); ax.set_title(f"objective per token, A = {a:+.0f}")
  ax.set_xlabel("ratio ρ")
axes[0].legend(); plt.tight_layout(); plt.show()
"""),
    md("""
## 3. Plug them in

Before registration, `RLConfig` rejects the names (and lists the valid ones):
"""),
    code("""
for fields in ({"advantage": "win_rate"}, {"policy_loss": "spo"}):
  try:
    rl_config.RLConfig(**fields)
  except ValueError as e:
    print("ValueError:", e)
  else:
    print(fields, "is accepted: registered already (this cell was re-run)")
"""),
    md("""
One call registers each function. From then on its name is valid everywhere the
step looks it up: in `RLConfig` (validation), in `advantages.compute_advantages`
and `policy_losses.policy_loss` (the dispatchers of the step's ADVANTAGE and
UPDATE stages), and so in the jitted `RLStep`. The registries are read live:
`advantages.advantage_estimator_names()` and `policy_losses.policy_loss_names()`
(and the old `advantages.ADVANTAGE_ESTIMATORS`, now a read-only view) list the
new names. Register through these functions rather than writing into the
registries: they check the name and the function's signature first.

* Registering a name a second time is an error unless you pass
  `overwrite=True`. We pass it here so that re-running the cell (in Colab, after
  editing `win_rate` or `spo`) replaces the function.
  `unregister_advantage_estimator` / `unregister_policy_loss` remove a name
  again; built-in names cannot be removed.
* The registries are module state. Register before building the `RLConfig` and
  jitting the step (in a launcher, or in a module that the config file
  imports). A step that is already compiled keeps the function it traced.
"""),
    code("""
advantages.register_advantage_estimator("win_rate", win_rate, overwrite=True)
policy_losses.register_policy_loss("spo", spo, overwrite=True)
print("estimators:", advantages.advantage_estimator_names())
print("losses:    ", policy_losses.policy_loss_names())
"""),
    md("""
**Options.** The step calls a registered function with two kinds of keyword
options:

* the options `RLConfig` sets from its own fields, if the function's signature
  names them: `eps` / `ddof` (from `adv_eps` / `adv_std_ddof`) for an estimator,
  `eps_low` / `eps_high` / `clip_c` (from `eps_low` / `eps_high` /
  `dual_clip_c`) for a loss;
* the function's own options, from `advantage_kwargs` / `loss_kwargs`: tuples of
  (name, value) pairs (a dict is converted). In a config file, write
  `c.rl.loss_kwargs = (("eps", 0.2),)`.

Neither `win_rate` nor `spo` names a field-set option, so each gets exactly its
`*_kwargs`. `advantage_options()` and `loss_options()` show what the step will
pass:
"""),
    code("""
custom = rl_config.RLConfig(advantage="win_rate", advantage_kwargs=(("margin", 0.0),),
                            policy_loss="spo", loss_kwargs=(("eps", 0.2),),
                            aggregation="token_mean", group_size=8, max_new_tokens=8)
print("estimator options:", custom.advantage_options())
print("loss options:     ", custom.loss_options())
# The step's dispatcher now finds the estimator, passes the options and
# broadcasts A to the tokens:
print(advantages.compute_advantages(custom.advantage, r, 4, jnp.ones((8, 2)),
                                    **custom.advantage_options())[:, 0])
"""),
    md("""
`RLConfig` checks every key when it is built, not at the first training step. A
key is an error if the function has no parameter of that name, if a field of
`RLConfig` already sets it (set the field instead), or if the step passes it
itself (`valid_B`, ...):
"""),
    code("""
for loss_kwargs in ((("epsilon", 0.2),),    # a typo: spo has no parameter 'epsilon'
                    (("eps_high", 0.2),)):  # set by RLConfig.eps_high, not here
  try:
    rl_config.RLConfig(policy_loss="spo", loss_kwargs=loss_kwargs)
  except ValueError as e:
    print("ValueError:", e)
"""),
    md("""
## 4. Train with them

A toy task that an untrained model can learn in a few dozen steps: after an
arithmetic prompt, answer with **digits only**. The reward is any function
`fn(RewardInputs) -> (rewards_B, {name: values_B})` of token arrays, written in
JAX so it runs inside the jitted step; here the fraction of digit tokens before
EOS, halved when the answer never reaches EOS, with `"correct"` (logged as
`rl/accuracy`) meaning digits only, then EOS.

We train two policies from the same initial weights, the GRPO advantage with
PPO clipping and the win rate with SPO (same aggregation, learning rate, data
and seeds), to check that the new pieces learn. The baseline's config drops
the `*_kwargs`: `grpo` has no `margin` and `ppo_clip` no `eps`, and `RLConfig`
would reject them.
"""),
    code("""
tok = tokenizers.load_tokenizer("builtin")
DIGIT_IDS = tuple(tok.encode(d)[0] for d in "0123456789")


def digits_reward(inputs: RewardInputs):
  span_BL, span_len_B = verifiers.answer_span(inputs.completion_BL, inputs.completion_mask_BL,
                                              eos_id=tok.eos_id)
  is_digit_BL = jnp.isin(inputs.completion_BL, jnp.asarray(DIGIT_IDS)) & span_BL
  frac_B = jnp.sum(is_digit_BL, axis=1) / jnp.maximum(span_len_B, 1)
  reward_B = frac_B * jnp.where(inputs.finished_B, 1.0, 0.5)
  correct_B = verifiers.format_reward(inputs, allowed_ids=DIGIT_IDS, eos_id=tok.eos_id)
  return reward_B, {"correct": correct_B, "digit_frac": frac_B}


model_cfg = config_lib.builtin_model_config(config_lib.ModelSpec(builtin="nano"), tok.vocab_size)
mesh = sharding.make_mesh(sharding.MeshConfig())
data = DataConfig(source="arithmetic", max_prompt_len=8, max_answer_len=4, batch_size=16)
train = tasks.generate("arithmetic", "train", 2000, seed=0, max_digits=1)


def train_rl(rl, seed=0):
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=3e-3, grad_clip_norm=1.0))
  state, shardings = create_train_state(model_cfg, tx, jax.random.key(seed), mesh)
  step = rl_step.RLStep(model_cfg, rl, tx, digits_reward, eos_id=tok.eos_id,
                        pad_id=tok.pad_id, mesh=mesh)
  run = rl_step.jit_rl_step(step, shardings)
  prompts = DataIterator(data, "train", mode="rl", tokenizer=tok, examples=train)
  history = []
  for _ in range(RL_STEPS):
    state, metrics = run(state, sharding.shard_batch(next(prompts), mesh), jax.random.key(seed))
    history.append(metrics)
  history = jax.device_get(history)
  return {k: np.array([m[k] for m in history]) for k in history[0]}


baseline = dataclasses.replace(custom, advantage="grpo", advantage_kwargs=(),
                               policy_loss="ppo_clip", loss_kwargs=())  # eps_high = 0.2
runs = {"grpo + ppo_clip": train_rl(baseline), "win_rate + spo": train_rl(custom)}
for name, h in runs.items():
  print(f"{name:16s} reward {h['reward/mean'][:5].mean():.2f} -> "
        f"{h['reward/mean'][-5:].mean():.2f}, digits-only answers "
        f"{h['rl/accuracy'][:5].mean():.0%} -> {h['rl/accuracy'][-5:].mean():.0%}")
"""),
    code("""
fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
for name, h in runs.items():
  axes[0].plot(h["reward/mean"], label=name)
  axes[1].plot(h["rl/accuracy"], label=name)
  axes[2].plot(h["rl/response_length"], label=name)
for ax, title in zip(axes, ("reward", "digits-only answers, ended by EOS",
                            "answer length (tokens)")):
  ax.set_title(title); ax.set_xlabel("RL step")
axes[0].legend(); plt.tight_layout(); plt.show()
"""),
    md("""
Both learn the toy task; at this size and number of steps the two are not
meaningfully different, which is what a plug-in check should show. The
ratio stays at 1 (`rl/clip_frac_low/high` are 0: no token leaves the trust
region) because each batch is used for one optimizer step; set `epochs` or
`minibatches` above 1 in `RLConfig` to reuse a batch and see the trust region
act, and change `loss_kwargs=(("eps", ...),)` to move its edge.

What this did **not** need: no change to the step, the sampler, the reward
plumbing or the sharding. What a new *kind* of algorithm needs instead: an
estimator with other inputs (a value model, like `advantages.gae`, or a greedy
baseline, like `remax`) is called explicitly by `compute_advantages`, so it
needs a change there (registration refuses the names `reinforce_pp` and
`remax` for that reason); a new aggregation mode is a branch of
`policy_losses.aggregate`.
"""),
]


# ---------------------------------------------------------------------------
# 05: GRPO vs Dr. GRPO, response length.
# ---------------------------------------------------------------------------
NB05 = header("05_dr_grpo_length_bias",
              "05 · GRPO vs Dr. GRPO: where long wrong answers come from", """
"Understanding R1-Zero-Like Training: A Critical Perspective" (Liu et al. 2025)
points at two normalisations in GRPO's objective that bias it:

* the **per-response length normalisation** 1/|y_i|, which scales each token's
  gradient by the length of its response; a long *incorrect* response is then
  penalised *less per token* than a short one, so nothing stops wrong answers
  from growing longer;
* the **std normalisation** of the advantage, which up-weights prompts whose
  rewards barely vary (nearly always right, or nearly always wrong).

Dr. GRPO ("GRPO done right") drops both: the advantage is r_i − mean_g r and the
token losses are summed and divided by a constant. In jaxrl_llm the two are the
presets `grpo` and `dr_grpo`. Here we train both from the same warm-started
policy, with the same data and seeds, and watch the length of correct and
incorrect answers (`rl/response_length_correct`, `rl/response_length_incorrect`).
""", """
A CPU runtime is enough: a 0.02M-parameter model, an 80-step SFT warm-start and
two GRPO runs of 150 steps, about a minute on 2 CPU cores.
""") + [
    code("""
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from jaxrl_llm import config as config_lib
from jaxrl_llm import optim, sharding, tokenizers
from jaxrl_llm.data import DataConfig, DataIterator, tasks
from jaxrl_llm.rewards import registry
from jaxrl_llm.rl import advantages, policy_losses
from jaxrl_llm.rl import config as rl_config
from jaxrl_llm.rl import rl_step
from jaxrl_llm.sft import sft_step
from jaxrl_llm.train_state import create_train_state

FAST = os.environ.get("JAXRL_NOTEBOOK_TEST") == "1"  # set by the test suite
SFT_STEPS = 30 if FAST else 80
RL_STEPS = 20 if FAST else 150
MAX_NEW_TOKENS = 10  # room for answers to grow: correct ones need 2-3 tokens with EOS
print("jax", jax.__version__, "on", jax.devices())
"""),
    md("""
## 1. The two objectives, on one group

For a prompt with G sampled answers $y_1..y_G$ and token losses
$\\ell_{i,t} = -\\min(\\rho_{i,t} A_i, \\mathrm{clip}(\\rho_{i,t}) A_i)$:

$$\\text{GRPO:}\\quad \\mathcal{L} = \\frac{1}{G}\\sum_i \\frac{1}{|y_i|}\\sum_t \\ell_{i,t},
\\qquad A_i = \\frac{r_i - \\mathrm{mean}(r)}{\\mathrm{std}(r) + \\varepsilon}$$

$$\\text{Dr. GRPO:}\\quad \\mathcal{L} = \\frac{1}{G\\,L_{\\max}}\\sum_i \\sum_t \\ell_{i,t},
\\qquad A_i = r_i - \\mathrm{mean}(r)$$

(aggregations `seq_mean_token_mean` and `seq_mean_token_sum_norm` of
`policy_losses.aggregate`). On-policy (ρ = 1) the gradient of token t of answer i
is $-w_{i}\\,\\nabla\\log\\pi(y_{i,t})$ with weight $w_i = A_i/(G|y_i|)$ for GRPO and
$A_i/(G L_{\\max})$ for Dr. GRPO. The cell computes these weights with the library's
functions for a group of two correct answers and two wrong ones, one short and
one long (a token's weight is minus the derivative of the aggregated loss with
respect to its log-prob).
"""),
    code("""
rewards = jnp.array([1.0, 1.0, 0.0, 0.0])   # two correct, two wrong
lengths = jnp.array([3, 3, 3, 10])          # the last wrong answer rambles on
L_MAX = 10
mask = (jnp.arange(L_MAX)[None, :] < lengths[:, None]).astype(jnp.float32)

def token_weights(adv, mode):
  # loss_t = -A_i * logp_t; the weight of a token is -d loss / d logp_t.
  def loss(logp):
    total, denom = policy_losses.aggregate(-adv[:, None] * logp, mask, mode, max_len=L_MAX)
    return total / denom
  return -jax.grad(loss)(jnp.zeros_like(mask))

for name, adv, mode in [
    ("grpo", advantages.grpo(rewards, group_size=4), "seq_mean_token_mean"),
    ("dr_grpo", advantages.dr_grpo(rewards, group_size=4), "seq_mean_token_sum_norm")]:
  w = token_weights(adv, mode)
  print(f"{name:8s} advantage {np.round(adv, 2)}")
  print(f"{'':8s} weight per token  {np.round(w[:, 0], 3)}   "
        f"total weight per answer {np.round(w.sum(1), 3)}")
"""),
    md("""
With GRPO each answer carries the same *total* weight whatever its length, so
the 10-token wrong answer gets a third of the per-token penalty of the 3-token
one: every extra wrong token dilutes the penalty. With Dr. GRPO every token
counts the same, so a long wrong answer is penalised in proportion to its
length. (When all answers have the same length, the two aggregations differ
only by a constant factor.)

## 2. A shared warm start

A tiny model (`nano`, 2 layers) learns the format of 1-digit arithmetic answers
from a short SFT: about one in seven of its sampled answers is correct, and the
wrong ones vary in length, which is what lets a length bias show.
"""),
    code("""
tok = tokenizers.load_tokenizer("builtin")
model_cfg = config_lib.builtin_model_config(config_lib.ModelSpec(builtin="nano"), tok.vocab_size)
mesh = sharding.make_mesh(sharding.MeshConfig())
train = tasks.generate("arithmetic", "train", 20000, seed=0, max_digits=1)
data = DataConfig(source="arithmetic", max_prompt_len=8, max_answer_len=4, seq_len=64,
                  batch_size=32)

tx = optim.make_optimizer(optim.OptimConfig(learning_rate=3e-3, grad_clip_norm=1.0))
state, shardings = create_train_state(model_cfg, tx, jax.random.key(0), mesh)
step = jax.jit(functools.partial(sft_step, cfg=model_cfg, tx=tx, mesh=mesh),
               in_shardings=(shardings, None, None), out_shardings=(shardings, None),
               donate_argnums=(0,))
sft_batches = DataIterator(data, "train", mode="sft", tokenizer=tok, examples=train)
for _ in range(SFT_STEPS):
  state, m = step(state, sharding.shard_batch(next(sft_batches), mesh), jax.random.key(0))
sft_params = jax.device_get(state.params)
print(f"SFT: {SFT_STEPS} steps, final NLL {float(m['loss/nll']):.3f}")
"""),
    md("""
## 3. Two runs from the same start

`rl_config.from_preset(name, **overrides)` gives the preset's `RLConfig`; we set
`kl_coef=0` in both so that only the advantage and the aggregation differ.
Each run starts from the SFT weights with a fresh optimizer, reads the same
prompts in the same order and uses the same PRNG key (the step folds the step
number into it), so the first rollout is identical in both runs.
"""),
    code("""
reward_fn = registry.build_reward_fn((("correct", 1.0),), tok)  # exact match, EOS-terminated
rl_data = dataclasses.replace(data, batch_size=16)  # 16 prompts x 8 answers per step


def train_rl(preset, seed=0):
  rl = rl_config.from_preset(preset, group_size=8, max_new_tokens=MAX_NEW_TOKENS, kl_coef=0.0)
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-3, warmup_steps=10,
                                              grad_clip_norm=1.0))
  state, shardings = create_train_state(model_cfg, tx, jax.random.key(seed), mesh,
                                        params=sft_params)
  step = rl_step.RLStep(model_cfg, rl, tx, reward_fn, eos_id=tok.eos_id, pad_id=tok.pad_id,
                        mesh=mesh)
  run = rl_step.jit_rl_step(step, shardings)
  prompts = DataIterator(dataclasses.replace(rl_data, seed=seed), "train", mode="rl",
                         tokenizer=tok, examples=train)
  history = []
  for _ in range(RL_STEPS):
    state, metrics = run(state, sharding.shard_batch(next(prompts), mesh), jax.random.key(seed))
    history.append(metrics)  # fetched below: the host never waits inside the loop
  history = jax.device_get(history)
  return {k: np.array([m[k] for m in history]) for k in history[0]}


runs = {preset: train_rl(preset) for preset in ("grpo", "dr_grpo")}
late = slice(RL_STEPS // 3, None)  # after the first third of training
print(f"mean over steps {RL_STEPS // 3 + 1}-{RL_STEPS}:")
print(f"{'':8s} {'incorrect len':>14s} {'correct len':>12s} {'truncated':>10s} {'accuracy':>9s}")
for preset, h in runs.items():
  print(f"{preset:8s} {h['rl/response_length_incorrect'][late].mean():14.2f} "
        f"{h['rl/response_length_correct'][late].mean():12.2f} "
        f"{h['rl/truncation_rate'][late].mean():10.1%} {h['rl/accuracy'][late].mean():9.1%}")
"""),
    code("""
def smooth(x, n=10):
  n = max(1, min(n, len(x)))
  return np.convolve(x, np.ones(n) / n, mode="valid")

panels = [("rl/response_length_incorrect", "length of incorrect answers"),
          ("rl/response_length_correct", "length of correct answers"),
          ("rl/truncation_rate", "truncated (no EOS within 10 tokens)"),
          ("rl/accuracy", "training accuracy")]
fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
for ax, (key, title) in zip(axes, panels):
  for preset, h in runs.items():
    x = np.arange(1, RL_STEPS + 1)
    ax.plot(x, h[key], alpha=0.2)
    ax.plot(x[len(x) - len(smooth(h[key])):], smooth(h[key]), label=preset,
            color=ax.lines[-1].get_color())
  ax.set_title(title); ax.set_xlabel("RL step")
axes[0].legend(); plt.tight_layout(); plt.show()
"""),
    md("""
## 4. Reading the plots

What the paper reports at scale: under GRPO the length of *incorrect* responses
keeps growing while correct ones stay about the same, so the average response
length rises without a matching gain in accuracy; Dr. GRPO keeps incorrect
responses short at the same accuracy.

What this tiny run shows (a 0.02M-parameter model, 150 steps): the same
direction. Over steps 51-150, seeds 0, 1 and 2 of this notebook gave, on a 2-core
CPU:

| | incorrect length | correct length | truncated | accuracy |
|---|---|---|---|---|
| grpo | 2.7-2.9 tokens | 2.2 | 4-6% | 12-19% |
| dr_grpo | 2.3 tokens | 2.2 | 0-1% | 10-15% |

GRPO's wrong answers drift longer and some run into the 10-token limit, while
correct answers keep their length; Dr. GRPO keeps wrong answers as short as
right ones at a similar accuracy. The effect is small and the curves are
noisy: a tiny model in 150 steps is a weak test, and your numbers will differ a
little (other seeds, other hardware). Try `train_rl(preset, seed=1)`, a larger
`MAX_NEW_TOKENS`, or more steps.

## 5. The other bias: std normalisation

Dividing by the group's reward std makes a prompt's advantages depend on how
often it is solved. For a group of 8 with k correct answers, the advantage of a
correct answer is:
"""),
    code("""
print(f"{'k correct':>9s} {'grpo A+':>8s} {'dr_grpo A+':>10s} {'ratio = 1/std':>14s}")
for k in range(1, 8):
  r = jnp.array([1.0] * k + [0.0] * (8 - k))
  a_grpo, a_dr = float(advantages.grpo(r, 8)[0]), float(advantages.dr_grpo(r, 8)[0])
  print(f"{k:9d} {a_grpo:8.2f} {a_dr:10.2f} {a_grpo / a_dr:14.2f}")
"""),
    md("""
Dr. GRPO's advantage of a correct answer is 1 − k/8. GRPO's is that divided by
the group's std, which is smallest when nearly every answer agrees: prompts the
policy almost always solves (k = 7) or almost never solves (k = 1) get their
advantages scaled up 2.8×, prompts at 50% only 1.9×. Liu et al. call this the
question-level difficulty bias: the update leans towards the prompts that are
already too easy or still too hard.
"""),
]


NOTEBOOKS = {
    "01_model_and_sampling": NB01,
    "02_grpo_quickstart": NB02,
    "03_dpo_and_reward_models": NB03,
    "04_custom_estimator_and_loss": NB04,
    "05_dr_grpo_length_bias": NB05,
}


def notebook(cells: list[nbformat.NotebookNode]) -> nbformat.NotebookNode:
  nb = nbformat.v4.new_notebook()
  nb.cells = cells
  nb.metadata = {
      "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
      "language_info": {"name": "python"},
      "colab": {"provenance": []},
  }
  return nb


def render(name: str) -> str:
  """The notebook file's text: stripped outputs, stable cell ids."""
  nb = notebook(NOTEBOOKS[name])
  for i, cell in enumerate(nb.cells):
    cell["id"] = f"cell-{i:02d}"
  return nbformat.writes(nb) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true",
                      help="do not write; exit 1 if a notebook differs from this file")
  args = parser.parse_args(argv)
  stale = []
  for name in NOTEBOOKS:
    path = NOTEBOOK_DIR / f"{name}.ipynb"
    text = render(name)
    if args.check:
      if not path.exists() or path.read_text() != text:
        stale.append(path.name)
    else:
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(text)
      print(f"wrote {path.relative_to(ROOT)}")
  if stale:
    print("out of date (run python scripts/make_notebooks.py):", ", ".join(stale))
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
