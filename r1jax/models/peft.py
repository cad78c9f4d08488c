"""Hugging Face PEFT LoRA adapters: `save_peft_adapter` writes a model's adapters in PEFT's format
(adapter_config.json + adapter_model.safetensors, which `peft.PeftModel.from_pretrained` loads onto the transformers
model of the same checkpoint), and `load_peft_adapter` attaches such a directory to a plain r1jax model.

An adapter maps exactly as its weight does (`r1jax.models.hf_mapping.param_sources`): r1jax's A [*in, r] flattens to
PEFT's lora_A.weight [r, in_features] and B [r, *out] to lora_B.weight [out_features, r], so scale * B_hf A_hf is the
transpose of r1jax's scale * A B. MLA's wk_b and wv_b are row blocks of one Linear, kv_b_proj (per head: the
qk_nope rows, then the v rows): their two rank-r adapters are one rank-2r adapter, A = [A_k; A_v] and B block
diagonal, written with rank_pattern 2r and alpha_pattern 2 alpha (scale alpha / r unchanged). Loading splits it
back; a rank-r kv_b_proj adapter gives wk_b and wv_b the same A.

transformers 5 fuses the routed experts of Qwen3-MoE and DeepSeek-V3, and PEFT (0.21) then turns every
target_modules entry named gate_proj / up_proj / down_proj into adapters on those fused experts, dropping the dense
MLPs it named; so those families' dense-layer and shared-expert MLP adapters are written as `target_parameters`
(`mlp.gate_proj.weight`, ...), which PEFT applies to exactly those Linear weights.

Routed-expert adapters (targets "experts") are PEFT's ParamWrapper on the fused parameters, target_parameters
`gate_up_proj` ([E, 2F, D]: w_gate's rows, then w_up's) and `down_proj` ([E, D, F]): per expert e, A_e [r, in] and
B_e [out, r] with delta_e = scale B_e A_e, stored as lora_A.weight [E r, in] (row e r + j) and lora_B.weight
[out, r E] (column j E + e). w_gate's and w_up's adapters are one rank-2r gate_up_proj adapter per expert, like
kv_b_proj's. peft nests one wrapper per targeted parameter of `mlp.experts`: down_proj's tensors are keyed
`mlp.experts.lora_*`, gate_up_proj's `mlp.experts.base_layer.lora_*` when both are targeted. (peft 0.21.2 warns
that rank_pattern / alpha_pattern keys naming a parameter "did not match any targeted module": its check reads
module names only, and it applies them.)

Refused, with the module or setting named, before anything is written or attached: adapters PEFT cannot place on a
transformers model (DeepSeek's multi-token-prediction modules), and adapters r1jax does not compute exactly (DoRA,
biases, modules_to_save, layers_to_transform, base-modifying initializations, lm_head, a fused gate_up_proj
adapter that is not one rank-r block per half, ...). rsLoRA (scale alpha / sqrt(r)) loads exactly.

Example:
    >>> import tempfile
    >>> from flax import nnx
    >>> from r1jax.models import Transformer, add_lora, get_preset, load_peft_adapter, save_peft_adapter
    >>> model = add_lora(Transformer(get_preset("tiny_qwen3"), rngs=nnx.Rngs(0)), rank=4, alpha=8.0)
    >>> path = tempfile.mkdtemp() + "/adapter"
    >>> save_peft_adapter(model, path)
    >>> plain = load_peft_adapter(Transformer(get_preset("tiny_qwen3"), rngs=nnx.Rngs(0)), path)
    >>> plain.dense.attn.wq_lora_a.shape  # [layers, D, r]
    (2, 64, 4)
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from r1jax.models.config import ModelConfig
from r1jax.models.lora import IN_DIMS, add_lora, has_lora, lora_params, parse_targets
from r1jax.models.peft_mapping import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError, PeftAdapter, _adaptable_weights,
                                       _adapter_shapes, _by_leaf, _expert_keys, _expert_rows, _FUSED_MOE_FAMILIES,
                                       _FUSED_MOE_LEAVES, _hf_experts, _hf_modules, _KEY_RE, _more, _number, _paths,
                                       _PLAIN_INITS, _PREFIX, _REFUSED, _routed, _rows, _suffix, _weight_of,
                                       _weight_targets)
from r1jax.parallel import hosts

# ------------------------------------------------------------------------------------------------------------------
# export


def peft_adapter_files(model, *, base_model_name_or_path: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter_config.json dict, adapter_model.safetensors tensors) of `model`'s adapters; raises AdapterError when
    they cannot be written exactly. On a mesh over several processes every process calls this (a collective)."""
    cfg = model.config
    flat = _paths(lora_params(model))
    weights = sorted({_weight_of(k) for k in flat if k[-1].endswith("_lora_a")})
    if not weights:
        raise AdapterError("the model has no LoRA adapters to export (add_lora attaches them)")
    mtp = [".".join(w) for w in weights if w[0] == "mtp"]
    if mtp:
        raise AdapterError(f"adapters on DeepSeek's multi-token-prediction modules ({mtp[0]}{_more(mtp)}) have no "
                           f"PEFT form: transformers' model has no MTP layers (a model with mtp_num_layers=0 has no "
                           f"such adapters)")
    modules, universe = _hf_modules(cfg)
    experts, expert_universe = _hf_experts(cfg)
    scales = {tuple(str(p) for p in path): float(m.lora_scale) for path, m in nnx.iter_modules(model)
              if hasattr(m, "lora_scale")}
    wanted = set(weights)
    adapted = {name: [p for p in pieces if p.key in wanted] for name, pieces in {**modules, **experts}.items()}
    adapted = {name: pieces for name, pieces in adapted.items() if pieces}
    unplaced = wanted - {p.key for pieces in adapted.values() for p in pieces}
    if unplaced:
        raise AdapterError(f"adapters with no Hugging Face Linear to hold them: "
                           f"{sorted('.'.join(k) for k in unplaced)}")
    values = {k: np.asarray(hosts.fetch(v[...]), np.float32) for k, v in sorted(flat.items())}
    as_expert = {n for n in adapted if n in experts}
    file_names = {**{n: n for n in adapted}, **_expert_keys(as_expert)}

    tensors, settings, units = {}, {}, []
    for name in sorted(adapted):
        a_parts, b_parts = [], []
        for p in adapted[name]:
            a = values[p.key[:-1] + (p.key[-1] + "_lora_a",)][p.cell]   # [*in, r]; routed: [E, in, r]
            b = values[p.key[:-1] + (p.key[-1] + "_lora_b",)][p.cell]   # [r, *out]; routed: [E, r, out]
            r = a.shape[-1]
            units.append((r, _number(scales[p.key[:-1]] * r)))
            if name in as_expert:
                # Per expert e as peft's ParamWrapper holds it: A_e [r, in] and B_e [out, r], delta_e = B_e A_e.
                rows, row_select = _expert_rows(p)
                a_parts.append(a.transpose(0, 2, 1))
                b_rows = np.zeros((b.shape[0], rows, r), np.float32)
                b_rows[:, row_select] = b.transpose(0, 2, 1)
                b_parts.append(b_rows)
                continue
            rows, row_select = _rows(p)
            a_parts.append(a.reshape(-1, r).T)
            b_rows = np.zeros((r, *rows), np.float32)  # rows of the Linear that other pieces (or none) hold stay 0
            b_rows[(slice(None), *row_select)] = b
            b_parts.append(b_rows.reshape(r, -1).T)
        module_scales = {scales[p.key[:-1]] for p in adapted[name]}
        if len(module_scales) != 1:
            raise AdapterError(f"{name}: its row blocks' adapters have different scales {sorted(module_scales)}")
        if name in as_expert:
            a_hf, b_hf = np.concatenate(a_parts, 1), np.concatenate(b_parts, 2)   # [E, R, in], [E, out, R]
            E, rank = a_hf.shape[:2]
            # peft: lora_A.weight [E * R, in] expert-major; lora_B.weight [out, R * E] with column j * E + e.
            a_hf, b_hf = a_hf.reshape(E * rank, -1), b_hf.transpose(1, 2, 0).reshape(b_hf.shape[1], rank * E)
        else:
            a_hf, b_hf = np.concatenate(a_parts, 0), np.concatenate(b_parts, 1)
            rank = a_hf.shape[0]
        settings[name] = (rank, _number(module_scales.pop() * rank))
        tensors[f"{_PREFIX}{file_names[name]}.lora_A.weight"] = np.ascontiguousarray(a_hf)
        tensors[f"{_PREFIX}{file_names[name]}.lora_B.weight"] = np.ascontiguousarray(b_hf)

    fused = cfg.family in _FUSED_MOE_FAMILIES
    as_param = {n for n in adapted if fused and n.rsplit(".", 1)[-1] in _FUSED_MOE_LEAVES} - as_expert
    as_module = set(adapted) - as_param - as_expert
    leaves, cache = _by_leaf(universe), {}
    target_modules = sorted({_suffix(n, as_module, leaves, cache) for n in as_module})
    param_names = {n + ".weight" for n in as_param} | as_expert
    leaves, cache = _by_leaf({u + ".weight" for u in universe} | expert_universe), {}
    target_parameters = sorted({_suffix(n + ".weight", param_names, leaves, cache) for n in as_param}
                               | {_suffix(n, param_names, leaves, cache) for n in as_expert})

    # The commonest (rank, alpha) of r1jax's adapters is the default, so row blocks written as one adapter of a
    # larger rank (kv_b_proj, gate_up_proj) are patterns; PEFT matches pattern keys as regexes ending the module's
    # key (the module name, or the targeted parameter's name).
    (r, alpha), _ = min(Counter(units).items(), key=lambda kv: (-kv[1], kv[0]))
    keys = {n: n + ".weight" if n in as_param else n for n in settings}
    rank_pattern, alpha_pattern = {}, {}
    leaves = _by_leaf(keys.values())
    for setting in sorted(set(settings.values()) - {(r, alpha)}):
        same = {keys[n] for n, s in settings.items() if s == setting}
        cache = {}
        for key in sorted({_suffix(k, same, leaves, cache) for k in same}):
            if setting[0] != r:
                rank_pattern[re.escape(key)] = setting[0]
            if setting[1] != alpha:
                alpha_pattern[re.escape(key)] = setting[1]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "r": r, "lora_alpha": alpha, "target_modules": target_modules, "exclude_modules": None,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "lora_bias": False, "lora_dropout": 0.0, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "init_lora_weights": True, "inference_mode": True,
    }
    if target_parameters:
        config["target_parameters"] = target_parameters
    return config, tensors


def save_peft_adapter(model, path: str | Path, *, base_model_name_or_path: str | None = None) -> None:
    """Writes `model`'s adapters (before `merge_lora`) as a PEFT LoRA adapter directory at `path`: the directory
    appears whole (written next to it, then renamed) or not at all, replacing an earlier one. Raises AdapterError,
    writing nothing, for adapters PEFT cannot hold exactly. On a multi-process mesh every process calls this and
    process 0 writes."""
    config, tensors = peft_adapter_files(model, base_model_name_or_path=base_model_name_or_path)
    if jax.process_index() == 0:
        _write_dir(Path(path), {ADAPTER_CONFIG: config}, tensors)


def _write_dir(path: Path, json_files: dict, tensors: dict) -> None:
    from safetensors.numpy import save_file

    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    old = None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the adapter is meant to be shared
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        for fname, content in json_files.items():
            (tmp / fname).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            path.rename(old / path.name)
        tmp.rename(path)
    except BaseException:
        if old is not None and not path.exists():
            (old / path.name).rename(path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------------------
# import


def lora_setting(config: dict, r=None, alpha=None) -> tuple[int, float]:
    """(rank, scale) of an adapter_config.json, or of one of its modules given that module's r / lora_alpha: PEFT's
    defaults are r 8 and lora_alpha 8, and rsLoRA scales by alpha / sqrt(r) instead of alpha / r."""
    r = int(config.get("r", 8) if r is None else r)
    alpha = float(config.get("lora_alpha", 8) if alpha is None else alpha)
    return r, alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def read_peft_config(path: str | Path) -> dict:
    """adapter_config.json of a PEFT adapter directory, with the settings r1jax cannot compute exactly refused."""
    path = Path(path)
    cfg_path = path / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise AdapterError(f"no {ADAPTER_CONFIG} in {path} (a PEFT LoRA adapter directory has one)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_path}: invalid JSON ({e})") from None
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type={config.get('peft_type')!r}; only 'LORA' adapters are supported")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterError(f"{cfg_path}: task_type={config['task_type']!r}; only CAUSAL_LM adapters are supported")
    for key, what in _REFUSED.items():
        if config.get(key):
            raise AdapterError(f"{cfg_path}: {key}={config[key]!r} ({what}) is not supported: r1jax's adapters compute "
                               f"W + scale B A on the targeted Linear weights only")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{cfg_path}: bias={config['bias']!r} trains the base biases; only 'none' is supported")
    if config.get("layers_to_transform") not in (None, []):
        raise AdapterError(f"{cfg_path}: layers_to_transform={config['layers_to_transform']!r} adapts only some "
                           f"layers; r1jax adapts a weight in every layer")
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise AdapterError(f"{cfg_path}: init_lora_weights={init!r} also rewrites the base weights, so the adapter "
                           f"applies to a different base model (convert it to plain LoRA with PEFT first)")
    if config.get("use_rslora") and (config.get("rank_pattern") or config.get("alpha_pattern")):
        raise AdapterError(f"{cfg_path}: use_rslora with rank_pattern / alpha_pattern is not supported")
    if isinstance(config.get("target_modules"), str) and config["target_modules"].lower() == "all-linear":
        raise AdapterError(f"{cfg_path}: target_modules='all-linear' is unresolved (PEFT saves the module names)")
    return config


def _match_list(targets, key: str) -> bool:
    if not targets:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    return any(key == t or key.endswith("." + t) for t in targets)


def _pattern_value(patterns: dict, key: str, default):
    for p, v in (patterns or {}).items():  # PEFT's get_pattern_key: the first pattern that ends the key
        if re.match(rf"(.*\.)?({p})$", key):
            return v
    return default


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    fpath = path / ADAPTER_WEIGHTS
    if not fpath.is_file():
        pickles = [p.name for p in path.glob("*.bin")]
        hint = f" ({pickles} are pickle files, which are never read; save with safetensors)" if pickles else ""
        raise AdapterError(f"no {ADAPTER_WEIGHTS} in {path}{hint}")
    try:
        with safe_open(str(fpath), framework="flax") as f:  # flax: bfloat16 tensors too (numpy has no bfloat16)
            return {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"cannot read {fpath}: {e} (truncated or corrupt file?)") from None


def read_peft_adapter(path: str | Path, cfg: ModelConfig) -> PeftAdapter:
    """Reads and checks a PEFT LoRA adapter directory against the model config `cfg` (nothing is attached)."""
    path = Path(path)
    config = read_peft_config(path)
    tensors = _read_tensors(path)
    where = f"adapter {path}"
    files: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            raise AdapterError(f"{where}: unexpected tensor {key!r} (only "
                               f"{_PREFIX}<module>.lora_A.weight / .lora_B.weight are LoRA adapters)")
        files.setdefault(m.group(1), {})[m.group(2)] = value
    for name, ab in sorted(files.items()):
        for x in "AB":
            if x not in ab:
                raise AdapterError(f"{where}: missing tensor {_PREFIX}{name}.lora_{x}.weight")
    modules, universe = _hf_modules(cfg)
    experts, expert_universe = _hf_experts(cfg)
    by_module, by_param = config.get("target_modules"), config.get("target_parameters")
    # A fused expert parameter's tensors are keyed by its module, nested as peft wraps the targeted parameters.
    in_file = {v: k for k, v in _expert_keys(p for p in experts if _match_list(by_param, p)).items()}
    files = {in_file.get(name, name): ab for name, ab in files.items()}
    pieces_of = {**modules, **experts}
    leaves = sorted({n.rsplit(".", 1)[-1] for n in pieces_of})
    for name in sorted(files):
        if name not in pieces_of:
            known = name in universe or any(u.startswith(name + ".") for u in universe | expert_universe)
            what = "has no r1jax adapter" if known else "is not a module of this model"
            raise AdapterError(f"{where}: {name} {what} (r1jax adapts the Linear weights and fused expert parameters "
                               f"{leaves} of attention, MLPs, shared and routed experts; embeddings and lm_head stay "
                               f"frozen)")
    # The config must target exactly the modules that have tensors (PEFT's matching rules).
    exclude = config.get("exclude_modules")
    targeted = {p: p for p in sorted(experts) if _match_list(by_param, p)}
    for name in sorted(universe):
        mod = _match_list(by_module, name) and not _match_list(exclude, name)
        par = _match_list(by_param, name + ".weight")
        if mod and par:
            raise AdapterError(f"{where}: {name} is targeted both by target_modules and target_parameters")
        if mod or par:
            targeted[name] = name + ".weight" if par else name
    missing = sorted(set(targeted) - set(files))
    if missing:
        raise AdapterError(f"{where}: {missing[0]}{_more(missing)} is targeted by adapter_config.json but has no "
                           f"lora_A / lora_B tensors" + ("" if missing[0] in pieces_of else
                                                         " (and r1jax has no adapter for it)"))
    untargeted = sorted(set(files) - set(targeted))
    if untargeted:
        raise AdapterError(f"{where}: tensors for {untargeted[0]}{_more(untargeted)}, which adapter_config.json's "
                           f"target_modules / target_parameters do not name")

    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    setting = {}
    for name in sorted(files):
        key = targeted[name]
        r, scale = lora_setting(config, _pattern_value(config.get("rank_pattern"), key, r_default),
                                _pattern_value(config.get("alpha_pattern"), key, alpha_default))
        if name in experts:
            E, out_f, in_f = experts[name][0].src.hf_shape
            wants, what = ((E * r, in_f), (out_f, r * E)), f"{E} experts' [{out_f}, {in_f}]"
        else:
            out_f, in_f = modules[name][0].src.hf_shape
            wants, what = ((r, in_f), (out_f, r)), f"Linear [{out_f}, {in_f}]"
        for x, want in zip("AB", wants):
            if files[name][x].shape != want:
                raise AdapterError(f"{where}: tensor {_PREFIX}{in_file.get(name, name)}.lora_{x}.weight has shape "
                                   f"{files[name][x].shape}, expected {want} (rank {r}, {what})")
        setting[name] = (r, scale)
    scales = sorted({s for _, s in setting.values()})
    if not np.allclose(scales, scales[0], rtol=1e-9, atol=0):
        raise AdapterError(f"{where}: the modules' scales (alpha / r) differ, {scales}; r1jax's adapters share one "
                           f"scale (lora_alpha / lora_rank)")
    single = sorted({r for n, (r, _) in setting.items() if len(pieces_of[n]) == 1})
    if len(single) > 1:
        raise AdapterError(f"{where}: the modules' ranks differ, {single}; r1jax's adapters share one rank")
    rank = single[0] if single else int(r_default)

    values: dict[tuple, np.ndarray] = {}
    shapes = _adapter_shapes(cfg, rank)
    filled: dict[tuple, set] = {}
    for name in sorted(files):
        a_hf, b_hf, pieces = files[name]["A"], files[name]["B"], pieces_of[name]
        r = setting[name][0]
        if name in experts:  # per expert e: A_e [r, in] and B_e [out, r] (see peft_adapter_files)
            E = pieces[0].src.hf_shape[0]
            a_hf, b_hf = a_hf.reshape(E, r, -1), b_hf.reshape(b_hf.shape[0], r, E).transpose(2, 0, 1)
        if r not in (rank, rank * len(pieces)):
            raise AdapterError(f"{where}: {name} has rank {r}; with rank {rank} elsewhere r1jax holds it only as rank "
                               f"{rank}" + (f" or {rank * len(pieces)} (a rank-{rank} block per row block)"
                                            if len(pieces) > 1 else ""))
        blocks = r != rank
        for i, p in enumerate(pieces):
            if name in experts:  # [E, r, in] and [E, r, rows] as r1jax's A and B are laid out, then transposed
                rows, row_select = _expert_rows(p)
                a_piece, b_piece = a_hf, b_hf[:, row_select].transpose(0, 2, 1)
            else:
                rows, row_select = _rows(p)
                a_piece = a_hf[None]
                b_piece = b_hf.T.reshape(r, *rows)[(slice(None), *row_select)][None]   # [r, *out] of this row block
            if blocks:
                cols = np.arange(i * rank, (i + 1) * rank)
                if np.any(np.delete(b_piece, cols, axis=1)):
                    raise AdapterError(f"{where}: {name}'s rank-{r} adapter is not one rank-{rank} block per row "
                                       f"block ({', '.join(q.key[-1] for q in pieces)}), as r1jax holds it")
                a_piece, b_piece = a_piece[:, cols], b_piece[:, cols]
            if name not in experts:
                a_piece, b_piece = a_piece[0], b_piece[0]
            ka, kb = p.key[:-1] + (p.key[-1] + "_lora_a",), p.key[:-1] + (p.key[-1] + "_lora_b",)
            if ka not in values:
                values[ka] = np.zeros(shapes[ka], np.float32)
                values[kb] = np.zeros(shapes[kb], np.float32)
            values[ka][p.cell] = np.swapaxes(a_piece, -1, -2).reshape(values[ka].shape[len(p.cell):])
            values[kb][p.cell] = b_piece.reshape(values[kb].shape[len(p.cell):])
            filled.setdefault(p.key, set()).add(p.cell)
    # add_lora adapts a weight name in every layer and stack; each of those adapters must come from the file.
    target_of = _weight_targets(cfg)
    targets = tuple(t for t in IN_DIMS if t in {target_of[k] for k in filled})  # add_lora's order: "all"'s graph
    names_of = {(p.key, p.cell): n for n, pieces in pieces_of.items() for p in pieces}
    for key in sorted(k for k in _adaptable_weights(cfg) if target_of[k] in targets):
        if key[0] == "mtp":
            raise AdapterError(f"{where}: r1jax would adapt {target_of[key]} in DeepSeek's multi-token-prediction "
                               f"modules too, which a PEFT adapter cannot hold; load the model without them "
                               f"(mtp_num_layers=0)")
        a_shape = shapes[key[:-1] + (key[-1] + "_lora_a",)]
        grid = a_shape[: len(a_shape) - 1 - IN_DIMS[target_of[key]] - _routed(cfg, key)]
        missing = [names_of[(key, c)] for c in np.ndindex(grid) if c not in filled.get(key, set())]
        if missing:
            raise AdapterError(f"{where}: no adapter for {missing[0]}{_more(missing)}; r1jax adapts "
                               f"{target_of[key]} in every layer and stack that has it, so the adapter must cover "
                               f"them all")
    return PeftAdapter(path=path, rank=rank, alpha=_number(scales[0] * rank), targets=targets, values=values)


def _expected_weights(cfg: ModelConfig, targets: str) -> set[tuple]:
    names = set(parse_targets(targets))
    return {k for k, t in _weight_targets(cfg).items() if t in names}


def load_peft_adapter(model, path: str | Path, *, rank: int | None = None, alpha: float | None = None,
                      targets: str | None = None, mesh=None, rules=None):
    """Attaches the PEFT LoRA adapter at `path` to the plain `model` (in place; returned): add_lora with the
    adapter's rank, alpha and targets, then its A and B. `rank` / `alpha` / `targets` (a stage's lora_rank,
    lora_alpha, lora_targets), when given, must describe the same adapters. Raises AdapterError, leaving the model
    unchanged, for an adapter it cannot hold exactly."""
    if has_lora(model):
        raise AdapterError("the model already has LoRA adapters; load a PEFT adapter into a plain model")
    adapter = read_peft_adapter(path, model.config)
    if rank is not None and rank != adapter.rank:
        raise AdapterError(f"the adapter at {adapter.path} has rank {adapter.rank}, not lora_rank={rank}")
    if alpha is not None and not math.isclose(alpha / adapter.rank, adapter.scale, rel_tol=1e-9):
        raise AdapterError(f"the adapter at {adapter.path} has scale {adapter.scale:g} (lora_alpha={adapter.alpha:g} "
                           f"at rank {adapter.rank}), lora_alpha={alpha:g} gives {alpha / adapter.rank:g}")
    if targets is not None:
        want, have = _expected_weights(model.config, targets), adapter.weights()
        if want != have:
            names = [n for n in IN_DIMS if n in {_weight_targets(model.config)[k] for k in want}]
            raise AdapterError(f"the adapter at {adapter.path} adapts {list(adapter.targets)}, "
                               f"lora_targets={targets!r} adapts {names}")
    add_lora(model, rank=adapter.rank, alpha=adapter.alpha, targets=",".join(adapter.targets), mesh=mesh, rules=rules)
    variables = _paths(lora_params(model))
    if set(variables) != set(adapter.values):  # read_peft_adapter checked this against the same add_lora
        raise AssertionError(f"adapter variables differ: {sorted(set(variables) ^ set(adapter.values))[:4]}")
    for key, var in variables.items():
        value, current = adapter.values[key].astype(jnp.dtype(var.dtype)), var[...]
        if not current.committed:  # as add_lora left it (no mesh): a committed copy would compile forwards anew
            var[...] = jnp.asarray(value)
        else:
            var[...] = jax.make_array_from_callback(value.shape, current.sharding, lambda idx, v=value: v[idx])
    return model
