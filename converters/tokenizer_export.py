"""HF tokenizer files -> GGUF tokenizer metadata, the way llama.cpp's converter writes it.

Two GGUF tokenizer families:
- ``llama`` (SentencePiece-style): from ``tokenizer.model``, or from a ``tokenizer.json`` BPE
  with byte fallback / ``▁`` spaces, or a Unigram ``tokenizer.json``. Tokens carry scores.
- ``gpt2`` (byte-level BPE): tokens + merges, and ``tokenizer.ggml.pre`` naming llama.cpp's
  pre-tokenizer, derived from the pre-tokenizer steps in ``tokenizer.json`` (``PRE_TOKENIZERS``).
Special ids, add_bos/add_eos and the chat template come from tokenizer_config.json,
special_tokens_map.json, generation_config.json and config.json.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from edge_lora.converters.sentencepiece_model import piece_columns, read_model
from edge_lora.core.bounded_json import JsonKind, read_json
from edge_lora.core.errors import EdgeLoraError, InvalidCheckpointError

MAX_VOCAB = 4_000_000
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
SPM_SPACE = "\u2581"

# --- byte-level BPE pre-tokenizers --------------------------------------------------------------
# llama.cpp does not read a pre-tokenizer from the file: ``tokenizer.ggml.pre`` names one of its
# built-in implementations (src/llama-vocab.cpp). We recognise a tokenizer.json by what decides
# its split (the regex, a Digits step) and by the two flags a name also fixes: whether BPE merges
# are skipped for words already in the vocabulary (tokenizer.json ``model.ignore_merges``) and
# whether decoding removes spaces before punctuation (``clean_up_tokenization_spaces``).

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT4O_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


class Split(enum.Enum):
    """What splits the text before byte-level BPE."""

    GPT2 = "GPT-2's regex (ByteLevel's built-in, or the same regex in a Split)"
    DIGITS_GPT2 = "single digits (Digits), then GPT-2's regex"
    LLAMA3 = "Llama 3's regex"
    QWEN2 = "Qwen2's regex"
    GPT4O = "GPT-4o's (o200k) regex"
    TEKKEN = "Mistral Tekken's regex"


# tokenizer.json Split regex -> what it is (GPT-2's regex also appears without the final \s+,
# which changes nothing: an unmatched whitespace run becomes its own piece in both libraries).
SPLIT_REGEXES: dict[str, Split] = {
    GPT2_REGEX: Split.GPT2, GPT2_REGEX.removesuffix(r"|\s+"): Split.GPT2,
    LLAMA3_REGEX: Split.LLAMA3, QWEN2_REGEX: Split.QWEN2, GPT4O_REGEX: Split.GPT4O, TEKKEN_REGEX: Split.TEKKEN,
}


@dataclass(frozen=True)
class PreTokenizer:
    """One llama.cpp pre-tokenizer name and the tokenizer.json behaviour it reproduces."""

    split: Split
    ignore_merges: bool  # llama.cpp sets ignore_merges for this name
    clean_spaces: bool  # llama.cpp's clean_spaces for this name (detokenization only)


# Every name llama.cpp 0.3.36 implements with one of these splits (aliases that behave the
# same, e.g. "deepseek-r1-qwen" = "qwen2", "olmo" = "gpt-2", "starcoder" = "refact", are not
# listed: the canonical name is written).
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "gpt-2": PreTokenizer(Split.GPT2, ignore_merges=False, clean_spaces=True),
    "refact": PreTokenizer(Split.DIGITS_GPT2, ignore_merges=False, clean_spaces=True),
    "smollm": PreTokenizer(Split.DIGITS_GPT2, ignore_merges=False, clean_spaces=False),
    "llama-bpe": PreTokenizer(Split.LLAMA3, ignore_merges=True, clean_spaces=True),
    "smaug-bpe": PreTokenizer(Split.LLAMA3, ignore_merges=False, clean_spaces=True),
    "qwen2": PreTokenizer(Split.QWEN2, ignore_merges=False, clean_spaces=False),
    "stablelm2": PreTokenizer(Split.QWEN2, ignore_merges=False, clean_spaces=True),
    "gpt-4o": PreTokenizer(Split.GPT4O, ignore_merges=False, clean_spaces=False),
    "tekken": PreTokenizer(Split.TEKKEN, ignore_merges=True, clean_spaces=False),
}


@dataclass
class TokenizerSpec:
    """Everything ``add_tokenizer`` writes; built by ``read_tokenizer``."""

    model: str  # "llama" or "gpt2"
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    pre: str | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    remove_extra_whitespaces: bool | None = None
    chat_template: str | list[dict[str, str]] | None = None


def _bad(path: Path, what: str) -> InvalidCheckpointError:
    return InvalidCheckpointError(f"{path}: {what}", fix="re-download the checkpoint's tokenizer files")


_JSON_KINDS = {"tokenizer.json": JsonKind.TOKENIZER, "generation_config.json": JsonKind.GENERATION_CONFIG}


def _read_json(path: Path) -> Any:
    """None when the file is absent; size, nesting and integers bounded (core.bounded_json)."""
    return read_json(path, _JSON_KINDS.get(path.name, JsonKind.TOKENIZER_CONFIG), missing_ok=True)


def _obj(value: Any, path: Path) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(path, "expected a JSON object")
    return value


def _token_text(value: Any) -> str | None:
    """Special tokens appear as plain strings or AddedToken dicts ({"content": ...})."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _looks_special(token: str) -> bool:
    # Same heuristic as llama.cpp's converter (does_token_look_special).
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>")))


@dataclass
class _Vocab:
    """Mutable token table while reading, kept as three lists indexed by id (``None`` text: an
    id not given yet, padded at the end): a 262,144-token vocabulary as dicts cost ~30 MB more
    at convert's peak."""

    tokens: list[str | None] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    types: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, tokens: list[str], scores: list[float], types: list[int]) -> _Vocab:
        """Ids 0..n-1 at once (the caller guarantees n <= MAX_VOCAB and equal lengths)."""
        return cls(tokens, scores, types)  # type: ignore[arg-type]

    def set(self, token_id: int, text: str, score: float, token_type: int, source: Path) -> None:
        if not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 <= token_id < MAX_VOCAB:
            raise _bad(source, f"token id {token_id!r} is out of range")
        if token_id >= len(self.tokens):
            self._grow(token_id + 1)
        self.tokens[token_id] = text
        self.scores[token_id] = score
        self.types[token_id] = token_type

    def _grow(self, size: int) -> None:
        missing = size - len(self.tokens)
        self.tokens.extend([None] * missing)
        self.scores.extend([0.0] * missing)
        self.types.extend([0] * missing)

    def finish(self, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
        if vocab_size > len(self.tokens):
            self._grow(vocab_size)
        for i, text in enumerate(self.tokens):
            if text is None:  # config.json's vocab_size is larger (resized embeddings): padding, as llama.cpp
                self.tokens[i] = f"[PAD{i}]"
                self.scores[i] = -1000.0
                self.types[i] = int(gguf.TokenType.UNUSED)
        return self.tokens, self.scores, self.types  # type: ignore[return-value]


@dataclass
class _Files:
    directory: Path
    tokenizer_json: dict[str, Any] | None
    tokenizer_config: dict[str, Any]
    special_tokens_map: dict[str, Any]
    generation_config: dict[str, Any]
    added_tokens: dict[str, Any]


def _load_files(ckpt_dir: Path) -> _Files:
    tj_path = ckpt_dir / "tokenizer.json"
    tj = _read_json(tj_path)
    if tj is not None and not isinstance(tj, dict):
        raise _bad(tj_path, "expected a JSON object")
    return _Files(
        directory=ckpt_dir, tokenizer_json=tj,
        tokenizer_config=_obj(_read_json(ckpt_dir / "tokenizer_config.json"), ckpt_dir / "tokenizer_config.json"),
        special_tokens_map=_obj(_read_json(ckpt_dir / "special_tokens_map.json"), ckpt_dir / "special_tokens_map.json"),
        generation_config=_obj(_read_json(ckpt_dir / "generation_config.json"), ckpt_dir / "generation_config.json"),
        added_tokens=_obj(_read_json(ckpt_dir / "added_tokens.json"), ckpt_dir / "added_tokens.json"),
    )


def _added_token_entries(files: _Files) -> list[tuple[int, str, bool]]:
    """(id, content, special) from tokenizer.json's added_tokens and tokenizer_config.json's
    added_tokens_decoder (the latter wins, as transformers does)."""
    entries: dict[int, tuple[str, bool]] = {}
    tj_path = files.directory / "tokenizer.json"
    for item in (files.tokenizer_json or {}).get("added_tokens") or []:
        if not isinstance(item, dict) or not isinstance(item.get("id"), int) or not isinstance(item.get("content"), str):
            raise _bad(tj_path, f"malformed added_tokens entry {str(item)[:80]}")
        entries[item["id"]] = (item["content"], bool(item.get("special")))
    tc_path = files.directory / "tokenizer_config.json"
    decoder = files.tokenizer_config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise _bad(tc_path, "added_tokens_decoder must be an object")
    for key, item in decoder.items():
        try:
            token_id = int(key)
        except ValueError as exc:
            raise _bad(tc_path, f"added_tokens_decoder key {key!r} is not an id") from exc
        content = _token_text(item)
        if content is None:
            raise _bad(tc_path, f"added_tokens_decoder[{key}] has no content")
        entries[token_id] = (content, bool(item.get("special")))
    return sorted((i, c, s) for i, (c, s) in entries.items())


def _apply_added_tokens(vocab: _Vocab, files: _Files) -> None:
    # As llama.cpp's SentencePiece path: added tokens get score -1000 and are CONTROL when
    # special, USER_DEFINED otherwise (spaces in user-defined tokens are pre-normalized).
    for token, token_id in sorted(files.added_tokens.items(), key=lambda kv: str(kv[1])):
        if isinstance(token_id, int):
            vocab.set(token_id, token, -1000.0, int(gguf.TokenType.USER_DEFINED), files.directory / "added_tokens.json")
    for token_id, content, special in _added_token_entries(files):
        if special or _looks_special(content):
            vocab.set(token_id, content, -1000.0, int(gguf.TokenType.CONTROL), files.directory)
        else:
            vocab.set(token_id, content.replace(SPM_SPACE, " "), -1000.0, int(gguf.TokenType.USER_DEFINED),
                      files.directory)


# --- SentencePiece-style sources ------------------------------------------------------------------

def _from_tokenizer_model(path: Path, files: _Files, vocab_size: int) -> TokenizerSpec:
    model = read_model(path)
    vocab = _Vocab.of(*piece_columns(model.pieces))  # ids 0..n-1, n <= MAX_PIECES <= MAX_VOCAB
    _apply_added_tokens(vocab, files)
    tokens, scores, types = vocab.finish(vocab_size)
    return TokenizerSpec(
        model="llama", tokens=tokens, scores=scores, token_types=types,
        bos_id=model.bos_id if model.bos_id >= 0 else None, eos_id=model.eos_id if model.eos_id >= 0 else None,
        unk_id=model.unk_id if model.unk_id >= 0 else None, pad_id=model.pad_id if model.pad_id >= 0 else None,
        add_space_prefix=model.add_dummy_prefix, remove_extra_whitespaces=model.remove_extra_whitespaces)


def _components(node: Any) -> list[dict[str, Any]]:
    """Flatten a normalizer / pre_tokenizer / decoder (``Sequence`` nodes) into a list."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        children = node.get("normalizers") or node.get("pretokenizers") or node.get("decoders") or []
        return [c for child in children for c in _components(child)]
    return [node]


def _metaspace_prefix(tj: dict[str, Any]) -> bool | None:
    """Whether the tokenizer prepends ``▁`` (llama.cpp's add_space_prefix); None if it does
    not use ``▁`` for spaces at all."""
    uses_metaspace = False
    prefix = False
    for comp in _components(tj.get("normalizer")):
        if comp.get("type") == "Prepend" and comp.get("prepend") == SPM_SPACE:
            prefix = True
        if comp.get("type") == "Replace" and comp.get("content") == SPM_SPACE:
            uses_metaspace = True
    for comp in _components(tj.get("pre_tokenizer")):
        if comp.get("type") == "Metaspace":
            uses_metaspace = True
            scheme = comp.get("prepend_scheme")
            prefix = prefix or (scheme in ("first", "always") if scheme is not None else bool(comp.get("add_prefix_space")))
    return prefix if uses_metaspace else None


def _is_byte_level(tj: dict[str, Any]) -> bool:
    return any(c.get("type") == "ByteLevel" for c in _components(tj.get("pre_tokenizer"))) or \
        any(c.get("type") == "ByteLevel" for c in _components(tj.get("decoder")))


def _merge_strings(merges: Any, path: Path) -> list[str]:
    if not isinstance(merges, list):
        raise _bad(path, "model.merges must be a list")
    out: list[str] = []
    for merge in merges:
        if isinstance(merge, str) and merge.count(" ") == 1:
            out.append(merge)
        elif isinstance(merge, list) and len(merge) == 2 and all(isinstance(p, str) for p in merge):
            out.append(f"{merge[0]} {merge[1]}")  # newer tokenizers write [left, right]
        else:
            raise _bad(path, f"malformed merge {str(merge)[:60]!r}")
    return out


def _model_vocab(model: dict[str, Any], path: Path) -> dict[int, tuple[str, float]]:
    raw = model.get("vocab")
    out: dict[int, tuple[str, float]] = {}
    if isinstance(raw, dict):  # BPE: {piece: id}
        for piece, token_id in raw.items():
            if not isinstance(token_id, int):
                raise _bad(path, f"vocab id for {piece!r} is not an integer")
            out[token_id] = (piece, 0.0)
    elif isinstance(raw, list):  # Unigram: [[piece, score], ...] in id order
        for token_id, item in enumerate(raw):
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                    and isinstance(item[1], (int, float))):
                raise _bad(path, f"malformed Unigram vocab entry {token_id}")
            out[token_id] = (item[0], float(item[1]))
    else:
        raise _bad(path, "model.vocab is missing")
    if len(out) > MAX_VOCAB:
        raise _bad(path, "vocabulary is too large")
    return out


def _spm_from_tokenizer_json(tj: dict[str, Any], files: _Files, vocab_size: int, space_prefix: bool) -> TokenizerSpec:
    path = files.directory / "tokenizer.json"
    model = tj["model"]
    pieces = _model_vocab(model, path)
    scores: dict[int, float]
    if model.get("type") == "BPE":
        # No scores in a BPE tokenizer.json: llama.cpp's tokenizer merges the adjacent pair whose
        # merged token has the highest score, so score a token by minus the rank of the merge
        # that creates it; tokens no merge creates (single symbols) score below every merge.
        text_to_id = {text: i for i, (text, _s) in pieces.items()}
        merges = _merge_strings(model.get("merges", []), path)
        scores = {i: -float(len(merges) + 1) for i in pieces}
        for rank, merge in enumerate(merges):
            merged = merge.replace(" ", "")
            token_id = text_to_id.get(merged)
            if token_id is not None and scores[token_id] < -rank:
                scores[token_id] = -float(rank)
    else:
        scores = {i: s for i, (_t, s) in pieces.items()}
    unk_text = model.get("unk_token")
    unk_id = model.get("unk_id") if model.get("type") == "Unigram" else None
    vocab = _Vocab()
    for i, (text, _s) in pieces.items():
        if BYTE_TOKEN.fullmatch(text):
            token_type = int(gguf.TokenType.BYTE)
        elif (unk_id is not None and i == unk_id) or (unk_text is not None and text == unk_text):
            token_type = int(gguf.TokenType.UNKNOWN)
        else:
            token_type = int(gguf.TokenType.NORMAL)
        vocab.set(i, text, scores[i], token_type, path)
    _apply_added_tokens(vocab, files)
    tokens, all_scores, types = vocab.finish(vocab_size)
    spec = TokenizerSpec(model="llama", tokens=tokens, scores=all_scores, token_types=types,
                         add_space_prefix=space_prefix)
    unk_ids = [i for i, t in enumerate(types) if t == int(gguf.TokenType.UNKNOWN)]
    spec.unk_id = unk_ids[0] if unk_ids else None
    return spec


# --- byte-level BPE -------------------------------------------------------------------------------

def _unknown_pre_tokenizer(path: Path, shown: str) -> InvalidCheckpointError:
    return InvalidCheckpointError(
        f"{path}: unknown pre-tokenizer {shown[:300]}; llama.cpp would split text differently "
        "than the model was trained on",
        fix="supported pre-tokenizers: " + ", ".join(sorted(PRE_TOKENIZERS)))


def _split_of(tj: dict[str, Any], path: Path) -> Split:
    """What splits text before BPE in this tokenizer.json (refused when llama.cpp has no match)."""
    regexes: list[str] = []
    digits = False
    byte_levels: list[dict[str, Any]] = []
    for comp in _components(tj.get("pre_tokenizer")):
        kind = comp.get("type")
        if kind == "Split":
            pattern = comp.get("pattern") or {}
            regex = pattern.get("Regex") if isinstance(pattern, dict) else None
            if not isinstance(regex, str) or comp.get("behavior", "Isolated") != "Isolated" or comp.get("invert"):
                raise _unknown_pre_tokenizer(path, f"step Split {str(pattern)[:200]!r} (behavior "
                                                   f"{comp.get('behavior')}, invert {comp.get('invert')})")
            if byte_levels or digits:
                raise _unknown_pre_tokenizer(path, "a Split after ByteLevel or Digits")
            regexes.append(regex)
        elif kind == "Digits" and comp.get("individual_digits") is True and not byte_levels and not regexes:
            digits = True
        elif kind == "ByteLevel":
            byte_levels.append(comp)
        else:
            raise _unknown_pre_tokenizer(path, f"step {str(comp)[:200]!r}")
    if len(byte_levels) != 1:
        raise _unknown_pre_tokenizer(path, f"with {len(byte_levels)} ByteLevel steps (byte-level BPE has one)")
    if byte_levels[0].get("add_prefix_space"):
        raise _unknown_pre_tokenizer(path, "ByteLevel with add_prefix_space (it adds a space before the text)")
    uses_own_regex = byte_levels[0].get("use_regex", True)
    if not regexes and uses_own_regex:
        return Split.DIGITS_GPT2 if digits else Split.GPT2
    if len(regexes) == 1 and not uses_own_regex and not digits and regexes[0] in SPLIT_REGEXES:
        return SPLIT_REGEXES[regexes[0]]
    shown = " + ".join(regexes) + (" + ByteLevel's regex" if uses_own_regex else "") if regexes else "(none)"
    raise _unknown_pre_tokenizer(path, f"regex {shown!r}")


def _pre_tokenizer_name(tj: dict[str, Any], files: _Files, path: Path) -> str:
    """The llama.cpp pre-tokenizer name that splits and merges exactly as this tokenizer.json."""
    split = _split_of(tj, path)
    ignore_merges = tj["model"].get("ignore_merges", False) is True
    names = [n for n, p in PRE_TOKENIZERS.items() if p.split == split and p.ignore_merges == ignore_merges]
    if not names:
        raise InvalidCheckpointError(
            f"{path}: {split.value} with model.ignore_merges={str(ignore_merges).lower()} has no llama.cpp "
            "pre-tokenizer (llama.cpp fixes whether merges are skipped for whole words in the vocabulary)",
            fix="supported pre-tokenizers: " + ", ".join(sorted(PRE_TOKENIZERS)))
    # Same split: prefer the name that decodes like transformers (clean_up_tokenization_spaces).
    clean = files.tokenizer_config.get("clean_up_tokenization_spaces")
    return next((n for n in names if PRE_TOKENIZERS[n].clean_spaces == clean), names[0])


def _gpt2_from_tokenizer_json(tj: dict[str, Any], files: _Files, vocab_size: int) -> TokenizerSpec:
    path = files.directory / "tokenizer.json"
    model = tj["model"]
    pre = _pre_tokenizer_name(tj, files, path)
    pieces = _model_vocab(model, path)
    merges = _merge_strings(model.get("merges", []), path)
    vocab = _Vocab()
    for i, (text, _s) in pieces.items():
        vocab.set(i, text, 0.0, int(gguf.TokenType.NORMAL), path)
    # Added tokens are stored as their raw text (llama.cpp matches them before byte encoding).
    for token_id, content, special in _added_token_entries(files):
        token_type = gguf.TokenType.CONTROL if special or _looks_special(content) else gguf.TokenType.USER_DEFINED
        vocab.set(token_id, content, 0.0, int(token_type), files.directory)
    tokens, _scores, types = vocab.finish(vocab_size)
    return TokenizerSpec(model="gpt2", tokens=tokens, token_types=types, merges=merges, pre=pre)


# --- special ids, flags, template -------------------------------------------------------------------

def _special_id(files: _Files, config: dict[str, Any], role: str, tokens: list[str]) -> int | None:
    for source in (files.tokenizer_config, files.special_tokens_map):
        text = _token_text(source.get(f"{role}_token"))
        if text is not None:
            try:
                return tokens.index(text)  # the first id with that text, searched at C speed
            except ValueError:
                raise InvalidCheckpointError(
                    f"{role}_token {text!r} in {files.directory} is not in the vocabulary",
                    fix="fix tokenizer_config.json / special_tokens_map.json") from None
    for source in (files.generation_config, config):
        value = source.get(f"{role}_token_id")
        if isinstance(value, list) and value:
            value = value[0]  # several eos ids: the first is the model's own eos
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(tokens):
            return value
    return None


def _template_flags(tj: dict[str, Any] | None, bos: int | None, eos: int | None) -> tuple[bool | None, bool | None]:
    """add_bos / add_eos from tokenizer.json's TemplateProcessing post-processor (Llama 3 style)."""
    if not tj:
        return None, None
    node = tj.get("post_processor")
    nodes = node.get("processors", []) if isinstance(node, dict) and node.get("type") == "Sequence" else [node]
    for proc in nodes:
        if isinstance(proc, dict) and proc.get("type") == "TemplateProcessing":
            single = proc.get("single") or []
            special_tokens = proc.get("special_tokens") or {}

            def special_id(item: Any) -> int | None:
                if isinstance(item, dict) and isinstance(item.get("SpecialToken"), dict):
                    ids = (special_tokens.get(item["SpecialToken"].get("id")) or {}).get("ids") or []
                    return ids[0] if len(ids) == 1 else None
                return None

            first = special_id(single[0]) if single else None
            last = special_id(single[-1]) if single else None
            return (first is not None and first == bos), (last is not None and last == eos)
    return None, None


def _chat_template(files: _Files) -> str | list[dict[str, str]] | None:
    jinja = files.directory / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise _bad(jinja, f"cannot read ({exc})") from exc
    value = files.tokenizer_config.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, dict) and isinstance(v.get("name"), str)
                                       and isinstance(v.get("template"), str) for v in value):
        return [{"name": v["name"], "template": v["template"]} for v in value]
    raise _bad(files.directory / "tokenizer_config.json", "chat_template must be a string or a list of {name, template}")


def read_tokenizer(ckpt_dir: Path, config: dict[str, Any]) -> TokenizerSpec:
    """Read the tokenizer of the HF checkpoint in ``ckpt_dir`` (``config`` = its config.json)."""
    try:
        return _read_tokenizer(Path(ckpt_dir), config)
    except EdgeLoraError:
        raise
    except (TypeError, KeyError, AttributeError, IndexError, ValueError) as exc:
        # tokenizer.json and tokenizer_config.json are free-form JSON: a field of an unexpected
        # type (a number where a list of normalizers belongs) would otherwise be a traceback.
        raise _bad(Path(ckpt_dir), f"a tokenizer file has an unexpected structure "
                                   f"({type(exc).__name__}: {exc})") from exc


def _read_tokenizer(ckpt_dir: Path, config: dict[str, Any]) -> TokenizerSpec:
    files = _load_files(ckpt_dir)
    spm_path = ckpt_dir / "tokenizer.model"
    vocab_size = config.get("vocab_size") if isinstance(config.get("vocab_size"), int) else 0
    tj = files.tokenizer_json
    tj_model = tj.get("model") if tj else None
    if tj is not None and not isinstance(tj_model, dict):
        raise _bad(ckpt_dir / "tokenizer.json", "no model section")

    if tj is not None and tj_model is not None and tj_model.get("type") == "BPE" and _is_byte_level(tj):
        spec = _gpt2_from_tokenizer_json(tj, files, vocab_size)
    elif spm_path.is_file():
        spec = _from_tokenizer_model(spm_path, files, vocab_size)  # llama.cpp prefers tokenizer.model
    elif tj is not None and tj_model is not None:
        kind = tj_model.get("type")
        prefix = _metaspace_prefix(tj)
        if kind == "Unigram" or (kind == "BPE" and (tj_model.get("byte_fallback") or prefix is not None)):
            spec = _spm_from_tokenizer_json(tj, files, vocab_size, bool(prefix))
        else:
            raise InvalidCheckpointError(
                f"{ckpt_dir / 'tokenizer.json'}: tokenizer model {kind!r} is neither byte-level BPE nor "
                "SentencePiece-style", fix="convert a checkpoint with a BPE or Unigram tokenizer")
    else:
        raise InvalidCheckpointError(f"no tokenizer.json or tokenizer.model in {ckpt_dir}",
                                     fix="copy the tokenizer files of the base model into the checkpoint directory")

    if vocab_size and len(spec.tokens) > vocab_size:
        raise InvalidCheckpointError(
            f"tokenizer has {len(spec.tokens)} tokens but config.json vocab_size is {vocab_size}",
            fix="resize the model's embeddings to the tokenizer, or fix config.json")

    for role in ("bos", "eos", "unk", "pad"):
        token_id = _special_id(files, config, role, spec.tokens)
        if token_id is not None:
            setattr(spec, f"{role}_id", token_id)
    tc = files.tokenizer_config
    add_bos, add_eos = _template_flags(tj, spec.bos_id, spec.eos_id)
    spec.add_bos = tc["add_bos_token"] if isinstance(tc.get("add_bos_token"), bool) else add_bos
    spec.add_eos = tc["add_eos_token"] if isinstance(tc.get("add_eos_token"), bool) else add_eos
    spec.chat_template = _chat_template(files)
    return spec


# llama.cpp sets token attributes by general.name (llama-vocab.cpp): a name containing "phi-3" or
# "phi3" makes every special token strip the whitespace after it, as Phi-3's tokenizer.json does,
# and looks these tokens up without checking that they exist.
PHI3_NAME_MARKERS = ("phi-3", "phi3")
PHI3_NAME_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def check_name_rules(name: str, spec: TokenizerSpec) -> None:
    """Refuse a model name that makes llama.cpp 0.3.36 fail to load this vocabulary."""
    lowered = name.lower()
    if any(marker in lowered for marker in PHI3_NAME_MARKERS):
        missing = [t for t in PHI3_NAME_TOKENS if t not in spec.tokens]
        if missing:
            raise InvalidCheckpointError(
                f"the model name {name!r} makes llama.cpp apply its Phi-3 tokenizer rule, which needs the tokens "
                f"{', '.join(missing)} this vocabulary lacks (llama.cpp could not load the file)",
                fix="convert it under a name without \"phi3\" / \"phi-3\" (rename the checkpoint directory)")


def add_tokenizer(writer: gguf.GGUFWriter, spec: TokenizerSpec) -> None:
    """Write ``spec`` as ``tokenizer.ggml.*`` metadata."""
    writer.add_tokenizer_model(spec.model)
    writer.add_tokenizer_pre(spec.pre or "default")
    writer.add_token_list(spec.tokens)
    if spec.scores is not None:
        writer.add_token_scores(spec.scores)
    writer.add_token_types(spec.token_types)
    if spec.merges:
        writer.add_token_merges(spec.merges)
    for token_id, add in ((spec.bos_id, writer.add_bos_token_id), (spec.eos_id, writer.add_eos_token_id),
                          (spec.unk_id, writer.add_unk_token_id), (spec.pad_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(token_id)
    if spec.add_bos is not None:
        writer.add_add_bos_token(spec.add_bos)
    if spec.add_eos is not None:
        writer.add_add_eos_token(spec.add_eos)
    if spec.add_space_prefix is not None:
        writer.add_add_space_prefix(spec.add_space_prefix)
    if spec.remove_extra_whitespaces is not None:
        writer.add_remove_extra_whitespaces(spec.remove_extra_whitespaces)
    if spec.chat_template:
        writer.add_chat_template(spec.chat_template)
