"""The Qwen2 byte-level BPE text tokenizer, read from the checkpoint's files.

Uses `tokenizer.json` when the checkpoint has one; otherwise builds the same
tokenizer from `vocab.json`, `merges.txt` and the special tokens listed in
`tokenizer_config.json` (NFC normalisation, the Qwen2 split pattern, byte-level).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


class TextTokenizer:
    def __init__(self, folder: str | Path):
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

        folder = Path(folder)
        if (folder / "tokenizer.json").exists():
            self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            return
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            if not (folder / name).exists():
                raise CheckpointError(f"checkpoint {folder} lacks the text tokenizer file {name}")
        try:
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
            merges = []
            for line in (folder / "merges.txt").read_text(encoding="utf-8").splitlines():
                if line.startswith("#version") or not line.strip():
                    continue
                a, b = line.split(" ")
                merges.append((a, b))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"cannot read the text tokenizer in {folder}: {exc}") from exc
        specials = {int(i): t["content"] for i, t in config.get("added_tokens_decoder", {}).items()}
        vocab.update({content: i for i, content in specials.items()})
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(c, special=True, normalized=False) for _, c in sorted(specials.items())])
        for i, content in specials.items():
            if tok.token_to_id(content) != i:
                raise CheckpointError(f"special token {content!r} should have id {i} in {folder}")
        self._tok = tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def token_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise CheckpointError(f"the text tokenizer has no token {token!r}")
        return i
