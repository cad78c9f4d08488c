"""GRPO's log-probs at the rollout's temperature (`logp_at_temperature`, default True): TRL and verl score the samples
under logits / temperature (TRL's selective_log_softmax_and_entropy(..., temperature), verl's logits.div_(temperature)),
for the policy, the old policy and the reference alike; the sampler reports the same numbers for the old policy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_sampling import _model
from test_speculative import _config as _mtp_config
from test_trainer import _by_step, _with_length_reward, _workdir

from r1jax import configs
from r1jax.logging import read_metrics
from r1jax.models import Transformer
from r1jax.pipeline.stages import run
from r1jax.rl.rollout import sample_group
from r1jax.rl.logprobs import completion_logp, logp_temperature, token_logp_entropy


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_logp_and_entropy_equal_trls_at_the_temperature(temperature):
    torch = pytest.importorskip("torch")
    trl_utils = pytest.importorskip("trl.trainer.utils")
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, 7, 50)) * 4).astype(np.float32)
    targets = rng.integers(0, 50, (3, 7))
    want_logp, want_entropy = trl_utils.selective_log_softmax_and_entropy(
        torch.tensor(logits), torch.tensor(targets), temperature=temperature)
    logp, entropy = token_logp_entropy(jnp.asarray(logits), jnp.asarray(targets), temperature)
    np.testing.assert_allclose(np.asarray(logp), want_logp.numpy(), atol=2e-5)
    np.testing.assert_allclose(np.asarray(entropy), want_entropy.numpy(), atol=2e-5)


def _sampler_vs_trainer(model, temperature, top_p, tempered, speculative=""):
    prompts = np.array([[0, 5, 9, 3], [7, 7, 2, 11]], np.int32)
    mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1]], bool)
    tokens, lengths, logp = sample_group(model, jnp.asarray(prompts), jnp.asarray(mask), group_size=2,
                                         max_new_tokens=10, temperature=temperature, top_p=top_p, top_k=0,
                                         eos_ids=[1], pad_id=0, rng=jax.random.key(3), speculative=speculative,
                                         tempered_logp=tempered)
    tokens, lengths, logp = np.asarray(tokens), np.asarray(lengths), np.asarray(logp)
    P = prompts.shape[1]
    full = np.concatenate([np.repeat(prompts, 2, 0), tokens], 1)
    full_mask = np.concatenate([np.repeat(mask, 2, 0), np.arange(tokens.shape[1])[None] < lengths[:, None]], 1)
    full = np.pad(full, ((0, 0), (0, 1)))  # completion_logp's last position is padding
    full_mask = np.pad(full_mask, ((0, 0), (0, 1)))
    recomputed = completion_logp(model, jnp.asarray(full), jnp.asarray(full_mask), P,
                                 temperature=temperature if tempered else 1.0)[0]
    valid = np.arange(tokens.shape[1])[None] < lengths[:, None]
    return logp, np.asarray(recomputed)[:, :tokens.shape[1]], valid


@pytest.mark.parametrize("tempered", [True, False], ids=["tempered", "t1"])
@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sampler_logp_is_what_the_trainer_recomputes(tempered, top_p):
    """The old policy's log-probs taken from the sampler (old_logp="auto", one update per rollout) are the ones the
    trainer computes for the policy: at the temperature (before top-p, as TRL and verl score), or at 1."""
    model = _model("tiny_qwen2")
    got, want, valid = _sampler_vs_trainer(model, 0.6, top_p, tempered)
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-4)
    other, _, _ = _sampler_vs_trainer(model, 0.6, top_p, not tempered)
    assert np.abs(other[valid] - got[valid]).max() > 0.1  # the setting changes the numbers


def test_speculative_sampler_reports_the_tempered_logp():
    model = Transformer(_mtp_config(), rngs=nnx.Rngs(0))
    got, want, valid = _sampler_vs_trainer(model, 0.7, 1.0, True, speculative="mtp")
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-4)


def test_stage_temperature_and_greedy():
    assert logp_temperature(configs.grpo_stage(temperature=0.6)) == 0.6
    assert logp_temperature(configs.grpo_stage(temperature=0.6, logp_at_temperature=False)) == 1.0
    assert logp_temperature(configs.grpo_stage(temperature=0.0)) == 1.0


def test_grpo_stage_ratio_is_one_with_the_samplers_old_logp(pretrained, tmp_path):
    """old_logp="sampler" at temperature 0.5: the sampler's and the update's log-probs agree (ratio 1 up to float
    rounding) with either setting, and the update's entropy is the tempered distribution's when it is on."""
    entropy = {}
    for tempered in (True, False):
        cfg = _with_length_reward(steps=2, temperature=0.5, old_logp="sampler", logp_at_temperature=tempered)
        cfg.grpo.eval.num_problems = 0
        d = tmp_path / str(tempered)
        run(cfg, _workdir(pretrained, d))
        metrics = read_metrics(d)
        for key in ("ratio/min", "ratio/max"):
            assert all(abs(v - 1.0) < 1e-3 for v in _by_step(metrics, "grpo", key).values()), key
        entropy[tempered] = _by_step(metrics, "grpo", "entropy")[1]
    assert entropy[True] < entropy[False]  # logits / 0.5 are sharper


def test_a_run_begun_before_the_setting_is_warned_when_it_resumes(tmp_path):
    """A GRPO stage begun under a config.json without `logp_at_temperature` (log-probs at T = 1) and resumed at
    another temperature is told the objective changes and how to keep the old one; stages done, not begun, at
    T = 1 or already recording the key are not."""
    import json

    from run_helpers import TINY_R1ZERO, load_config

    from r1jax.pipeline.stages import _warn_changed_defaults

    def recorded(cfg, drop=True):
        out = json.loads(cfg.to_json_best_effort())
        if drop:
            del out["grpo"]["logp_at_temperature"]
        (tmp_path / "config.json").write_text(json.dumps(out))

    cfg = load_config(str(TINY_R1ZERO), None)
    cfg.grpo.temperature = 0.6
    recorded(cfg)
    assert _warn_changed_defaults(cfg, tmp_path) == []  # the stage has not begun: the new default from its start
    (tmp_path / "grpo").mkdir()
    (warning,) = _warn_changed_defaults(cfg, tmp_path)
    assert "stage 'grpo' from before config.grpo.logp_at_temperature existed" in warning
    assert "--config.grpo.logp_at_temperature=False" in warning
    cfg.grpo.logp_at_temperature = False  # the override it names: silent
    assert _warn_changed_defaults(cfg, tmp_path) == []
    cfg.grpo.logp_at_temperature = True
    cfg.grpo.temperature = 1.0  # the same numbers either way
    assert _warn_changed_defaults(cfg, tmp_path) == []
    cfg.grpo.temperature = 0.6
    recorded(cfg, drop=False)  # begun with the setting recorded
    assert _warn_changed_defaults(cfg, tmp_path) == []
    recorded(cfg)
    (tmp_path / "grpo" / "DONE").write_text("{}")
    assert _warn_changed_defaults(cfg, tmp_path) == []
    (tmp_path / "config.json").write_text("{not json")
    assert _warn_changed_defaults(cfg, tmp_path) == []
