"""charloom's tokenizers as Hugging Face fast tokenizers (the ``tokenizers`` library), id for id.

* char: a word-level vocabulary of single characters behind a pre-tokenizer that isolates every
  character, so each code point is one token; an unknown character becomes the replacement
  character (``--unknown replace``), as a fast tokenizer cannot refuse.
* word: the same vocabulary model behind charloom's word pattern (``WORD_PATTERN``); ``<unk>`` is id 0.
  It is not declared a special token: as in charloom, the text "<unk>" is read as "<", "unk", ">".
* bpe: charloom's byte-level BPE already is a ``tokenizers`` tokenizer; it is used as it is.

Decoding joins the tokens with nothing between them (the ``Fuse`` decoder for char and word, the
byte-level decoder for BPE), so ``decode(encode(text)) == text`` for text in the vocabulary. A run
trained with ``--lowercase`` gets a lowercasing normalizer, as charloom lowercases prompts.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import CharloomError
from ..text.tokenizers import UNK, WORD_PATTERN

INSTALL = "pip install 'charloom[hf]'"


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise CharloomError("export --format hf", "needs the tokenizers package", INSTALL) from None
    return tokenizers


def fast_tokenizer(tokenizer: dict[str, Any], lowercase: bool) -> Any:
    """A ``tokenizers.Tokenizer`` giving charloom's ids for ``tokenizer`` (its ``to_dict``)."""
    tk = _tokenizers()
    kind = tokenizer.get("kind")
    if kind == "bpe":
        fast = tk.Tokenizer.from_str(json.dumps(tokenizer["hf"]))
    elif kind == "char":
        chars = list(tokenizer["chars"])
        unknown = tokenizer.get("replacement") or chars[0]
        fast = tk.Tokenizer(tk.models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=unknown))
        # [\s\S]: any code point, newlines included (Oniguruma's "." stops at a newline).
        fast.pre_tokenizer = tk.pre_tokenizers.Split(tk.Regex(r"[\s\S]"), behavior="isolated")
        fast.decoder = tk.decoders.Fuse()
    elif kind == "word":
        tokens = [UNK, *tokenizer["tokens"]]
        fast = tk.Tokenizer(tk.models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=UNK))
        fast.pre_tokenizer = tk.pre_tokenizers.Split(tk.Regex(WORD_PATTERN.pattern), behavior="isolated")
        fast.decoder = tk.decoders.Fuse()
    else:
        raise CharloomError("export --format hf", f"no Hugging Face tokenizer for charloom's {kind!r} tokens",
                            "use --format onnx")
    if lowercase:
        fast.normalizer = tk.normalizers.Lowercase()
    return fast


def check_tokenizer(loaded: Any, charloom: Any, texts: list[str]) -> None:
    """Raise unless the loaded HF tokenizer gives ``charloom``'s ids for each text and decodes them back to it."""
    for text in texts:
        want = charloom.encode(text, unknown="replace")
        got = list(loaded(text, add_special_tokens=False)["input_ids"])
        back = loaded.decode(want, clean_up_tokenization_spaces=False)
        if got != want or back != charloom.decode(want):
            sample = text[:40]
            raise CharloomError("export --format hf", f"the exported tokenizer disagrees with charloom's on {sample!r}",
                                "this is a bug in charloom's exporter; please report it")
