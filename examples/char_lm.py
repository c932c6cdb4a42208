"""Train a small transformer character language model on Python's standard-library sources.

The text is already on every machine: a few modules of the standard library (``argparse.py``,
``textwrap.py``, ``collections/__init__.py``...), about 200 KB. The model (token and position
embeddings, 2 pre-norm ``TransformerEncoderLayer`` blocks with a causal mask, dropout) trains
with ``fl.Trainer.fit`` and ``adamw`` under a warmup-cosine schedule with gradient clipping;
then a pure predict step samples text from a prompt, drawing from its own ``torch.Generator``
seeded from the state.

    python examples/char_lm.py                 # full run (about 2.5 minutes on one CPU core)
    python examples/char_lm.py --quick         # a shorter run for smoke tests (about 10 s)

At this model size one intra-op thread is fastest (``--threads`` changes it for the run).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

import fnloop as fl
import fnloop.optim as flo
from fnloop.callbacks import callback_state, with_callback_state

SOURCES = (
    "argparse.py", "textwrap.py", "collections/__init__.py", "functools.py",
    "dataclasses.py", "contextlib.py", "heapq.py", "string.py",
)
SAMPLE_KEY = 0x5A4D  # folded into the state's key: sampling draws apart from dropout


def load_text(max_chars: int = 200_000, sources: Sequence[str] = SOURCES) -> str:
    """The standard-library modules in ``sources`` (those present), joined, cut to ``max_chars``.

    Example:
        >>> len(load_text(1000))
        1000
    """
    root = os.path.dirname(os.__file__)
    parts: list[str] = []
    size = 0
    for name in sources:
        path = os.path.join(root, name)
        if size >= max_chars or not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            parts.append(f.read())
        size += len(parts[-1])
    if not parts:
        raise fl.ConfigError(
            f"load_text: none of {list(sources)} exists under {root}; pass other module paths in sources="
        )
    return "".join(parts)[:max_chars]


class Vocab:
    """The characters of a text, each mapped to its index in sorted order.

    Example:
        >>> v = Vocab("abca")
        >>> v.encode("cab").tolist(), v.decode(torch.tensor([2, 0]))
        ([2, 0, 1], 'ca')
    """

    def __init__(self, text: str):
        self.chars = "".join(sorted(set(text)))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str, *, what: str = "text") -> torch.Tensor:
        """``text`` as an int64 tensor of indices; raises ``ConfigError`` naming unknown characters."""
        unknown = sorted(set(text) - self.index.keys())
        if unknown:
            raise fl.ConfigError(
                f"{what}: characters {unknown[:10]} are not in the training text; use only {self.chars!r}"
            )
        return torch.tensor([self.index[c] for c in text], dtype=torch.int64)

    def decode(self, ids: torch.Tensor) -> str:
        """The characters of ``ids``."""
        return "".join(self.chars[i] for i in ids.tolist())


def unigram_entropy(ids: torch.Tensor, vocab_size: int) -> float:
    """Entropy in nats per character of the character frequencies of ``ids``: the loss of the
    best predictor that ignores context.

    Example:
        >>> round(unigram_entropy(torch.tensor([0, 1, 0, 1]), 2), 4)
        0.6931
    """
    p = torch.bincount(ids, minlength=vocab_size).double() / len(ids)
    p = p[p > 0]
    return float(-(p * p.log()).sum())


class CharTransformer(torch.nn.Module):
    """Token + position embeddings, pre-norm transformer blocks with a causal mask, a linear head.

    Example:
        >>> m = CharTransformer(vocab_size=10, d_model=32, n_heads=2, context=8)
        >>> m(torch.zeros(3, 5, dtype=torch.int64)).shape
        torch.Size([3, 5, 10])
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        d_model: int = 64,
        n_heads: int = 4,
        n_layers: int = 2,
        context: int = 64,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.context = context
        self.tokens = torch.nn.Embedding(vocab_size, d_model)
        self.positions = torch.nn.Embedding(context, d_model)
        self.dropout = torch.nn.Dropout(dropout)
        self.blocks = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(
                d_model, n_heads, dim_feedforward=4 * d_model, dropout=dropout, activation="gelu",
                batch_first=True, norm_first=True,
            )
            for _ in range(n_layers)
        )
        self.norm = torch.nn.LayerNorm(d_model)
        self.head = torch.nn.Linear(d_model, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, time, vocab]`` of the next character at every position of ``ids``."""
        length = ids.shape[1]
        h = self.tokens(ids) + self.positions(torch.arange(length, device=ids.device))
        h = self.dropout(h)
        mask = torch.nn.Transformer.generate_square_subsequent_mask(length, device=ids.device, dtype=h.dtype)
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


def loss_fn(model: Any, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """Next-character cross-entropy (nats) of windows of ``context + 1`` characters."""
    (windows,) = batch
    logits = model(windows[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())


def sample_fn(model: Any, request: Mapping[str, Any]) -> torch.Tensor:
    """Extend ``request["prompt"]`` (``[1, P]`` ids) by ``request["length"]`` sampled ids.

    Each character is drawn from ``softmax(logits / temperature)`` with a ``torch.Generator``
    seeded with ``request["seed"]``; the global RNG is not used. Returns the new ids ``[length]``.
    """
    ids = request["prompt"]
    generator = torch.Generator(device=ids.device).manual_seed(request["seed"])
    for _ in range(request["length"]):
        logits = model(ids[:, -model.context:])[:, -1] / request["temperature"]
        next_id = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        ids = torch.cat([ids, next_id], dim=1)
    return ids[0, request["prompt"].shape[1]:]


SAMPLE = fl.predict_step(sample_fn)


def generate(state: fl.TrainState, vocab: Vocab, prompt: str, *, length: int = 200, temperature: float = 0.8) -> str:
    """``length`` characters sampled after ``prompt``; the same state gives the same text.

    Example:
        >>> import fnloop.optim as flo
        >>> v = Vocab("ab\\n")
        >>> s = fl.TrainState.create(CharTransformer(len(v), d_model=16, n_heads=2, context=8), flo.adamw(), seed=0)
        >>> len(generate(s, v, "ab", length=5))
        5
    """
    if temperature <= 0:
        raise fl.ConfigError(f"generate(temperature={temperature}): the temperature must be > 0")
    request = {
        "prompt": vocab.encode(prompt, what="prompt")[None],
        "length": length,
        "temperature": temperature,
        "seed": fl.rng.fold(int(state.rng), int(state.step), SAMPLE_KEY),
    }
    return vocab.decode(SAMPLE(state, request))


class LossReport(fl.Callback):
    """Prints the train loss at each logging boundary and the validation loss at each
    validation, and keeps every ``(step, val/loss)`` in the state (a checkpoint holds them)."""

    def on_log(self, metrics: Mapping[str, float], step: int) -> None:
        if "train/loss" in metrics:
            print(f"step {step:5d}  train/loss {metrics['train/loss']:.4f}")

    def on_validation_end(self, state: Any, metrics: Mapping[str, float]) -> Any:
        loss = metrics["val/loss"]
        print(f"step {state.loop.global_step:5d}  val/loss {loss:.4f}  perplexity {math.exp(loss):.2f}")
        history = callback_state(state, self.state_key, {"steps": [], "val_loss": []})
        history = {"steps": [*history["steps"], state.loop.global_step], "val_loss": [*history["val_loss"], loss]}
        return with_callback_state(state, self.state_key, history)


def main(argv: list[str] | None = None) -> float:
    """Parse ``argv``, train, print the losses and a sample; returns the final validation loss."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, for smoke tests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 2000, 150 with --quick)")
    parser.add_argument("--batch-size", type=int, default=None, help="windows per batch (default 32, 16 with --quick)")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--prompt", default="def ")
    parser.add_argument("--length", type=int, default=200, help="characters to sample")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (at this size one is fastest)")
    args = parser.parse_args(argv)
    if args.temperature <= 0:
        parser.error(f"--temperature={args.temperature}: the temperature must be > 0")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(previous_threads)


def run(args: argparse.Namespace) -> float:
    """Train, report and sample as ``args`` say; returns the final validation loss."""
    steps = args.steps if args.steps is not None else (150 if args.quick else 2000)
    batch_size = args.batch_size if args.batch_size is not None else (16 if args.quick else 32)
    val_every = max(1, steps // 5)

    text = load_text()
    vocab = Vocab(text)
    vocab.encode(args.prompt, what="--prompt")  # refuse unknown characters before training, not after
    ids = vocab.encode(text)
    split = int(0.9 * len(ids))
    train_ids, val_ids = ids[:split], ids[split:]
    window = args.context + 1
    train = TensorDataset(train_ids.unfold(0, window, 1))  # every position starts a window (a view)
    val = TensorDataset(val_ids.unfold(0, window, args.context))  # disjoint windows
    entropy = unigram_entropy(val_ids, len(vocab))
    print(
        f"text: {len(text)} characters, vocabulary {len(vocab)}, "
        f"unigram entropy of the validation text {entropy:.4f} nats/char"
    )

    model = CharTransformer(len(vocab), d_model=args.d_model, context=args.context)
    schedule = flo.warmup_cosine(3e-3, warmup_steps=steps // 10, decay_steps=steps, end_lr=3e-4)
    tx = flo.chain(  # clip the global gradient norm to 1, then AdamW (no weight decay on biases and norms)
        flo.clip_by_global_norm(1.0),
        flo.adamw(schedule, weight_decay=0.01, mask=flo.ndim_mask(2)),
    )
    state = fl.TrainState.create(model, tx, seed=args.seed)
    trainer = fl.Trainer(
        max_steps=steps,
        val_check_interval=val_every,
        log_every_n_steps=val_every,
        num_sanity_val_steps=0,
        callbacks=[LossReport()],
        enable_progress_bar=False,
    )
    start = time.perf_counter()
    state = trainer.fit(
        state,
        fl.train_step(loss_fn),
        DataLoader(train, batch_size=batch_size, shuffle=True),
        val_step=fl.eval_step(loss_fn),
        val_data=DataLoader(val, batch_size=256),
    )
    seconds = time.perf_counter() - start
    history = state.loop.callbacks["LossReport"]
    first, last = history["val_loss"][0], history["val_loss"][-1]
    print(f"trained {state.loop.global_step} steps in {seconds:.1f} s, status {state.loop.status}")
    print(
        f"val/loss: first {first:.4f}, final {last:.4f} (unigram entropy {entropy:.4f}), "
        f"final perplexity {math.exp(last):.2f}"
    )

    sample = generate(state, vocab, args.prompt, length=args.length, temperature=args.temperature)
    print(f"--- sample: {args.length} characters after {args.prompt!r}, temperature {args.temperature} ---")
    print(args.prompt + sample)
    print("--- end of sample ---")
    return last


if __name__ == "__main__":
    main()
