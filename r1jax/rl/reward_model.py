"""Model-based rewards: the Bradley-Terry preference loss, and reward models / judges as GRPO reward components.

Bradley-Terry (InstructGPT; DeepSeek-R1's helpfulness and harmlessness reward models), for a pair with rewards r_c
(chosen) and r_r (rejected), an optional per-pair margin m (Llama 2) and centering coefficient c (keeps rewards near
0 so their scale does not drift: Eisenstein et al. 2023):

    loss = mean(-log sigmoid(r_c - r_r - m)) + c * mean((r_c + r_r)^2)

In GRPO, `config.<stage>.model_rewards` names components scored by models, each with a weight, a schedule (active
on steps start_step <= step < end_step; R1 used its preference rewards only in the last few hundred steps, since
longer use invited reward hacking) and a normalization of its scores before weighting (none | batch: z-score over
all B*G completions | group: z-score within each prompt's G samples). Kinds:
- `reward_model`: a `RewardModel` scores every completion of the step in one jitted call on device (prompt +
  completion tokens as the rollout made them, the run's tokenizer);
- `judge` (r1jax.rl.judge): a language model prompted with a template answers yes or no, greedily.
Each component's raw (unnormalized, unweighted) score is logged as `reward/<name>` like a rule reward's.

Example:
    >>> import jax.numpy as jnp
    >>> loss, m = bradley_terry_loss(jnp.array([2.0, 0.0]), jnp.array([0.0, 1.0]))
    >>> round(float(loss), 4), float(m["pairwise_accuracy"]), float(m["margin"])
    (0.7201, 0.5, 0.5)
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax.parallel import hosts
from r1jax.parallel.sharding import merge_rows, split_rows

NORMALIZE = ("none", "batch", "group")
KINDS = ("reward_model", "judge")
NORM_EPS = 1e-6


# ------------------------------------------------------------------------------------------------------------------
# the preference loss


def bradley_terry_loss(r_chosen_B, r_rejected_B, *, margin_B=None, center_coef: float = 0.0):
    """Mean -log sigmoid(r_c - r_r - margin) (+ center_coef * mean((r_c + r_r)^2)) -> (loss, metrics) in f32.

    metrics: pairwise_accuracy (share of pairs with r_c > r_r; ties count as wrong), margin (mean r_c - r_r),
    reward_chosen / reward_rejected (means), bt_loss (the loss without centering)."""
    rc = jnp.asarray(r_chosen_B, jnp.float32)
    rr = jnp.asarray(r_rejected_B, jnp.float32)
    diff = rc - rr
    shifted = diff if margin_B is None else diff - jnp.asarray(margin_B, jnp.float32)
    bt = -jnp.mean(jax.nn.log_sigmoid(shifted))
    loss = bt + center_coef * jnp.mean((rc + rr) ** 2) if center_coef else bt
    metrics = {"bt_loss": bt, "pairwise_accuracy": jnp.mean((diff > 0).astype(jnp.float32)),
               "margin": jnp.mean(diff), "reward_chosen": jnp.mean(rc), "reward_rejected": jnp.mean(rr)}
    return loss, metrics


def pair_loss(model, batch, *, center_coef: float = 0.0):
    """The reward-model stage's loss on a batch of B pairs (`chosen`, `chosen_mask`, `rejected`, `rejected_mask`
    [B, L]; optional `margin` [B]; both sides scored in one forward pass) -> (loss, (metrics, aux))."""
    B = batch["chosen"].shape[0]
    tokens = jnp.concatenate([batch["chosen"], batch["rejected"]], axis=0)
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
    scores = model(tokens, attention_mask_BL=mask)
    loss, metrics = bradley_terry_loss(scores[:B], scores[B:], margin_B=batch.get("margin"),
                                       center_coef=center_coef)
    return loss, (metrics, {})


# ------------------------------------------------------------------------------------------------------------------
# scoring on device


def _micro(fn, micro: int, *xs):
    """fn over rows in chunks of `micro` (a scan: one chunk's activations live at a time); 0: all at once."""
    R = xs[0].shape[0]
    if not micro or micro >= R:
        return fn(*xs)
    if R % micro:
        raise ValueError(f"micro_batch={micro} must divide the {R} scored rows")
    chunks = [split_rows(x, R // micro) for x in xs]
    return merge_rows(jax.lax.map(lambda c: fn(*c), tuple(chunks)))


@partial(jax.jit, static_argnames=("graphdef", "micro"))
def score_rows(graphdef, state, tokens_RT, mask_RT, *, micro: int = 0):
    """Reward-model scores [R] (f32) of padded rows (any padding side), read at each row's last real token."""
    rm = nnx.merge(graphdef, state)
    return _micro(lambda t, m: rm(t, attention_mask_BL=m), micro, tokens_RT, mask_RT)


@partial(jax.jit, static_argnames=("graphdef", "group_size", "micro"))
def score_completions(graphdef, state, prompt_ids_BP, prompt_mask_BP, tokens_RN, lengths_R, *, group_size: int,
                      micro: int = 0):
    """Scores [R = B * G] of sampled completions (the sampler's device arrays: tokens [R, N], lengths [R]) after
    their left-padded prompts, without a trip through the host."""
    ids = jnp.repeat(prompt_ids_BP, group_size, axis=0)
    pmask = jnp.repeat(prompt_mask_BP.astype(bool), group_size, axis=0)
    cmask = jnp.arange(tokens_RN.shape[1])[None, :] < lengths_R[:, None]
    tokens = jnp.concatenate([ids, tokens_RN.astype(ids.dtype)], axis=1)
    mask = jnp.concatenate([pmask, cmask], axis=1)
    rm = nnx.merge(graphdef, state)
    return _micro(lambda t, m: rm(t, attention_mask_BL=m), micro, tokens, mask)


def normalize_scores(scores_R, mode: str, group_size: int = 1):
    """none | batch (z-score over all rows) | group (z-score within consecutive groups of `group_size`); the std is
    the population std (+1e-6), so a constant batch or group maps to 0."""
    if mode not in NORMALIZE:
        raise ValueError(f"normalize={mode!r}; valid: {NORMALIZE}")
    s = jnp.asarray(scores_R, jnp.float32)
    if mode == "none":
        return s
    if mode == "batch":
        return (s - s.mean()) / (s.std() + NORM_EPS)
    R = s.shape[0]
    if R % group_size:
        raise ValueError(f"group_size={group_size} does not divide the {R} scores")
    g = s.reshape(R // group_size, group_size)
    return ((g - g.mean(1, keepdims=True)) / (g.std(1, keepdims=True) + NORM_EPS)).reshape(R)


# ------------------------------------------------------------------------------------------------------------------
# configuration


REWARD_MODEL_KEYS = dict(kind="reward_model", model="", weight=1.0, start_step=0, end_step=0, normalize="none",
                         micro_batch=0)
JUDGE_KEYS = dict(kind="judge", model="", weight=1.0, start_step=0, end_step=0, normalize="none",
                  template="correct", reference_field="answer", max_new_tokens=4, max_prompt_len=512,
                  batch_size=0, yes_score=1.0, no_score=0.0, invalid_score=0.0)


@dataclasses.dataclass(frozen=True)
class ModelRewardSpec:
    """One model reward component (see `parse_model_rewards`)."""

    name: str
    kind: str
    model: str
    weight: float
    start_step: int
    end_step: int           # 0: no end
    normalize: str
    options: dict = dataclasses.field(default_factory=dict)  # kind-specific (micro_batch; the judge's keys)

    def active(self, step: int) -> bool:
        """Whether the component scores GRPO step `step` (0-based: the step being taken)."""
        return step >= self.start_step and (self.end_step == 0 or step < self.end_step)


def parse_model_rewards(entries, where: str = "model_rewards", rule_rewards=()) -> list[ModelRewardSpec]:
    """Checks `config.<stage>.model_rewards` ({name: {kind, model, weight, ...}}) and returns its specs; errors name
    the key (`where.name.key`) and what is valid."""
    entries = entries.to_dict() if hasattr(entries, "to_dict") else dict(entries or {})
    specs = []
    for name, entry in entries.items():
        at = f"{where}.{name}"
        if name in rule_rewards:
            raise ValueError(f"{at}: {name!r} is also a rule reward in rewards; both would log reward/{name}")
        entry = entry.to_dict() if hasattr(entry, "to_dict") else entry
        if not isinstance(entry, dict):
            raise ValueError(f"{at} must be a dict like {{'model': 'stage:rm', 'weight': 1.0}}; got {entry!r}")
        kind = entry.get("kind", "reward_model")
        if kind not in KINDS:
            raise ValueError(f"{at}.kind={kind!r}; valid: {KINDS}")
        schema = REWARD_MODEL_KEYS if kind == "reward_model" else JUDGE_KEYS
        unknown = sorted(set(entry) - set(schema))
        if unknown:
            raise ValueError(f"{at} has unknown key(s) {unknown}; valid for kind={kind!r}: {sorted(schema)}")
        e = {**schema, **entry}
        if not isinstance(e["model"], str) or not e["model"].startswith(("stage:", "hf:", "r1jax:", "previous")):
            raise ValueError(f"{at}.model={e['model']!r}; valid: stage:NAME, hf:PATH, r1jax:PATH"
                             + (", previous" if kind == "judge" else ""))
        if kind == "reward_model" and e["model"] == "previous":
            raise ValueError(f"{at}.model='previous': name the reward model with stage:NAME, hf:PATH or r1jax:PATH")
        w = e["weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w):
            raise ValueError(f"{at}.weight must be a finite number; got {w!r}")
        for key in ("start_step", "end_step"):
            if isinstance(e[key], bool) or not isinstance(e[key], int) or e[key] < 0:
                raise ValueError(f"{at}.{key}={e[key]!r} must be an int >= 0")
        if e["end_step"] and e["end_step"] <= e["start_step"]:
            raise ValueError(f"{at}: end_step={e['end_step']} must be > start_step={e['start_step']} (or 0: no end)")
        if e["normalize"] not in NORMALIZE:
            raise ValueError(f"{at}.normalize={e['normalize']!r}; valid: {NORMALIZE}")
        common = ("kind", "model", "weight", "start_step", "end_step", "normalize")
        specs.append(ModelRewardSpec(name=name, kind=kind, model=e["model"], weight=float(w),
                                     start_step=e["start_step"], end_step=e["end_step"], normalize=e["normalize"],
                                     options={k: v for k, v in e.items() if k not in common}))
    return specs


# ------------------------------------------------------------------------------------------------------------------
# the components in a rollout


class RewardModelComponent:
    """A loaded reward model as a GRPO component: `score(...) -> raw scores [R]` (numpy)."""

    def __init__(self, spec: ModelRewardSpec, rm):
        self.spec = spec
        self.graphdef, self.state = nnx.split(rm)

    def score(self, *, prompt_ids_BP, prompt_mask_BP, tokens_RN, lengths_R, group_size, **_) -> np.ndarray:
        return np.asarray(hosts.fetch(score_completions(
            self.graphdef, self.state, jnp.asarray(prompt_ids_BP), jnp.asarray(prompt_mask_BP), tokens_RN,
            lengths_R, group_size=group_size, micro=int(self.spec.options.get("micro_batch", 0)))), np.float64)


class ModelRewards:
    """The stage's model reward components: `score(step, ...)` -> {name: (raw_R, weighted contribution_R)} for the
    components active at `step`."""

    def __init__(self, components: list[Any]):
        self.components = components

    def __bool__(self) -> bool:
        return bool(self.components)

    def active(self, step: int) -> list[str]:
        return [c.spec.name for c in self.components if c.spec.active(step)]

    def weights(self, step: int) -> dict[str, float]:
        return {c.spec.name: float(c.spec.weight) for c in self.components if c.spec.active(step)}

    def score(self, step: int, *, group_size: int, **inputs) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {}
        for c in self.components:
            if not c.spec.active(step):
                continue
            raw = c.score(group_size=group_size, **inputs)
            norm = np.asarray(normalize_scores(raw, c.spec.normalize, group_size), np.float64)
            out[c.spec.name] = (raw, c.spec.weight * norm)
        return out
