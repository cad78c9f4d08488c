"""The `r1jax` command.

    r1jax train   --config experiments/X.py[:variant] --workdir DIR [--config.a.b=value ...] [--dry_run|--check_data]
    r1jax sample  --model DIR [--tokenizer PATH] --prompt TEXT [--num_samples 4 --max_new_tokens 128 ...]
    r1jax eval    --model DIR [--tokenizer PATH] --data FILE|TASK [--k 4 --max_new_tokens 512 ...]
    r1jax convert --to_hf --workdir DIR --stage NAME --out DIR        (r1jax stage weights -> Hugging Face)
    r1jax convert --from_hf DIR --out DIR                             (Hugging Face -> r1jax parameters)
    r1jax plot    DIR [--out FILE.png]
    r1jax inspect --data FILE|TASK [--template T --tokenizer PATH --reward R --max_prompt_len N --show 2]
                  [--decontaminate aime,math500 --out CLEAN.jsonl]

`--model` is a Hugging Face checkpoint directory, or a stage directory of a workdir (WORKDIR/<stage>, whose
weights are read with the run's config and tokenizer). `sample` and `eval` run on a mesh over every device (of every
process): `--mesh data=-1` (the default for a checkpoint: weights replicated, rows split), `--mesh fsdp=-1` or
`--mesh data=2,tensor=4` for a model one device cannot hold, with `--rules` choosing the sharding preset.
Re-running `train` with the same workdir resumes. `train --check_data` does what a run does before its first stage
(tasks, tokenizer, every stage's data checks) and stops, so a pod job does not find a bad prompt set after startup.
`inspect` shows what a dataset looks like to a run before one starts (r1jax.data.describe): counts, fields, sources,
gold kinds, whether --reward judges every problem, prompt tokens under --template with --tokenizer, the problems
--decontaminate's evaluation sets contaminate (--out writes the others), and the first --show prompts as the model
reads them; it exits 1 when the reward or the template cannot take every problem.
`train --dry_run` checks the config for its `config.hardware` on this machine instead (r1jax.pipeline.dry_run:
abstract mesh, shardings, lowering for the target platform, memory per device; no files, no weights) and writes
WORKDIR/dry_run.json when --workdir is given.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

from absl import app, flags

from r1jax.cli_flags import _CONFIG, FLAGS, UsageError  # defined once, even when this file runs as __main__

COMMANDS = ("train", "sample", "eval", "convert", "plot", "inspect")

_ADDED_KEYS: list[str] = []  # check_overrides' new-key overrides, applied once the config is loaded


def _config_key_paths(cfg, prefix="config") -> dict[str, object]:
    out = {}
    for k in cfg.keys():
        v = cfg[k]
        path = f"{prefix}.{k}"
        out[path] = v
        if hasattr(v, "keys") and hasattr(v, "to_dict"):
            out.update(_config_key_paths(v, path))
    return out


# Config dicts whose keys are names the user picks: rule-reward weights, options and schedules, model-config fields,
# task options and an evaluate stage's dataset options. `--config.<dict>.<new key>=value` adds the key (ml_collections
# refuses keys a config lacks), so a reward can join a run, or a sweep, from the command line. The stage checks and
# the model / task builders still refuse names that mean nothing (an unregistered reward, an unknown model field).
OPEN_DICTS = tuple(re.compile(p) for p in (
    r"config\.[^.]+\.rewards\.[^.]+",
    r"config\.[^.]+\.reward_kwargs\.[^.]+\.[^.]+",
    r"config\.[^.]+\.eval\.reward_kwargs\.[^.]+",  # the evaluation's one reward's options
    r"config\.[^.]+\.reward_schedule\.[^.]+\.[^.]+",
    r"config\.(?:[^.]+\.)?model\.overrides\.[^.]+(?:\.[^.]+)?",
    r"config\.task\.(?:train|test)(?:\.[^.]+)+",  # a mixture's parts nest: task.train.parts.<label>.<option>
    r"config\.[^.]+\.dataset_options\.[^.]+\.[^.]+",
))


def check_overrides(argv: list[str]) -> list[str]:
    """Rejects `--config.a.b=...` naming a key the config does not have, listing the valid keys at that level
    (ml_collections would reject it too, but without saying what is valid). Returns the overrides that add a key
    to an OPEN_DICTS dict (`--config.a.b=VALUE` arguments): ml_collections cannot apply them, `add_config_keys`
    does."""
    cfg_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if cfg_arg is None and "--config" in argv:
        i = argv.index("--config")
        cfg_arg = argv[i + 1] if i + 1 < len(argv) else None
    overrides = [a for a in argv if a.startswith("--config.")]
    if not overrides or cfg_arg is None:
        return []
    from ml_collections.config_flags import config_flags as cf

    path, _, variant = cfg_arg.partition(":")
    if not Path(path).exists():
        raise UsageError(f"--config {path}: no such file")
    module = cf._LoadConfigModule(f"{path}_check", path)
    cfg = module.get_config(variant) if variant else module.get_config()
    keys = _config_key_paths(cfg)
    added = []
    for arg in overrides:
        name = arg[2:].split("=", 1)[0]
        if name in keys:
            continue
        parent = name.rsplit(".", 1)[0]
        while parent not in keys and parent != "config":
            parent = parent.rsplit(".", 1)[0]
        level = cfg if parent == "config" else keys[parent]
        if any(p.fullmatch(name) for p in OPEN_DICTS) and (level is cfg or hasattr(level, "keys")):
            if "=" not in arg:
                raise UsageError(f"--{name}: a new key takes its value after '=' (--{name}=VALUE)")
            added.append(arg)
            continue
        valid = sorted(level.keys()) if hasattr(level, "keys") else []
        raise UsageError(f"--{name}: unknown config key; valid keys under {parent}: {', '.join(valid)}")
    return added


_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def parse_value(raw: str):
    """A command-line value for a key without a declared type: a number, True/False/None (any case), or a
    bracketed / quoted Python literal; anything else is the string itself (so 2024-12-31 is a date string, not
    the arithmetic literal_eval would make of it)."""
    s = raw.strip()
    if s.lower() in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[s.lower()]
    if _NUMBER.fullmatch(s) or s[:1] in ("[", "{", "(", "'", '"'):
        try:
            return ast.literal_eval(s)
        except (ValueError, SyntaxError):
            pass
    return raw


def split_options(text: str) -> list[str]:
    """`text` split at the commas outside brackets and quotes: "n=5,num_digits=(1, 3),ops='+,-'" gives three
    KEY=VALUE items, so a value can be any literal `parse_value` reads."""
    items, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(depth - 1, 0)
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return [*items, text[start:]]


def add_config_keys(cfg, added: list[str]) -> None:
    """Applies check_overrides' new-key overrides to the loaded config (values typed by `parse_value`), creating
    the nested dict a `reward_kwargs.<reward>.<arg>` or `overrides.<sub>.<field>` needs."""
    import ml_collections

    with cfg.unlocked():
        for arg in added:
            name, raw = arg[2:].split("=", 1)
            *parents, key = name.split(".")[1:]
            node = cfg
            for p in parents:
                if p not in node:
                    node[p] = ml_collections.ConfigDict()
                node = node[p]
            node[key] = parse_value(raw)


# ---------------------------------------------------------------------------------------------------------------
# commands


def cmd_train(argv):
    from r1jax.pipeline.stages import run
    from r1jax.training import StopFlag

    cfg = _CONFIG.value
    if cfg is not None and _ADDED_KEYS:
        add_config_keys(cfg, _ADDED_KEYS)
    if cfg is not None and FLAGS.dry_run:
        return _dry_run(cfg)
    if cfg is None or not FLAGS.workdir:
        raise UsageError("train needs --config FILE[:variant] and --workdir DIR")
    if FLAGS.check_data:
        try:
            result = run(cfg, FLAGS.workdir, check_data=True)
        except (ValueError, FileNotFoundError) as e:
            print(f"r1jax train --check_data: {e}", file=sys.stderr)
            return 1
        print(f"data ok for stages {result['checked']}: {result['tasks']} problems, tokenizer of "
              f"{result['vocab_size']} ids")
        return 0
    from r1jax.pipeline.dry_run import check_hardware

    try:
        check_hardware(cfg)
    except ValueError as e:
        raise UsageError(str(e)) from None
    stop = StopFlag().install()
    result = run(cfg, FLAGS.workdir, stop=stop, progress=True)
    if result["stopped"]:
        print(f"stopped by signal during stage {result['stopped_in']!r}; checkpoint saved. Re-run the same command "
              f"to resume.", file=sys.stderr)
        return 0
    for name, summary in result["stages"].items():
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}
        print(f"{name}: {json.dumps(shown)}")
    return 0


def _dry_run(cfg):
    from r1jax.pipeline.dry_run import dry_run
    from r1jax.pipeline.dry_run_report import format_report

    report = dry_run(cfg)
    print(format_report(report, FLAGS["config"].config_filename or ""))
    if FLAGS.workdir:
        out = Path(FLAGS.workdir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "dry_run.json").write_text(json.dumps(report, indent=2, default=str))
    return 0 if report["ok"] else 1


def _rules_flag() -> str | None:
    from r1jax.parallel import PRESETS

    if FLAGS.rules and FLAGS.rules not in PRESETS:
        raise UsageError(f"--rules {FLAGS.rules}: unknown preset; valid: {', '.join(sorted(PRESETS))}")
    return FLAGS.rules or None


def _mesh_flag(default: str):
    """--mesh (or `default`) as a mesh over every device; a bad one is a usage error."""
    from r1jax.parallel import make_mesh, parse_mesh

    try:
        return make_mesh(**parse_mesh(FLAGS.mesh or default))
    except ValueError as e:
        raise UsageError(f"--mesh: {e}") from None


def _mesh_and_rules(default_mesh: str):
    """--mesh (or `default_mesh`) and --rules; without --rules, a tensor axis gets the rules that split the heads and
    MLPs over it (with plain fsdp rules its devices would hold replicated weights)."""
    mesh = _mesh_flag(default_mesh)
    return mesh, _rules_flag() or ("fsdp_tensor" if mesh.shape["tensor"] > 1 else "fsdp")


def _from_pretrained(path, mesh, rules):
    """from_pretrained, with a layout the mesh cannot split as a usage error (checked before any weight is read)."""
    from r1jax.models import from_pretrained
    from r1jax.parallel import LayoutError

    try:
        return from_pretrained(path, dtype=FLAGS.dtype, mesh=mesh, rules=rules)
    except LayoutError as e:
        raise UsageError(f"--mesh / --rules: {e}") from None


def _load_model_and_tokenizer(path: str):
    """An HF checkpoint dir (tokenizer from --tokenizer or the dir), or WORKDIR/<stage> of an r1jax run
    -> (model, tokenizer, mesh, rules), the model on --mesh by --rules (defaults: data=-1 for a checkpoint, the
    run's mesh and rules for a stage)."""
    from r1jax.data import ByteTokenizer, load_tokenizer
    from r1jax.parallel import LayoutError

    path = Path(path)
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        # The checkpoint's own ids: the <think>/<answer> tags read as the text its tokenizer makes of them.
        tok = ByteTokenizer() if FLAGS.tokenizer == "byte" else load_tokenizer(FLAGS.tokenizer or path,
                                                                                add_markers=False)
        mesh, rules = _mesh_and_rules("data=-1")
        return _from_pretrained(path, mesh, rules), tok, mesh, rules
    if (path / "final").exists() and (path.parent / "config.json").exists():
        import ml_collections

        from r1jax import training
        from r1jax.pipeline.stages import setup

        cfg = ml_collections.ConfigDict(json.loads((path.parent / "config.json").read_text()))
        ctx = setup(cfg, path.parent, mesh=_mesh_flag("") if FLAGS.mesh else None, rules=_rules_flag())
        try:
            return training.load_final(ctx, path.name), ctx.tokenizer, ctx.mesh, ctx.rules
        except LayoutError as e:
            raise UsageError(f"--mesh / --rules: {e}") from None
    raise UsageError(f"--model {path}: neither a Hugging Face checkpoint (config.json + safetensors) nor a finished "
                     f"stage directory WORKDIR/<stage> with final/")


def _check_sampling_flags() -> None:
    """--temperature / --top_k / --top_p / --min_p, checked before the model loads."""
    from r1jax.sampling import make_strategy

    try:
        make_strategy(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p, FLAGS.min_p)
    except ValueError as e:
        raise UsageError(f"--{e}") from None


def _template_flag() -> str:
    """--template, checked before the model loads; 'hf' is the chat template of --tokenizer (its directory), else of
    --model."""
    from r1jax.data import check_template
    from r1jax.data.templates import own_template

    # "hf?enable_thinking=false": with template variables
    template = own_template(FLAGS.template, FLAGS.tokenizer if FLAGS.tokenizer not in (None, "byte") else FLAGS.model)
    try:
        check_template(template)
    except KeyError as e:
        raise UsageError(f"--template {FLAGS.template}: {e.args[0]}") from None
    except ValueError as e:
        raise UsageError(f"--template {FLAGS.template}: {e}") from None
    return template


def cmd_sample(argv):
    from r1jax.data import render
    from r1jax.eval import decode_completions, encode_prompts
    from r1jax.sampling import generate

    if not FLAGS.model or FLAGS.prompt is None:
        raise UsageError("sample needs --model DIR and --prompt TEXT")
    _check_sampling_flags()
    template = _template_flag()
    model, tok, mesh, rules = _load_model_and_tokenizer(FLAGS.model)
    ex = {"prompt": FLAGS.prompt}
    prompts = encode_prompts(tok, [ex], template)
    out = generate(model, prompts, num_samples=FLAGS.num_samples, max_new_tokens=FLAGS.max_new_tokens,
                   temperature=FLAGS.temperature, top_p=FLAGS.top_p, top_k=FLAGS.top_k, min_p=FLAGS.min_p,
                   eos_id=tok.stop_ids,
                   pad_id=tok.pad_id or 0, seed=FLAGS.seed, mesh=mesh, rules=rules, compact=FLAGS.compact,
                   speculative=FLAGS.speculative)
    print(render(template, ex))
    for i, text in enumerate(decode_completions(tok, out.tokens, out.lengths)):
        print(f"--- sample {i} ({out.lengths[i]} tokens)\n{text}")
    return 0


def cmd_convert(argv):
    from r1jax.checkpoint import save_params
    from r1jax.models import save_pretrained
    from r1jax.training import copy_tokenizer_files

    if FLAGS.from_hf:
        if not FLAGS.out:
            raise UsageError("convert --from_hf DIR needs --out DIR")
        from flax import nnx

        # Split over every device by default: each reads only its shard, so a model no device holds converts.
        model = _from_pretrained(FLAGS.from_hf, *_mesh_and_rules("fsdp=-1"))
        save_params(FLAGS.out, nnx.state(model))
        print(f"wrote r1jax parameters to {FLAGS.out} (use init='r1jax:{FLAGS.out}' with a matching config.model)")
        return 0
    if FLAGS.to_hf:
        if not (FLAGS.workdir and FLAGS.stage and FLAGS.out):
            raise UsageError("convert --to_hf needs --workdir DIR --stage NAME --out DIR")
        model, *_ = _load_model_and_tokenizer(str(Path(FLAGS.workdir) / FLAGS.stage))
        save_pretrained(model, FLAGS.out)  # one file's tensors on the host at a time
        cfg = json.loads((Path(FLAGS.workdir) / "config.json").read_text())
        files = copy_tokenizer_files(cfg["tokenizer"], Path(FLAGS.workdir), Path(FLAGS.out))
        print(f"wrote a Hugging Face checkpoint to {FLAGS.out}" + (
            f" with the run's {', '.join(f.name for f in files)}" if files else
            " (the run's tokenizer is the byte tokenizer: pass --tokenizer byte to r1jax sample / eval)"))
        return 0
    raise UsageError("convert needs --to_hf or --from_hf DIR")


def cmd_plot(argv):
    from r1jax.logging import plot

    if len(argv) < 1:
        raise UsageError("plot needs the run directory: r1jax plot DIR")
    print(plot(argv[0], FLAGS.out))
    return 0


def _main(argv):
    cmd, rest = argv[1], argv[2:]
    if not FLAGS["verbosity"].present:
        # orbax and jax log every checkpoint at INFO through absl; the progress display and metrics.jsonl say what
        # matters. `-v 0` brings the INFO lines back.
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    if cmd in ("train", "sample", "eval", "convert"):
        from r1jax.parallel import initialize

        initialize()  # jax.distributed from the environment, before any device is touched; no-op for one process
    try:
        if cmd in ("eval", "inspect"):
            from r1jax.cli_eval import cmd_eval, cmd_inspect  # (they read FLAGS, defined here)

            return {"eval": cmd_eval, "inspect": cmd_inspect}[cmd](rest)
        return {"train": cmd_train, "sample": cmd_sample, "convert": cmd_convert, "plot": cmd_plot}[cmd](rest)
    except UsageError as e:
        print(f"r1jax {cmd}: {e}", file=sys.stderr)
        return 2


def run(argv: list[str] | None = None):
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        print(f"r1jax: expected a command, one of {COMMANDS}", file=sys.stderr)
        sys.exit(2)
    try:
        added = check_overrides(argv[2:])
    except (UsageError, ValueError) as e:
        print(f"r1jax {argv[1]}: {e}", file=sys.stderr)
        sys.exit(2)
    _ADDED_KEYS[:] = added
    rest = [a for a in argv[2:] if a not in added]
    if added:  # config_flags also reads the override names from sys.argv
        sys.argv = [argv[0], argv[1], *rest]
    # absl parses flags from argv[1:]; keep the command as a positional argument.
    app.run(_main, argv=[argv[0], argv[1], *rest], flags_parser=_parse_flags)


def _parse_flags(argv):
    try:
        return FLAGS(argv)
    except flags.Error as e:
        print(f"r1jax: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
