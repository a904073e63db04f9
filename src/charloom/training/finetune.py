"""Fine-tuning: a new run that starts from another model's weights (``--init-from RUN_DIR`` or ``base``).

The new run keeps the parent's architecture and sizes; its vocabulary is the union of the parent's
characters and the new corpus's (sorted, as every char tokenizer is), so each parameter with a vocabulary
dimension (embedding or one-hot input columns, output rows) is rebuilt: a character the parent knew keeps
its row, a new one keeps the fresh initialisation, with an output bias as low as the parent's lowest (a
new character starts as rare as the rarest known one instead of at the fresh bias of ~0). The optimiser
and schedule start fresh (as char-rnn's ``-init_from`` and the GPT-2 fine-tuning tools do), at
FINETUNE_LR_SCALE of the recipe's learning rate after a short warm-up; the run's config records its parent.

``base`` is the small English model that ships inside the package (BASE_DIR; made by tools/train_base.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import MODEL_FILE, read_config, resolve
from ..config import ModelConfig, from_dict, to_dict
from ..errors import CharloomError, CheckpointError
from ..files import sha256_of
from ..text.tokenizers import CharTokenizer, tokenizer_from_dict

BASE = "base"  # the --init-from name of the bundled model
BASE_DIR = Path(__file__).resolve().parents[1] / "pretrained" / "base"  # a checkpoint directory
# Of the recipe's (size preset's) peak learning rate: 0.25, 0.5, 1 and 1.67 were measured on two corpora the
# base model never saw, and 1 was best on both (docs/finetuning.md); the short warm-up is what differs.
FINETUNE_LR_SCALE = 1.0
FINETUNE_WARMUP = 20  # steps: Adam's moments start fresh on weights that are already good
# Settings that shape the weights: taken from the parent; giving another value is an error.
SHAPE_FIELDS = tuple(f.name for f in fields(ModelConfig) if f.name != "dropout" and not f.name.startswith("cache_"))


@dataclass(frozen=True)
class Parent:
    """The model a run starts from: its checkpoint, model settings, characters, weights and record."""

    path: Path
    model: ModelConfig
    chars: list[str]
    lowercase: bool
    state: dict[str, torch.Tensor]
    record: dict[str, Any]  # the new run's config["parent"]


def load_parent(init_from: str | os.PathLike, which: str = "best") -> Parent:
    """Read the model to start from (a run or checkpoint directory, or ``base``); a one-line error if it cannot be."""
    path = BASE_DIR if str(init_from) == BASE else Path(init_from)
    if str(init_from) == BASE and not (BASE_DIR / MODEL_FILE).is_file():
        raise CharloomError("--init-from base", "the bundled base model is not installed with this copy of charloom",
                            "reinstall charloom, or run tools/train_base.py in a source checkout")
    ckpt = resolve(path, which)
    config, tok_data = read_config(ckpt)
    try:
        tokenizer = tokenizer_from_dict(tok_data)
        model = from_dict(ModelConfig, config["model"]).validate()
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(str(ckpt / "config.json"), f"cannot build the model ({exc})", "use another checkpoint") from None
    if not isinstance(tokenizer, CharTokenizer):
        raise CharloomError("--init-from", f"{init_from} is a {tokenizer.kind}-token model; fine-tuning extends a "
                            "character model's alphabet", "start from a char model, or train from scratch")
    from safetensors.torch import load_file

    state = load_file(str(ckpt / MODEL_FILE))
    record = {"init_from": BASE if str(init_from) == BASE else str(init_from), "checkpoint": ckpt.name,
              "model_sha256": sha256_of(ckpt / MODEL_FILE), "corpus": (config.get("corpus") or {}).get("name")}
    return Parent(ckpt, model, list(tokenizer.chars), bool((config.get("train") or {}).get("lowercase")), state, record)


def parent_settings(parent: Parent, given: dict[str, Any]) -> dict[str, Any]:
    """The model settings a fine-tune takes from its parent, refusing an explicit setting that differs."""
    fixed = {k: v for k, v in to_dict(parent.model).items() if k in SHAPE_FIELDS}
    for name, value in fixed.items():
        if name in given and given[name] != value:
            raise CharloomError(f"--{name.replace('_', '-')}", f"{given[name]!r} differs from the model it starts from "
                                f"({value!r}; --init-from keeps its architecture)", "drop it, or train from scratch")
    return fixed


def union_alphabet(parent: Parent, chars: list[str]) -> list[str]:
    """The fine-tuned model's characters: the parent's and the corpus's, sorted."""
    return sorted(set(parent.chars) | set(chars))


@torch.no_grad()
def grow_into(parent: Parent, chars: list[str], net: torch.nn.Module) -> int:
    """Load the parent's weights into ``net`` (built for ``chars``), row by row along vocabulary dimensions;
    returns how many characters are new."""
    index = {c: i for i, c in enumerate(parent.chars)}
    known_new = torch.tensor([i for i, c in enumerate(chars) if c in index], dtype=torch.long)
    known_old = torch.tensor([index[c] for c in chars if c in index], dtype=torch.long)
    new_rows = torch.tensor([i for i, c in enumerate(chars) if c not in index], dtype=torch.long)
    own = net.state_dict()
    grown: dict[str, torch.Tensor] = {}
    for name, fresh in own.items():
        old = parent.state.get(name)
        if old is None:
            raise CheckpointError(str(parent.path / MODEL_FILE), f"has no {name}", "the parent checkpoint does not match its config")
        dims = [d for d in range(fresh.dim()) if fresh.shape[d] != old.shape[d]] if fresh.dim() == old.dim() else [-1]
        if not dims:
            grown[name] = old
            continue
        if len(dims) != 1 or old.shape[dims[0]] != len(parent.chars) or fresh.shape[dims[0]] != len(chars):
            raise CheckpointError(str(parent.path / MODEL_FILE), f"{name} has shape {tuple(old.shape)}, not one this model "
                                  f"can grow into {tuple(fresh.shape)}", "start from another checkpoint")
        d = dims[0]
        out = fresh.clone()
        out.index_copy_(d, known_new, old.index_select(d, known_old).to(out.dtype))
        if name.endswith("head.bias") and len(new_rows):
            out[new_rows] = old.min()
        grown[name] = out
    net.load_state_dict(grown)
    return len(new_rows)
