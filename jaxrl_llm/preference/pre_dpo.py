"""Pre-DPO: DPO against a guiding reference model.

Pan et al., "Pre-DPO: Improving Data Utilization in Direct Preference
Optimization Using a Guiding Reference Model" (2025, AAAI 2026,
arXiv:2504.15843). The paradigm:

  1. start from the initial policy π_0 (the SFT model);
  2. first round: optimise π_0 on the preference data with DPO (reference
     π_0) or a reference-free loss such as SimPO, giving π_guide;
  3. second round: optimise π_0 again, from the same starting params, with
     DPO whose reference is π_guide.

Why it helps (the paper's analysis): the DPO gradient of a pair is

  ∇ℓ = −β · λ · ∇(log π_θ(y_w) − log π_θ(y_l)),
  λ = σ(β·log π_ref(y_w)/π_θ(y_w) − β·log π_ref(y_l)/π_θ(y_l)) = σ(−β·h),

so the reference is a per-pair data weight. With π_ref = π_θ = π_0, every
pair starts at λ = σ(0) = 1/2 (uniform weights). A guiding reference that
already separates a pair (large reference margin) gives it a large λ until
the policy catches up, and pairs the first round could not learn get small
weights: the data is re-weighted by what the data itself can teach. The step
logs λ's batch mean and spread as ``pref/dpo_weight`` and
``pref/dpo_weight_std`` (`dpo_pair_weights`).

Config (section ``preference``): ``reference_from`` names the workdir of a
finished run whose final params are the guiding reference (any kind with the
same model: a DPO, SimPO, ... run); or ``guiding_steps > 0`` runs the first
round inside this run, in ``<workdir>/guiding_reference``, with
``guiding_losses`` (default: this run's losses) and the same starting params,
data and optimizer settings, then trains the policy from the start again.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

GUIDING_DIR = "guiding_reference"


def dpo_pair_weights(margin_B: jax.Array) -> jax.Array:
  """λ = σ(−β·h) per pair, from the implicit-reward margin β·h (see the docstring)."""
  return jax.nn.sigmoid(-margin_B)


def validate(pref: Any, fail: Callable[[str], None]) -> None:
  """Checks the Pre-DPO fields of a `PreferenceConfig` (called from its __post_init__)."""
  if pref.reference_from and pref.guiding_steps:
    fail(f"reference_from={pref.reference_from!r} and guiding_steps={pref.guiding_steps} "
         "both name a guiding reference; set one (reference_from for a finished run, "
         "guiding_steps to train it first in this run)")
  if isinstance(pref.guiding_steps, bool) or not isinstance(pref.guiding_steps, int) or (
      pref.guiding_steps < 0):
    fail(f"guiding_steps must be an int >= 0, got {pref.guiding_steps!r}")
  if pref.guiding_losses and not pref.guiding_steps:
    fail(f"guiding_losses={pref.guiding_losses} is set but guiding_steps=0: set "
         "guiding_steps to train the guiding reference, or clear guiding_losses")
  if not pref.needs_reference:
    fail(f"a guiding reference (reference_from / guiding_steps) is set but the losses "
         f"{[n for n, _ in pref.losses]} with reference={pref.reference!r} never read "
         "π_ref; use a reference-based loss such as 'dpo'")
  if pref.reference != "on_the_fly":
    fail(f"a guiding reference needs reference='on_the_fly' (got {pref.reference!r}): "
         "precomputed reference log-probs would come from another model")
  if pref.unpaired:
    fail("a guiding reference is implemented for paired losses only (not 'kto')")
  if pref.guiding_losses:
    guiding = dataclasses.replace(pref, losses=tuple(pref.guiding_losses), guiding_steps=0,
                                  guiding_losses=())
    if guiding.unpaired:
      fail("guiding_losses must be paired losses (the first round trains on the same pairs)")


def guiding_round_config(cfg: Any, workdir: str) -> Any:
  """The ExperimentConfig of the first round (the guiding reference's training).

  Same data, model, optimizer and seed; ``guiding_steps`` steps with
  ``guiding_losses`` (or the run's own losses) from the same starting params:
  the run's ``trainer.init_from``, or, when the run warm-starts with SFT, the
  warm-start checkpoint in ``<workdir>/sft_warmstart`` (made by then).
  """
  from jaxrl_llm import config as config_lib
  from jaxrl_llm import fileio
  pref = cfg.preference
  trainer = cfg.trainer
  if not trainer.init_from and trainer.sft_warmstart.num_steps > 0:
    trainer = dataclasses.replace(trainer, init_from=fileio.join(workdir, "sft_warmstart"),
                                  sft_warmstart=config_lib.SFTWarmstart())
  trainer = dataclasses.replace(trainer, num_steps=pref.guiding_steps)
  losses = tuple(pref.guiding_losses) or pref.losses
  return dataclasses.replace(
      cfg, trainer=trainer,
      preference=dataclasses.replace(pref, losses=losses, guiding_steps=0, guiding_losses=(),
                                     reference_from=""))
