"""The Model facade that ``charloom.train`` and ``charloom.load`` return: generate, stream, evaluate, inspect.

It holds a network and its tokenizer; generation runs through :mod:`charloom.generation`, scoring through
:mod:`charloom.metrics`. Nothing prints.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .checkpoint import RunDir, check_shapes, load_weights, read_config, resolve
from .config import CACHE_SIZE, ConfigError, DynamicEval, ModelConfig, SampleConfig, TrainConfig, from_dict
from .errors import CharloomError, CheckpointError
from .generation.completion import Completion, complete, make_plan, prompt_ids, run
from .generation.engine import device_of
from .generation.light import encode_prompt
from .generation.options import sample_config
from .generation.processors import build_pipeline, process
from .kernels.choice import sampling_device
from .metrics import EvalResult, dynamic_nats, gradient_rms, record_nats, stateful_nats, windowed_nats
from .models import LanguageModel, build_model, model_class
from .text.encode import open_run_ids
from .text.records import END, RecordIds, Records, layout, record_ids, split_text
from .text.tokenizers import Tokenizer, tokenizer_from_dict


@dataclass
class NextTokens:
    """Every next token after a text: its probability as the model gives it and as sampling reweights it."""

    tokens: list[str]
    probs: list[float]  # softmax(logits): the model's own distribution (T = 1, no cut-off)
    reweighted: list[float]  # after temperature, top-k and top-p: what the sampler draws from


class Model:
    """A trained language model with its tokenizer: generate, stream, evaluate."""

    def __init__(self, net: LanguageModel, tokenizer: Tokenizer, config: dict[str, Any], path: Path | None = None) -> None:
        self.net, self.tokenizer, self.config, self.path = net, tokenizer, config, path
        self.train_config: TrainConfig = from_dict(TrainConfig, config.get("train", {}))
        self.stop_reason: str = config.get("stop_reason", "")
        self.history: list[dict[str, float]] = []
        self.last_completion: Completion | None = None  # what the last stream() produced, with its finish reason
        # A model trained on records (charloom.text.records): where they are in its ids, their labels.
        self.records: RecordIds | None = record_ids(config.get("corpus", {}), tokenizer)
        self.record_labels: dict[str, str] = dict(config.get("corpus", {}).get("records", {}).get("labels") or {})
        # Line records hold no newline: a model fine-tuned from one that knows it must not write one.
        line = config.get("corpus", {}).get("records", {}).get("format") == "line" and "\n" in tokenizer.index
        self.record_banned: list[int] = [tokenizer.index["\n"]] if line else []

    def __repr__(self) -> str:
        m = self.net.config
        return (f"<charloom.Model {m.model} {m.layers}x{m.hidden}, {self.net.num_parameters():,} parameters, "
                f"{self.tokenizer.vocab_size} tokens{f', from {self.path}' if self.path else ''}>")

    def without_cache(self) -> "Model":
        """The same model without its continuous cache (``charloom.models.cache``): weights shared,
        predictions from the network alone. ``self`` when it has no cache."""
        net = self.net.without_cache()
        if net is self.net:
            return self
        config = {**self.config, "model": {**self.config.get("model", {}), "cache_size": 0}}
        twin = Model(net, self.tokenizer, config, self.path)
        twin.history, twin.stop_reason = self.history, self.stop_reason
        return twin

    # -- prompts --------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str, unknown: str = "error") -> list[int]:
        """Prompt ids; unknown symbols raise (listing them and the alphabet), are skipped, or replaced."""
        return encode_prompt(self.tokenizer, prompt, self.train_config.lowercase, unknown)

    # -- generation -----------------------------------------------------------------------------
    def stream(self, prompt: str = "", *, length: int = 400, temperature: float = 1.0, seed: int | None = None,
               unknown: str = "error", stop: Sequence[str] = (), max_time: float = 0.0, **options: Any) -> Iterator[str]:
        """Yield the continuation of ``prompt`` piece by piece as it is drawn.

        Takes the keywords of :meth:`generate` (one temperature, one sample, no beams). Text that
        may be the start of a stop string is held back until it is known not to be one.
        """
        for name in ("num_samples", "num_beams", "logprobs"):
            if name in options:
                raise CharloomError(f"stream({name}=...)", "streams one sample", "use generate() for several samples, beams or log-probabilities")
        plan = make_plan(self, prompt, temperature=temperature, length=length, seed=seed, unknown=unknown, stop=stop,
                         max_time=max_time, **options)
        drawn = run(plan, pieces=True)
        for _, piece in drawn:
            yield piece
        self.last_completion = drawn.completions[0]

    def generate(self, prompt: str = "", *, length: int = 400, temperature: float | Sequence[float] = 1.0,
                 num_samples: int = 1, seed: int | None = None, unknown: str = "error", stop: Sequence[str] = (),
                 max_time: float = 0.0, num_beams: int = 1, logprobs: int | None = None,
                 **options: Any) -> Completion | list[Completion]:
        """The continuation of ``prompt`` (not including it).

        One temperature and one sample give a :class:`Completion`; a list of temperatures or
        ``num_samples > 1`` gives a list ordered temperature-major, all drawn in one batch;
        ``num_beams = K > 1`` gives the K likeliest continuations, best first. ``options`` are
        :class:`~charloom.config.SampleConfig` fields (``top_k``, ``min_p``, ``repetition_penalty``,
        ``ban``, ``logit_bias``, ``samplers``, ``temperature_schedule``...). ``stop`` ends a text at the
        first of these strings; ``max_time`` (seconds, 0 = none) ends all of them; ``logprobs=K``
        adds log-probabilities (of the model's own distribution) with the K likeliest tokens per step.
        """
        many = not isinstance(temperature, (int, float)) or num_samples > 1 or num_beams > 1
        plan = make_plan(self, prompt, temperature=temperature, length=length, num_samples=num_samples, seed=seed,
                         unknown=unknown, stop=stop, max_time=max_time, num_beams=num_beams, logprobs=logprobs, **options)
        out = complete(plan)
        return out if many else out[0]

    @torch.inference_mode()
    def next_token_distribution(self, text: str = "", *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                                unknown: str = "error", label: str = "") -> NextTokens:
        """The probability of every next token after ``text``, before and after sampling's reweighting
        (for a model trained on records, ``text`` starts a record, with ``label`` if given, as in generation).

        One forward pass through the model contract (``net(idx) -> logits``), then the same
        processors generation uses, so ``reweighted`` is exactly what a draw at these settings uses.
        """
        config = sample_config(temperature, top_k=top_k, top_p=top_p)
        ids = prompt_ids(self, text, unknown, label)
        window = self.train_config.generation_window
        device = device_of(self.net)
        idx = torch.tensor([ids[-window:] if window else ids], dtype=torch.long, device=device)  # (1, T)
        logits, _ = self.net(idx)
        place = sampling_device(device)  # where generation runs the processors
        idx, last = idx.to(place), logits[:, -1].float().to(place)  # (1, T), (1, V)
        banned = self.tokenizer.banned_ids
        original = process(build_pipeline(SampleConfig(), banned=banned), idx, last).softmax(-1)[0]
        reweighted = process(build_pipeline(config, banned=banned), idx, last).softmax(-1)[0]
        tokens = [self.tokenizer.decode([i]) for i in range(last.shape[-1])]
        return NextTokens(tokens, original.tolist(), reweighted.tolist())

    def generate_records(self, n: int = 20, prompt: str = "", *, novel: bool = False, **options: Any) -> Any:
        """``n`` whole records (a model trained on records), with how many drawn records copied training ones:
        a :class:`charloom.generation.records.RecordBatch`. ``novel`` keeps only records not in the training set."""
        from .generation.records import draw_records

        return draw_records(self, n, prompt, novel=novel, **options)

    def training_records(self) -> set[str]:
        """The texts of the run's training records (a model trained on records, in its run directory)."""
        if self.records is None:
            raise CharloomError("--novel", "this model was not trained on records", "drop --novel")
        ids, split, _ = self.run_data()
        text = self.tokenizer.decode(np.asarray(ids[:split]).tolist())
        labels = set(self.record_labels.values())
        return {"".join(c for c in piece if c not in labels) for piece in text.split(END) if piece}

    # -- evaluation -----------------------------------------------------------------------------
    def run_data(self) -> tuple[np.ndarray, int, int]:
        """The run's corpus ids (memory-mapped), the token index where validation starts, and its characters."""
        if self.path is None or self.path.parent.name != "checkpoints":
            raise CharloomError(str(self.path or "model"), "is not a checkpoint inside a run directory",
                                "give the run directory (it holds data/ids.bin), or pass a text")
        run = RunDir(self.path.parent.parent)
        if not run.ids_path.is_file():
            raise CharloomError(str(run.ids_path), "the run's data cache is missing", "use the run directory as training left it")
        return open_run_ids(run.ids_path, self.config.get("corpus", {}), self.tokenizer.vocab_size, self.tokenizer.kind == "char")

    def evaluate(self, text: str | None = None, *, exact: bool = True, dynamic: DynamicEval | bool = False,
                 progress: bool | None = None) -> EvalResult:
        """Loss, bits per char and perplexity on ``text``, or on the run's validation split when None.

        ``dynamic`` (True or a :class:`DynamicEval`): dynamic evaluation, adapting the weights to the
        text as it is scored (one exact pass; needs the run's training data for gradient statistics;
        the model is unchanged afterwards). It takes a minute or two on a CPU for a 100k-char split:
        ``progress`` shows bars on stderr (None: only on a terminal)."""
        settings = DynamicEval() if dynamic is True else (dynamic or None)
        if settings is not None:
            self._check_dynamic(settings, exact)
        if self.records is not None and settings is None:
            return self._evaluate_records(text)
        if text is None:
            ids, start, chars = self.run_data()
        else:
            # Out-of-vocabulary words score as <unk>, as they did in training; a char model refuses them.
            unknown = "error" if self.tokenizer.unk_id is None else "replace"
            encoded = self.encode_prompt(text, unknown=unknown) if text else []
            if len(encoded) < 2:
                raise CharloomError("evaluate", "the text is too short to score (fewer than 2 tokens)", "give a longer text")
            ids = np.asarray(encoded, dtype=np.int64)
            start = 1
            # The first token is context only: every character after it is scored.
            scored_text = text.lower() if self.train_config.lowercase else text
            chars = len(scored_text) - len(self.tokenizer.decode(encoded[:1]))
        window = self.train_config.generation_window
        if settings is not None:
            # The validation split's run data is the training split's too; a text needs it read here.
            train_ids, split = (ids, start) if text is None else self._training_split()
            from tqdm.auto import tqdm

            off = None if progress is None else not progress  # tqdm's disable=None: a bar only on a terminal
            with tqdm(total=settings.stats_segments, desc="gradient statistics", unit="batch", disable=off, leave=False) as bar:
                try:
                    # The network alone: the statistics only scale the steps, and a continuous cache over
                    # 64 streams would hold ~130 MB of hidden states for them.
                    rms = gradient_rms(self.net.without_cache(), train_ids, split, settings, tick=bar.update)
                except ValueError as exc:
                    raise CharloomError("dynamic evaluation", str(exc), "train on a longer corpus, or evaluate without it") from None
            with tqdm(total=len(ids) - start, desc="dynamic evaluation", unit="tok", disable=off, leave=False) as bar:
                total, n = dynamic_nats(self.net, ids, start, len(ids), rms, settings, tick=bar.update)
        elif window:
            total, n = windowed_nats(self.net, ids, start, len(ids), window)
        else:
            total, n = stateful_nats(self.net, ids, start, len(ids), streams=1 if exact else 16,
                                     burn_in=2 * self.train_config.seq_len)
        return EvalResult(total, n, chars)

    def _evaluate_records(self, text: str | None) -> EvalResult:
        """Each record from a zero state, its characters and end scored (its label not): the validation
        split, or ``text`` cut into records as the run's corpus was (CSV and JSONL: one record a line)."""
        if text is None:
            ids, start, _ = self.run_data()
        else:
            info = self.config["corpus"]["records"]
            fmt = info["format"] if info["format"] in ("line", "paragraph", "separator") else "line"
            pieces = [t for t in split_text(text, fmt, info.get("separator") or "%") if t.strip()]
            if not pieces:
                raise CharloomError("evaluate", "the text holds no record", "give a text with at least one record")
            joined = layout(Records(pieces, None, fmt), np.arange(len(pieces)))
            unknown = "error" if self.tokenizer.unk_id is None else "replace"
            ids, start = np.asarray(self.encode_prompt(joined, unknown=unknown), dtype=np.int64), 0
        total, n = record_nats(self.net, ids, start, len(ids), self.records)
        return EvalResult(total, n, n)

    def _check_dynamic(self, settings: DynamicEval, exact: bool) -> None:
        try:
            settings.check()
        except ConfigError as exc:
            raise CharloomError("--" + exc.field.replace("_", "-"), str(exc), "see charloom evaluate --help") from None
        if self.records is not None:
            raise CharloomError("dynamic evaluation", "reads one stream of text; this model was trained on records, "
                                "each read from a fresh start", "evaluate it without --dynamic")
        if not exact:
            raise CharloomError("dynamic evaluation", "is one exact pass; it cannot score pieces side by side",
                                "drop --fast (exact=False)")
        if self.train_config.generation_window:
            raise CharloomError("dynamic evaluation", f"needs a model that carries its state; this one reads fixed "
                                f"windows of {self.train_config.generation_window} tokens (the book recipe)",
                                "evaluate it without --dynamic")

    def _training_split(self) -> tuple[np.ndarray, int]:
        # The run's ids and where validation starts, with an error that says what needed them.
        try:
            ids, split, _ = self.run_data()
        except CharloomError as exc:
            raise CharloomError(exc.what, f"{exc.why} (dynamic evaluation reads the run's training split)", exc.fix) from None
        return ids, split


def load(path: str | os.PathLike, which: str = "best", *, cache: bool | None = None,
         device: str | torch.device = "cpu") -> Model:
    """Load a run directory's ``best`` (or ``last``) checkpoint, or a checkpoint directory, onto ``device``
    (a resolved one: :func:`charloom.load` turns ``auto`` and checks what is available).

    ``cache`` is the continuous cache (``charloom.models.cache``), a test-time option: ``None`` keeps
    what training recorded (on only for a run trained with ``--cache-size N``), ``True`` adds one (the
    recorded settings, else ``CACHE_SIZE``), ``False`` predicts with the network alone."""
    ckpt = resolve(path, which)
    config, tok_data = read_config(ckpt)
    try:
        tokenizer = tokenizer_from_dict(tok_data)
        mcfg = from_dict(ModelConfig, config["model"]).validate()
        from_dict(TrainConfig, config.get("train", {})).validate()  # its settings reach every request (a window)
        with torch.device("meta"):  # shapes only, no memory: compared with the file before anything is allocated
            shell = build_model(dataclasses.replace(mcfg, cache_size=0), tokenizer.vocab_size)
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(str(ckpt / "config.json"), f"cannot build the model ({exc})", "use another checkpoint") from None
    check_shapes(ckpt, {k: tuple(v.shape) for k, v in shell.state_dict().items()},
                 sum(p.numel() for p in shell.parameters()))
    if cache is True and not mcfg.cache_size:
        if not model_class(mcfg.model).supports_cache:
            raise CharloomError("--cache", f"a {mcfg.model} has no recurrent hidden state for the continuous cache to match",
                                "use it without --cache")
        mcfg = dataclasses.replace(mcfg, cache_size=CACHE_SIZE)
        config = {**config, "model": {**config["model"], "cache_size": CACHE_SIZE}}
    try:
        net = build_model(mcfg, tokenizer.vocab_size)
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(str(ckpt / "config.json"), f"cannot build the model ({exc})", "use another checkpoint") from None
    load_weights(ckpt, net)  # read on the CPU whatever device trained it, then moved
    net.to(device).eval()
    model = Model(net, tokenizer, config, ckpt)
    return model.without_cache() if cache is False else model
