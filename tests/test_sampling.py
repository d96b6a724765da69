"""The sampler's distributions, and stop strings (cut and held back)."""

import pytest
import torch

from splitserve.engine.output import TextState
from splitserve.engine.sampler import sample
from splitserve.engine.sampling_params import SamplingParams

N = 20000


def _freqs(logits, params):
    shared = torch.Generator().manual_seed(0)
    tokens = sample(logits.repeat(N, 1), [params] * N, [None] * N, shared)
    return torch.bincount(torch.tensor(tokens), minlength=logits.shape[-1]).float() / N


def _reference(probs: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """The target distribution in plain torch: probs restricted to ``keep``, renormalised."""
    out = torch.zeros_like(probs)
    out[keep] = probs[keep] / probs[keep].sum()
    return out


PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = torch.log(PROBS)[None, :]


def test_greedy_is_argmax():
    logits = torch.randn(6, 50)
    assert sample(logits, [SamplingParams(temperature=0)] * 6, [None] * 6, torch.Generator()) == \
        logits.argmax(-1).tolist()


@pytest.mark.parametrize("params,expected", [
    (SamplingParams(temperature=1.0), _reference(PROBS, [0, 1, 2, 3])),
    (SamplingParams(temperature=0.5), torch.softmax(LOGITS[0] / 0.5, -1)),
    (SamplingParams(top_k=2), _reference(PROBS, [0, 1])),
    (SamplingParams(top_p=0.7), _reference(PROBS, [0, 1])),   # 0.5 < 0.7, then 0.8 >= 0.7: stop
    (SamplingParams(top_p=0.85), _reference(PROBS, [0, 1, 2])),
    (SamplingParams(top_p=0.3), _reference(PROBS, [0])),      # the top token is always kept
])
def test_sampled_frequencies_match_the_target(params, expected):
    freqs = _freqs(LOGITS, params)
    # total variation distance; with 20k samples the sampling noise is well under 0.02
    assert 0.5 * (freqs - expected).abs().sum() < 0.02, (freqs, expected)
    assert (freqs[expected == 0] == 0).all()  # never outside the allowed set


def test_per_row_parameters_in_one_batch():
    logits = LOGITS.repeat(2, 1)
    params = [SamplingParams(top_k=1), SamplingParams(temperature=0)]
    for _ in range(20):
        assert sample(logits, params, [None, None], torch.Generator()) == [0, 0]


class _CharTokenizer:
    """Stand-in tokenizer for stop-string tests: token id = unicode code point."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(map(chr, ids))


def _stream(text, stop):
    st = TextState(_CharTokenizer(), stop)
    deltas, stopped = [], False
    for ch in text:
        stopped = st.add(ord(ch))
        deltas.append(st.take(final=stopped))
        if stopped:
            break
    if not stopped:
        st.finish()
        deltas.append(st.take(final=True))
    return deltas, stopped


def test_stop_string_cuts_the_text_and_is_never_shown():
    deltas, stopped = _stream("Hello END world", ("END",))
    assert stopped and "".join(deltas) == "Hello "
    assert not any("E" in d for d in deltas)  # the partial "E", "EN" were held back, never emitted


def test_held_back_prefix_is_released_when_it_is_not_a_stop():
    deltas, stopped = _stream("an ENTRY, then more", ("END",))
    assert not stopped and "".join(deltas) == "an ENTRY, then more"
    assert deltas[3] == "" and deltas[4] == ""  # "E", "EN" waited ...
    assert deltas[5] == "ENT"  # ... until "ENT" proved it was not "END"


def test_earliest_of_several_stops_wins():
    deltas, stopped = _stream("abc\n\nxyz STOP", ("STOP", "\n\n"))
    assert stopped and "".join(deltas) == "abc"
