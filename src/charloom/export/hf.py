"""A charloom transformer as a Hugging Face ``transformers`` folder: weights, config, tokenizer, model card.

charloom's transformer is pre-norm, exact-erf GELU, one fused qkv Linear, a (usually tied) head with a
bias. Each position encoding maps onto a transformers architecture that computes the same function:

* learned positions -> GPT-2 (``GPT2LMHeadModel``). Its ``Conv1D`` layers hold weights as (in, out),
  the transpose of ``nn.Linear``; its fused ``c_attn`` splits q, k, v then heads, as charloom's qkv.
* rotary positions -> GPT-NeoX (``GPTNeoXForCausalLM``) with sequential residuals
  (``use_parallel_residual=False``), rotary on the whole head and the same rotate-half layout. Its
  ``query_key_value`` is laid out per head (q, k, v of head 0, then head 1...), so rows are permuted.

Neither has a bias on its output layer. logits = W (g * x^ + beta) + b, so a bias b is moved into the
final LayerNorm's bias: beta' = beta + c with W c = b, which has an exact solution when W (V, D) has
rank V (a character vocabulary no larger than the width). Otherwise the export is refused.

The folder is written to a temporary place, loaded back with ``AutoModelForCausalLM`` and
``AutoTokenizer`` and checked against charloom (logits on random ids, the tokenizer's ids and text)
before its files are moved into place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import CharloomError
from ..models import LanguageModel
from ..models.transformer import ROPE_BASE, TransformerLM
from ..text.tokenizers import tokenizer_from_dict
from .card import model_card
from .hf_tokenizer import INSTALL, check_tokenizer, fast_tokenizer

TOLERANCE = 1e-4  # max |transformers - charloom| logit, relative to the largest logit
ARCHITECTURES = {"learned": "GPT2LMHeadModel", "rotary": "GPTNeoXForCausalLM"}  # by charloom's --positions


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise CharloomError("export --format hf", "needs the transformers package", INSTALL) from None
    return transformers


@contextlib.contextmanager
def _quiet(tf: Any) -> Iterator[None]:
    """transformers without its progress bars, notes and warnings (on generation defaults, missing pad
    tokens, sequence lengths) while the export runs; the caller's settings are put back after."""
    log = tf.utils.logging
    verbosity, bars = log.get_verbosity(), log.is_progress_bar_enabled()
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.set_verbosity(verbosity)
        if bars:
            log.enable_progress_bar()


def _refuse_other_architectures(net: LanguageModel) -> None:
    if not isinstance(net, TransformerLM):
        raise CharloomError("export --format hf", f"transformers has no architecture that computes charloom's "
                            f"{net.config.model} (it holds attention models)", "use --format onnx")


def _folded_norm_bias(head_w: torch.Tensor, norm_b: torch.Tensor, head_b: torch.Tensor) -> torch.Tensor:
    """The final LayerNorm bias that makes a bias-free head give ``head_w @ (.) + head_b`` (see above)."""
    w, b = head_w.double(), head_b.double()  # (V, D), (V,)
    c = torch.linalg.pinv(w) @ b  # (D,): the smallest c with w c = b, when there is one
    residual = float((w @ c - b).abs().max()) if b.numel() else 0.0
    if residual > 1e-6 * max(1.0, float(b.abs().max())):
        raise CharloomError("export --format hf", f"the output layer's bias has no equivalent in transformers' GPT-2 "
                            f"and GPT-NeoX for {w.shape[0]} tokens over a width of {w.shape[1]}", "use --format onnx")
    return (norm_b.double() + c).float()


def _gpt2(net: LanguageModel, tf: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    cfg = net.config
    config = tf.GPT2Config(vocab_size=net.vocab_size, n_positions=net.context, n_embd=cfg.hidden, n_layer=cfg.layers,
                           n_head=cfg.heads, n_inner=4 * cfg.hidden, activation_function="gelu",
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=net.ln_f.eps,
                           bos_token_id=None, eos_token_id=None, tie_word_embeddings=cfg.tie_weights,
                           architectures=[ARCHITECTURES["learned"]])
    sd = {"transformer.wte.weight": net.wte.weight, "transformer.wpe.weight": net.wpe.weight,
          "transformer.ln_f.weight": net.ln_f.weight}
    for i, b in enumerate(net.blocks):
        p = f"transformer.h.{i}."
        for theirs, ours in (("ln_1", b.ln1), ("attn.c_attn", b.qkv), ("attn.c_proj", b.out), ("ln_2", b.ln2),
                             ("mlp.c_fc", b.mlp[0]), ("mlp.c_proj", b.mlp[2])):
            sd[p + theirs + ".weight"] = ours.weight.t()  # Conv1D holds (in, out)
            sd[p + theirs + ".bias"] = ours.bias
    return config, {**sd, **_head(net, "transformer.ln_f.bias")}


def _neox(net: LanguageModel, tf: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    cfg = net.config
    config = tf.GPTNeoXConfig(vocab_size=net.vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                              num_attention_heads=cfg.heads, intermediate_size=4 * cfg.hidden, hidden_act="gelu",
                              max_position_embeddings=net.context, layer_norm_eps=net.ln_f.eps,
                              use_parallel_residual=False, attention_bias=True, attention_dropout=0.0,
                              hidden_dropout=0.0, bos_token_id=None, eos_token_id=None,
                              rope_parameters={"rope_type": "default", "rope_theta": float(ROPE_BASE),
                                               "partial_rotary_factor": 1.0},
                              tie_word_embeddings=cfg.tie_weights, architectures=[ARCHITECTURES["rotary"]])
    D, H = cfg.hidden, cfg.heads
    sd = {"gpt_neox.embed_in.weight": net.wte.weight, "gpt_neox.final_layer_norm.weight": net.ln_f.weight}
    for i, b in enumerate(net.blocks):
        p = f"gpt_neox.layers.{i}."
        # charloom's qkv rows are (3, heads, dh); GPT-NeoX reads them as (heads, 3, dh).
        qkv_w = b.qkv.weight.view(3, H, D // H, D).transpose(0, 1).reshape(3 * D, D)
        qkv_b = b.qkv.bias.view(3, H, D // H).transpose(0, 1).reshape(3 * D)
        sd.update({p + "attention.query_key_value.weight": qkv_w, p + "attention.query_key_value.bias": qkv_b})
        for theirs, ours in (("input_layernorm", b.ln1), ("attention.dense", b.out), ("post_attention_layernorm", b.ln2),
                             ("mlp.dense_h_to_4h", b.mlp[0]), ("mlp.dense_4h_to_h", b.mlp[2])):
            sd[p + theirs + ".weight"], sd[p + theirs + ".bias"] = ours.weight, ours.bias
    return config, {**sd, **_head(net, "gpt_neox.final_layer_norm.bias")}


def _head(net: LanguageModel, norm_bias: str) -> dict[str, torch.Tensor]:
    out = {norm_bias: _folded_norm_bias(net.head.weight, net.ln_f.bias, net.head.bias)}
    if not net.config.tie_weights:
        out["lm_head.weight"] = net.head.weight
    return out


def _build(net: LanguageModel, tf: Any) -> Any:
    """The transformers model holding ``net``'s weights."""
    config, sd = (_gpt2 if net.wpe is not None else _neox)(net, tf)
    model = tf.AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict({k: v.detach().float().contiguous() for k, v in sd.items()},
                                                strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and net.config.tie_weights)]
    if missing or unexpected:
        raise CharloomError("export --format hf", f"transformers' {type(model).__name__} has other weights "
                            f"({', '.join((missing + unexpected)[:3])})",
                            "use the transformers version charloom's [hf] extra names, or --format onnx")
    return model.eval()


def _check(folder: Path, net: LanguageModel, tokenizer: dict[str, Any], lowercase: bool, tf: Any) -> tuple[float, int]:
    """Load ``folder`` as a user would and compare it with charloom: logits on random ids, the tokenizer."""
    model = tf.AutoModelForCausalLM.from_pretrained(folder)
    loaded = tf.AutoTokenizer.from_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    worst, batches = 0.0, 0
    with torch.inference_mode():
        for rows, length in ((1, 1), (2, net.context), (3, max(1, net.context // 3))):
            ids = torch.randint(0, net.vocab_size, (rows, length), generator=gen)
            want = net(ids)[0]  # (B, T, V): within the context, no window is dropped
            got = model(input_ids=ids).logits
            diff = float((got - want).abs().max())
            worst, batches = max(worst, diff), batches + 1
            if not diff <= TOLERANCE * max(1.0, float(want.abs().max())):
                raise CharloomError("export --format hf", f"the exported model differs from charloom by {diff:.3g}",
                                    "this is a bug in charloom's exporter; please report it")
        ours = tokenizer_from_dict(tokenizer)
        texts = [ours.decode(torch.randint(0, net.vocab_size, (200,), generator=gen).tolist())]
        if tokenizer.get("kind") == "char":
            texts.append(ours.decode(range(net.vocab_size)))  # every character once
        check_tokenizer(loaded, ours, [t.lower() if lowercase else t for t in texts])
    return worst, batches


def write_hf(net: LanguageModel, tokenizer: dict[str, Any], config: dict[str, Any], folder: Callable[[], Path],
             source: Path | None) -> tuple[list[Path], float, int]:
    """Write ``net`` (a float32 CPU copy in eval mode) as a transformers folder into ``folder()``, made once
    every check that needs no writing has passed; the files are checked before they are moved there."""
    _refuse_other_architectures(net)
    tf = _transformers()
    lowercase = bool(config.get("train", {}).get("lowercase"))
    fast = fast_tokenizer(tokenizer, lowercase)
    with _quiet(tf):
        model = _build(net, tf)
    out = folder()
    tmp = Path(tempfile.mkdtemp(prefix=".hf-", dir=out))
    try:
        with _quiet(tf):
            model.save_pretrained(tmp)
            wrapped = tf.PreTrainedTokenizerFast(tokenizer_object=fast, clean_up_tokenization_spaces=False,
                                                 model_max_length=net.context)
            wrapped.save_pretrained(tmp)
            (tmp / "README.md").write_text(model_card(net, config, source, type(model).__name__), encoding="utf-8")
            diff, batches = _check(tmp, net, tokenizer, lowercase, tf)
        files = []
        for path in sorted(tmp.iterdir()):
            os.replace(path, out / path.name)
            files.append(out / path.name)
        return files, diff, batches
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
