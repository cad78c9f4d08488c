"""A GRPO rollout across processes, checked from inside: run by tests/test_multihost.py on 2 processes x 2 CPU
devices (launch/local_multiprocess.sh). Each process loads its own prompts (its data shard, of another length
bucket than the other process's); the sampler runs over the 4-device mesh. Checks, on every process:
  - its rows are its own prompts' greedy samples (equal to sampling them alone on one local device),
  - (sampled) its rows' rewards are its own completions' scores, and advantages are over the whole batch,
  - metrics are the whole batch's, identical on every process,
  - the batch assembles into global arrays (shard_batch),
  - the host helpers: concat of unequal row counts, concat_objects, process_max, and process_rows: its own
    sampled rows from its own devices (also with compaction, which samples the same rows), and the right rows by
    a fetch when the layout is not process-major,
  - evaluation: every process samples every problem and scores its share; pass@1 is over all rows; a resumed
    evaluation follows process 0's progress file,
  - a Hugging Face export of a model split over both processes equals the local model's (process 0 writes),
  - an LLM judge on every process's texts gives the verdicts it gives on one local device,
  - a stop signal that reaches one process stops every process at the same step.
Prints one JSON line and exits 0, or fails an assertion."""

import json

from r1jax.parallel import initialize

initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from r1jax.configs import grpo_stage  # noqa: E402
from r1jax.data import ByteTokenizer, get_task, rl_prompt_dataset  # noqa: E402
from r1jax.models import Transformer, get_preset  # noqa: E402
from r1jax.parallel import hosts, make_mesh, shard_batch, shard_model  # noqa: E402
from r1jax.rl.grpo import group_advantages  # noqa: E402
from r1jax.rl.rewards import register_reward  # noqa: E402
from r1jax.rl.rollout import rollout, score  # noqa: E402
from r1jax.sampling import generate  # noqa: E402

pid, pc = jax.process_index(), jax.process_count()
assert pc == 2 and jax.device_count() == 4, (pc, jax.device_count())

# host helpers
assert hosts.concat(np.arange(pid + 1)).tolist() == [0, 0, 1]
assert hosts.concat_objects([{"p": pid}] * (pid + 1)) == [{"p": 0}, {"p": 1}, {"p": 1}]
assert hosts.process_max(pid + 7) == 8 and hosts.process_min(pid + 7) == 7

tok = ByteTokenizer()
G, N, B = 2, 8, 2
# Process 1's problems are longer, so its prompts land in a wider bucket than process 0's.
task = get_task("arithmetic", n=B, seed=pid, num_digits=1 + 2 * pid, num_ops=(1 + pid, 1 + pid))
prompts = next(iter(rl_prompt_dataset(task, tok, batch_size=B, group_size=G, template="plain", shuffle=False,
                                      max_prompt_len=64)))
config = get_preset("tiny_qwen2")
mesh = make_mesh(data=-1)
model = shard_model(Transformer(config, rngs=nnx.Rngs(0)), mesh, "fsdp")


@register_reward("test_checksum")
def checksum(completion, example, **_):
    """A reward that varies between a random model's completions (accuracy and format are all 0 here)."""
    return float(sum(completion.encode()) % 3)


widths = hosts.concat(np.array([prompts["prompt_ids"].shape[1]]))
assert widths[0] < widths[1], widths
cfg = grpo_stage(group_size=G, max_new_tokens=N, temperature=0.0, reward_workers=1,
                 rewards={"accuracy": 1.0, "test_checksum": 1.0})
batch, metrics, rows = rollout(model, tok, prompts, cfg, jax.random.key(0), mesh=mesh, rules="fsdp")
assert batch["tokens"].shape[0] == B * G

# Its own prompts' greedy samples, on one local device.
local = Transformer(config, rngs=nnx.Rngs(0))
own = [list(ids[m.astype(bool)]) for ids, m in zip(prompts["prompt_ids"][::G], prompts["prompt_mask"][::G])]
alone = generate(local, own, num_samples=G, max_new_tokens=N, temperature=0.0, eos_id=tok.eos_id, pad_id=0)
lengths = batch["completion_mask"].sum(1)
np.testing.assert_array_equal(lengths, alone.lengths)
for row in range(B * G):
    np.testing.assert_array_equal(batch["tokens"][row, -N:][:lengths[row]], alone.tokens[row, :lengths[row]])

# Sampled (temperature 1): its own rewards; advantages over the whole batch.
cfg.temperature = 1.0
batch, metrics, rows = rollout(model, tok, prompts, cfg, jax.random.key(1), mesh=mesh, rules="fsdp")
lengths = batch["completion_mask"].sum(1)
totals, own_parts, own_texts = score(tok, batch["tokens"][:, -N:], lengths, prompts["examples"], cfg.rewards.to_dict(),
                             timeout_s=1.0, num_workers=1)
assert own_texts == [row["completion"] for row in rows]
np.testing.assert_allclose([row["reward"] for row in rows], batch["rewards"], rtol=1e-6)
for name, values in own_parts.items():  # each row's components are its own, not another process's rows'
    np.testing.assert_allclose([row[f"reward/{name}"] for row in rows], values, rtol=1e-6)
np.testing.assert_allclose(batch["rewards"], totals, rtol=1e-6)
all_rewards = hosts.concat(batch["rewards"])
all_advantages = hosts.concat(batch["advantages"])
np.testing.assert_allclose(all_advantages, np.asarray(group_advantages(all_rewards, G)), rtol=1e-5, atol=1e-6)
assert np.ptp(all_advantages) > 0, all_rewards

# Whole-batch metrics, the same on both processes.
all_lengths = hosts.concat(lengths)
assert metrics["completion_len"] == float(all_lengths.mean()) and metrics["generated_tokens"] == all_lengths.sum()
assert np.isclose(metrics["reward"], float(np.mean(all_rewards)))
gathered = hosts.concat(np.array([[metrics["reward"], metrics["completion_len"]]]))
assert (gathered[0] == gathered[1]).all(), gathered

# Process 1's prompts are wider: both padded to the same columns, and the batch assembles.
assert hosts.concat(np.array([batch["tokens"].shape[1]])).tolist() == [batch["tokens"].shape[1]] * 2
placed = shard_batch({k: batch[k] for k in ("tokens", "mask", "advantages")}, mesh, "fsdp")
assert placed["tokens"].shape == (pc * B * G, batch["tokens"].shape[1])
# Each process reads its own rows from its own devices when the sampler's rows lie process-major (the mesh
# above), and fetches the whole array otherwise (devices in the other process order; columns split).
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from r1jax.rl.rollout import sample_group  # noqa: E402

all_ids, all_mask = (hosts.concat(x) for x in
                     (prompts["prompt_ids"][::G][:, -8:], prompts["prompt_mask"][::G][:, -8:].astype(bool)))
sampled = sample_group(model, all_ids, all_mask, group_size=G, max_new_tokens=N, temperature=1.0, top_p=1.0,
                       top_k=0, eos_ids=[tok.eos_id], pad_id=0, rng=jax.random.key(2), mesh=mesh, rules="fsdp")
rows = B * G
whole = hosts.fetch(sampled[0])
assert hosts.holds_process_rows(sampled[0], rows) and hosts.holds_process_rows(sampled[2], rows)
np.testing.assert_array_equal(hosts.process_rows(sampled[0], rows), whole[pid * rows:(pid + 1) * rows])
# Compaction (most rows end early here) samples the same rows and leaves them on their processes' devices.
tail = dict(group_size=G, max_new_tokens=N, temperature=1.0, top_p=1.0, top_k=0, pad_id=0, rng=jax.random.key(4),
            eos_ids=list(range(3, 3 + config.vocab_size // 4)), mesh=mesh, rules="fsdp")
plain, compacted = (sample_group(model, all_ids, all_mask, compact=c, **tail) for c in (0, 2))
assert np.median(hosts.fetch(plain[1])) < N, hosts.fetch(plain[1])
for a, b in zip(plain, compacted):
    assert hosts.holds_process_rows(b, rows)
    np.testing.assert_allclose(hosts.process_rows(b, rows), hosts.process_rows(a, rows), atol=1e-4)
values = np.arange(pc * rows * 4, dtype=np.float32).reshape(pc * rows, 4)
swapped = jax.sharding.Mesh(np.asarray(jax.devices())[[2, 3, 0, 1]], ("x",))
for mesh_, spec in ((swapped, PartitionSpec("x")), (make_mesh(data=-1), PartitionSpec(None, "data"))):
    spread_ = jax.make_array_from_callback(values.shape, NamedSharding(mesh_, spec), lambda i: values[i])
    assert not hosts.holds_process_rows(spread_, rows)
    np.testing.assert_array_equal(hosts.process_rows(spread_, rows), values[pid * rows:(pid + 1) * rows])
# Evaluation: every process samples every problem, each scores its share; the metrics are all rows'.
from r1jax.eval.run import decode_completions, encode_prompts, evaluate  # noqa: E402
from r1jax.rl.rewards import score_batch  # noqa: E402

problems = get_task("arithmetic", n=6, seed=5)  # the same on both processes
ev = evaluate(model, tok, problems, k=2, template="plain", temperature=1.0, max_new_tokens=N, seed=3, mesh=mesh,
              rules="fsdp", reward="test_checksum")
out = generate(model, encode_prompts(tok, problems, "plain"), num_samples=2, max_new_tokens=N, temperature=1.0,
               top_p=0.95, eos_id=tok.eos_id, pad_id=0, seed=3, mesh=mesh, rules="fsdp")
_, parts = score_batch(decode_completions(tok, out.tokens, out.lengths), [p for p in problems for _ in range(2)],
                       {"test_checksum": 1.0}, timeout_s=1.0)
assert ev["pass@1"] == float(np.mean(parts["test_checksum"] > 0.5)) and 0 < ev["pass@1"] < 1, ev
# Resuming from a progress file that only process 0 sees (each process names its own file here, as on disks that
# are not shared): every process follows process 0, skips the batch it holds and samples the rest with it.
import os  # noqa: E402
import tempfile  # noqa: E402

base = os.path.join(tempfile.gettempdir(), "r1jax_mp_" + os.environ["R1JAX_COORDINATOR_ADDRESS"].replace(":", "_"))
own = f"{base}_{pid}.jsonl"
kw = dict(k=2, template="plain", temperature=1.0, max_new_tokens=N, seed=3, mesh=mesh, rules="fsdp",
          reward="test_checksum", batch_size=2)
full = evaluate(model, tok, problems, progress=own, **kw)
assert os.path.exists(own) == (pid == 0)
if pid == 0:
    lines = open(own).read().splitlines()
    open(own, "w").write("\n".join(lines[:2]) + "\n")  # the header and the first of 3 batches
resumed = evaluate(model, tok, problems, progress=own, **kw)
assert resumed == full, (resumed, full)
if pid == 0:
    os.remove(own)
# A Hugging Face export of a model split over both processes (fsdp over 4 devices): every process reads each
# file's tensors (a collective), process 0 writes them, and the files equal the local model's export.
from r1jax.models import save_pretrained  # noqa: E402

split = shard_model(Transformer(config, rngs=nnx.Rngs(0)), make_mesh(fsdp=-1), "fsdp")
assert not split.embed.embedding[...].is_fully_addressable
save_pretrained(split, base + "_hf_mesh", max_shard_bytes=100_000)
if pid == 0:
    save_pretrained(local, base + "_hf_local", max_shard_bytes=100_000)
    names = sorted(os.listdir(base + "_hf_local"))
    assert len(names) > 3 and names == sorted(os.listdir(base + "_hf_mesh")), names
    for name in names:
        a, b = (open(os.path.join(base + d, name), "rb").read() for d in ("_hf_local", "_hf_mesh"))
        assert a == b, name
    import shutil  # noqa: E402

    shutil.rmtree(base + "_hf_local"), shutil.rmtree(base + "_hf_mesh")
# An LLM judge (a model reward) on the whole batch's texts: the same verdicts as judging them on one local device.
from r1jax.rl.judge import Judge  # noqa: E402

all_texts, all_examples = hosts.concat_objects(own_texts), hosts.concat_objects(prompts["examples"])
assert len(all_texts) == len(all_examples) == pc * B * G
spread = Judge(model, tok, max_new_tokens=3, mesh=mesh, rules="fsdp")(all_texts, all_examples)[1]["outputs"]
alone = Judge(local, tok, max_new_tokens=3)(all_texts, all_examples)[1]["outputs"]
assert spread == alone and all(isinstance(o, str) for o in spread), (spread, alone)
# A stop signal that reaches one process stops both at the same check (each check is a collective).
import signal  # noqa: E402

from r1jax.training import StopFlag  # noqa: E402

flag, stopped_at = StopFlag(), None
for i in range(6):
    if pid == 1 and i == 3:
        flag._handle(signal.SIGTERM, None)  # process 1 alone is signalled
    if flag:
        stopped_at = i
        break
    hosts.concat(np.array([i]))  # a collective per step, as a training step has
assert stopped_at == 3, stopped_at
print(json.dumps({"process_index": pid, "rollout": "ok", "prompt_columns": int(batch["tokens"].shape[1] - N),
                  "reward": metrics["reward"]}))
