"""Synthetic Hugging Face checkpoints and PEFT adapters, written in the exact on-disk layout
transformers and PEFT produce, for every architecture edge-lora supports.

Tiny dims (hidden 256, 4 heads x 64, 2 KV heads, 2 layers) keep a numpy forward pass cheap
while exercising GQA, RoPE, biases, q/k norms, sliding windows and every stored dtype.
Tokenizers are trained with the `tokenizers` library on /usr/share/common-licenses text, so they
are real BPE tokenizers of the two families llama.cpp knows (byte-level "bpe", SentencePiece-style
"spm" with byte fallback). Everything is deterministic in `seed`.
"""

from __future__ import annotations

import functools
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "gemma2", "phi3", "granite", "smollm3")
# Architectures whose fixture config is always one transformers saved (tests/data/configs).
LIBRARY_CONFIG_ARCHS = ("gemma2", "phi3", "granite", "smollm3")
DEFAULT_TOKENIZER = {"llama": "spm", "mistral": "spm", "qwen2": "bpe", "qwen3": "bpe", "gemma3": "spm",
                     "gemma2": "spm", "phi3": "gpt4o", "granite": "granite", "smollm3": "smollm3"}
# One dtype per arch so the suite covers all three safetensors float types.
STORAGE_DTYPE = {"llama": "bfloat16", "mistral": "float16", "qwen2": "float32", "qwen3": "bfloat16",
                 "gemma3": "bfloat16", "gemma2": "float16", "phi3": "bfloat16", "granite": "bfloat16",
                 "smollm3": "bfloat16"}
DEFAULT_TIED = {"llama": False, "mistral": False, "qwen2": True, "qwen3": True, "gemma3": True, "gemma2": True,
                "phi3": True, "granite": True, "smollm3": True}
CONFIG_DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "configs"

HIDDEN = 256
INTERMEDIATE = 512
N_HEADS = 4
HEAD_DIM = 64
N_KV_HEADS = 2
GEMMA3_SLIDING_WINDOW = 8  # tiny on purpose: tests with > 8 tokens exercise the window

LICENSE_DIR = Path("/usr/share/common-licenses")
# Apache-2.0 and MPL-2.0 are the project's held-out evaluation text: train on the others.
TRAINING_TEXTS = ("GPL-3", "LGPL-3", "GPL-2", "Artistic", "BSD", "MPL-1.1", "GFDL-1.3", "CC0-1.0")

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
# Gemma 2 refuses a system message (the Gemma 3 template folds it into the first user turn).
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
# Phi-3 / Phi-3.5-mini-instruct
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
# Phi-4-mini-instruct: the role markers are built from the role name, no newlines
PHI4_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
    "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + "
    "message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] "
    "+ '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}"
    "{{ eos_token }}{% endif %}")
# Granite 3.x (3.1+ add a dated default system prompt when the conversation has none)
GRANITE_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set system_message = \"Knowledge Cutoff Date: April "
    "2024.\nToday's Date: \" + strftime_now('%B %d, %Y') + \".\nYou are Granite, developed by IBM.\" %}"
    "{%- set loop_messages = messages %}{%- endif %}"
    "{{- '<|start_of_role|>system<|end_of_role|>' + system_message + '<|end_of_text|>\n' }}"
    "{%- for message in loop_messages %}{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + "
    "message['content'] + '<|end_of_text|>\n' }}{%- if loop.last and add_generation_prompt %}"
    "{{- '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}{%- endfor %}")
# SmolLM3 (abridged): every conversation opens with a metadata system block (today's date,
# reasoning mode) that wraps the user's system message.
SMOLLM3_TEMPLATE = (
    "{%- set reasoning_mode = '/think' %}{%- if messages[0]['role'] == 'system' %}"
    "{%- set custom_instructions = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set custom_instructions = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- '<|im_start|>system\n## Metadata\n\nKnowledge Cutoff Date: June 2025\nToday Date: ' + "
    "strftime_now('%d %B %Y') + '\nReasoning Mode: ' + reasoning_mode + '\n\n## Custom Instructions\n\n' + "
    "custom_instructions + '\n\n<|im_end|>\n' }}"
    "{%- for message in loop_messages %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")

GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


# ----------------------------------------------------------------------------- tokenizers

class TokenizerFiles:
    """A trained tokenizer plus what tokenizer_config.json / config.json need to know about it."""

    def __init__(self, tokenizer_json: str, config: dict[str, Any], bos_id: int | None, eos_id: int,
                 pad_id: int | None, vocab_size: int) -> None:
        self.tokenizer_json = tokenizer_json
        self.config = config
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.vocab_size = vocab_size


def _training_lines() -> list[str]:
    lines: list[str] = []
    for name in TRAINING_TEXTS:
        path = LICENSE_DIR / name
        if path.exists():
            lines.extend(line for line in path.read_text(errors="replace").splitlines() if line.strip())
    if not lines:
        raise FileNotFoundError(f"no training text under {LICENSE_DIR}")
    return lines


def _added_token(content: str, token_id: int, special: bool = True) -> dict[str, Any]:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": not special, "special": special}


def _code_and_number_lines(n: int = 400) -> list[str]:
    """Digit runs, camelCase, upper-case contractions and indentation, frequent enough that a
    byte-level BPE learns merges inside the pieces its own split makes (so a tokenizer split
    differently, e.g. digits one at a time vs up to three, tokenizes this text differently)."""
    return [f"    def getValue{i % 17}(self, itemId={i * 37 % 1000}): return {i * 12345 % 99991} + 0x{i * 97 % 4096:X}"
            f"  # it's {2000 + i % 30}-{i % 12 + 1:02d}-{i % 28 + 1:02d}; HTTPServer's JSONValue isn't "
            f"WHAT'S EXPECTED, you'll SEE {i % 7 * 111}\t\tdone"
            for i in range(n)]


def _train_byte_level(split_regex: str | None, specials: Sequence[str], vocab_size: int, *,
                      digits: bool = False, ignore_merges: bool = False) -> Tokenizer:
    """A byte-level BPE trained on the license text. ``split_regex`` None: ByteLevel's own
    (GPT-2) regex, optionally after single-digit splitting (StarCoder / SmolLM / Granite)."""
    tok = Tokenizer(models.BPE())
    if split_regex is None:
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)]
        if digits:
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
        tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(_training_lines() + _code_and_number_lines(), trainer=trainer)
    if ignore_merges:  # Llama 3 / Tekken: a word already in the vocabulary is one token
        state = json.loads(tok.to_str())
        state["model"]["ignore_merges"] = True
        tok = Tokenizer.from_str(json.dumps(state))
    # Like Llama-3 and Qwen2, special tokens come after the BPE vocabulary.
    tok.add_special_tokens(list(specials))
    return tok


@dataclass(frozen=True)
class ByteLevelFlavour:
    """A byte-level BPE tokenizer as a model family ships it; ``pre`` is the llama.cpp
    pre-tokenizer name the converter must write for it."""

    pre: str
    split_regex: str | None
    specials: tuple[str, ...]
    bos: str | None  # the BOS the tokenizer adds (None: adds none)
    eos: str
    pad: str | None
    chat_template: str
    clean_up_tokenization_spaces: bool
    digits: bool = False
    ignore_merges: bool = False
    nfc: bool = False
    vocab_size: int = 640


CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BYTE_LEVEL_FLAVOURS: dict[str, ByteLevelFlavour] = {
    # Llama 3 / 3.2 (and SmolLM3, which ships Llama 3's tokenizer)
    "llama3": ByteLevelFlavour("llama-bpe", LLAMA3_SPLIT, ("<|begin_of_text|>", "<|end_of_text|>",
                               "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|begin_of_text|>",
                               "<|eot_id|>", None, LLAMA3_TEMPLATE, True, ignore_merges=True, vocab_size=700),
    # Llama 3's regex without ignore_merges (Smaug, DBRX)
    "smaug": ByteLevelFlavour("smaug-bpe", LLAMA3_SPLIT, ("<|begin_of_text|>", "<|eot_id|>"), "<|begin_of_text|>",
                              "<|eot_id|>", None, LLAMA3_TEMPLATE, True),
    "qwen2": ByteLevelFlavour("qwen2", QWEN2_SPLIT, CHATML_SPECIALS, None, "<|im_end|>", "<|endoftext|>",
                              CHATML_TEMPLATE, False, nfc=True),
    # DeepSeek-R1-Distill-Qwen: Qwen2.5's split with DeepSeek's specials and an added BOS. llama.cpp's
    # "deepseek-r1-qwen" is "qwen2" under another name (same split, flags): "qwen2" is written.
    "deepseek_r1_qwen": ByteLevelFlavour("qwen2", QWEN2_SPLIT, ("<｜begin▁of▁sentence｜>",
                                         "<｜end▁of▁sentence｜>", "<｜User｜>",
                                         "<｜Assistant｜>"), "<｜begin▁of▁sentence｜>",
                                         "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
                                         CHATML_TEMPLATE, False),
    "stablelm2": ByteLevelFlavour("stablelm2", QWEN2_SPLIT, ("<|endoftext|>",), None, "<|endoftext|>", None,
                                  CHATML_TEMPLATE, True),
    # GPT-2 / OLMo: a bare ByteLevel pre-tokenizer, no Split
    "gpt2": ByteLevelFlavour("gpt-2", None, ("<|endoftext|>",), None, "<|endoftext|>", None, CHATML_TEMPLATE, True),
    # SmolLM / SmolLM2: single digits, then ByteLevel; decodes without clean-up
    "smollm2": ByteLevelFlavour("smollm", None, CHATML_SPECIALS, None, "<|im_end|>", "<|im_end|>", CHATML_TEMPLATE,
                                False, digits=True),
    # Granite 3.x / StarCoder: the same split, decoding with clean-up
    "granite": ByteLevelFlavour("refact", None, ("<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>",
                                "<|tool_call|>"), None, "<|end_of_text|>", "<|end_of_text|>", GRANITE_TEMPLATE,
                                True, digits=True),
    # Phi-4-mini (o200k regex)
    "gpt4o": ByteLevelFlavour("gpt-4o", GPT4O_SPLIT, ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>",
                              "<|end|>"), None, "<|endoftext|>", "<|endoftext|>", PHI4_TEMPLATE, False),
    # SmolLM3: Llama 3's tokenizer with ChatML turn markers
    "smollm3": ByteLevelFlavour("llama-bpe", LLAMA3_SPLIT, ("<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>",
                                "<|im_end|>"), None, "<|im_end|>", "<|end_of_text|>", SMOLLM3_TEMPLATE, True,
                                ignore_merges=True, vocab_size=700),
    # Mistral Nemo (Tekken)
    "tekken": ByteLevelFlavour("tekken", TEKKEN_SPLIT, ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), "<s>", "</s>",
                               None, MISTRAL_TEMPLATE, False, ignore_merges=True),
}


@functools.lru_cache(maxsize=None)
def _bpe_tokenizer(flavour: str) -> TokenizerFiles:
    """A byte-level BPE of ``BYTE_LEVEL_FLAVOURS[flavour]``, special tokens after the vocabulary."""
    spec = BYTE_LEVEL_FLAVOURS[flavour]
    tok = _train_byte_level(spec.split_regex, spec.specials, spec.vocab_size, digits=spec.digits,
                            ignore_merges=spec.ignore_merges)
    if spec.nfc:
        tok.normalizer = normalizers.NFC()
    bos = tok.token_to_id(spec.bos) if spec.bos else None
    if spec.bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B:1", special_tokens=[(spec.bos, bos)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    eos = tok.token_to_id(spec.eos)
    pad = tok.token_to_id(spec.pad) if spec.pad else None
    config: dict[str, Any] = {
        "bos_token": spec.bos, "eos_token": spec.eos, "pad_token": spec.pad, "chat_template": spec.chat_template,
        "clean_up_tokenization_spaces": spec.clean_up_tokenization_spaces, "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": spec.bos is not None,
        "added_tokens_decoder": {str(tok.token_to_id(s)): _added_token(s, tok.token_to_id(s)) for s in spec.specials},
    }
    # As in Qwen2/2.5 releases: config.json names <|endoftext|> as bos_token_id, but the
    # tokenizer never adds it (tokenizer_config bos_token null).
    config_bos = bos if bos is not None else pad
    return TokenizerFiles(tok.to_str(), config, config_bos, eos, pad, tok.get_vocab_size(with_added_tokens=True))


def _train_spm_merges(vocab_budget: int, dummy_prefix: bool) -> tuple[list[str], list[tuple[str, str]]]:
    """Train SentencePiece-style BPE pieces (words keep their leading ▁) on the license text."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if dummy_prefix else "never")
    trainer = trainers.BpeTrainer(vocab_size=vocab_budget, min_frequency=2, show_progress=False,
                                  limit_alphabet=120, special_tokens=[])
    tok.train_from_iterator(_training_lines(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    pieces = sorted(model["vocab"], key=lambda p: model["vocab"][p])
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return pieces, merges  # type: ignore[return-value]


@functools.lru_cache(maxsize=None)
def _spm_tokenizer(flavour: str) -> TokenizerFiles:
    """flavour "llama2" (Llama-2/Mistral: <unk> <s> </s>, dummy prefix) or "gemma" (<pad> <eos>
    <bos> <unk>, turn markers, no dummy prefix). Byte tokens <0x00>..<0xFF> follow the controls."""
    if flavour == "llama2":
        controls = ["<unk>", "<s>", "</s>"]
        extra_specials: list[str] = []
        unk, bos_s, eos_s, pad_s = "<unk>", "<s>", "</s>", None
        dummy_prefix = True
    elif flavour == "gemma":
        controls = ["<pad>", "<eos>", "<bos>", "<unk>"]
        extra_specials = ["<start_of_turn>", "<end_of_turn>"]
        unk, bos_s, eos_s, pad_s = "<unk>", "<bos>", "<eos>", "<pad>"
        dummy_prefix = False
    else:
        raise ValueError(f"unknown spm flavour {flavour!r}")
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    pieces, merges = _train_spm_merges(420, dummy_prefix)
    vocab: dict[str, int] = {}
    for piece in [*controls, *extra_specials, *byte_tokens, *pieces]:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    if dummy_prefix:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([*controls, *extra_specials])
    bos = vocab[bos_s]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos_s} $A", pair=f"{bos_s} $A {bos_s} $B:1", special_tokens=[(bos_s, bos)])
    config: dict[str, Any] = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": bos_s, "eos_token": eos_s,
        "unk_token": unk, "pad_token": pad_s, "clean_up_tokenization_spaces": False,
        "legacy": False, "model_max_length": 32768, "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer" if flavour == "gemma" else "LlamaTokenizer",
        "added_tokens_decoder": {str(vocab[s]): _added_token(s, vocab[s]) for s in [*controls, *extra_specials]},
    }
    if flavour == "gemma":
        config["chat_template"] = GEMMA_TEMPLATE
    return TokenizerFiles(tok.to_str(), config, bos, vocab[eos_s], vocab[pad_s] if pad_s else None,
                          tok.get_vocab_size(with_added_tokens=True))


def tokenizer_for(arch: str, kind: str) -> TokenizerFiles:
    """kind "bpe" (the architecture's byte-level BPE), "spm", or a ``BYTE_LEVEL_FLAVOURS`` name."""
    if kind in BYTE_LEVEL_FLAVOURS:
        return _bpe_tokenizer(kind)
    if kind == "bpe":
        return _bpe_tokenizer("qwen2" if arch.startswith("qwen") else "llama3")
    if kind == "spm":
        files = _spm_tokenizer("gemma" if arch in ("gemma2", "gemma3") else "llama2")
        if arch == "gemma3":
            return files
        template = {"mistral": MISTRAL_TEMPLATE, "gemma2": GEMMA2_TEMPLATE, "phi3": PHI3_TEMPLATE}.get(arch, LLAMA2_TEMPLATE)
        config = dict(files.config, chat_template=template)
        return TokenizerFiles(files.tokenizer_json, config, files.bos_id, files.eos_id, files.pad_id,
                              files.vocab_size)
    raise ValueError(f"tokenizer kind must be 'bpe' or 'spm', not {kind!r}")


# ----------------------------------------------------------------------------- safetensors

_ST_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit pattern (uint16), round to nearest even, as torch does."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def _encode(values: np.ndarray, dtype: str) -> bytes:
    if dtype == "float32":
        return np.ascontiguousarray(values, dtype="<f4").tobytes()
    if dtype == "float16":
        return np.ascontiguousarray(values, dtype="<f2").tobytes()
    if dtype == "bfloat16":
        return to_bf16_bits(values).astype("<u2").tobytes()
    raise ValueError(f"unsupported storage dtype {dtype!r}")


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray], dtype: str,
                      metadata: Mapping[str, str] | None = None) -> None:
    """The safetensors layout torch's save_file writes: u64 header size, JSON header (sorted
    names, padded with spaces to 8 bytes), then the raw little-endian data."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    blobs: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        blob = _encode(tensors[name], dtype)
        header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for blob in blobs:
            fh.write(blob)


# ----------------------------------------------------------------------------- configs

def _layer_types(arch: str, n_layers: int, pattern: int) -> list[str]:
    if arch == "gemma3":
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
    return ["full_attention"] * n_layers


def library_config(arch: str, generation: str, tok: TokenizerFiles, *, n_layers: int | None = None,
                   tied: bool | None = None) -> dict[str, Any]:
    """The config.json transformers ``generation`` ("tf4" / "tf5") saved for ``arch``
    (tests/support/make_config_data.py), with the tokenizer's vocabulary size and special ids;
    ``n_layers`` keeps the first layers (and their per-layer lists)."""
    config = json.loads((CONFIG_DATA_DIR / f"{arch}-{generation}.json").read_text())
    config.update(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    config["torch_dtype" if generation == "tf4" else "dtype"] = STORAGE_DTYPE[arch]
    if tied is not None:
        config["tie_word_embeddings"] = tied
    if n_layers is not None:
        config["num_hidden_layers"] = n_layers
        for key in ("layer_types", "no_rope_layers"):
            if key in config:
                config[key] = config[key][:n_layers]
    return config


def make_config(arch: str, tok: TokenizerFiles, *, n_layers: int, tied: bool, kind: str,
                rope_scaling: dict[str, Any] | None = None) -> dict[str, Any]:
    dtype = STORAGE_DTYPE[arch]
    common: dict[str, Any] = {
        "attention_dropout": 0.0, "hidden_size": HIDDEN, "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE, "num_attention_heads": N_HEADS, "num_hidden_layers": n_layers,
        "num_key_value_heads": N_KV_HEADS, "head_dim": HEAD_DIM, "vocab_size": tok.vocab_size,
        "tie_word_embeddings": tied, "torch_dtype": dtype, "transformers_version": "4.56.1",
        "use_cache": True, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
    }
    if arch == "llama":
        llama3 = kind == "bpe"
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
                "hidden_act": "silu", "max_position_embeddings": 8192 if llama3 else 4096, "mlp_bias": False,
                "pretraining_tp": 1, "rms_norm_eps": 1e-5 if llama3 else 1e-6,
                "rope_scaling": rope_scaling, "rope_theta": 500000.0 if llama3 else 10000.0, **common}
    if arch == "mistral":
        return {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu",
                "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
                "sliding_window": None, **common}
    if arch in ("qwen2", "qwen3"):
        config = {"architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "Qwen3ForCausalLM"],
                  "model_type": arch, "hidden_act": "silu", "max_position_embeddings": 32768,
                  "max_window_layers": n_layers, "rms_norm_eps": 1e-6, "rope_scaling": rope_scaling,
                  "rope_theta": 1000000.0, "sliding_window": None, "use_sliding_window": False,
                  "layer_types": _layer_types(arch, n_layers, 0), **common}
        if arch == "qwen3":
            config["attention_bias"] = False
        return config
    if arch == "gemma3":
        pattern = 6
        return {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
                "_sliding_window_pattern": pattern, "sliding_window_pattern": pattern,
                "attention_bias": False, "attn_logit_softcapping": None, "final_logit_softcapping": None,
                "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 32768,
                "pad_token_id": tok.pad_id, "query_pre_attn_scalar": HEAD_DIM, "rms_norm_eps": 1e-6,
                "rope_local_base_freq": 10000.0, "rope_scaling": rope_scaling, "rope_theta": 1000000.0,
                "sliding_window": GEMMA3_SLIDING_WINDOW, "layer_types": _layer_types(arch, n_layers, pattern),
                "use_bidirectional_attention": False, **common}
    raise ValueError(f"arch must be one of {SUPPORTED_ARCHS}, not {arch!r}")


# ----------------------------------------------------------------------------- weights

def make_weights(arch: str, config: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    """float32 weights named as transformers names them. Scales give unit-ish activations and
    logits with a standard deviation of a few units (a clear, non-degenerate distribution)."""
    rng = np.random.default_rng(seed)
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_out = config["num_attention_heads"] * head_dim
    kv_out = config["num_key_value_heads"] * head_dim
    gemma = arch in ("gemma2", "gemma3")

    def linear(n_out: int, n_in: int) -> np.ndarray:
        return (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)

    def norm(n: int, gain: float = 1.0) -> np.ndarray:
        # Gemma stores the offset w of x * (1 + w); the others store the multiplier itself.
        offset = 0.1 * rng.standard_normal(n)
        return (offset + gain - 1.0 if gemma else gain + offset).astype(np.float32)

    tied = config.get("tie_word_embeddings", DEFAULT_TIED[arch])  # transformers 4 omits a class default
    embed_std = 0.2 if tied else 0.5
    # Granite scales the embedding up and every block's output down (residual_multiplier): blocks
    # this much stronger keep their share of the residual stream, as trained Granite weights do.
    block_gain = (np.float32(10 * config.get("embedding_multiplier", 1.0) * embed_std / config.get("residual_multiplier", 1.0))
                  if arch == "granite" else np.float32(1.0))
    weights: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": (embed_std * rng.standard_normal((vocab, hidden))).astype(np.float32)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        if arch == "phi3":  # fused projections, as Phi-3 stores them: rows [q | k | v], [gate | up]
            weights[p + "self_attn.qkv_proj.weight"] = linear(q_out + 2 * kv_out, hidden)
            weights[p + "self_attn.o_proj.weight"] = linear(hidden, q_out)
            weights[p + "mlp.gate_up_proj.weight"] = linear(2 * inter, hidden)
            weights[p + "mlp.down_proj.weight"] = linear(hidden, inter)
            weights[p + "input_layernorm.weight"] = norm(hidden)
            weights[p + "post_attention_layernorm.weight"] = norm(hidden)
            continue
        weights[p + "self_attn.q_proj.weight"] = linear(q_out, hidden)
        weights[p + "self_attn.k_proj.weight"] = linear(kv_out, hidden)
        weights[p + "self_attn.v_proj.weight"] = linear(kv_out, hidden)
        weights[p + "self_attn.o_proj.weight"] = linear(hidden, q_out) * block_gain
        if arch == "qwen2":  # Qwen2 always has q/k/v biases (not in config.json)
            for name, n in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
                weights[p + f"self_attn.{name}.bias"] = (0.5 * rng.standard_normal(n)).astype(np.float32)
        if arch in ("qwen3", "gemma3"):
            weights[p + "self_attn.q_norm.weight"] = norm(head_dim)
            weights[p + "self_attn.k_norm.weight"] = norm(head_dim)
        weights[p + "mlp.gate_proj.weight"] = linear(inter, hidden)
        weights[p + "mlp.up_proj.weight"] = linear(inter, hidden)
        weights[p + "mlp.down_proj.weight"] = linear(hidden, inter) * block_gain
        weights[p + "input_layernorm.weight"] = norm(hidden)
        weights[p + "post_attention_layernorm.weight"] = norm(hidden, gain=12.0 if gemma else 1.0)
        if gemma:
            weights[p + "pre_feedforward_layernorm.weight"] = norm(hidden)
            # Gemma's embedding is scaled by sqrt(hidden) = 16: gains of ~12 on the sandwich
            # post-norms keep the blocks' outputs comparable, so the tied head does not just
            # echo the input token (as trained Gemma post-norm weights do).
            weights[p + "post_feedforward_layernorm.weight"] = norm(hidden, gain=12.0)
    # Granite divides the logits by logits_scaling: a final-norm gain as large keeps their spread.
    weights["model.norm.weight"] = norm(hidden, gain=config.get("logits_scaling", 1.0) if arch == "granite" else 1.0)
    if not tied:
        weights["lm_head.weight"] = (0.2 * rng.standard_normal((vocab, hidden))).astype(np.float32)
    return weights


def _write_weights(out_dir: Path, weights: dict[str, np.ndarray], dtype: str, sharded: bool) -> None:
    if not sharded:
        write_safetensors(out_dir / "model.safetensors", weights, dtype)
        return
    names = sorted(weights)
    # Two shards split mid-stack, embedding in the first and the rest after, as HF's shard writer does.
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map: dict[str, str] = {}
    itemsize = 4 if dtype == "float32" else 2
    total = sum(int(weights[n].size) * itemsize for n in names)
    for k, part in enumerate(halves, start=1):
        fname = f"model-{k:05d}-of-{len(halves):05d}.safetensors"
        write_safetensors(out_dir / fname, {n: weights[n] for n in part}, dtype)
        weight_map.update({n: fname for n in part})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def make_checkpoint(arch: str, out_dir: Path, *, tokenizer: str | None = None, seed: int = 0,
                    tie_embeddings: bool | None = None, n_layers: int | None = None, sharded: bool = False,
                    rope_scaling: dict[str, Any] | None = None, config_generation: str | None = None,
                    config_changes: Mapping[str, Any] | None = None) -> Path:
    """Write a synthetic HF checkpoint directory for `arch` and return it. ``config_generation``
    "tf4" / "tf5": config.json as that transformers version saved it (with non-default RoPE; the
    default for LIBRARY_CONFIG_ARCHS), else the hand-written one. ``config_changes`` are applied last."""
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"arch must be one of {SUPPORTED_ARCHS}, not {arch!r}")
    kind = tokenizer or DEFAULT_TOKENIZER[arch]
    tok = tokenizer_for(arch, kind)
    generation = config_generation or ("tf4" if arch in LIBRARY_CONFIG_ARCHS else None)
    if generation is not None:
        if rope_scaling is not None:
            raise ValueError("rope_scaling applies to hand-written configs; use config_changes")
        config = library_config(arch, generation, tok, n_layers=n_layers, tied=tie_embeddings)
    else:
        tied = DEFAULT_TIED[arch] if tie_embeddings is None else tie_embeddings
        config = make_config(arch, tok, n_layers=n_layers or 2, tied=tied, kind=kind, rope_scaling=rope_scaling)
    config.update(config_changes or {})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation_config = {"_from_model_config": True, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                         "transformers_version": config["transformers_version"]}
    if tok.pad_id is not None:
        generation_config["pad_token_id"] = tok.pad_id
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    (out_dir / "tokenizer.json").write_text(tok.tokenizer_json)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok.config, indent=2) + "\n")
    special_map = {k: tok.config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                   if tok.config.get(k) is not None}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    _write_weights(out_dir, make_weights(arch, config, seed), STORAGE_DTYPE[arch], sharded)
    return out_dir


# ----------------------------------------------------------------------------- PEFT adapters

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's get_pattern_key: the first key K with re.match(rf"(.*\\.)?({K})$", module)."""
    import re

    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def _target_module_names(weight_names: Iterable[str], targets: Sequence[str]) -> list[str]:
    modules = []
    for name in weight_names:
        if not name.endswith(".weight"):
            continue
        module = name[: -len(".weight")]
        if module.split(".")[-1] in targets:
            modules.append(module)
    return sorted(modules)


def make_peft_adapter(ckpt_dir: Path, out_dir: Path, *, r: int = 8, alpha: float = 16,
                      use_rslora: bool = False, use_dora: bool = False,
                      rank_pattern: Mapping[str, int] | None = None,
                      alpha_pattern: Mapping[str, float] | None = None,
                      target_modules: Sequence[str] = DEFAULT_TARGETS,
                      modules_to_save: Sequence[str] | None = None, seed: int = 1,
                      magnitude_scale: float = 0.1, strength: float = 0.02,
                      lora_bias: bool = False, dtype: str = "float32") -> Path:
    """Write adapter_config.json + adapter_model.safetensors exactly as PEFT's save_pretrained does.

    lora_A ~ N(0, 1/in) [r, in], lora_B ~ N(0, strength^2) [out, r] (nonzero: a trained adapter).
    DoRA magnitude = ||W||_row * (1 + magnitude_scale * N(0,1)), saved as `...lora_magnitude_vector`
    (PEFT >= 0.12 strips the DoraLinearLayer's `.weight`). modules_to_save entries are saved as
    full trained copies under `base_model.model.<module>.weight` (PEFT strips
    `modules_to_save.default`). "embed_tokens" in target_modules gives PEFT's embedding LoRA
    (`lora_embedding_A` [r, vocab], `lora_embedding_B` [hidden, r]); lora_bias adds `lora_B.bias`."""
    from tests.support.reference import load_checkpoint  # tests-only helper, independent of the converters

    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    config, base = load_checkpoint(ckpt_dir)
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for module in _target_module_names(base, target_modules):
        w = base[module + ".weight"]
        n_out, n_in = w.shape
        rank = int(_pattern_value(rank_pattern or {}, module, r))
        key = f"base_model.model.{module}"
        if module.endswith("embed_tokens"):  # lora.Embedding: A [r, vocab], B [hidden, r]
            tensors[key + ".lora_embedding_A"] = rng.standard_normal((rank, n_out)).astype(np.float32)
            tensors[key + ".lora_embedding_B"] = (strength * rng.standard_normal((n_in, rank))).astype(np.float32)
            continue
        tensors[key + ".lora_A.weight"] = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32)
        tensors[key + ".lora_B.weight"] = (strength * rng.standard_normal((n_out, rank))).astype(np.float32)
        if lora_bias:
            tensors[key + ".lora_B.bias"] = (strength * rng.standard_normal(n_out)).astype(np.float32)
        if use_dora:
            row_norm = np.linalg.norm(w.astype(np.float64), axis=1)
            magnitude = row_norm * (1.0 + magnitude_scale * rng.standard_normal(n_out))
            tensors[key + ".lora_magnitude_vector"] = magnitude.astype(np.float32)
    if not tensors:
        raise ValueError(f"no module of {ckpt_dir} matches target_modules={list(target_modules)}")
    for module_key in modules_to_save or ():
        matches = [n for n in base if n.endswith(".weight") and
                   (n[: -len(".weight")] == module_key or n[: -len(".weight")].endswith("." + module_key))]
        if not matches and module_key == "lm_head" and config.get("tie_word_embeddings", True):
            matches = ["lm_head.weight"]  # a tied head still is its own module in transformers
        if not matches:
            raise ValueError(f"modules_to_save entry {module_key!r} matches no module of {ckpt_dir}")
        for name in matches:
            source = base.get(name, base["model.embed_tokens.weight"])
            trained = source + 0.02 * rng.standard_normal(source.shape)
            tensors[f"base_model.model.{name}"] = trained.astype(np.float32)
    adapter_config = {
        "alpha_pattern": dict(alpha_pattern or {}), "auto_mapping": None,
        "base_model_name_or_path": str(ckpt_dir), "bias": "none", "corda_config": None,
        "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "layer_replication": None, "layers_pattern": None,
        "layers_to_transform": None, "loftq_config": {}, "lora_alpha": alpha, "lora_bias": lora_bias,
        "lora_dropout": 0.0, "megatron_config": None, "megatron_core": "megatron.core",
        "modules_to_save": list(modules_to_save) if modules_to_save else None, "peft_type": "LORA",
        "peft_version": "0.17.1", "r": r, "rank_pattern": dict(rank_pattern or {}), "revision": None,
        "target_modules": sorted(set(target_modules)), "task_type": "CAUSAL_LM",
        "trainable_token_indices": None, "use_dora": use_dora, "use_rslora": use_rslora,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    write_safetensors(out_dir / "adapter_model.safetensors", tensors, dtype)
    return out_dir


# ----------------------------------------------------------------------------- Gemma 3 multimodal

# How Gemma3ForConditionalGeneration names its language model, by transformers version.
GEMMA3_MULTIMODAL_LAYOUTS: dict[str, dict[str, str]] = {
    "pre-4.52": {"model.": "language_model.model.", "lm_head.": "language_model.lm_head.",
                 "vision": "vision_tower.", "projector": "multi_modal_projector."},
    "4.52+": {"model.": "model.language_model.", "lm_head.": "lm_head.",
              "vision": "model.vision_tower.", "projector": "model.multi_modal_projector."},
}


def multimodal_name(text_name: str, layout: str) -> str:
    """The Gemma3ForConditionalGeneration name of a Gemma3ForCausalLM tensor/module name."""
    for text_prefix in ("model.", "lm_head."):
        if text_name.startswith(text_prefix):
            return GEMMA3_MULTIMODAL_LAYOUTS[layout][text_prefix] + text_name[len(text_prefix):]
    raise ValueError(f"{text_name!r} is not a Gemma 3 text tensor name")


def vision_tensor_names(layout: str) -> list[str]:
    names = GEMMA3_MULTIMODAL_LAYOUTS[layout]
    return [names["vision"] + "vision_model.encoder.layers.0.self_attn.q_proj.weight",
            names["vision"] + "vision_model.post_layernorm.weight",
            names["projector"] + "mm_input_projection_weight"]


def make_gemma3_multimodal_checkpoint(text_dir: Path, out_dir: Path, *, layout: str,
                                      tie_at_top: bool = False, extra_vocab_rows: int = 0) -> Path:
    """A Gemma3ForConditionalGeneration checkpoint whose language model is the Gemma3ForCausalLM
    checkpoint ``text_dir``: its config under text_config, its tensors renamed to ``layout``,
    plus small fake vision tower / projector tensors. Tokenizer files are copied.
    ``extra_vocab_rows`` appends embedding rows no token maps to (as the real models' 262208 vs
    the tokenizer's 262144) and raises vocab_size to match."""
    import shutil

    from tests.support.reference import load_checkpoint

    text_config, weights = load_checkpoint(Path(text_dir))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in Path(text_dir).iterdir():
        if item.name != "config.json" and not item.name.startswith("model.safetensors") \
                and not item.name.startswith("model-"):
            shutil.copy(item, out_dir / item.name)
    nested = {k: v for k, v in text_config.items() if k not in ("architectures", "transformers_version")}
    config: dict[str, Any] = {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "boi_token_index": 255999, "eoi_token_index": 256000, "image_token_index": 262144,
        "mm_tokens_per_image": 256, "initializer_range": 0.02, "text_config": nested,
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 8, "image_size": 16,
                          "patch_size": 8, "num_hidden_layers": 1},
        "transformers_version": text_config.get("transformers_version", "4.56.0"),
    }
    if extra_vocab_rows:
        embed = weights["model.embed_tokens.weight"]
        extra = np.random.default_rng(4).standard_normal((extra_vocab_rows, embed.shape[1])) * embed.std()
        weights["model.embed_tokens.weight"] = np.concatenate([embed, extra.astype(np.float32)])
        nested["vocab_size"] = int(nested["vocab_size"]) + extra_vocab_rows
    if tie_at_top:
        config["tie_word_embeddings"] = nested.pop("tie_word_embeddings", True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {multimodal_name(n, layout): w for n, w in weights.items()}
    rng = np.random.default_rng(3)
    for name in vision_tensor_names(layout):
        tensors[name] = rng.standard_normal((8, 8) if name.endswith("q_proj.weight") or
                                            name.endswith("projection_weight") else (8,)).astype(np.float32)
    write_safetensors(out_dir / "model.safetensors", tensors, STORAGE_DTYPE["gemma3"])
    return out_dir
