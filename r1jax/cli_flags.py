"""The `r1jax` command's flags and its usage error, in a module of their own: `python -m r1jax.cli` runs cli.py as
__main__, and r1jax.cli_eval imports r1jax.cli again, so the flags must not be defined in cli.py."""

from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path.py[:variant]).",
                                          lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics.jsonl, stage outputs).")
flags.DEFINE_string("model", None, "HF checkpoint directory or WORKDIR/<stage> (sample, eval).")
flags.DEFINE_string("tokenizer", None, "Tokenizer file or directory, or 'byte' (default: the model's or the run's).")
flags.DEFINE_string("prompt", None, "Prompt text (sample).")
flags.DEFINE_string("template", "r1_zero", "Prompt template (sample, eval): plain, r1_zero, qwen2.5, deepseek_r1, "
                    "hf (the chat template of --tokenizer, else of --model), or hf:PATH (a checkpoint's or a "
                    ".jinja file's); template variables after '?', e.g. 'hf?enable_thinking=false'; '+NAME' appends "
                    "an instruction (r1jax.data.INSTRUCTIONS) to the prompt, e.g. 'qwen2.5+think_hash'.")
flags.DEFINE_integer("num_samples", 1, "Samples per prompt (sample).")
flags.DEFINE_integer("max_new_tokens", 256, "Tokens to generate (sample, eval).")
flags.DEFINE_float("temperature", 0.6, "Sampling temperature (0 = greedy).")
flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass.")
flags.DEFINE_integer("top_k", 0, "Top-k sampling (0 = off).")
flags.DEFINE_string("pass_at", "", "eval: also report pass@j for these sample counts, e.g. 1,4,16 (each <= --k).")
flags.DEFINE_float("min_p", 0.0, "Min-p sampling: keep tokens with probability >= min_p x the top one's (0 = off).")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_string("data", None, "Eval data: a GSM8K/MATH/AIME/AMC/LiveCodeBench/APPS file, your own problems (JSON "
                    "lines or a JSON array: prompt/problem/question with answer and/or tests), or a task name (gsm8k, "
                    "math500, ...) with options after a colon (livecodebench:path=FILE,start_date=2024-08-01; "
                    "literals keep their commas: arithmetic:n=100,num_digits=(2, 3)).")
flags.DEFINE_integer("k", 4, "Samples per problem (eval).")
flags.DEFINE_integer("limit", 0, "Evaluate only the first N problems (0 = all).")
flags.DEFINE_integer("batch_size", 32, "Problems per sampler batch (eval).")
flags.DEFINE_string("reward", "accuracy", "eval: the rule that judges a sample (accuracy: the final answer; "
                    "code_tests: the program passes every test of the problem's `tests`).")
flags.DEFINE_string("reward_kwargs", "", "eval, inspect: the options of --reward as a dict literal, e.g. "
                    "\"{'rules': {'math_dapo': 'answer_line', '*': 'verifiable'}}\" for --reward by_source.")
flags.DEFINE_string("dtype", "float32", "Compute dtype for loaded models.")
flags.DEFINE_bool("to_hf", False, "convert: r1jax stage weights -> Hugging Face.")
flags.DEFINE_string("from_hf", None, "convert: Hugging Face checkpoint -> r1jax parameters.")
flags.DEFINE_string("stage", None, "convert: the stage of --workdir to export.")
flags.DEFINE_string("out", None, "Output path (convert, plot, eval results JSON).")
flags.DEFINE_string("mesh", "", "sample, eval, convert: the device mesh, e.g. 'data=-1' (default for sampling a "
                    "Hugging Face checkpoint: every device data parallel, the weights replicated), 'fsdp=-1' (default "
                    "for convert --from_hf) or 'data=2,tensor=4' for a model one device cannot hold; default for "
                    "WORKDIR/<stage>: the run's config.mesh.")
flags.DEFINE_string("rules", "", "sample, eval, convert: the sharding rules preset (fsdp, fsdp_tensor, expert, data); "
                    "default: fsdp_tensor when --mesh has tensor > 1, else fsdp; the run's for WORKDIR/<stage>.")
flags.DEFINE_integer("compact", 3, "sample, eval: the decode loop continues on the unfinished rows, halving up to "
                     "this many times as rows end (the same samples; 0: off).")
flags.DEFINE_string("speculative", "", "sample, eval: 'mtp' decodes with a DeepSeek-V3 model's multi-token-"
                    "prediction module as the draft, verified by the model (the same distribution; greedy: the same "
                    "tokens), up to 2 tokens per step.")
flags.DEFINE_string("problems_out", None, "eval: also write each problem with its pass_rate over the --k samples to "
                    "this JSONL file (a problem file: prompts='jsonl:FILE' in a GRPO stage).")
flags.DEFINE_string("keep_pass_rates", "", "eval --problems_out: only the problems whose pass rate lies in this "
                    "interval, e.g. '(0,1)' (drop those never or always solved) or '[0.25,0.75]'.")
flags.DEFINE_string("samples_out", None, "eval: also write every completion to this JSONL file (problem, prompt, "
                    "reference, completion, extracted answer, correct, num_tokens). With it or --out, sampled batches "
                    "are kept in <file>.progress.jsonl until the end, and an interrupted eval run again resumes.")
flags.DEFINE_integer("show", 2, "inspect: how many prompts to print as rendered.")
flags.DEFINE_string("decontaminate", "", "inspect: count the problems sharing a word n-gram with these evaluation "
                    "sets (comma-separated task names or files, e.g. aime,math500); with --out, write the others.")
flags.DEFINE_integer("decontaminate_ngram", 8, "inspect --decontaminate: n-gram length in words (open-r1's 8).")
flags.DEFINE_integer("max_prompt_len", 0, "inspect: also count the prompts longer than this many tokens.")
flags.DEFINE_bool("check_data", False, "train: load the tasks and tokenizer and run every stage's data checks (prompt "
                  "lengths, rewards that cannot judge a problem, ...) on this machine, then stop; no stage runs.")
flags.DEFINE_bool("dry_run", False, "train: check the config for config.hardware without running it (no weights).")


class UsageError(ValueError):
    pass
