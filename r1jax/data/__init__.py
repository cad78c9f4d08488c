"""Tasks, prompt templates, tokenizers and grain input pipelines.

Example:
    >>> from r1jax.data import get_task, render, ByteTokenizer
    >>> ex = get_task("multiplication", n=1, a_digits=2, b_digits=2)[0]
    >>> text = render("r1_zero", ex)
    >>> ByteTokenizer().decode(ByteTokenizer().encode(text)) == text
    True
"""
from r1jax.data.chat_template import ChatTemplate, ChatTemplateError, load_chat_template
from r1jax.data.code_benchmarks import code_prompt, load_apps, load_livecodebench
from r1jax.data.decontaminate import decontaminate
from r1jax.data.describe import describe
from r1jax.data.gpqa import load_gpqa
from r1jax.data.mixture import load_mixture
from r1jax.data.mmlu import load_mmlu
from r1jax.data.parquet import iter_parquet
from r1jax.data.pipeline import (
    bucket_length,
    default_buckets,
    pad_sequences,
    rl_prompt_dataset,
    sft_dataset,
    tokenize_sft_example,
)
from r1jax.data.problems import load_problem_file, load_problems, normalize_tests
from r1jax.data.tasks import (
    Example,
    InexactDivisionError,
    countdown_prompt,
    default_data_dir,
    evaluate_expression,
    generate_arithmetic,
    generate_countdown,
    generate_multiplication,
    get_task,
    list_tasks,
    load_aime,
    load_amc,
    load_gsm8k,
    load_math,
    register_task,
    split_of,
)
from r1jax.data.templates import (
    ANSWER_END,
    ANSWER_START,
    BOXED_INSTRUCTION,
    INSTRUCTIONS,
    MARKERS,
    R1_ZERO_TEMPLATE,
    THINK_END,
    THINK_START,
    check_template,
    list_templates,
    register_instruction,
    register_template,
    render,
)
from r1jax.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_sentencepiece,
)

__all__ = [
    "ANSWER_END", "ANSWER_START", "BOXED_INSTRUCTION", "ByteTokenizer", "ChatTemplate", "ChatTemplateError",
    "Example", "HFTokenizer", "INSTRUCTIONS", "InexactDivisionError", "MARKERS", "R1_ZERO_TEMPLATE",
    "SentencePieceTokenizer",
    "THINK_END", "THINK_START", "Tokenizer", "bucket_length", "check_template", "code_prompt", "countdown_prompt",
    "decontaminate", "describe",
    "default_buckets", "default_data_dir", "evaluate_expression", "generate_arithmetic", "generate_countdown",
    "generate_multiplication", "get_task", "iter_parquet", "list_tasks", "list_templates", "load_aime", "load_amc",
    "load_apps",
    "load_chat_template", "load_gpqa", "load_mmlu", "load_gsm8k", "load_livecodebench", "load_math", "load_mixture",
    "load_problem_file", "load_problems", "load_tokenizer", "normalize_tests", "pad_sequences", "register_task",
    "register_instruction", "register_template", "render", "rl_prompt_dataset", "sft_dataset", "split_of",
    "tokenize_sft_example",
    "train_sentencepiece",
]
