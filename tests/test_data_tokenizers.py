"""Tokenizers: sentencepiece, Hugging Face tokenizer.json and bytes behind one interface."""
import io
import json
import time

import numpy as np
import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as HFTok
from tokenizers import decoders, models, pre_tokenizers, trainers

from r1jax.data import (
    MARKERS,
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    generate_arithmetic,
    load_tokenizer,
    render,
    train_sentencepiece,
)


def corpus(n=3000):
    data = generate_arithmetic(n, seed=0, num_digits=(1, 3))
    return [render("r1_zero", ex) + f" <think> {ex['expression']} = {ex['answer']} </think> "
            f"<answer> {ex['answer']} </answer>" for ex in data]


@pytest.fixture(scope="module")
def texts():
    return corpus()


@pytest.fixture(scope="module")
def spm_tok(texts, tmp_path_factory):
    return train_sentencepiece(texts, vocab_size=512, path=tmp_path_factory.mktemp("spm") / "arith")


def build_hf_json(texts, path, with_markers: bool):
    """A tiny byte-level BPE tokenizer.json, GPT-2/Qwen style, trained on the given lines."""
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    if with_markers:
        HFTokenizer(tok)  # adds the markers as added tokens to `tok`
    tok.save(str(path))
    (path.parent / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>"}))
    return path


@pytest.fixture(scope="module")
def hf_dir(texts, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    build_hf_json(texts[:500], d / "tokenizer.json", with_markers=True)
    return d


@pytest.fixture(params=["spm", "hf", "bytes"])
def tok(request, spm_tok, hf_dir):
    return {"spm": lambda: spm_tok, "hf": lambda: load_tokenizer(hf_dir),
            "bytes": ByteTokenizer}[request.param]()


SAMPLES = [
    "What is 12 + 345 * (6 - 7)?",
    "  two  spaces\nnewline\ttab ",
    "<think> 2 + 2 = 4 </think> <answer> 4 </answer>",
    "<think>x</think><answer>-17</answer>",
    "unicode é ü 漢字 😀 and \\boxed{42}",
    "",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(np.asarray(ids, np.int32)) == text


def test_markers_are_single_tokens(tok):
    ids = tok.marker_ids
    assert len(set(ids.values())) == 4
    for m, i in ids.items():
        assert tok.encode(m) == [i] and tok.decode([i]) == m and tok.id_of(m) == i
    ids_in_text = tok.encode("<think> 1 </think> <answer> 1 </answer>")
    assert [i for i in ids_in_text if i in ids.values()] == [ids[m] for m in MARKERS]


def test_interface(tok):
    assert tok.batch_encode(SAMPLES) == [tok.encode(s) for s in SAMPLES]
    assert tok.bos_id is not None and tok.eos_id is not None and tok.pad_id is not None
    assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3
    ids = tok.encode("7 * 8", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and ids[1:-1] == tok.encode("7 * 8")
    assert tok.decode(ids, skip_special_tokens=True) == "7 * 8"
    assert tok.decode(ids + [tok.pad_id] * 3, skip_special_tokens=True) == "7 * 8"
    with pytest.raises(KeyError, match="not a single token"):
        tok.id_of("<definitely-not-a-token>")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TypeError, match="sequence of strings"):
        tok.batch_encode("abc")
    # prompt and completion tokenized apart still decode to their concatenation
    a, b = "What is 3 + 4?", " <think> 7 </think>"
    assert tok.decode(tok.encode(a) + tok.encode(b)) == a + b


def test_sentencepiece_training(texts, tmp_path):
    t0 = time.perf_counter()
    tok = train_sentencepiece(texts, vocab_size=512, path=tmp_path / "m.model")
    assert time.perf_counter() - t0 < 20.0  # catches runaway trainer settings, not speed (~0.3 s here)
    assert (tmp_path / "m.model").is_file() and tok.added_markers == ()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.id_of("<unk>")) == (0, 1, 2, 3)
    assert [tok.id_of(m) for m in MARKERS] == [4, 5, 6, 7]
    assert 264 < tok.vocab_size <= 512
    # digits are split into single pieces, so numbers tokenize digit by digit
    assert len(tok.encode("12345")) == 5
    assert tok.encode("987") == [tok.id_of("9"), tok.id_of("8"), tok.id_of("7")]
    # deterministic, and load_tokenizer reads it back identically
    again = train_sentencepiece(texts, vocab_size=512, path=tmp_path / "m2")
    assert (tmp_path / "m2.model").read_bytes() == (tmp_path / "m.model").read_bytes()
    loaded = load_tokenizer(tmp_path / "m.model")
    assert isinstance(loaded, SentencePieceTokenizer)
    assert loaded.encode(texts[0]) == tok.encode(texts[0]) == again.encode(texts[0])
    unigram = train_sentencepiece(texts[:500], vocab_size=400, path=tmp_path / "u", model_type="unigram")
    assert unigram.decode(unigram.encode(texts[1])) == texts[1]
    with pytest.raises(ValueError, match="model_type='wordpiece'; valid"):
        train_sentencepiece(texts, 300, tmp_path / "x", model_type="wordpiece")
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_sentencepiece(texts, 100, tmp_path / "x")


def test_sentencepiece_without_markers_gets_them(texts, tmp_path):
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts[:300]), model_writer=buf, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, hard_vocab_limit=False, minloglevel=2)
    path = tmp_path / "plain.model"
    path.write_bytes(buf.getvalue())
    base = spm.SentencePieceProcessor(model_file=str(path))
    tok = load_tokenizer(path)
    assert tok.added_markers == MARKERS
    assert sorted(tok.marker_ids.values()) == list(range(base.get_piece_size(), base.get_piece_size() + 4))
    text = "What is 1 + 2? <think> 3 </think> <answer> 3 </answer>"
    assert tok.decode(tok.encode(text)) == text
    assert [i for i in tok.encode(text) if i >= base.get_piece_size()] == list(tok.marker_ids.values())
    bare = load_tokenizer(path, add_markers=False)
    assert bare.added_markers == () and bare.vocab_size == base.get_piece_size()
    with pytest.raises(KeyError, match="'<think>'"):
        bare.id_of("<think>")


def test_hf_markers_added_and_config(texts, tmp_path):
    path = build_hf_json(texts[:300], tmp_path / "tokenizer.json", with_markers=False)
    raw_size = HFTok.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    tok = load_tokenizer(path)
    assert isinstance(tok, HFTokenizer) and tok.added_markers == MARKERS
    assert tok.vocab_size == raw_size + 4
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)  # from tokenizer_config.json
    override = load_tokenizer(path, eos_token="<pad>")
    assert override.eos_id == 0
    with pytest.raises(ValueError, match="eos_token='<eot>' is not in the vocabulary"):
        load_tokenizer(path, eos_token="<eot>")
    # markers already present as added tokens are not added again
    assert load_tokenizer(build_hf_json(texts[:300], tmp_path / "t2.json", with_markers=True)).added_markers == ()


def test_hf_matches_transformers(hf_dir):
    transformers = pytest.importorskip("transformers")
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
    tok = load_tokenizer(hf_dir)
    for text in SAMPLES + corpus(20):
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == ref.decode(ids)
    assert all(tok.id_of(m) == ref.convert_tokens_to_ids(m) for m in MARKERS)


def test_load_tokenizer_errors(tmp_path, hf_dir, spm_tok):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "bad.model").write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(ValueError, match="bad.model: not a valid sentencepiece model"):
        load_tokenizer(tmp_path / "bad.model")
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match="tokenizer.json: not a valid Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(ValueError, match="unknown tokenizer file type '.txt'"):
        load_tokenizer(tmp_path / "vocab.txt")
    with pytest.raises(ValueError, match="fixed inside sentencepiece"):
        load_tokenizer(spm_tok.path, eos_token="</s>")
    # a directory with a sentencepiece model is found too
    d = tmp_path / "spmdir"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(open(spm_tok.path, "rb").read())
    assert isinstance(load_tokenizer(d), SentencePieceTokenizer)


def test_byte_tokenizer_without_bos_errors():
    tok = ByteTokenizer()
    tok.bos_id = None
    with pytest.raises(ValueError, match="add_bos=True but this tokenizer has no bos_id"):
        tok.encode("x", add_bos=True)


def test_run_tokenizer_from_a_checkpoint_keeps_its_ids(texts, tmp_path):
    """A run on a checkpoint's tokenizer (kind "path") reads the <think>/<answer> tags as the text its tokenizer
    makes of them, as transformers does (new ids would be untrained embedding rows); a run resumed with the other
    add_markers setting is refused, since its ids would change."""
    from r1jax.configs import base_config
    from r1jax.pipeline.stages import build_tokenizer

    (tmp_path / "tok").mkdir()
    path = build_hf_json(texts[:300], tmp_path / "tok" / "tokenizer.json", with_markers=False)
    raw = HFTok.from_file(str(path))
    cfg = base_config()
    cfg.tokenizer.update(kind="path", path=str(path.parent))
    workdir = tmp_path / "run"
    workdir.mkdir()
    tok = build_tokenizer(cfg, workdir, tasks=None)
    text = render("r1_zero", {"prompt": "1 + 2"})
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    assert tok.encode(text) == raw.encode(text, add_special_tokens=False).ids
    (workdir / "config.json").write_text(json.dumps({"tokenizer": {"kind": "path", "add_markers": True}}))
    with pytest.raises(ValueError, match="records tokenizer.add_markers=True.*--config.tokenizer.add_markers=True"):
        build_tokenizer(cfg, workdir, tasks=None)
    cfg.tokenizer.add_markers = True
    assert build_tokenizer(cfg, workdir, tasks=None).added_markers == MARKERS


def test_checkpoint_generation_config_adds_stop_ids(texts, tmp_path):
    """Instruct checkpoints end a turn with ids besides the tokenizer's eos (generation_config.json's eos_token_id,
    where transformers' generate stops): completions end at any of them, and decoding drops the one that ended it."""
    import numpy as np

    from r1jax.eval import decode_completions

    build_hf_json(texts[:300], tmp_path / "tokenizer.json", with_markers=False)
    assert load_tokenizer(tmp_path).stop_ids == (2,)  # eos "</s>" from tokenizer_config.json
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    tok = load_tokenizer(tmp_path)
    assert tok.eos_id == 2 and tok.stop_ids == (2, 0)
    ids = tok.encode("1 + 2")
    rows = np.asarray([ids + [0, 5], ids + [2, 5], ids + [5, 5]])
    assert decode_completions(tok, rows, np.asarray([len(ids) + 1] * 3)) == ["1 + 2", "1 + 2", tok.decode(ids + [5])]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 10**6}))
    with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id=1000000 is not an id or a list of ids "
                                         r"below the tokenizer's vocab_size"):
        load_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="generation_config.json: not a JSON object"):
        load_tokenizer(tmp_path)
