"""Hugging Face checkpoints: `from_pretrained` and `save_pretrained` (config.json + safetensors, never pickle).

Example:
    >>> import tempfile, jax.numpy as jnp
    >>> from flax import nnx
    >>> from r1jax.models import Transformer, get_preset, from_pretrained, save_pretrained
    >>> path = tempfile.mkdtemp()
    >>> save_pretrained(Transformer(get_preset("tiny_llama"), rngs=nnx.Rngs(0)), path)
    >>> model = from_pretrained(path, dtype="float32")
    >>> model(jnp.zeros((1, 4), jnp.int32)).shape
    (1, 4, 256)

With a mesh, every parameter is created already sharded: each device's shard is read straight from the
safetensors files (only the layers, experts and rows it holds), so no host holds a full copy of the model.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from r1jax.models.config import ModelConfig
from r1jax.models.hf_mapping import Source, config_from_hf, config_to_hf, is_ignored, param_sources
from r1jax.models.transformer import Transformer
from r1jax.parallel import hosts
from r1jax.parallel.rules import logical_to_spec
from r1jax.parallel.sharding import validate_layout

_FP8_BLOCK = 128


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: names the file or tensor and what was expected."""


class CheckpointReader:
    """Lazy reader over single or sharded safetensors files; reads whole tensors or slices of them."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory {self.path} does not exist")
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            weight_map = None
        if not files:
            pickles = [p.name for p in self.path.glob("*.bin")] + [p.name for p in self.path.glob("*.pt*")]
            hint = f" (found {pickles}: pickle checkpoints are never read; convert them to safetensors)" if pickles \
                else ""
            raise CheckpointError(f"no *.safetensors files in {self.path}{hint}")
        self._handles = {}
        self.file_of: dict[str, str] = {}
        for fname in files:
            handle = self._open(fname)
            for name in handle.keys():
                self.file_of[name] = fname
        if weight_map is not None:
            missing = sorted(n for n, f in weight_map.items() if self.file_of.get(n) != f)
            if missing:
                raise CheckpointError(f"{index} lists tensors not found in their files, e.g. {missing[:5]}")

    def _open(self, fname: str):
        if fname not in self._handles:
            fpath = self.path / fname
            if not fpath.exists():
                raise CheckpointError(f"checkpoint file {fpath} is missing (listed in the index)")
            try:
                self._handles[fname] = safe_open(str(fpath), framework="np")
            except SafetensorError as e:
                raise CheckpointError(f"cannot read {fpath}: {e} (truncated or corrupt file?)") from None
        return self._handles[fname]

    def names(self) -> set[str]:
        return set(self.file_of)

    def shape(self, name: str) -> tuple:
        return tuple(self._open(self.file_of[name]).get_slice(name).get_shape())

    def read(self, name: str, slices: tuple[slice, ...] | None = None) -> np.ndarray:
        """The tensor (or its [slices]) as numpy; FP8 weights with `<name>_scale_inv` block scales are dequantized."""
        handle = self._open(self.file_of[name])
        tensor = handle.get_slice(name)
        shape = tuple(tensor.get_shape())
        slices = tuple(slice(None) for _ in shape) if slices is None else slices
        slices = tuple(slice(*s.indices(n)[:2]) for s, n in zip(slices, shape))
        try:
            if tensor.get_dtype().startswith("F8_"):
                out = self._read_fp8(name, tensor.get_dtype(), shape)[slices]
            else:
                out = np.asarray(tensor[slices])
        except Exception as e:  # a file shorter than its header says
            raise CheckpointError(f"cannot read tensor {name!r} from {self.path / self.file_of[name]}: {e}") from None
        scale_name = name + "_scale_inv"
        if scale_name in self.file_of and out.ndim == 2:
            out = self._dequantize(out, scale_name, slices)
        return out

    def _read_fp8(self, name, dtype, shape):
        """numpy has no float8; map the raw bytes with ml_dtypes (header layout from the safetensors spec)."""
        fpath = self.path / self.file_of[name]
        with open(fpath, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            begin, _ = json.loads(f.read(n))[name]["data_offsets"]
        np_dtype = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}[dtype]
        return np.memmap(fpath, dtype=np_dtype, mode="r", offset=8 + n + begin, shape=shape)

    def _dequantize(self, block, scale_name, slices):
        (r0, r1), (c0, c1) = [(s.start, s.stop) for s in slices]
        b = _FP8_BLOCK
        scale = self.read(scale_name, (slice(r0 // b, -(-r1 // b)), slice(c0 // b, -(-c1 // b))))
        scale = np.repeat(np.repeat(scale.astype(np.float32), b, 0), b, 1)
        scale = scale[r0 - (r0 // b) * b:, c0 - (c0 // b) * b:][: r1 - r0, : c1 - c0]
        return block.astype(np.float32) * scale


# ------------------------------------------------------------------------------------------------------------------
# reading one parameter (or one shard of it)


def _norm(index, shape):
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def _view_groups(hf_shape, view):
    """For each checkpoint dim, the consecutive view dims it splits into."""
    groups, v = [], 0
    for n in hf_shape:
        group, prod = [v], view[v]
        v += 1
        while prod < n:
            group.append(v)
            prod *= view[v]
            v += 1
        if prod != n:
            raise CheckpointError(f"view {view} does not split checkpoint shape {hf_shape}")
        groups.append(group)
    if v != len(view):
        raise CheckpointError(f"view {view} does not split checkpoint shape {hf_shape}")
    return groups


def _read_tensor_block(reader: CheckpointReader, name: str, src: Source, t_index: tuple) -> np.ndarray:
    """Reads transformed-tensor block `t_index` of one checkpoint tensor, touching only the rows it needs."""
    view = src.view_shape
    # Undo the transpose, then the select, to get the block in view coordinates.
    v_index = [slice(None)] * len(view)
    perm = src.perm or tuple(range(len(view)))
    for t_dim, v_dim in enumerate(perm):
        v_index[v_dim] = t_index[t_dim]
    sel_sizes = src.transformed_shape()
    sel_sizes = [sel_sizes[perm.index(v)] for v in range(len(view))]
    v_index = list(_norm(v_index, sel_sizes))
    if src.select is not None:
        for d, s in enumerate(_norm(src.select, view)):
            v_index[d] = slice(s.start + v_index[d].start, s.start + v_index[d].stop)
    # Checkpoint dims: read whole inner view dims, only the needed range of the outermost one.
    hf_slices, block_view, inner = [], [], []
    for hf_dim, group in enumerate(_view_groups(src.hf_shape, view)):
        first = v_index[group[0]]
        rest = int(np.prod([view[v] for v in group[1:]], dtype=np.int64))
        hf_slices.append(slice(first.start * rest, first.stop * rest))
        block_view += [first.stop - first.start] + [view[v] for v in group[1:]]
        inner += [slice(None)] + [v_index[v] for v in group[1:]]
    block = reader.read(name, tuple(hf_slices)).reshape(block_view)[tuple(inner)]
    return block.transpose(perm) if src.perm is not None else block


def read_param(reader: CheckpointReader, src: Source, index: tuple | None, shape: tuple, dtype) -> np.ndarray:
    """Parameter block `index` (a tuple of slices over `shape`, None for all) assembled from the checkpoint."""
    index = _norm(index or tuple(slice(None) for _ in shape), shape)
    grid_nd = src.names.ndim
    g_index, t_index = index[:grid_nd], index[grid_nd:]
    names = src.names[g_index] if grid_nd else src.names
    out_shape = tuple(s.stop - s.start for s in index)
    out = np.empty(out_shape, dtype=dtype)
    for cell in np.ndindex(names.shape):
        name = names[cell]
        if name not in reader.file_of:
            if not src.optional:
                raise CheckpointError(f"missing tensor {name!r} (expected shape {src.hf_shape})")
            out[cell] = 0
            continue
        out[cell] = _read_tensor_block(reader, name, src, t_index).astype(dtype)
    return out


def _validate(reader: CheckpointReader, sources: dict[tuple, Source], cfg: ModelConfig, strict: bool):
    names = reader.names()
    expected = set()
    missing, wrong = [], []
    for src in sources.values():
        for name in src.names.reshape(-1):
            expected.add(name)
            if name not in names:
                if not src.optional:
                    missing.append(f"{name} {src.hf_shape}")
            elif reader.shape(name) != tuple(src.hf_shape):
                wrong.append(f"{name}: checkpoint {reader.shape(name)}, expected {tuple(src.hf_shape)}")
    extra = sorted(n for n in names - expected if not is_ignored(n, cfg) and not n.endswith("_scale_inv"))
    problems = []
    if wrong:
        problems.append(f"{len(wrong)} mis-shaped tensors: " + "; ".join(sorted(wrong)[:10]))
    if missing:
        problems.append(f"{len(missing)} missing tensors, e.g. " + ", ".join(sorted(missing)[:10]))
    if extra and strict:
        problems.append(f"{len(extra)} unexpected tensors, e.g. " + ", ".join(extra[:10]) +
                        " (pass strict=False to ignore them)")
    if problems:
        raise CheckpointError(f"checkpoint {reader.path} does not match the {cfg.family} config: " +
                              " | ".join(problems))


def read_config(path: str | Path, **overrides) -> ModelConfig:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"no config.json in {path}")
    try:
        hf = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
    return config_from_hf(hf, **overrides)


def _state_paths(state) -> dict[tuple, object]:
    return {tuple(str(k) for k in path): var for path, var in nnx.to_flat_state(state)}


def from_pretrained(path: str | Path, *, dtype: str = "bfloat16", param_dtype: str | None = None, mesh=None,
                    rules="fsdp", load_mtp: bool = True, strict: bool = True, **config_overrides) -> Transformer:
    """Loads a Hugging Face checkpoint directory (config.json + safetensors) into a `Transformer`.

    dtype: compute dtype (and parameter dtype unless `param_dtype` is given). mesh/rules: create each parameter
    sharded by its logical axes. load_mtp: keep DeepSeek-V3's multi-token-prediction modules if present.
    strict: unexpected tensors are an error. Extra keyword arguments override ModelConfig fields.
    """
    reader = CheckpointReader(path)
    cfg = read_config(path, dtype=dtype, param_dtype=param_dtype or dtype, **config_overrides)
    if cfg.family == "deepseek_v3" and load_mtp and "mtp_num_layers" not in config_overrides:
        hf = json.loads((Path(path) / "config.json").read_text())
        n_mtp = hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0
        present = f"model.layers.{cfg.num_layers}.eh_proj.weight" in reader.file_of
        cfg = cfg.replace(mtp_num_layers=n_mtp if present else 0)
    return load_weights(reader, cfg, mesh=mesh, rules=rules, strict=strict)


def uses_fused_experts(reader: CheckpointReader) -> bool:
    return any(n.endswith("mlp.experts.gate_up_proj") for n in reader.names())


def load_weights(reader: CheckpointReader, cfg: ModelConfig, *, mesh=None, rules="fsdp", strict=True,
                 module_fn=None, sources: dict | None = None):
    """Reads `reader` into `module_fn()` (default: `Transformer(cfg)`), whose parameter paths `sources` maps to
    checkpoint tensors (default: `param_sources(cfg)`); other modules, e.g. a reward model, pass both."""
    if sources is None:
        sources = param_sources(cfg, fused_experts=uses_fused_experts(reader))
    _validate(reader, sources, cfg, strict)
    if mesh is not None:  # before reading anything: a dimension the mesh cannot split is named, with sizes that fit
        validate_layout(cfg, mesh, rules)
    abstract = nnx.eval_shape(module_fn or (lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    values = []
    for path, var in flat:
        key = tuple(str(k) for k in path)
        if key not in sources:
            raise AssertionError(f"no checkpoint source for parameter {key}")
        src, shape, dt = sources[key], var.shape, var.dtype
        np_dt = ml_dtypes.bfloat16 if dt == jnp.bfloat16 else np.dtype(dt)
        if mesh is None:
            arr = jnp.asarray(read_param(reader, src, None, shape, np_dt))
        else:
            sharding = jax.sharding.NamedSharding(mesh, logical_to_spec(var.get_metadata()["axes"], rules, mesh))
            arr = jax.make_array_from_callback(
                shape, sharding, lambda idx, src=src, shape=shape, np_dt=np_dt: read_param(reader, src, idx, shape,
                                                                                          np_dt))
        values.append((path, var.replace(arr)))
    return nnx.merge(graphdef, nnx.from_flat_state(values))


# ------------------------------------------------------------------------------------------------------------------
# saving


class CheckpointTensors(Mapping):
    """A module's parameters as checkpoint tensors (name -> numpy array in the hub layout), each computed when it is
    read: one parameter cell is sliced and cast on its devices, then fetched. A checkpoint written from this holds
    one file's tensors on the host at a time, not the model twice over. `sources` maps the parameter paths of a
    module other than `Transformer` (e.g. a reward model). On a mesh that spans processes every read is a
    collective: every process reads the same names in the same order (`write_checkpoint` does)."""

    def __init__(self, model, dtype: str | None = None, sources: dict | None = None):
        cfg = model.config
        sources = param_sources(cfg) if sources is None else sources
        self._dtype = None if dtype is None else jnp.dtype(dtype)
        _, state = nnx.split(model)
        self._values = {tuple(str(k) for k in path): var[...] for path, var in nnx.to_flat_state(state)}
        self._pieces: dict[str, list[tuple[tuple, tuple, Source]]] = {}
        self._src: dict[str, Source] = {}
        for key, value in self._values.items():
            src = sources[key]
            if not src.saved:
                if np.any(hosts.fetch(value)):
                    raise ValueError(f"{'.'.join(key)} is non-zero but {cfg.family} checkpoints have no such tensor "
                                     f"(moe.bias_update_rate > 0 trained an aux-loss-free routing bias); saving "
                                     f"would drop it and change the routing. Keep the r1jax (orbax) checkpoint.")
                continue
            for cell in np.ndindex(src.names.shape):
                self._pieces.setdefault(src.names[cell], []).append((key, cell, src))
                self._src[src.names[cell]] = src
        self._alias: dict[str, str] = {}
        if cfg.mtp_num_layers:  # the hub layout repeats the shared embedding and head in each MTP module
            head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
            for k in range(cfg.mtp_num_layers):
                self._alias[f"model.layers.{cfg.num_layers + k}.embed_tokens.weight"] = "model.embed_tokens.weight"
                self._alias[f"model.layers.{cfg.num_layers + k}.shared_head.head.weight"] = head
        self.collective = any(isinstance(v, jax.Array) and not v.is_fully_addressable for v in self._values.values())

    def __iter__(self):
        return iter([*self._pieces, *self._alias])

    def __len__(self):
        return len(self._pieces) + len(self._alias)

    def __contains__(self, name):
        return name in self._pieces or name in self._alias

    def nbytes(self, name: str) -> int:
        """The tensor's size in the checkpoint, without computing it."""
        name = self._alias.get(name, name)
        key = self._pieces[name][0][0]
        dtype = self._dtype or self._values[key].dtype
        return math.prod(self._src[name].hf_shape) * jnp.dtype(dtype).itemsize

    def __getitem__(self, name: str) -> np.ndarray:
        name = self._alias.get(name, name)
        src, buf = self._src[name], None
        for key, cell, piece in self._pieces[name]:
            value = self._values[key]
            block = hosts.fetch(_take_cell(value, np.asarray(cell, np.int32), self._dtype or value.dtype))
            if piece.perm is not None:
                block = block.transpose(np.argsort(piece.perm))
            if piece.select is None and len(self._pieces[name]) == 1:
                return np.ascontiguousarray(block.reshape(src.hf_shape))
            if buf is None:
                buf = np.zeros(src.view_shape, dtype=block.dtype)
            buf[piece.select if piece.select is not None else ...] = block
        return np.ascontiguousarray(buf.reshape(src.hf_shape))


@functools.partial(jax.jit, static_argnames="dtype")
def _take_cell(value, cell, dtype):
    """value[cell] cast to dtype, on value's devices (the cell index is traced: one compile per parameter shape)."""
    return value[tuple(cell)].astype(dtype) if cell.shape[0] else value.astype(dtype)


def hf_tensors(model: Transformer, dtype=None, sources: dict | None = None) -> dict[str, np.ndarray]:
    """Every checkpoint tensor at once (`CheckpointTensors` computes them one at a time)."""
    return dict(CheckpointTensors(model, dtype, sources))


def save_pretrained(model: Transformer, path: str | Path, *, dtype: str | None = None,
                    max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes config.json and safetensors (sharded with an index past `max_shard_bytes`) that transformers loads.
    The host holds one file's tensors at a time; on a mesh over several processes every process calls this and
    process 0 writes."""
    hf_cfg = config_to_hf(model.config)
    if dtype is not None:
        hf_cfg["torch_dtype"] = dtype
    write_checkpoint(path, CheckpointTensors(model, dtype), hf_cfg, max_shard_bytes=max_shard_bytes)


def write_checkpoint(path: str | Path, tensors: Mapping[str, np.ndarray], hf_cfg: dict, *,
                     max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes `tensors` as (sharded) safetensors and `hf_cfg` as config.json (process 0 writes). Files are filled
    in name order and each file's tensors are read just before it is written, so a `CheckpointTensors` costs one
    file of host memory."""
    path = Path(path)
    if isinstance(tensors, CheckpointTensors):
        nbytes = tensors.nbytes
        if jax.process_index() != 0 and not tensors.collective:
            return
    else:
        nbytes = lambda name: tensors[name].nbytes  # noqa: E731
    writer = jax.process_index() == 0
    if writer:
        path.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], [], 0
    for name in sorted(tensors):
        if current and size + nbytes(name) > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes(name)
    shards.append(current)
    fnames = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, names in zip(fnames, shards):
        shard = {n: tensors[n] for n in names}  # on every process: a collective read for a multi-process mesh
        if writer:
            save_file(shard, str(path / fname), metadata={"format": "pt"})
        del shard
    if not writer:
        return
    if len(shards) > 1:
        weight_map = {n: f for f, names in zip(fnames, shards) for n in names}
        total = int(sum(nbytes(n) for names in shards for n in names))
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(hf_cfg, indent=2))


def param_count(cfg: ModelConfig) -> int:
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
