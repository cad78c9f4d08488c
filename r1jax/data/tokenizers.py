"""One tokenizer interface over sentencepiece models, Hugging Face ``tokenizer.json`` and raw bytes.

The reasoning markers ``<think> </think> <answer> </answer>`` are always single tokens: trained
sentencepiece models get them as user-defined symbols, loaded models that lack them get them appended
(``add_markers=True``; ``added_markers`` lists what was added, so the model's embedding table must have
room for ``vocab_size`` rows). ``encode`` never adds BOS/EOS unless asked.

Example:
    >>> import tempfile, os
    >>> from r1jax.data import train_sentencepiece, load_tokenizer
    >>> texts = [f"What is {i} + {i * 7 % 10}? <think> {i} </think> <answer> {i + i * 7 % 10} </answer>"
    ...          for i in range(200)]
    >>> path = os.path.join(tempfile.mkdtemp(), "arith.model")
    >>> tok = train_sentencepiece(texts, vocab_size=300, path=path)
    >>> ids = tok.encode("<answer> 42 </answer>")
    >>> ids[0] == tok.id_of("<answer>"), tok.decode(ids)
    (True, '<answer> 42 </answer>')
    >>> load_tokenizer(path).encode("7 * 8") == tok.encode("7 * 8")
    True
"""
from __future__ import annotations

import abc
import io
import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

from r1jax.data.templates import MARKERS

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


class Tokenizer(abc.ABC):
    """text <-> ids. ``bos_id`` / ``eos_id`` / ``pad_id`` are None where the vocabulary has none."""

    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    added_markers: tuple[str, ...] = ()
    extra_stop_ids: tuple[int, ...] = ()  # end-of-turn ids besides eos_id (a checkpoint's generation_config.json)

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids that end a completion: eos_id, then `extra_stop_ids`. Instruct checkpoints end turns with a
        token that need not be the tokenizer's eos (Llama 3 Instruct: <|eot_id|>; Qwen2.5-Instruct also stops at
        <|endoftext|>), and transformers' generate stops at every id of generation_config.json's eos_token_id."""
        ids = ([self.eos_id] if self.eos_id is not None else []) + list(self.extra_stop_ids)
        return tuple(dict.fromkeys(ids))

    @abc.abstractmethod
    def _encode(self, texts: list[str]) -> list[list[int]]: ...

    @abc.abstractmethod
    def _decode(self, ids: list[int]) -> str: ...

    @abc.abstractmethod
    def _lookup(self, token: str) -> int | None: ...

    def id_of(self, token: str) -> int:
        """The id of a single-token string (a marker, special token or vocabulary piece)."""
        i = self._lookup(token)
        if i is None:
            raise KeyError(f"token {token!r} is not a single token of this {type(self).__name__} "
                           f"(vocab_size={self.vocab_size})")
        return i

    @property
    def marker_ids(self) -> dict[str, int]:
        return {m: self.id_of(m) for m in MARKERS}

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None)

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos and self.bos_id is None:
            raise ValueError("add_bos=True but this tokenizer has no bos_id; pass bos_token to load_tokenizer")
        if add_eos and self.eos_id is None:
            raise ValueError("add_eos=True but this tokenizer has no eos_id; pass eos_token to load_tokenizer")
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self.batch_encode([text], add_bos=add_bos, add_eos=add_eos)[0]

    def batch_encode(self, texts: Sequence[str], *, add_bos: bool = False,
                     add_eos: bool = False) -> list[list[int]]:
        if isinstance(texts, str):
            raise TypeError("batch_encode takes a sequence of strings; use encode for one string")
        return [self._wrap(ids, add_bos, add_eos) for ids in self._encode(list(texts))]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; markers always decode to their text. ``skip_special_tokens`` drops
        bos/eos/pad (sentencepiece never renders control tokens anyway)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return self._decode(ids)


# ---------------------------------------------------------------------------------------------------

class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (``.model`` file or serialized proto bytes)."""

    def __init__(self, model: str | os.PathLike | bytes, *, add_markers: bool = True):
        import sentencepiece as spm

        source = "<bytes>" if isinstance(model, bytes) else str(model)
        if not isinstance(model, bytes):
            try:
                model = Path(model).read_bytes()
            except OSError as e:
                raise FileNotFoundError(f"{source}: cannot read sentencepiece model ({e})") from None
        self.path = source
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(model)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{source}: not a valid sentencepiece model ({e})") from None
        missing = [m for m in MARKERS if not self._is_piece(sp, m)]
        if missing and add_markers:
            sp = self._with_user_symbols(model, missing, source)
            self.added_markers = tuple(missing)
        self._sp = sp
        self.bos_id, self.eos_id, self.pad_id = (None if i < 0 else i
                                                 for i in (sp.bos_id(), sp.eos_id(), sp.pad_id()))

    @staticmethod
    def _is_piece(sp, token: str) -> bool:
        i = sp.piece_to_id(token)
        return sp.id_to_piece(i) == token

    @staticmethod
    def _with_user_symbols(model: bytes, symbols: list[str], source: str):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        try:
            proto.ParseFromString(model)
        except Exception as e:  # protobuf raises DecodeError, which has no stable import path
            raise ValueError(f"{source}: not a valid sentencepiece model ({e})") from None
        for s in symbols:
            piece = proto.pieces.add()
            piece.piece, piece.score = s, 0.0
            piece.type = pb.ModelProto.SentencePiece.USER_DEFINED
        return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts)

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def _lookup(self, token: str) -> int | None:
        return self._sp.piece_to_id(token) if self._is_piece(self._sp, token) else None


def train_sentencepiece(texts: Iterable[str], vocab_size: int, path: str | os.PathLike, *,
                        model_type: str = "bpe", byte_fallback: bool = True, split_digits: bool = True,
                        user_defined_symbols: Sequence[str] = (), character_coverage: float = 1.0,
                        max_sentence_length: int = 1 << 16, split_by_whitespace: bool = True,
                        max_piece_length: int = 16) -> SentencePieceTokenizer:
    """Trains a small sentencepiece model on ``texts`` and writes it to ``path`` (".model" appended if
    missing). Ids pad=0, bos=1, eos=2, unk=3, then the four markers (+ ``user_defined_symbols``).

    ``split_by_whitespace=False`` with a large ``max_piece_length`` lets pieces span words, so text that
    repeats verbatim (a prompt template) compresses into a few tokens.

    Text is not normalized (identity rule, whitespace kept, no dummy prefix) so ``decode(encode(t)) == t``
    and ``encode(a) + encode(b)`` decodes to ``a + b``. ``vocab_size`` is an upper bound: a small corpus
    yields fewer pieces rather than an error. Byte fallback (256 byte pieces) lets any text encode.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type={model_type!r}; valid: 'bpe', 'unigram'")
    path = Path(path)
    if path.suffix != ".model":
        path = path.with_name(path.name + ".model")
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_sentencepiece: texts is empty")
    symbols = list(MARKERS) + [s for s in user_defined_symbols if s not in MARKERS]
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=byte_fallback, split_digits=split_digits, user_defined_symbols=symbols,
            pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            character_coverage=character_coverage, hard_vocab_limit=False,
            max_sentence_length=max_sentence_length, split_by_whitespace=split_by_whitespace,
            max_sentencepiece_length=max_piece_length, num_threads=1, minloglevel=2)
    except RuntimeError as e:
        need = f"{256 * byte_fallback + 4 + len(symbols)} + the number of distinct characters"
        raise ValueError(f"sentencepiece training for {path} failed with vocab_size={vocab_size} "
                         f"(needs at least {need}): {e}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return SentencePieceTokenizer(path)


# ---------------------------------------------------------------------------------------------------

class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` (``tokenizer.json``); bos/eos/pad are named by token
    string because tokenizer.json itself does not say which tokens play those roles. Missing markers
    are added to ``tokenizer`` in place, as non-special tokens so every decode keeps them."""

    def __init__(self, tokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, add_markers: bool = True, path: str = "<memory>"):
        from tokenizers import AddedToken

        self._tok = tokenizer
        self.path = path
        added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        # A marker that is only a vocabulary entry may still be split by the pre-tokenizer; registering
        # it as an added token (which reuses its id when it exists) makes encode match it whole.
        missing = [m for m in MARKERS if m not in added]
        if missing and add_markers:
            new = [m for m in missing if tokenizer.token_to_id(m) is None]
            tokenizer.add_tokens([AddedToken(m, special=False, normalized=False) for m in missing])
            self.added_markers = tuple(new)
        self.bos_id, self.eos_id, self.pad_id = (
            None if t is None else self._special(t, role)
            for t, role in ((bos_token, "bos_token"), (eos_token, "eos_token"), (pad_token, "pad_token")))

    def _special(self, token: str, role: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"{self.path}: {role}={token!r} is not in the vocabulary")
        return i

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def _lookup(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


# ---------------------------------------------------------------------------------------------------

class ByteTokenizer(Tokenizer):
    """UTF-8 bytes plus pad=0, bos=1, eos=2 and the markers at 3..6; needs no files (tests, toys)."""

    _OFFSET = 3 + len(MARKERS)
    _SPLIT = re.compile("(" + "|".join(re.escape(m) for m in MARKERS) + ")")

    def __init__(self):
        self.pad_id, self.bos_id, self.eos_id = PAD_ID, BOS_ID, EOS_ID
        self._markers = {m: 3 + i for i, m in enumerate(MARKERS)}
        self._names = {v: k for k, v in self._markers.items()}

    @property
    def vocab_size(self) -> int:
        return self._OFFSET + 256

    def _encode(self, texts: list[str]) -> list[list[int]]:
        out = []
        for text in texts:
            ids: list[int] = []
            for part in self._SPLIT.split(text):
                if part in self._markers:
                    ids.append(self._markers[part])
                else:
                    ids.extend(b + self._OFFSET for b in part.encode("utf-8"))
            out.append(ids)
        return out

    def _decode(self, ids: list[int]) -> str:
        parts, run = [], bytearray()
        for i in ids:
            if i >= self._OFFSET:
                run.append(i - self._OFFSET)
            elif i in self._names:
                parts += [run.decode("utf-8", errors="replace"), self._names[i]]
                run = bytearray()
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def _lookup(self, token: str) -> int | None:
        if token in self._markers:
            return self._markers[token]
        b = token.encode("utf-8")
        return b[0] + self._OFFSET if len(b) == 1 else None


# ---------------------------------------------------------------------------------------------------

def _config_token(config: dict, key: str) -> str | None:
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


def read_json_object(path: Path) -> dict:
    """A checkpoint's JSON file that holds an object (tokenizer_config.json, generation_config.json); errors name
    the file, and the line of a syntax error."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a JSON object (it holds a {type(value).__name__})")
    return value


def _generation_stop_ids(config_path: Path, vocab_size: int) -> tuple[int, ...]:
    eos = read_json_object(config_path).get("eos_token_id")
    ids = [] if eos is None else [eos] if isinstance(eos, int) and not isinstance(eos, bool) else eos
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size
                                            for i in ids):
        raise ValueError(f"{config_path}: eos_token_id={eos!r} is not an id or a list of ids below the "
                         f"tokenizer's vocab_size={vocab_size}")
    return tuple(ids)


def load_tokenizer(path: str | os.PathLike, *, add_markers: bool = True, bos_token: str | None = None,
                   eos_token: str | None = None, pad_token: str | None = None) -> Tokenizer:
    """A tokenizer from a ``tokenizer.json`` or ``.model`` file, or a directory holding one
    (tokenizer.json preferred). For tokenizer.json, bos/eos/pad come from the arguments, else from a
    ``tokenizer_config.json`` beside it; sentencepiece models carry their own. A ``generation_config.json``
    beside it adds its ``eos_token_id`` ids to ``stop_ids``."""
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return load_tokenizer(path / name, add_markers=add_markers, bos_token=bos_token,
                                      eos_token=eos_token, pad_token=pad_token)
        raise FileNotFoundError(f"{path}: directory has neither tokenizer.json nor tokenizer.model")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such tokenizer file (expected a tokenizer.json, a "
                                "sentencepiece .model, or a directory with one)")
    if path.suffix == ".model":
        if any(t is not None for t in (bos_token, eos_token, pad_token)):
            raise ValueError(f"{path}: bos/eos/pad tokens are fixed inside sentencepiece models; "
                             "do not pass bos_token/eos_token/pad_token")
        return _with_generation_config(SentencePieceTokenizer(path, add_markers=add_markers), path)
    if path.suffix != ".json":
        raise ValueError(f"{path}: unknown tokenizer file type {path.suffix!r}; valid: .json "
                         "(Hugging Face tokenizer.json), .model (sentencepiece)")
    from tokenizers import Tokenizer as _HFTok

    try:
        tok = _HFTok.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise ValueError(f"{path}: not a valid Hugging Face tokenizer.json ({e})") from None
    config_path = path.with_name("tokenizer_config.json")
    config = read_json_object(config_path) if config_path.is_file() else {}
    return _with_generation_config(HFTokenizer(tok, add_markers=add_markers, path=str(path),
                                               bos_token=bos_token or _config_token(config, "bos_token"),
                                               eos_token=eos_token or _config_token(config, "eos_token"),
                                               pad_token=pad_token or _config_token(config, "pad_token")), path)


def _with_generation_config(tok: Tokenizer, path: Path) -> Tokenizer:
    config_path = path.with_name("generation_config.json")
    if config_path.is_file():
        tok.extra_stop_ids = _generation_stop_ids(config_path, tok.vocab_size)
    return tok
