"""The converted embedded models compute what the GGUF weights compute (SPEC §2.2 checks).

Pinned values come from this conversion and were checked against the SPEC's ranges: a wrong Q/K
permutation, norm offset or tokenizer moves the NLL of plain English to >= 4 nats/token.
"""

from __future__ import annotations

import numpy as np
import pytest

from mlxgate.generate import full_sequence_entropy, generate, score_tokens
from mlxgate.prompts import chat_ids, prompt_ids

SENTENCE = "The quick brown fox jumps over the lazy dog."
PARAGRAPH = (
    "Every spring the river rises with meltwater from the mountains, and the farmers who live along its banks "
    "move their animals to higher ground. For a few weeks the valley floor becomes a shallow lake, and the old stone "
    "bridge is the only way to cross it. When the water goes down, it leaves behind a layer of fine mud that makes "
    "the fields some of the most fertile in the region. The villagers have learned to plant their crops late, after "
    "the flood has passed, and they hold a small festival each year to celebrate the return of dry land."
)


def test_smollm_token_ids(smollm):
    _, tok, _ = smollm
    assert prompt_ids(tok, SENTENCE, raw=True) == [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30]
    ids = chat_ids(tok, [{"role": "user", "content": "Hi"}])
    # ChatML markup: <|im_start|>=1, <|im_end|>=2, "\n"=198; the template adds its default system turn.
    assert ids == [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
                   19712, 8182, 2, 198, 1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198]
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_gemma_token_ids(gemma270):
    _, tok, _ = gemma270
    assert prompt_ids(tok, SENTENCE, raw=True) == [2, 818, 3823, 8864, 37423, 38167, 1024, 506, 31770, 4799, 236761]
    # <bos>=2 once, <start_of_turn>=105, <end_of_turn>=106, "\n"=107, "user"=2364, "model"=4368.
    assert chat_ids(tok, [{"role": "user", "content": "Hi"}]) == [2, 105, 2364, 107, 10979, 106, 107, 105, 4368, 107]


@pytest.mark.parametrize("fixture,expected", [("smollm", 2.8976), ("gemma270", 2.7428)])
def test_paragraph_nll(request, fixture, expected):
    model, tok, _ = request.getfixturevalue(fixture)
    scores = score_tokens(model, prompt_ids(tok, PARAGRAPH, raw=True))
    nll = float(scores["nll"].mean())
    assert nll < 3.5, "a broken conversion gives >= 4 nats/token on plain English"
    assert nll == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize("fixture", ["smollm", "gemma270"])
def test_cached_entropy_equals_full_recompute(request, fixture):
    model, tok, _ = request.getfixturevalue(fixture)
    prompt = prompt_ids(tok, "Tell me about the history of tea.", raw=fixture == "gemma270")
    comp = generate(model, [prompt], 64, eos_ids=set())[0]
    assert len(comp.tokens) == 64
    full = full_sequence_entropy(model, prompt, comp.tokens)
    np.testing.assert_allclose(np.array(comp.entropy), full, atol=1e-3)


def test_instruct_answers_paris(smollm):
    model, tok, _ = smollm
    comp = generate(model, [prompt_ids(tok, "What is the capital of France?")], 24, eos_ids=set(tok.eos_token_ids))[0]
    assert "Paris" in tok.decode(comp.tokens)
    assert comp.finish == "eos"


def test_batched_equals_unbatched_real(smollm):
    model, tok, _ = smollm
    prompts = [prompt_ids(tok, p) for p in ("Name a color.", "Write one sentence about winter mornings.", "2+2=?")]
    batched = generate(model, prompts, 16, eos_ids=set(tok.eos_token_ids))
    for p, b in zip(prompts, batched):
        single = generate(model, [p], 16, eos_ids=set(tok.eos_token_ids))[0]
        assert single.tokens == b.tokens
        np.testing.assert_allclose(single.entropy, b.entropy, atol=1e-4)
