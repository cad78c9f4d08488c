"""How r1jax's LoRA adapters sit on a Hugging Face checkpoint's modules, for `r1jax.models.peft`: which Linear (or
row block of one, or fused routed-expert parameter) holds each adapted weight, PEFT's naming of them, and the
adapter settings r1jax refuses. See r1jax.models.peft for the format and the rules."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flax import nnx

from r1jax.models.config import ModelConfig
from r1jax.models.hf import _view_groups
from r1jax.models.hf_mapping import Source, param_sources
from r1jax.models.lora import EXPERT_WEIGHTS, IN_DIMS, add_lora, lora_params, weight_targets
from r1jax.models.transformer import Transformer

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
# See r1jax.models.peft's docstring: PEFT rewrites these target_modules leaves of these families to the fused experts.
_FUSED_MOE_FAMILIES = ("qwen3_moe", "deepseek_v3")
_FUSED_MOE_LEAVES = ("gate_proj", "up_proj", "down_proj", "gate")
# transformers 5's fused routed experts (`mlp.experts`), in the order the class defines them, which is the order peft
# wraps targeted parameters in: each ParamWrapper wraps the one before, whose tensors' keys gain ".base_layer".
_EXPERT_PARAMS = ("gate_up_proj", "down_proj")
# Initializations that only set A and B; the others (PiSSA, OLoRA, CorDA, MiCA, LoftQ, LoRA-GA) also rewrite the
# base weights, so their adapters apply to a different base model.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
# Settings that make the adapter compute something other than W + scale B A on the targeted Linear weights.
_REFUSED = {
    "use_dora": "DoRA's magnitude vectors", "lora_bias": "adapter biases", "modules_to_save": "fully trained "
    "module copies", "trainable_token_indices": "trained embedding rows", "layer_replication": "replicated layers",
    "alora_invocation_tokens": "activated LoRA", "use_qalora": "QA-LoRA pooling", "use_bdlora": "block-diagonal "
    "LoRA", "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA", "arrow_config": "Arrow routing",
    "kasa_config": "KaSA", "fan_in_fan_out": "Conv1D (fan_in_fan_out) layers",
}


class AdapterError(ValueError):
    """An adapter that cannot be written or read exactly; names the module, tensor or setting."""


@dataclass(frozen=True)
class _Piece:
    """One stacked-layer cell of an r1jax weight that a Hugging Face Linear (or a row block of it) holds."""

    key: tuple      # the weight's parameter path, e.g. ("dense", "attn", "wk_b")
    cell: tuple     # index into the weight's layer grid
    src: Source


@dataclass
class PeftAdapter:
    """A PEFT adapter read for a model config: add_lora(rank, alpha, targets) plus the values of every adapter
    (parameter path of the `_lora_a` / `_lora_b` variable -> float32 array with the layer grid in front)."""

    path: Path
    rank: int
    alpha: float
    targets: tuple[str, ...]
    values: dict[tuple, np.ndarray]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def weights(self) -> set[tuple]:
        return {k[:-1] + (k[-1][: -len("_lora_a")],) for k in self.values if k[-1].endswith("_lora_a")}


# ------------------------------------------------------------------------------------------------------------------
# the mapping


@functools.lru_cache(maxsize=8)
def _adapter_shapes(cfg: ModelConfig, rank: int) -> dict[tuple, tuple]:
    """Parameter path -> shape of every adapter variable add_lora (targets "all,experts") gives a model of `cfg`."""
    abstract = nnx.eval_shape(lambda: add_lora(Transformer(cfg, rngs=nnx.Rngs(0)), rank=rank, alpha=1.0,
                                               targets="all,experts"))
    return {k: tuple(v.shape) for k, v in _paths(lora_params(abstract)).items()}


@functools.lru_cache(maxsize=8)
def _weight_targets(cfg: ModelConfig) -> dict[tuple, str]:
    """Parameter path -> target name (r1jax.models.lora.IN_DIMS) of every weight add_lora can give an adapter."""
    return weight_targets(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))


def _adaptable_weights(cfg: ModelConfig) -> set[tuple]:
    """Parameter paths of every weight add_lora can give an adapter."""
    return set(_weight_targets(cfg))


def _routed(cfg: ModelConfig, key: tuple) -> bool:
    return _weight_targets(cfg).get(key) in EXPERT_WEIGHTS


def _paths(state) -> dict[tuple, object]:
    return {tuple(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}


def _weight_of(adapter_key: tuple) -> tuple:
    return adapter_key[:-1] + (adapter_key[-1][: -len("_lora_a")],)


def _hf_modules(cfg: ModelConfig) -> tuple[dict[str, list[_Piece]], set[str]]:
    """(Hugging Face module name -> the r1jax weight pieces an adapter on it is, for every adaptable weight outside
    the MTP modules; every module name of the family's checkpoint, which PEFT's target names are matched against)."""
    adaptable = _adaptable_weights(cfg)
    modules: dict[str, list[_Piece]] = {}
    universe: set[str] = set()
    for key, src in param_sources(cfg).items():
        for cell in np.ndindex(src.names.shape):
            name = str(src.names[cell])
            if not name.endswith(".weight"):
                continue
            universe.add(name[: -len(".weight")])
            if key in adaptable and key[0] != "mtp" and not _routed(cfg, key):
                modules.setdefault(name[: -len(".weight")], []).append(_Piece(key, cell, src))
    return modules, universe


def _hf_experts(cfg: ModelConfig) -> tuple[dict[str, list[_Piece]], set[str]]:
    """(transformers 5 fused expert parameter, e.g. model.layers.1.mlp.experts.gate_up_proj -> the routed weight
    pieces it holds, outside the MTP modules; every such parameter name, MTP modules' included)."""
    params: dict[str, list[_Piece]] = {}
    universe: set[str] = set()
    for key, src in param_sources(cfg, fused_experts=True).items():
        if not _routed(cfg, key):
            continue
        for cell in np.ndindex(src.names.shape):
            universe.add(str(src.names[cell]))
            if key[0] != "mtp":
                params.setdefault(str(src.names[cell]), []).append(_Piece(key, cell, src))
    return params, universe


def _expert_rows(piece: _Piece) -> tuple[int, slice]:
    """(rows of the fused parameter [E, out, in] per expert, the routed weight's slice of them). Refuses a layout
    other than the per-expert transpose of r1jax's [E, in, out]."""
    src = piece.src
    select = src.select or (slice(None),) * 3
    if (len(src.hf_shape) != 3 or src.view is not None or src.perm != (0, 2, 1)
            or any(select[d].indices(src.hf_shape[d]) != (0, src.hf_shape[d], 1) for d in (0, 2))):
        raise AdapterError(f"{'.'.join(piece.key)}: its checkpoint layout (shape {src.hf_shape}, perm {src.perm}) is "
                           f"not transformers' fused experts [E, out, in]; no PEFT adapter maps onto it")
    return src.hf_shape[1], select[1]


def _expert_keys(params) -> dict[str, str]:
    """Fused expert parameter -> the module name its adapter's tensors have in a PEFT file, for the targeted
    `params` (peft nests one ParamWrapper per targeted parameter of a module, in _EXPERT_PARAMS order)."""
    by_module: dict[str, list[str]] = {}
    for p in params:
        by_module.setdefault(p.rsplit(".", 1)[0], []).append(p)
    out = {}
    for module, names in by_module.items():
        names = sorted(names, key=lambda p: _EXPERT_PARAMS.index(p.rsplit(".", 1)[1]))
        for i, p in enumerate(names):
            out[p] = module + ".base_layer" * (len(names) - 1 - i)
    return out


def _rows(piece: _Piece) -> tuple[list[int], tuple]:
    """(sizes of the Linear's output rows as the weight's view splits them, the weight's select over them). Refuses a
    weight whose input dims are not the Linear's columns and output dims its rows, in order."""
    src, n_in = piece.src, IN_DIMS[piece.key[-1]]
    view = src.view_shape
    if len(src.hf_shape) != 2:
        raise AdapterError(f"{'.'.join(piece.key)}: checkpoint tensor of shape {src.hf_shape} is not a Linear weight")
    rows, cols = _view_groups(src.hf_shape, view)
    perm = src.perm or tuple(range(len(view)))
    select = src.select or (slice(None),) * len(view)
    if (list(perm[:n_in]) != cols or list(perm[n_in:]) != rows
            or any(select[d].indices(view[d]) != (0, view[d], 1) for d in cols)):
        raise AdapterError(f"{'.'.join(piece.key)}: its checkpoint layout (view {view}, perm {perm}) does not keep "
                           f"inputs as the Linear's columns and outputs as its rows; no PEFT adapter maps onto it")
    return [view[d] for d in rows], tuple(select[d] for d in rows)


def _suffix(name: str, allowed: set[str], universe: dict[str, list[str]], cache: dict) -> str:
    """The shortest dotted suffix of `name` that PEFT's name matching (equal, or ends with "." + suffix) applies to
    no name outside `allowed`. `universe`: candidate names grouped by their last component."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        t = ".".join(parts[i:])
        if t not in cache:
            cache[t] = all(u in allowed for u in universe.get(parts[-1], ()) if u == t or u.endswith("." + t))
        if cache[t]:
            return t
    return name


def _by_leaf(names) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(n.rsplit(".", 1)[-1], []).append(n)
    return out


def _more(names: list) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def _number(x: float):
    x = round(float(x), 9)
    return int(x) if x == int(x) else x
