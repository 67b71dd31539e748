"""The tokenizer side of a GGUF file, read from a Hugging Face tokenizer folder.

GGUF keeps the vocabulary as ``tokenizer.ggml.*`` metadata:

- ``model``: ``gpt2`` for byte-level BPE (pieces in the GPT-2 byte-to-unicode alphabet, with a
  ranked ``merges`` list) or ``llama`` for SentencePiece (pieces with ``scores``; the highest
  scoring adjacent merge is applied first).
- ``pre``: the name under which llama.cpp knows the pre-tokenizer regexes of a BPE vocabulary.
  We derive it from the ``pre_tokenizer`` of ``tokenizer.json`` (the regexes a model splits text
  with), not from a hash of sample output: the regex list is compared with the lists llama.cpp
  implements under each name.
- ``tokens`` / ``token_type`` (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte);
  ids the tokenizer does not define but the embedding has rows for become ``[PAD<id>]``, unused.
- special token ids, ``add_bos_token`` / ``add_eos_token``, ``add_space_prefix`` and the chat
  template, read with the gguf package's ``SpecialVocab`` (the same reader llama.cpp's converter
  uses).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from mlx_lora.plumbing.errors import ExportError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The split regexes of the common byte-level BPE pre-tokenizers, as tokenizer.json spells them.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
DIGIT_REGEX = r"\p{N}"

PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "gpt-2": (GPT2_REGEX,),
    "llama-bpe": (LLAMA3_REGEX,),
    "qwen2": (QWEN2_REGEX,),
    "smollm": (DIGIT_REGEX, GPT2_REGEX),  # digits split one by one, then GPT-2 (also StarCoder)
}
"""llama.cpp pre-tokenizer name -> the regexes it splits text with, in order (the names export writes)."""

PRE_TOKENIZER_ALIASES: dict[str, str] = {
    "default": "gpt-2",
    "gpt2": "gpt-2",
    "llama3": "llama-bpe",
    "llama-v3": "llama-bpe",
    "smaug-bpe": "llama-bpe",
    "dbrx": "llama-bpe",
    "deepseek-r1-qwen": "qwen2",
    "starcoder": "smollm",
    "refact": "smollm",
    "command-r": "smollm",
}
"""Other llama.cpp names for the same regexes, which files written elsewhere carry."""


@dataclass
class Vocab:
    model: str  # "gpt2" or "llama"
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    add_space_prefix: bool | None = None
    special: Any = None  # gguf.SpecialVocab: merges, special ids, add_* flags, chat template
    notes: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.tokens)


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError) as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None


def split_regexes(pre_tokenizer: dict | None) -> tuple[str, ...] | None:
    """The regexes a ``tokenizer.json`` pre-tokenizer splits with, or None if it does
    something else than splitting (then no llama.cpp name can be derived)."""
    if not pre_tokenizer:
        return ()
    kind = pre_tokenizer.get("type")
    if kind == "Sequence":
        out: list[str] = []
        for p in pre_tokenizer.get("pretokenizers", []):
            part = split_regexes(p)
            if part is None:
                return None
            out.extend(part)
        return tuple(out)
    if kind == "ByteLevel":
        return (GPT2_REGEX,) if pre_tokenizer.get("use_regex", True) else ()
    if kind == "Digits":
        return (DIGIT_REGEX,) if pre_tokenizer.get("individual_digits") else (r"\p{N}+",)
    if kind == "Split":
        pattern = pre_tokenizer.get("pattern") or {}
        if pre_tokenizer.get("behavior", "Isolated") not in ("Isolated", "isolated") or pre_tokenizer.get("invert"):
            return None
        return (pattern.get("Regex") or re.escape(pattern.get("String", "")),)
    return None


def detect_pre_tokenizer(tokenizer_json: dict, source: str = "tokenizer.json") -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE ``tokenizer.json``."""
    regexes = split_regexes(tokenizer_json.get("pre_tokenizer"))
    for name, known in PRE_TOKENIZERS.items():
        if regexes == known:
            return name
    raise ExportError(
        f"{source}: the pre-tokenizer {json.dumps(tokenizer_json.get('pre_tokenizer'))[:300]} matches none that "
        f"llama.cpp implements ({', '.join(PRE_TOKENIZERS)}); pass --pre-tokenizer NAME if you know its llama.cpp name"
    )


def _looks_special(token: str) -> bool:
    # llama.cpp marks these as control tokens even when tokenizer.json does not flag them special.
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


def _added_tokens(folder: Path, tok_json: dict) -> dict[int, tuple[str, bool]]:
    """id -> (content, special) from tokenizer.json and tokenizer_config.json."""
    out: dict[int, tuple[str, bool]] = {}
    for t in tok_json.get("added_tokens") or []:
        out[int(t["id"])] = (t["content"], bool(t.get("special")))
    conf = _load_json(folder / "tokenizer_config.json")
    for tid, t in (conf.get("added_tokens_decoder") or {}).items():
        out.setdefault(int(tid), (t["content"], bool(t.get("special"))))
    return out


def _pad(tokens: list, types: list, scores: list | None, n_vocab: int, source: str, pad_score: float) -> None:
    if len(tokens) > n_vocab:
        raise ExportError(
            f"{source}: the tokenizer defines {len(tokens)} tokens but the model's embedding has only "
            f"{n_vocab} rows (config vocab_size)"
        )
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]")
        types.append(UNUSED)
        if scores is not None:
            scores.append(pad_score)


def backend_json(tokenizer) -> dict | None:
    """The ``tokenizer.json`` content of a loaded (fast) tokenizer, as it actually runs.

    transformers may replace parts of the file when it loads it (e.g. Qwen2's tokenizer class
    installs Qwen2's split regex whatever the file says), so the loaded tokenizer, not the
    file, tells which pre-tokenizer llama.cpp must reproduce."""
    inner = tokenizer
    for attr in ("_tokenizer", "_tokenizer"):  # mlx-lm wrapper -> transformers -> tokenizers
        inner = getattr(inner, attr, None)
        if inner is None:
            return None
        if hasattr(inner, "to_str"):
            try:
                return json.loads(inner.to_str())
            except (ValueError, TypeError):
                return None
    return None


def _bpe_vocab(folder: Path, tok_json: dict, n_vocab: int, pre: str | None, loaded: dict | None) -> Vocab:
    src = str(folder / "tokenizer.json")
    pre = pre or detect_pre_tokenizer(loaded or tok_json, src)
    by_id: dict[int, str] = {int(i): t for t, i in tok_json["model"]["vocab"].items()}
    added = _added_tokens(folder, tok_json)
    top = max([*by_id, *added], default=-1) + 1
    if top > n_vocab:
        raise ExportError(f"{src}: token id {top - 1} is outside the model's embedding ({n_vocab} rows)")
    tokens, types = [], []
    for i in range(top):
        if i in added:
            content, special = added[i]
            tokens.append(content)
            types.append(CONTROL if special or _looks_special(content) else USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
    _pad(tokens, types, None, n_vocab, src, 0.0)
    return Vocab("gpt2", pre, tokens, types)


def _spm_vocab(folder: Path, n_vocab: int) -> Vocab:
    """SentencePiece ``tokenizer.model``: pieces, scores and types as the processor reports them,
    then tokens added in ``added_tokens.json`` / ``tokenizer_config.json`` (score -1000)."""
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise ExportError("exporting a SentencePiece tokenizer needs the 'sentencepiece' package") from None
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(folder / "tokenizer.model"))
    except (OSError, RuntimeError) as e:
        raise ExportError(f"{folder / 'tokenizer.model'}: cannot read ({e})") from None
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.IdToPiece(i))
        scores.append(float(sp.GetScore(i)))
        if sp.IsUnknown(i):
            types.append(UNKNOWN)
        elif sp.IsControl(i):
            types.append(CONTROL)
        elif sp.IsUnused(i):
            types.append(UNUSED)
        elif sp.IsByte(i):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    extra = {int(v): (k, False) for k, v in _load_json(folder / "added_tokens.json").items()}
    extra.update(_added_tokens(folder, _load_json(folder / "tokenizer.json")))
    if extra and max(extra) >= len(tokens):
        _pad(tokens, types, scores, max(extra) + 1, str(folder), -10000.0)
    for tid, (content, special) in sorted(extra.items()):
        if tid >= n_vocab:
            raise ExportError(f"{folder}: added token {content!r} has id {tid}, outside the embedding ({n_vocab} rows)")
        if special or _looks_special(content):
            tokens[tid], types[tid] = content, CONTROL
        else:
            tokens[tid], types[tid] = content.replace("\u2581", " "), USER_DEFINED
        scores[tid] = -1000.0
    _pad(tokens, types, scores, n_vocab, str(folder / "tokenizer.model"), -10000.0)
    return Vocab("llama", "default", tokens, types, scores)


def _spm_bpe_vocab(folder: Path, tok_json: dict, n_vocab: int) -> Vocab:
    """A SentencePiece-style BPE ``tokenizer.json`` (``byte_fallback``, ``▁`` for spaces) without
    ``tokenizer.model``. SentencePiece merges the pair whose result scores highest; giving the
    result of merge rank ``k`` the score ``-k`` makes that the BPE order."""
    src = str(folder / "tokenizer.json")
    model = tok_json["model"]
    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    rank: dict[str, int] = {}
    for k, m in enumerate(model.get("merges") or []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, k)
    added = _added_tokens(folder, tok_json)
    unk = model.get("unk_token")
    top = max([*by_id, *added], default=-1) + 1
    tokens, scores, types = [], [], []
    for i in range(top):
        if i in added:
            content, special = added[i]
            tokens.append(content)
            scores.append(-1000.0)
            types.append(UNKNOWN if content == unk else CONTROL if special or _looks_special(content) else USER_DEFINED)
            continue
        piece = by_id.get(i, f"[PAD{i}]")
        tokens.append(piece)
        scores.append(-float(rank[piece]) if piece in rank else 0.0)
        if i not in by_id:
            types.append(UNUSED)
        elif piece == unk:
            types.append(UNKNOWN)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    _pad(tokens, types, scores, n_vocab, src, -10000.0)
    prefix = None
    text = json.dumps([tok_json.get("normalizer"), tok_json.get("pre_tokenizer")])
    if "Prepend" in text or '"prepend_scheme": "always"' in text or '"prepend_scheme": "first"' in text:
        prefix = True
    elif "Metaspace" in text or "\\u2581" in text or "\u2581" in text:
        prefix = False
    return Vocab("llama", "default", tokens, types, scores, add_space_prefix=prefix)


def read_vocab(folder, config: dict, pre_tokenizer: str | None = None, tokenizer=None) -> Vocab:
    """Read the tokenizer of the HF folder ``folder`` for a model whose embedding has
    ``config["vocab_size"]`` rows. ``tokenizer`` (the loaded tokenizer, optional) decides the
    pre-tokenizer name; ``pre_tokenizer`` overrides it."""

    folder = Path(folder)
    n_vocab = int(config["vocab_size"])
    if (
        pre_tokenizer is not None
        and pre_tokenizer not in PRE_TOKENIZERS
        and not re.fullmatch(r"[\w.-]+", pre_tokenizer)
    ):
        raise ExportError(f"--pre-tokenizer '{pre_tokenizer}' is not a valid llama.cpp pre-tokenizer name")
    tok_json = _load_json(folder / "tokenizer.json")
    tok_conf = _load_json(folder / "tokenizer_config.json")
    if (folder / "tokenizer.model").is_file() and tok_conf.get("tokenizer_class") not in (
        "GPT2Tokenizer",
        "GPT2TokenizerFast",
    ):
        vocab = _spm_vocab(folder, n_vocab)
    elif tok_json:
        model = tok_json.get("model") or {}
        if model.get("type") != "BPE":
            raise ExportError(
                f"{folder / 'tokenizer.json'}: tokenizer model '{model.get('type')}' is not supported "
                f"(supported: byte-level BPE, SentencePiece)"
            )
        if model.get("byte_fallback"):
            vocab = _spm_bpe_vocab(folder, tok_json, n_vocab)
        else:
            vocab = _bpe_vocab(
                folder, tok_json, n_vocab, pre_tokenizer, backend_json(tokenizer) if tokenizer is not None else None
            )
    else:
        raise ExportError(f"{folder}: no tokenizer.json or tokenizer.model; the GGUF file needs the tokenizer")
    if "add_prefix_space" in tok_conf and vocab.model == "llama":
        vocab.add_space_prefix = bool(tok_conf["add_prefix_space"])
    if config.get("model_type") == "gemma2":
        vocab.add_space_prefix = False  # Gemma's SentencePiece model has no dummy prefix
    vocab.special = gguf.SpecialVocab(folder, load_merges=vocab.model == "gpt2", n_vocab=vocab.size)
    if vocab.model == "gpt2" and not vocab.special.merges:
        raise ExportError(f"{folder / 'tokenizer.json'}: a BPE tokenizer without merges cannot be exported")
    _fill_special_ids(vocab, config, tok_conf)
    # generation_config.json may list several end tokens; GGUF holds one EOS id (llama.cpp finds
    # the other end-of-generation tokens by their text when it loads the vocabulary).
    gen = _load_json(folder / "generation_config.json")
    eos = gen.get("eos_token_id", config.get("eos_token_id"))
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    if eos_ids and "eos" not in vocab.special.special_token_ids and 0 <= eos_ids[0] < vocab.size:
        vocab.special.special_token_ids["eos"] = eos_ids[0]
    return vocab


def _fill_special_ids(vocab: Vocab, config: dict, tok_conf: dict) -> None:
    """Special ids SpecialVocab could not resolve (it needs tokenizer.json's added tokens to map
    the names in tokenizer_config.json): from config.json's ``*_token_id``, else by looking the
    token text up in the vocabulary."""
    ids = vocab.special.special_token_ids
    index = {t: i for i, t in reversed(list(enumerate(vocab.tokens)))}
    for typ in ("bos", "eos", "unk", "pad"):
        if typ in ids:
            continue
        tid = config.get(f"{typ}_token_id")
        if not isinstance(tid, int):
            entry = tok_conf.get(f"{typ}_token")
            text = entry.get("content") if isinstance(entry, dict) else entry
            tid = index.get(text) if isinstance(text, str) else None
        if tid is None and typ == "unk" and UNKNOWN in vocab.types:
            tid = vocab.types.index(UNKNOWN)
        if isinstance(tid, int) and 0 <= tid < vocab.size:
            ids[typ] = tid


def write_vocab(writer, vocab: Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    vocab.special.add_to_gguf(writer, quiet=True)


def tokenizer_metadata(vocab: Vocab) -> dict:
    """The ``tokenizer.ggml.*`` keys :func:`write_vocab` writes, as plain values (for checks)."""
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": vocab.model,
        "tokenizer.ggml.pre": vocab.pre,
        "tokenizer.ggml.tokens": vocab.tokens,
        "tokenizer.ggml.token_type": vocab.types,
    }
    if vocab.scores is not None:
        meta["tokenizer.ggml.scores"] = vocab.scores
    if vocab.special.merges:
        meta["tokenizer.ggml.merges"] = vocab.special.merges
    if vocab.add_space_prefix is not None:
        meta["tokenizer.ggml.add_space_prefix"] = vocab.add_space_prefix
    names = {"unk": "unknown", "pad": "padding"}
    for typ, tid in vocab.special.special_token_ids.items():
        meta[f"tokenizer.ggml.{names.get(typ, typ)}_token_id"] = tid
    for typ, value in vocab.special.add_special_token.items():
        meta[f"tokenizer.ggml.add_{typ}_token"] = value
    if vocab.special.chat_template is not None:
        meta["tokenizer.chat_template"] = vocab.special.chat_template
    return meta
