"""Tokenizer, chat template and incremental detokenization.

Sources: a GGUF file's ``tokenizer.ggml.*`` metadata (BPE "gpt2" vocabularies,
rebuilt as a ``tokenizers`` object with the pre-tokenizer the file names) or a
Hugging Face ``tokenizer.json``. Chat templates are the model's own Jinja
template, rendered in a sandbox the way Hugging Face does.

:class:`IncrementalDetokenizer` turns a growing list of token ids into text
deltas and never emits a half-decoded multi-byte character: it decodes a small
window of recent tokens and holds text back while it ends in U+FFFD.
"""

from __future__ import annotations

import json
import os
from datetime import datetime

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from splitserve.errors import CorruptModelError, InvalidRequestError, UnsupportedModelError

# Pre-tokenizer regexes of llama.cpp's BPE "pre" types (the same splits HF's tokenizer.json declare).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SUPPORTED_PRE = ("default", "gpt2", "gpt-2", "smollm", "llama-bpe", "llama3", "qwen2")


def _pre_tokenizer(pre: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    split = lambda rx: pre_tokenizers.Split(Regex(rx), behavior="isolated")  # noqa: E731
    if pre in ("default", "gpt2", "gpt-2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # digits one by one, then GPT-2 splitting
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in ("llama-bpe", "llama3"):
        return pre_tokenizers.Sequence([split(_LLAMA3), byte_level])
    if pre == "qwen2":
        return pre_tokenizers.Sequence([split(_QWEN2), byte_level])
    raise UnsupportedModelError(f"GGUF tokenizer pre-type {pre!r} is not supported; supported: {_SUPPORTED_PRE}")


class ChatTemplate:
    def __init__(self, source: str, bos_token: str, eos_token: str):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        self.template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidRequestError(
                    "messages", f"message {i} must be an object with string 'role' and 'content', got {m!r}")
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError as e:
            raise InvalidRequestError("messages", f"the model's chat template rejected the messages: {e}") from None


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's alphabet: the printable character that stands for each byte -> the byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _byte_alphabet()


def _raise_template_error(message: str):
    raise TemplateError(message)


class TextTokenizer:
    """Encode/decode text and apply the chat template; knows the stop token ids."""

    def __init__(self, tok: Tokenizer, eos_token_ids: set[int], bos_token_id: int | None,
                 add_bos: bool, chat_template: str | None):
        self.tok = tok
        self.eos_token_ids = eos_token_ids
        self.bos_token_id = bos_token_id
        self.add_bos = add_bos
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self._byte_level: bool | None = None  # token_bytes: the decoder is byte-level BPE (None: not looked yet)
        self._added_ids: frozenset = frozenset()
        bos = tok.id_to_token(bos_token_id) if bos_token_id is not None else ""
        eos = tok.id_to_token(min(eos_token_ids)) if eos_token_ids else ""
        self.chat_template = ChatTemplate(chat_template, bos or "", eos or "") if chat_template else None

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a token may hold part of a UTF-8 character): an added or
        special token's own text, a byte-level BPE piece through its alphabet, a byte-fallback token's
        ``<0xNN>``, else its decoded text."""
        piece = self.tok.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level is None:  # once: a logprobs response asks for up to 21 tokens per output token
            self._added_ids = frozenset(self.tok.get_added_tokens_decoder())
            self._byte_level = type(self.tok.decoder).__name__ == "ByteLevel"
        if token_id in self._added_ids:
            return piece.encode("utf-8")
        if self._byte_level and all(c in _BYTE_OF for c in piece):
            return bytes(_BYTE_OF[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return self.decode([token_id]).encode("utf-8")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if self.chat_template is None:
            raise InvalidRequestError("messages", "this model declares no chat template; send a plain prompt")
        text = self.chat_template.render(messages, add_generation_prompt)
        # The template writes BOS itself where the model wants it.
        return self.tok.encode(text, add_special_tokens=False).ids

    # -- construction ----------------------------------------------------

    @classmethod
    def from_gguf(cls, reader) -> "TextTokenizer":
        from splitserve.engine.weights.gguf_loader import field

        kind = field(reader, "tokenizer.ggml.model")
        if kind != "gpt2":
            raise UnsupportedModelError(
                f"GGUF tokenizer model {kind!r} is not supported (supported: 'gpt2' BPE); for SentencePiece "
                f"models pass a Hugging Face directory with tokenizer.json")
        tokens = field(reader, "tokenizer.ggml.tokens")
        types = field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = field(reader, "tokenizer.ggml.merges") or []
        if not tokens:
            raise CorruptModelError("GGUF tokenizer has no tokens")
        vocab = {t: i for i, t in enumerate(tokens)}
        bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                         fuse_unk=False, byte_fallback=False)
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = _pre_tokenizer(field(reader, "tokenizer.ggml.pre", "default"))
        tok.decoder = decoders.ByteLevel()
        # token_type 3 = control (special), 4 = user defined: both must never be split.
        added = [AddedToken(tokens[i], special=(t == 3), normalized=False)
                 for i, t in enumerate(types) if t in (3, 4)]
        tok.add_tokens(added)
        eos = {field(reader, "tokenizer.ggml.eos_token_id")}
        eot = field(reader, "tokenizer.ggml.eot_token_id")
        if eot is not None:
            eos.add(eot)
        return cls(tok, {int(e) for e in eos if e is not None}, field(reader, "tokenizer.ggml.bos_token_id"),
                   bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
                   field(reader, "tokenizer.chat_template"))

    @classmethod
    def from_hf_dir(cls, path: str) -> "TextTokenizer":
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise UnsupportedModelError(f"{path!r} has no tokenizer.json (the only tokenizer format supported "
                                        f"for Hugging Face directories)")
        tok = Tokenizer.from_file(tj)
        tcfg = _read_json(os.path.join(path, "tokenizer_config.json"))
        gen = _read_json(os.path.join(path, "generation_config.json"))
        cfg = _read_json(os.path.join(path, "config.json"))
        template = tcfg.get("chat_template")
        jinja_file = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.isfile(jinja_file):
            with open(jinja_file) as f:
                template = f.read()

        def token_id(value):
            if isinstance(value, dict):
                value = value.get("content")
            return tok.token_to_id(value) if isinstance(value, str) else None

        eos_ids = gen.get("eos_token_id", cfg.get("eos_token_id"))
        if eos_ids is None:
            eos_ids = token_id(tcfg.get("eos_token"))
        eos = set(eos_ids if isinstance(eos_ids, list) else [eos_ids]) - {None}
        bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
        if bos is None:
            bos = token_id(tcfg.get("bos_token"))
        # tokenizer.json's post-processor adds BOS where the model wants it; we encode
        # without special tokens, so mirror that choice explicitly.
        add_bos = bos is not None and len(tok.encode("a", add_special_tokens=True).ids) > len(
            tok.encode("a", add_special_tokens=False).ids)
        return cls(tok, {int(e) for e in eos}, bos, add_bos, template)


def load_tokenizer(model_path: str | None) -> TextTokenizer:
    """The tokenizer of a model path (GGUF file or HF dir; None = the default model), without its weights."""
    from splitserve.engine.default_model import default_model_path
    path = model_path or default_model_path()
    if os.path.isdir(path):
        return TextTokenizer.from_hf_dir(path)
    from splitserve.engine.weights.gguf_loader import open_gguf
    return TextTokenizer.from_gguf(open_gguf(path))


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


class IncrementalDetokenizer:
    """Token ids in, text deltas out; never splits a multi-byte character."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the decoding window (context for spacing)
        self.read_offset = 0  # tokens before this are already emitted
        self.text = ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence (or a skipped special token): wait
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of a request: whatever is still held back (incomplete bytes as U+FFFD)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        delta = full[len(prefix):] if len(full) > len(prefix) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta
