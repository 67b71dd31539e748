"""Rebuild a Hugging Face ``tokenizer.json`` (and its config files) from GGUF tokenizer metadata.

GGUF stores the vocabulary as ``tokenizer.ggml.*`` keys: ``model`` (``gpt2`` for byte-level BPE,
``llama`` for SentencePiece), ``tokens`` (piece strings by id), ``token_type`` (1 normal,
2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte), ``merges`` (BPE only, ``"a b"`` by
rank), ``scores`` (SentencePiece only), ``pre`` (which pre-tokenizer regexes llama.cpp applies),
the special token ids, ``add_bos_token`` / ``add_eos_token`` / ``add_space_prefix`` and
``tokenizer.chat_template``.

- ``gpt2``: a byte-level BPE whose pieces are already in the GPT-2 byte-to-unicode alphabet. The
  text is split by the regexes named by ``pre`` (each split keeps matches and the text between
  them as separate pieces), then mapped to that alphabet, then merged.
- ``llama``: SentencePiece BPE. Spaces become ``▁`` and one ``▁`` is prepended to every run of
  text between special tokens (llama.cpp's ``add_space_prefix``); characters missing from the
  vocabulary fall back to ``<0xXX>`` byte pieces. SentencePiece merges the adjacent pair whose
  concatenation has the highest score, so the equivalent ranked merge list is every split
  ``a + b`` of every piece, ordered by the piece's score (ties by id).
"""

from __future__ import annotations

from typing import Any, Optional

from mlx_lora.converters.gguf_vocab import CONTROL, NORMAL, PRE_TOKENIZER_ALIASES, UNKNOWN, USER_DEFINED
from mlx_lora.converters.gguf_vocab import PRE_TOKENIZERS as _EXPORT_PRE_TOKENIZERS
from mlx_lora.plumbing.errors import ModelError

PRE_TOKENIZERS: dict[str, list[str]] = {
    name: list(_EXPORT_PRE_TOKENIZERS[PRE_TOKENIZER_ALIASES.get(name, name)])
    for name in (*_EXPORT_PRE_TOKENIZERS, *PRE_TOKENIZER_ALIASES)
}
"""Every ``tokenizer.ggml.pre`` value we import -> the regexes llama.cpp splits with."""

# Pre-tokenizers for which llama.cpp looks a whole pre-token up in the vocabulary before merging.
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx"}
# Where add_bos_token is absent llama.cpp adds BOS for SentencePiece and for Llama-3-style BPE.
_BOS_BY_DEFAULT = _IGNORE_MERGES


def _get(meta: dict, key: str, default: Any = None) -> Any:
    return meta.get(key, default)


def _required(meta: dict, key: str, source: str) -> Any:
    if key not in meta:
        raise ModelError(f"{source}: tokenizer metadata '{key}' is missing; cannot rebuild the tokenizer")
    return meta[key]


def build_tokenizer(meta: dict, source: str = "GGUF file"):
    """A ``tokenizers.Tokenizer`` equivalent to llama.cpp's for the metadata ``meta``.

    ``meta`` maps GGUF keys to plain Python values (lists for arrays). ``source`` names the file
    in error messages.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _required(meta, "tokenizer.ggml.model", source)
    tokens: list[str] = list(_required(meta, "tokenizer.ggml.tokens", source))
    types = list(_get(meta, "tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise ModelError(f"{source}: 'tokenizer.ggml.token_type' has {len(types)} entries for {len(tokens)} tokens")
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a duplicate piece keeps its first id, as llama.cpp's lookup does

    if kind == "gpt2":
        pre = _get(meta, "tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise ModelError(
                f"{source}: unsupported pre-tokenizer 'tokenizer.ggml.pre' = '{pre}'; supported: "
                f"{', '.join(sorted(PRE_TOKENIZERS))}"
            )
        merges_raw = list(_required(meta, "tokenizer.ggml.merges", source))
        merges = []
        for rank, m in enumerate(merges_raw):
            parts = m.split(" ")
            if len(parts) != 2:
                raise ModelError(
                    f"{source}: 'tokenizer.ggml.merges'[{rank}] = {m!r} is not two pieces separated by a space"
                )
            merges.append((parts[0], parts[1]))
        model = models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _IGNORE_MERGES)
        tok = Tokenizer(model)
        splits = [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in PRE_TOKENIZERS[pre]]
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        tok.decoder = decoders.ByteLevel()
        special_types = (CONTROL,)
    elif kind == "llama":
        scores = list(_required(meta, "tokenizer.ggml.scores", source))
        if len(scores) != len(tokens):
            raise ModelError(f"{source}: 'tokenizer.ggml.scores' has {len(scores)} entries for {len(tokens)} tokens")
        merges = _merges_from_scores(tokens, scores, types)
        unk_id = _get(meta, "tokenizer.ggml.unknown_token_id")
        unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
        model = models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
        tok = Tokenizer(model)
        prefix = bool(_get(meta, "tokenizer.ggml.add_space_prefix", True))
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="always" if prefix else "never", split=False
        )
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
        tok.decoder = decoders.Sequence(steps)
        special_types = (CONTROL, UNKNOWN)
    else:
        raise ModelError(
            f"{source}: unsupported tokenizer model 'tokenizer.ggml.model' = '{kind}'; "
            "supported: gpt2 (BPE), llama (SentencePiece)"
        )

    added = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty in special_types:
            added.append(AddedToken(t, special=True, normalized=False))
        elif ty == USER_DEFINED:
            added.append(AddedToken(t, special=False, normalized=False))
    if added:
        tok.add_tokens(added)

    bos_id = _get(meta, "tokenizer.ggml.bos_token_id")
    eos_id = _get(meta, "tokenizer.ggml.eos_token_id")
    add_bos, add_eos = added_bos_eos(meta)
    if add_bos or add_eos:
        pre_s = [tokens[bos_id]] if add_bos else []
        post_s = [tokens[eos_id]] if add_eos else []
        single = pre_s + ["$A:0"] + post_s
        pair = single + pre_s + ["$B:1"] + post_s
        specials = ([(tokens[bos_id], bos_id)] if add_bos else []) + ([(tokens[eos_id], eos_id)] if add_eos else [])
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def added_bos_eos(meta: dict) -> tuple[bool, bool]:
    """Whether llama.cpp adds BOS / EOS around encoded text for this vocabulary."""
    tokens = meta.get("tokenizer.ggml.tokens") or []
    if meta.get("tokenizer.ggml.model") == "llama":
        bos_default = True
    else:
        bos_default = meta.get("tokenizer.ggml.pre", "default") in _BOS_BY_DEFAULT
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", bos_default))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    return (
        add_bos and _valid(meta.get("tokenizer.ggml.bos_token_id"), tokens),
        add_eos and _valid(meta.get("tokenizer.ggml.eos_token_id"), tokens),
    )


def _valid(token_id: Optional[int], tokens: list[str]) -> bool:
    return token_id is not None and 0 <= int(token_id) < len(tokens)


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """SentencePiece BPE as ranked merges: ``(a, b)`` for every piece ``a + b`` in the vocabulary,
    best-scoring result first (ties by the result's id, then by the split position)."""
    mergeable = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED)}
    found = []
    for piece, pid in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                found.append((-scores[pid], pid, cut, left, right))
    found.sort()
    return [(left, right) for _, _, _, left, right in found]


def tokenizer_files(meta: dict, source: str = "GGUF file", model_max_length: Optional[int] = None) -> dict[str, Any]:
    """The files of a Hugging Face tokenizer folder for ``meta``.

    Returns ``{"tokenizer.json": str, "tokenizer_config.json": dict,
    "special_tokens_map.json": dict}``; the config carries the chat template, BOS/EOS/PAD/UNK
    and whether BOS/EOS are added, in the form transformers' ``PreTrainedTokenizerFast`` reads.
    """
    tok = build_tokenizer(meta, source)
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)

    def name(key: str) -> Optional[str]:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if _valid(i, tokens) else None

    kind = meta["tokenizer.ggml.model"]
    special_types = (CONTROL,) if kind == "gpt2" else (CONTROL, UNKNOWN)
    added_decoder = {}
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty in special_types or ty == USER_DEFINED:
            added_decoder[str(i)] = {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": ty in special_types,
            }
    bos, eos, unk, pad = name("bos"), name("eos"), name("unknown"), name("padding")
    add_bos, add_eos = added_bos_eos(meta)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
        "added_tokens_decoder": added_decoder,
        "clean_up_tokenization_spaces": False,
    }
    if model_max_length:
        config["model_max_length"] = int(model_max_length)
    templates = {
        k[len("tokenizer.chat_template") :].lstrip("."): v
        for k, v in meta.items()
        if k.startswith("tokenizer.chat_template")
    }
    if "" in templates and len(templates) == 1:
        config["chat_template"] = templates[""]
    elif templates:
        config["chat_template"] = [{"name": k or "default", "template": v} for k, v in sorted(templates.items())]
    special_map = {
        k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad)) if v
    }
    return {
        "tokenizer.json": tok.to_str(pretty=True),
        "tokenizer_config.json": config,
        "special_tokens_map.json": special_map,
    }
