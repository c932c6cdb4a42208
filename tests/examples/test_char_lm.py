"""examples/char_lm.py: the character model learns below the unigram entropy and samples purely."""

from __future__ import annotations

import math
import pathlib
import re

import pytest
import torch

import fnloop as fl
import fnloop.optim as flo

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
SAMPLE_BLOCK = re.compile(
    r"--- sample: (\d+) characters after '(.*?)', temperature \S+ ---\n(.*)\n--- end of sample ---\n", re.S
)


@pytest.fixture(scope="module")
def example(load_example):
    return load_example("char_lm")


@pytest.fixture(scope="module")
def vocab(example):
    return example["Vocab"](example["load_text"]())


@pytest.fixture(scope="module")
def untrained(example, vocab):
    model = example["CharTransformer"](len(vocab), d_model=32, n_heads=2, context=16)
    return fl.TrainState.create(model, flo.adamw(1e-3), seed=3)


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not found in the output:\n{text}"
    return float(match.group(1))


def test_quick_run_learns_and_samples(example, vocab, capsys):
    final = example["main"](["--quick"])
    out = capsys.readouterr().out
    entropy = _number(r"unigram entropy of the validation text ([0-9.]+)", out)
    first = _number(r"val/loss: first ([0-9.]+)", out)
    printed_final = _number(r"val/loss: first [0-9.]+, final ([0-9.]+)", out)
    assert printed_final == pytest.approx(final, abs=1e-4)
    assert 2.5 < entropy < 4.5  # source code over ~100 characters
    assert final < first - 0.1  # validation loss went down after the first validation
    assert final < entropy - 0.3  # and the model uses context: clearly below the unigram entropy
    assert _number(r"final perplexity ([0-9.]+)", out) == pytest.approx(math.exp(final), rel=1e-2)
    block = SAMPLE_BLOCK.search(out)
    assert block, out
    length, prompt, text = int(block.group(1)), block.group(2), block.group(3)
    assert length == 200 and text.startswith(prompt)
    sample = text[len(prompt):]
    assert len(sample) == 200
    assert set(sample) <= set(vocab.chars)


def test_generate_is_a_pure_function_of_the_state(example, vocab, untrained):
    before = torch.get_rng_state()
    a = example["generate"](untrained, vocab, "def f(x):", length=50, temperature=1.0)
    b = example["generate"](untrained, vocab, "def f(x):", length=50, temperature=1.0)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is neither used nor reseeded
    assert a == b and len(a) == 50 and set(a) <= set(vocab.chars)
    later = untrained.replace(step=untrained.step + 1)  # another step seeds another draw
    assert example["generate"](later, vocab, "def f(x):", length=50, temperature=1.0) != a


def test_generate_refuses_unknown_prompt_characters_and_zero_temperature(example, vocab, untrained):
    with pytest.raises(fl.ConfigError, match="prompt"):
        example["generate"](untrained, vocab, "\u00e9", length=5)
    with pytest.raises(fl.ConfigError, match="temperature"):
        example["generate"](untrained, vocab, "def", length=5, temperature=0.0)


def test_the_model_is_causal(example, vocab, untrained):
    ids = torch.randint(0, len(vocab), (2, 16), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % len(vocab)
    logits = fl.predict_step(lambda model, x: model(x))
    a, b = logits(untrained, ids), logits(untrained, changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])  # positions before 10 never see later characters
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_unigram_entropy_of_a_uniform_text_is_log_of_its_size(example):
    assert example["unigram_entropy"](torch.arange(4).repeat(10), 4) == pytest.approx(math.log(4))
    assert example["unigram_entropy"](torch.zeros(7, dtype=torch.int64), 3) == 0.0


def test_bad_flags_are_refused_before_training(example, capsys):
    with pytest.raises(SystemExit):
        example["main"](["--temperature", "0"])
    assert "--temperature=0.0" in capsys.readouterr().err
    with pytest.raises(fl.ConfigError, match="--prompt"):
        example["main"](["--prompt", "\u00e9"])
    assert "val/loss" not in capsys.readouterr().out
