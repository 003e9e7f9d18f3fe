"""Tokenizer export: llama.cpp, loading our GGUF, must tokenize exactly as the HF tokenizer."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import pytest
from tokenizers import Tokenizer

from edge_lora.converters.hf_to_gguf import convert_checkpoint
from edge_lora.converters.sentencepiece_model import (ModelType, Piece, PieceType, SentencePieceModel, parse_model,
                                            read_model, serialize_model)
from edge_lora.converters.tokenizer_export import add_tokenizer, read_tokenizer
from edge_lora.core.errors import InvalidCheckpointError
from tests.support.model_fixtures import (BYTE_LEVEL_FLAVOURS, STORAGE_DTYPE, _write_weights, make_checkpoint,
                                          make_weights)

llama_cpp = pytest.importorskip("llama_cpp")

TEXTS = [
    "Hello world",
    "The Licensor grants You a perpetual, worldwide license.",
    "café naïve résumé é",
    "日本語のテキスト",
    "emoji 🙂🚀 mixed",
    "a    b     c",
    "   leading and trailing   ",
    "line one\nline two\n\nline four",
    "tab\tseparated\t\tvalues",
    "digits 123456 and 7 and 3.14159",
    "it's they're we've I'm you'll he'd",
    "",
]

# (arch, tokenizer kind) -> the four tokenizer families the fixtures build
KINDS = [("llama", "spm"), ("gemma3", "spm"), ("llama", "bpe"), ("qwen2", "bpe")]
SPECIAL_TEXTS = {
    ("llama", "spm"): "<s>Hello</s> world",
    ("gemma3", "spm"): "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    ("llama", "bpe"): "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    ("qwen2", "bpe"): "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[Path, Path]]:
    out: dict[tuple[str, str], tuple[Path, Path]] = {}
    for arch, kind in KINDS:
        base = tmp_path_factory.mktemp(f"{arch}-{kind}")
        ckpt = make_checkpoint(arch, base / "ckpt", tokenizer=kind, n_layers=1)
        out[(arch, kind)] = (ckpt, convert_checkpoint(ckpt, base / "model-F16.gguf"))
    return out


def _llama(path: Path) -> object:
    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


@pytest.mark.parametrize("key", KINDS, ids=[f"{a}-{k}" for a, k in KINDS])
def test_llama_cpp_tokenizes_like_hf(converted: dict, key: tuple[str, str]) -> None:
    ckpt, gguf_path = converted[key]
    hf = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    llm = _llama(gguf_path)
    for text in [*TEXTS, SPECIAL_TEXTS[key]]:
        expected = hf.encode(text, add_special_tokens=True).ids
        got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        assert got == expected, f"{key} {text!r}"
        expected_plain = hf.encode(text, add_special_tokens=False).ids
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == expected_plain, f"{key} {text!r}"


@pytest.mark.parametrize("key", KINDS, ids=[f"{a}-{k}" for a, k in KINDS])
def test_metadata_matches_tokenizer_files(converted: dict, key: tuple[str, str]) -> None:
    ckpt, gguf_path = converted[key]
    reader = gguf.GGUFReader(gguf_path)
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    tc = json.loads((ckpt / "tokenizer_config.json").read_text())
    hf = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    assert fields["tokenizer.ggml.model"] == ("gpt2" if key[1] == "bpe" else "llama")
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == json.loads((ckpt / "config.json").read_text())["vocab_size"]
    types = fields["tokenizer.ggml.token_type"]
    for token_id, entry in tc["added_tokens_decoder"].items():
        assert tokens[int(token_id)] == entry["content"]
        assert types[int(token_id)] == (gguf.TokenType.CONTROL if entry["special"] else gguf.TokenType.USER_DEFINED)
    if tc.get("eos_token"):
        assert fields["tokenizer.ggml.eos_token_id"] == hf.token_to_id(tc["eos_token"])
    if tc.get("bos_token"):
        assert fields["tokenizer.ggml.bos_token_id"] == hf.token_to_id(tc["bos_token"])
    assert fields["tokenizer.ggml.add_bos_token"] == tc["add_bos_token"]
    assert fields["tokenizer.chat_template"] == tc["chat_template"]
    if key[1] == "spm":
        assert all(types[hf.token_to_id(f"<0x{b:02X}>")] == gguf.TokenType.BYTE for b in range(256))
        assert fields["tokenizer.ggml.add_space_prefix"] == (key[0] == "llama")
    else:
        assert fields["tokenizer.ggml.pre"] == {"llama": "llama-bpe", "qwen2": "qwen2"}[key[0]]
        merges = json.loads((ckpt / "tokenizer.json").read_text())["model"]["merges"]
        assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]


def test_bpe_spm_scores_follow_merge_rank(converted: dict) -> None:
    ckpt, gguf_path = converted[("llama", "spm")]
    model = json.loads((ckpt / "tokenizer.json").read_text())["model"]
    reader = gguf.GGUFReader(gguf_path)
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    first = model["merges"][0]
    merged = (first if isinstance(first, str) else " ".join(first)).replace(" ", "")
    assert scores[model["vocab"][merged]] == 0.0  # rank 0 merge -> the highest score
    last = model["merges"][-1]
    merged_last = (last if isinstance(last, str) else " ".join(last)).replace(" ", "")
    assert scores[model["vocab"][merged_last]] < scores[model["vocab"][merged]]


@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_resized_vocabulary_with_extra_added_tokens(tmp_path: Path, kind: str) -> None:
    """Tokens added after training (and embeddings resized past them, padded) still convert, and
    llama.cpp splits them out of text exactly like the HF tokenizer."""
    ckpt = make_checkpoint("llama", tmp_path / "ckpt", tokenizer=kind, n_layers=1)
    tj = json.loads((ckpt / "tokenizer.json").read_text())
    base_size = 1 + max(max(tj["model"]["vocab"].values()), max(t["id"] for t in tj["added_tokens"]))
    # normalized=False, as real added tokens are: llama.cpp matches added tokens in the raw text
    # (HF matches normalized=True ones after "▁" replacement, which llama.cpp cannot express).
    extra = [("<|tool_call|>", True), ("legalese", False)]
    for offset, (content, special) in enumerate(extra):
        tj["added_tokens"].append({"id": base_size + offset, "content": content, "single_word": False,
                                   "lstrip": False, "rstrip": False, "normalized": False, "special": special})
    (ckpt / "tokenizer.json").write_text(json.dumps(tj))
    config = json.loads((ckpt / "config.json").read_text())
    new_vocab = base_size + 8  # resized to a multiple, as training scripts do
    config["vocab_size"] = new_vocab
    (ckpt / "config.json").write_text(json.dumps(config))
    _write_weights(ckpt, make_weights("llama", config, seed=0), STORAGE_DTYPE["llama"], sharded=False)

    spec = read_tokenizer(ckpt, config)
    assert len(spec.tokens) == new_vocab
    assert spec.tokens[base_size] == "<|tool_call|>" and spec.token_types[base_size] == gguf.TokenType.CONTROL
    assert spec.tokens[base_size + 1] == "legalese" and spec.token_types[base_size + 1] == gguf.TokenType.USER_DEFINED
    assert spec.token_types[base_size + 2:] == [gguf.TokenType.UNUSED] * 6

    gguf_path = convert_checkpoint(ckpt, tmp_path / "resized-F16.gguf")
    llm = _llama(gguf_path)
    hf = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    for text in ["call <|tool_call|> now", "the legalese of the License", "legalese<|tool_call|>legalese"]:
        expected = hf.encode(text, add_special_tokens=True).ids
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == expected, text
    assert base_size in expected and base_size + 1 in expected


def test_unknown_pre_tokenizer_regex_is_refused(tmp_path: Path) -> None:
    ckpt = make_checkpoint("llama", tmp_path / "ckpt", tokenizer="bpe", n_layers=1)
    tj = json.loads((ckpt / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\s+|[0-9]{1,2}"
    (ckpt / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(InvalidCheckpointError, match=r"unknown pre-tokenizer regex .*\[0-9\]\{1,2\}") as err:
        read_tokenizer(ckpt, json.loads((ckpt / "config.json").read_text()))
    assert err.value.fix and "llama-bpe" in err.value.fix


def test_missing_tokenizer(tmp_path: Path) -> None:
    ckpt = make_checkpoint("llama", tmp_path / "ckpt", n_layers=1)
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(InvalidCheckpointError, match="no tokenizer.json or tokenizer.model in"):
        read_tokenizer(ckpt, {})


def test_malformed_tokenizer_json(tmp_path: Path) -> None:
    ckpt = make_checkpoint("llama", tmp_path / "ckpt", n_layers=1)
    (ckpt / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(InvalidCheckpointError, match="not valid JSON"):
        read_tokenizer(ckpt, {})


@pytest.mark.parametrize("arch,path,value", [
    ("llama", ("added_tokens",), 1),
    ("llama", ("post_processor", "special_tokens", "<s>"), "x"),
    ("qwen3", ("pre_tokenizer", "pretokenizers"), 1.5),
    ("mistral", ("post_processor", "special_tokens", "<s>", "ids"), {"a": 1}),
    ("mistral", ("normalizer", "normalizers"), 1),
    ("gemma3", ("post_processor", "single"), 1),
], ids=["added-tokens-int", "special-token-str", "pretokenizers-float", "ids-object", "normalizers-int",
        "single-int"])
def test_tokenizer_json_of_unexpected_structure(tmp_path: Path, arch: str, path: tuple[str, ...],
                                                value: object) -> None:
    # Found by fuzzing: each used to escape as TypeError / AttributeError / KeyError.
    ckpt = make_checkpoint(arch, tmp_path / "ckpt", n_layers=1)
    tj = json.loads((ckpt / "tokenizer.json").read_text())
    parent = tj
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    (ckpt / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(InvalidCheckpointError, match="unexpected structure"):
        read_tokenizer(ckpt, json.loads((ckpt / "config.json").read_text()))


# --- tokenizer.model (SentencePiece protobuf) --------------------------------------------------------

def _sample_model() -> SentencePieceModel:
    pieces = [Piece("<unk>", 0.0, PieceType.UNKNOWN), Piece("<s>", 0.0, PieceType.CONTROL),
              Piece("</s>", 0.0, PieceType.CONTROL)]
    pieces += [Piece(f"<0x{b:02X}>", 0.0, PieceType.BYTE) for b in range(256)]
    pieces += [Piece(p, -float(i), PieceType.NORMAL) for i, p in enumerate(["▁", "e", "t", "▁t", "he", "▁the", "é", "日"])]
    return SentencePieceModel(pieces=pieces, model_type=ModelType.BPE, byte_fallback=True, unk_id=0, bos_id=1,
                              eos_id=2, pad_id=-1, add_dummy_prefix=True, remove_extra_whitespaces=False)


def test_sentencepiece_round_trip() -> None:
    model = _sample_model()
    parsed = parse_model(serialize_model(model))
    assert parsed == model


def test_sentencepiece_model_drives_llama_cpp(tmp_path: Path) -> None:
    """A checkpoint with only tokenizer.model: llama.cpp must segment with its scores."""
    ckpt = make_checkpoint("llama", tmp_path / "ckpt", tokenizer="spm", n_layers=1)
    (ckpt / "tokenizer.json").unlink()
    (ckpt / "tokenizer.model").write_bytes(serialize_model(_sample_model()))
    config = json.loads((ckpt / "config.json").read_text())
    spec = read_tokenizer(ckpt, config)
    assert spec.add_space_prefix is True and spec.unk_id == 0 and spec.bos_id == 1
    writer = gguf.GGUFWriter(tmp_path / "vocab.gguf", "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(1)
    writer.add_layer_norm_rms_eps(1e-5)
    add_tokenizer(writer, spec)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    llm = _llama(tmp_path / "vocab.gguf")
    the = spec.tokens.index("▁the")
    assert llm.tokenize(b"the", add_bos=True, special=False) == [1, the]
    # "é" is a piece; "ü" is not and falls back to its UTF-8 bytes.
    assert llm.tokenize("é".encode(), add_bos=False)[-1] == spec.tokens.index("é")
    assert llm.tokenize("ü".encode(), add_bos=False)[-2:] == [3 + 0xC3, 3 + 0xBC]


@pytest.mark.parametrize("blob, message", [
    (b"\x0a\xff\xff\xff\xff\x0f", "declares"),                  # piece length beyond the file
    (b"\x0a\x80", "truncated varint"),
    (b"\x0b\x00", "unsupported wire type"),                     # group wire type
    (b"\x0a\x02\x18\x63", "unknown piece type"),            # type 99
    (b"", "no pieces"),
    (b"\x0a\x02\x0a\x00\x12\x03\xc0\x02\x02", "outside the vocabulary"),  # unk_id 2 with one piece
])
def test_sentencepiece_rejects_malformed(tmp_path: Path, blob: bytes, message: str) -> None:
    path = tmp_path / "tokenizer.model"
    path.write_bytes(blob)
    with pytest.raises(InvalidCheckpointError, match=message):
        read_model(path)


def test_sentencepiece_negative_ids_and_float_scores() -> None:
    model = _sample_model()
    model.pieces[3].score = -12.5
    raw = serialize_model(model)
    assert struct.pack("<f", -12.5) in raw
    assert parse_model(raw).pad_id == -1


def test_unigram_tokenizer_json_keeps_scores(tmp_path: Path) -> None:
    """A Unigram tokenizer.json (T5/Gemma-1 style) becomes a SentencePiece vocabulary with its
    own log-probabilities as scores and the unk piece typed UNKNOWN."""
    from tokenizers import models, normalizers, pre_tokenizers

    ckpt = make_checkpoint("llama", tmp_path / "ckpt", tokenizer="spm", n_layers=1)
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), ("▁", -2.0), ("▁the", -3.5), ("a", -4.25), ("<0x41>", 0.0)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tj = json.loads(tok.to_str())
    tj["added_tokens"] = [{"id": 1, "content": "<s>", "special": True}, {"id": 2, "content": "</s>", "special": True}]
    (ckpt / "tokenizer.json").write_text(json.dumps(tj))
    tc = json.loads((ckpt / "tokenizer_config.json").read_text())
    del tc["added_tokens_decoder"]  # the added tokens come from tokenizer.json alone here
    (ckpt / "tokenizer_config.json").write_text(json.dumps(tc))
    config = dict(json.loads((ckpt / "config.json").read_text()), vocab_size=len(pieces))
    spec = read_tokenizer(ckpt, config)
    assert spec.model == "llama" and spec.add_space_prefix is True
    assert spec.tokens == [p for p, _s in pieces]
    assert spec.scores == [0.0, -1000.0, -1000.0, -2.0, -3.5, -4.25, 0.0]
    assert spec.token_types == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL,
                                gguf.TokenType.NORMAL, gguf.TokenType.NORMAL, gguf.TokenType.NORMAL,
                                gguf.TokenType.BYTE]
    assert spec.unk_id == 0 and spec.bos_id == 1 and spec.eos_id == 2


def test_vocab_larger_than_config_is_refused(tmp_path: Path) -> None:
    ckpt = make_checkpoint("llama", tmp_path / "ckpt", tokenizer="bpe", n_layers=1)
    config = json.loads((ckpt / "config.json").read_text())
    config["vocab_size"] = 100
    with pytest.raises(InvalidCheckpointError, match="vocab_size is 100"):
        read_tokenizer(ckpt, config)


# --- byte-level BPE pre-tokenizers: every name we write, checked by llama.cpp on real text -------------

# Code, numbers, accents, CJK, emoji, whitespace runs, upper-case contractions.
MIXED_TEXT = (
    "def parse(x):\n    return {'a': x[0], \"b\": 3.14159 * 2**10}  # naïve café\n"
    "\tIndentation\t\twith tabs and    four spaces\n\n\n"
    "Prices: $1,234,567.89 — 42% off; 2024-06-30T12:00:00Z, 0x1F600.\n"
    "Ünïcödé: résumé, Straße, façade, ÉCOLE, Ñandú; Ελληνικά; русский текст.\n"
    "中文文本和日本語のテキスト、한국어 문장。\n"
    "Emoji: 🙂🚀👩‍💻 🇫🇷  mixed🙂text\n"
    "It's we'll they've I'M YOU'LL HE'D\n"
    "   trailing spaces   \n")
REAL_TEXT = (Path("/usr/share/common-licenses/Apache-2.0").read_text()[:6000]
             if Path("/usr/share/common-licenses/Apache-2.0").exists() else "")


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Each byte-level flavour (a tokenizer as a model family ships it), converted once."""
    root = tmp_path_factory.mktemp("byte-level")
    return {flavour: (ckpt := make_checkpoint("llama", root / flavour, tokenizer=flavour, n_layers=1),
                      convert_checkpoint(ckpt, root / f"{flavour}-F16.gguf"))
            for flavour in BYTE_LEVEL_FLAVOURS}


def _vocab_gguf(spec: object, path: Path) -> Path:
    """A vocabulary-only GGUF written from a TokenizerSpec (what llama.cpp's vocab_only loads)."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    add_tokenizer(writer, spec)  # type: ignore[arg-type]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


def _ids_differ(hf: Tokenizer, gguf_path: Path, text: str) -> bool:
    got = _llama(gguf_path).tokenize(text.encode("utf-8"), add_bos=False, special=False)
    return got != hf.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("flavour", list(BYTE_LEVEL_FLAVOURS))
def test_byte_level_pre_tokenizer_names_tokenize_like_hf(byte_level: dict, flavour: str, tmp_path: Path) -> None:
    """The converted file names the llama.cpp pre-tokenizer that splits as the tokenizer.json
    does (GPT-2's bare ByteLevel is "gpt-2", which llama.cpp knows; "gpt2" it refuses), and
    llama.cpp's ids equal `tokenizers`' on mixed and real text."""
    ckpt, gguf_path = byte_level[flavour]
    pre = gguf.GGUFReader(gguf_path).fields["tokenizer.ggml.pre"].contents()
    assert pre == BYTE_LEVEL_FLAVOURS[flavour].pre
    hf = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    llm = _llama(gguf_path)
    for text in (MIXED_TEXT, REAL_TEXT, *TEXTS):
        expected = hf.encode(text, add_special_tokens=False).ids
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == expected, (flavour, text[:60])
    assert len(hf.encode(MIXED_TEXT).ids) > 300 and not _ids_differ(hf, gguf_path, MIXED_TEXT)


# A name whose split differs from each flavour's (the nearest one whose difference these small
# vocabularies can show): written instead, llama.cpp's ids differ from tokenizers', so the
# comparison above fails for a wrong name. Names that differ only in clean_spaces (qwen2 /
# stablelm2, smollm / refact) tokenize alike by design.
WRONG_NAME = {"gpt2": "smollm", "smollm2": "gpt-2", "granite": "gpt-2", "llama3": "qwen2", "smaug": "qwen2",
              "qwen2": "smollm", "stablelm2": "refact", "gpt4o": "tekken", "tekken": "smollm", "smollm3": "qwen2",
              "deepseek_r1_qwen": "smollm"}


@pytest.mark.parametrize("flavour", list(BYTE_LEVEL_FLAVOURS))
def test_a_wrong_pre_tokenizer_name_is_caught(byte_level: dict, flavour: str, tmp_path: Path) -> None:
    ckpt, _ = byte_level[flavour]
    spec = read_tokenizer(ckpt, json.loads((ckpt / "config.json").read_text()))
    spec.pre = WRONG_NAME[flavour]
    hf = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    assert _ids_differ(hf, _vocab_gguf(spec, tmp_path / "wrong.gguf"), MIXED_TEXT + REAL_TEXT)


@pytest.mark.parametrize("change, message", [
    (lambda tj: tj["pre_tokenizer"].update(add_prefix_space=True), "add_prefix_space"),
    (lambda tj: tj["pre_tokenizer"].update(use_regex=False), r"regex '\(none\)'"),
    (lambda tj: tj.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": False}, tj["pre_tokenizer"]]}), "Digits"),
    (lambda tj: tj.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Whitespace"}, tj["pre_tokenizer"]]}), "Whitespace"),
], ids=["prefix-space", "no-regex", "grouped-digits", "unknown-step"])
def test_byte_level_without_a_llama_cpp_pre_tokenizer_is_refused(byte_level: dict, change: object,
                                                                   message: str, tmp_path: Path) -> None:
    ckpt, _ = byte_level["gpt2"]
    tj = json.loads((ckpt / "tokenizer.json").read_text())
    change(tj)  # type: ignore[operator]
    edited = tmp_path / "ckpt"
    edited.mkdir()
    for item in ckpt.iterdir():
        (edited / item.name).write_bytes(item.read_bytes())
    (edited / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(InvalidCheckpointError, match=message) as err:
        read_tokenizer(edited, json.loads((edited / "config.json").read_text()))
    assert err.value.fix and "gpt-2" in err.value.fix and "smollm" in err.value.fix


def test_split_behaviour_and_ignore_merges_pick_the_name(byte_level: dict, tmp_path: Path) -> None:
    """Llama 3's regex names "llama-bpe" only with ignore_merges (llama.cpp then looks whole words
    up first), else "smaug-bpe"; Tekken's regex without ignore_merges has no llama.cpp name; a
    Split that removes its matches is not a pre-tokenizer llama.cpp has."""
    for flavour, edit, expected in (
            ("llama3", lambda tj: tj["model"].update(ignore_merges=False), "smaug-bpe"),
            ("smaug", lambda tj: tj["model"].update(ignore_merges=True), "llama-bpe"),
            ("tekken", lambda tj: tj["model"].update(ignore_merges=False), "ignore_merges=false"),
            ("qwen2", lambda tj: tj["pre_tokenizer"]["pretokenizers"][0].update(behavior="Removed"), "Removed")):
        ckpt, _ = byte_level[flavour]
        tj = json.loads((ckpt / "tokenizer.json").read_text())
        edit(tj)
        edited = tmp_path / flavour
        edited.mkdir()
        for item in ckpt.iterdir():
            (edited / item.name).write_bytes(item.read_bytes())
        (edited / "tokenizer.json").write_text(json.dumps(tj))
        config = json.loads((edited / "config.json").read_text())
        if expected.endswith("-bpe"):
            assert read_tokenizer(edited, config).pre == expected
        else:
            with pytest.raises(InvalidCheckpointError, match=expected):
                read_tokenizer(edited, config)
