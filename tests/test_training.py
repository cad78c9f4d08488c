"""Stage initialization: a model started from a Hugging Face checkpoint keeps the stage's model overrides."""
import types

import jax
import numpy as np
from flax import nnx

from r1jax import training
from r1jax.configs import base_config
from r1jax.models import Transformer, get_preset
from r1jax.models.hf import save_pretrained


def test_hf_init_applies_the_model_overrides(tmp_path):
    """config.model.overrides (here scan_unroll and attention_q_block, execution settings that config.json does not
    hold) reach a model loaded from config.model.hf_path; they used to be dropped, leaving only dtype and remat."""
    src = Transformer(get_preset("tiny_qwen2", num_layers=2), rngs=nnx.Rngs(3))
    save_pretrained(src, tmp_path / "hf", dtype="float32")
    cfg = base_config()
    cfg.model.hf_path = str(tmp_path / "hf")
    cfg.model.dtype = "float32"
    cfg.model.overrides.scan_unroll = 2
    cfg.model.overrides.attention_q_block = 4
    cfg.tokenizer.kind = "path"
    tokenizer = types.SimpleNamespace(vocab_size=src.config.vocab_size)
    mc = training.build_model_config(cfg, tokenizer)
    ctx = training.RunContext(config=cfg, workdir=tmp_path, mesh=training.make_run_mesh(cfg.mesh),
                              rules=cfg.mesh.rules, tokenizer=tokenizer, logger=None, model_config=mc,
                              stop=training.StopFlag())
    model = training.init_model(ctx, "base", None, seed=0)
    assert (model.config.scan_unroll, model.config.attention_q_block) == (2, 4)
    assert model.config == mc
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(src, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
