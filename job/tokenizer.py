"""The tokenizer: Qwen2.5's real BPE built offline (`qwen2.5-offline`), else AutoTokenizer.

The dashscope wheel ships Qwen's 151,643 BPE ranks (`qwen.tiktoken`); with Qwen2's pre-tokenizer
regex, NFC normalization, Qwen2.5's 22 special tokens and its ChatML template this gives the same
ids as `Qwen/Qwen2.5-14B-Instruct`'s tokenizer without the hub. Built once, then cached on disk.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

from contracts.errors import ContractError

OFFLINE = "qwen2.5-offline"
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen2.5's added tokens from id 151643 on, in order; <tool_call> and </tool_call> are not "special".
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)
FIRST_SPECIAL_ID = 151643
# Qwen2.5-Instruct's ChatML template without the tool branch (the job never passes tools).
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def load_tokenizer(name: str | None, model_id: str | None = None, revision: str | None = None):
    """`qwen2.5-offline` -> the offline Qwen2.5 tokenizer; anything else -> AutoTokenizer."""
    source = name or model_id
    if source == OFFLINE:
        return qwen25_offline()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, revision=revision)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ContractError(f"model.tokenizer: {source!r} could not be loaded ({first}); give a local path, a "
                            f"reachable Hugging Face id, or {OFFLINE!r}") from None


def qwen25_offline():
    """Qwen2.5's tokenizer from the dashscope wheel's BPE ranks, cached under ~/.cache/socrates-launch."""
    ranks = _ranks_file()
    key = hashlib.sha256(ranks.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("SOCRATES_CACHE", Path.home() / ".cache" / "socrates-launch"))
    folder = cache / f"qwen2.5-tokenizer-{key}"
    if (folder / "tokenizer.json").is_file():
        return _wrap(tokenizer_file=str(folder / "tokenizer.json"))
    tok = _build(ranks)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, folder)  # atomic: of two concurrent builds, one wins
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


def _ranks_file() -> Path:
    candidates = [os.environ.get("QWEN_TIKTOKEN")]
    try:
        spec = importlib.util.find_spec("dashscope")
        if spec and spec.submodule_search_locations:
            candidates.append(str(Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"))
    except (ImportError, ValueError):
        pass
    candidates += [".carry/qwen.tiktoken", str(Path(__file__).resolve().parent.parent / ".carry" / "qwen.tiktoken")]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    raise ContractError(f"model.tokenizer: {OFFLINE!r} needs qwen.tiktoken (pip install dashscope, or set "
                        "QWEN_TIKTOKEN to the file); none found")


def _build(ranks: Path):
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN2_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    if hasattr(backend.model, "ignore_merges"):
        backend.model.ignore_merges = False  # Qwen2's tokenizer.json applies merges strictly
    n = backend.get_vocab_size()
    if n != FIRST_SPECIAL_ID:
        raise ContractError(f"{ranks}: {n} BPE ranks, expected {FIRST_SPECIAL_ID} (Qwen's qwen.tiktoken)")
    backend.add_special_tokens([
        AddedToken(t, normalized=False, special=not t.endswith("tool_call>")) for t in SPECIAL_TOKENS
    ])
    return _wrap(tokenizer_object=backend)


def _wrap(**backend):
    """The transformers tokenizer around the BPE backend (`tokenizer_object=` a built one, or `tokenizer_file=`
    the cached tokenizer.json), its settings from here: loading the cache this way takes ~0.6 s where
    from_pretrained takes ~2.3 s (it re-parses the 7 MB tokenizer.json in Python and deep-copies the backend),
    once in every job process that tokenizes. No name_or_path: with one, transformers looks the name up as a
    Mistral model (a hub call; offline, a file path is refused as a repo id)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        **backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "right"
    return tok


def padded_vocab(tok, multiple: int = 128) -> int:
    """Embedding rows for this tokenizer: len(tok) rounded up (Qwen pads 151,665 to 152,064)."""
    return -(-len(tok) // multiple) * multiple
