"""The Jittor MOSS model against transformers' CodeGenForCausalLM (torch CPU, random weights)."""

from __future__ import annotations

import numpy as np
import pytest

from jmoss.api import Model
from jmoss.errors import ConfigError, ContextLengthError
from jmoss.config import MossConfig
from torch_reference import CONFIGS, make_codegen, state_dict_numpy, torch_greedy, torch_logits

NAMES = list(CONFIGS)


@pytest.fixture(scope="module", params=NAMES)
def pair(request):
    torch_model, config = make_codegen(request.param)
    model = Model.from_state_dict(state_dict_numpy(torch_model), config, device="cpu", dtype="float32")
    return request.param, torch_model, model


def _ids(config: MossConfig, batch: int, length: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.vocab_size, size=(batch, length))


def _rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def test_full_sequence_logits_match_transformers_fp32(pair, report):
    name, torch_model, model = pair
    ids = _ids(model.config, 2, 40)
    ours, ref = model.logits(ids), torch_logits(torch_model, ids)
    assert ours.shape == ref.shape == (2, 40, model.config.vocab_size)
    err = _rel_err(ours, ref)
    report(f"{name} fp32 full-sequence max|diff|/max|logits| = {err:.2e} (bound 1e-4)")
    assert err < 1e-4


def test_cached_decoding_equals_full_recomputation(pair, report):
    name, _, model = pair
    ids = _ids(model.config, 1, 30, seed=2)
    full = model.logits(ids)[0]
    session = model.session(max_len=30)
    steps = [session.prefill(ids[:, :10])[0]]
    for t in range(10, 30):
        steps.append(session.decode(ids[:, t])[0])
    incremental = np.stack(steps)  # logits predicting tokens 10..30
    err = _rel_err(incremental, full[9:30])
    report(f"{name} cached decode vs full recompute: max rel diff {err:.2e}")
    assert err < 1e-5


def test_left_padded_batch_equals_rows_alone(pair, report):
    name, torch_model, model = pair
    rows = [list(_ids(model.config, 1, n, seed=n)[0]) for n in (12, 5, 9)]
    session = model.session(batch=3, max_len=20)
    first = session.prefill(rows)
    nxt = first.argmax(-1)
    second = session.decode(nxt)
    worst = 0.0
    for b, row in enumerate(rows):
        alone = model.session(max_len=20)
        a1 = alone.prefill([row])[0]
        a2 = alone.decode([nxt[b]])[0]
        worst = max(worst, _rel_err(first[b], a1), _rel_err(second[b], a2))
    # and the padded batch agrees with transformers given the same mask and positions
    width = max(map(len, rows))
    ids = np.zeros((3, width), dtype=np.int64)
    mask = np.zeros((3, width), dtype=np.int64)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = row
        mask[b, width - len(row):] = 1
    ref = torch_logits(torch_model, ids, mask)[:, -1]
    torch_err = _rel_err(first, ref)
    report(f"{name} left-padded batch vs rows alone {worst:.2e}; vs transformers {torch_err:.2e}")
    assert worst < 1e-5 and torch_err < 1e-4


def greedy(model: Model, prompt: list[int], new_tokens: int) -> list[int]:
    session = model.session(max_len=len(prompt) + new_tokens)
    logits = session.prefill([prompt])
    out = []
    for _ in range(new_tokens):
        token = int(logits[0].argmax())
        out.append(token)
        logits = session.decode([token])
    return out


def test_greedy_32_tokens_identical_to_transformers_generate(pair, report):
    name, torch_model, model = pair
    prompt = list(_ids(model.config, 1, 8, seed=3)[0])
    ours, ref = greedy(model, prompt, 32), torch_greedy(torch_model, prompt, 32)
    report(f"{name} fp32 greedy 32 tokens: {sum(a == b for a, b in zip(ours, ref))}/32 equal")
    assert ours == ref


def test_fp16_compute_within_measured_tolerance_and_same_greedy(pair, report):
    name, torch_model, _ = pair
    config = pair[2].config
    half = Model.from_state_dict(state_dict_numpy(torch_model), config, device="cpu",
                                 dtype="float16", compute_dtype="float16")
    ids = _ids(config, 2, 24, seed=4)
    err = _rel_err(half.logits(ids), torch_logits(torch_model, ids))
    prompt = list(_ids(config, 1, 8, seed=3)[0])
    ours, ref = greedy(half, prompt, 32), torch_greedy(torch_model, prompt, 32)
    report(f"{name} fp16 compute vs fp32 reference: max rel diff {err:.2e} (bound 1e-2); greedy "
           f"{sum(a == b for a, b in zip(ours, ref))}/32 equal")
    assert err < 1e-2
    assert ours == ref


def test_past_n_positions_is_a_clear_error(pair):
    _, _, model = pair
    n = model.config.n_positions
    with pytest.raises(ContextLengthError, match="n_positions"):
        model.logits(np.zeros((1, n + 1), dtype=np.int64))
    session = model.session(max_len=4)
    session.prefill([[1, 2, 3, 4]])
    with pytest.raises(ContextLengthError):
        session.decode([5])


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(n_embd=100, n_head=8), "divisible by n_head"),
        (dict(n_embd=96, n_head=6), "divisible by 4"),
        (dict(n_embd=64, n_head=4, rotary_dim=32), "rotary_dim"),
        (dict(model_type="llama"), "unsupported model_type"),
    ],
)
def test_config_validation_errors(changes, message):
    base = {"model_type": "moss", "n_embd": 64, "n_head": 4, "rotary_dim": 8}
    with pytest.raises(ConfigError, match=message):
        MossConfig.from_dict({**base, **changes})


def test_real_moss_and_codegen_configs_load(shared_dir):
    moss = MossConfig.from_json_file(shared_dir / "assets/moss-moon-003-sft/config.json")
    assert (moss.n_layer, moss.n_head, moss.head_dim, moss.inner_dim, moss.vocab_size) == (34, 24, 256, 24576, 107008)
    codegen = MossConfig.from_json_file(shared_dir / "assets/codegen-350M-mono/config.json")
    assert codegen.model_type == "codegen" and codegen.head_dim == 64 and codegen.rotary_dim == 32


def test_cpu_kernel_path_keeps_parity_and_greedy_tokens(pair, report):
    """fp16 weights with fp32 activations through jmoss.kernels: the fast CPU path."""
    from jmoss import kernels

    name, torch_model, model32 = pair
    assert kernels.available(), kernels.info()
    fast = Model.from_state_dict(state_dict_numpy(torch_model), model32.config, device="cpu",
                                 dtype="float16", compute_dtype="float32")
    assert fast.ops is kernels
    ids = _ids(model32.config, 2, 24, seed=5)
    err = _rel_err(fast.logits(ids), torch_logits(torch_model, ids))
    prompt = list(_ids(model32.config, 1, 8, seed=3)[0])
    ours, ref = greedy(fast, prompt, 32), torch_greedy(torch_model, prompt, 32)
    report(f"{name} kernel path (fp16 weights, fp32 activations) vs fp32 reference: max rel diff {err:.2e}; "
           f"greedy {sum(a == b for a, b in zip(ours, ref))}/32 equal")
    assert err < 5e-3
    assert ours == ref
