"""batchjax computes what transformers computes, for every supported architecture.

Tiny random HF models are saved with `save_pretrained` and read back through the safetensors
loader; transformers (CPU torch) is the oracle and is needed only here.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

# One thread: torch's thread pool thrashes when the suite runs tests in parallel on few cores.
torch.set_num_threads(1)

from batchjax.attention.dense import dense_causal_attention  # noqa: E402
from batchjax.engine.step import ModelStep  # noqa: E402
from batchjax.models.reference_decode import greedy_decode  # noqa: E402
from batchjax.models.registry import load_model  # noqa: E402

VOCAB = 160
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    # Wider than HF's default 0.02 so random logits have clear argmaxes: greedy parity then
    # tests the model, not float rounding between near-equal logits.
    initializer_range=0.15,
)


@dataclasses.dataclass(frozen=True)
class TinyModel:
    name: str
    config_class: str
    model_class: str
    kwargs: dict


TINY_MODELS = [
    TinyModel(
        "llama3_gqa_rope_scaling",
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_theta=500000.0,
            # original_max_position_embeddings is small so all three frequency bands occur.
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    TinyModel(
        "llama_tied_mha_bias",
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=True,
            attention_bias=True,
        ),
    ),
    TinyModel(
        "qwen2_gqa_tied",
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
    ),
    TinyModel(
        "qwen3_qk_norm_wide_heads",
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
    ),
    TinyModel(
        "mistral_gqa",
        "MistralConfig",
        "MistralForCausalLM",
        dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None, head_dim=16),
    ),
]

PROMPTS = [[3, 17, 99], [5] * 11, list(range(40, 47)), list(range(120, 100, -1))]


def _nudge_biases_and_norms(hf_model) -> None:
    # HF initialises biases to 0 and norm weights to 1, which would hide a wiring mistake there.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """name -> (directory, HF model in f32), built once per session."""
    built = {}
    for spec in TINY_MODELS:
        torch.manual_seed(0)
        config = getattr(transformers, spec.config_class)(**_COMMON, **spec.kwargs)
        hf_model = getattr(transformers, spec.model_class)(config).eval()
        _nudge_biases_and_norms(hf_model)
        directory = tmp_path_factory.mktemp(spec.name)
        hf_model.save_pretrained(directory)
        built[spec.name] = (str(directory), hf_model)
    return built


def _hf_last_logits(hf_model, prompt: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor([prompt])).logits[0, -1].float().numpy()


def _hf_greedy(hf_model, prompt: list[int], steps: int) -> list[int]:
    sequence = list(prompt)
    for _ in range(steps):
        sequence.append(int(_hf_last_logits(hf_model, sequence).argmax()))
    return sequence[len(prompt) :]


def _flat_batch(prompts: list[list[int]]):
    tokens = jnp.asarray(np.concatenate(prompts), jnp.int32)
    segments = jnp.asarray(np.repeat(np.arange(len(prompts)), [len(p) for p in prompts]))
    positions = jnp.asarray(np.concatenate([np.arange(len(p)) for p in prompts]), jnp.int32)
    last = jnp.asarray(np.cumsum([len(p) for p in prompts]) - 1, jnp.int32)
    return tokens, segments, positions, last


def _batch_last_logits(model, prompts: list[list[int]]) -> np.ndarray:
    tokens, segments, positions, last = _flat_batch(prompts)
    attention = dense_causal_attention(segments, positions)
    logits, _ = model(tokens, positions, (None,) * len(model.layers), attention, last)
    return np.asarray(logits)  # [S, vocab]


@pytest.mark.parametrize("name", [m.name for m in TINY_MODELS])
def test_last_position_logits_match_transformers(tiny_models, name):
    directory, hf_model = tiny_models[name]
    loaded = load_model(directory)
    assert loaded.format == "safetensors"
    assert loaded.config.architecture == hf_model.config.architectures[0]
    ours = _batch_last_logits(loaded.model, PROMPTS)
    for row, prompt in zip(ours, PROMPTS):
        np.testing.assert_allclose(row, _hf_last_logits(hf_model, prompt), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", [m.name for m in TINY_MODELS])
def test_greedy_tokens_match_transformers(tiny_models, name):
    directory, hf_model = tiny_models[name]
    ours = greedy_decode(load_model(directory).model, PROMPTS, max_new_tokens=32)
    theirs = [_hf_greedy(hf_model, prompt, 32) for prompt in PROMPTS]
    assert ours == theirs
    # A constant continuation would make the comparison nearly vacuous.
    assert all(len(set(tokens)) > 3 for tokens in ours)


def test_logits_index_selects_rows_of_full_logits(tiny_models):
    directory, _ = tiny_models["qwen2_gqa_tied"]
    model = load_model(directory).model
    tokens, segments, positions, last = _flat_batch(PROMPTS)
    attention = dense_causal_attention(segments, positions)
    kv = (None,) * len(model.layers)
    full, _ = model(tokens, positions, kv, attention)
    picked, _ = model(tokens, positions, kv, attention, last)
    assert full.shape == (tokens.shape[0], VOCAB) and picked.shape == (len(PROMPTS), VOCAB)
    assert full.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(picked), np.asarray(full)[np.asarray(last)], atol=1e-5)


def test_split_jit_merge_matches_eager(tiny_models):
    directory, _ = tiny_models["llama3_gqa_rope_scaling"]
    model = load_model(directory).model
    tokens, segments, positions, last = _flat_batch(PROMPTS)
    num_layers = len(model.layers)
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, tokens, positions, segments, last):
        attention = dense_causal_attention(segments, positions)
        return nnx.merge(graphdef, state)(tokens, positions, (None,) * num_layers, attention, last)

    jitted, kv = step(state, tokens, positions, segments, last)
    eager = _batch_last_logits(model, PROMPTS)
    assert kv == (None,) * num_layers
    np.testing.assert_allclose(np.asarray(jitted), eager, atol=1e-5)


def test_kv_tuple_is_threaded_through_every_layer(tiny_models):
    directory, _ = tiny_models["mistral_gqa"]
    model = load_model(directory).model
    tokens, segments, positions, _ = _flat_batch(PROMPTS)
    dense = dense_causal_attention(segments, positions)
    seen = []

    def counting_attention(layer_idx, q, k, v, layer_kv):
        seen.append((layer_idx, q.shape, k.shape, v.shape))
        out, _ = dense(layer_idx, q, k, v, None)
        return out, layer_kv + 1

    _, kv = model(tokens, positions, (10, 20), counting_attention)
    t = tokens.shape[0]
    assert kv == (11, 21)
    assert seen == [(i, (t, 4, 16), (t, 2, 16), (t, 2, 16)) for i in range(2)]


def test_bf16_safetensors_load_exactly_and_run_in_bf16(tiny_models, tmp_path):
    directory, hf_model = tiny_models["llama3_gqa_rope_scaling"]
    rounded = {k: v.to(torch.bfloat16) for k, v in hf_model.state_dict().items()}
    hf_model.save_pretrained(tmp_path, state_dict=dict(rounded))  # it empties the dict it gets
    # The bf16 file read into f32 must equal HF running the same rounded weights in f32 (a fresh
    # f32 module: casting the module itself would also round HF's RoPE frequency buffer).
    hf_rounded = type(hf_model)(hf_model.config).eval()
    hf_rounded.load_state_dict({k: v.float() for k, v in rounded.items()})
    as_f32 = load_model(str(tmp_path), dtype=jnp.float32)
    np.testing.assert_allclose(
        _batch_last_logits(as_f32.model, PROMPTS[:1])[0],
        _hf_last_logits(hf_rounded, PROMPTS[0]),
        atol=1e-4,
    )
    as_bf16 = load_model(str(tmp_path), dtype=jnp.bfloat16)
    kernel = as_bf16.model.layers[0].self_attn.q_proj.kernel[...]
    assert kernel.dtype == jnp.bfloat16
    logits = _batch_last_logits(as_bf16.model, PROMPTS)
    reference = _batch_last_logits(as_f32.model, PROMPTS)
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    assert np.abs(logits - reference).max() < 0.05 * np.abs(reference).max()
    assert (logits.argmax(-1) == reference.argmax(-1)).all()


def test_sharded_checkpoint_loads_like_single_file(tiny_models, tmp_path):
    directory, hf_model = tiny_models["qwen3_qk_norm_wide_heads"]
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    sharded = _batch_last_logits(load_model(str(tmp_path)).model, PROMPTS)
    single = _batch_last_logits(load_model(directory).model, PROMPTS)
    np.testing.assert_array_equal(sharded, single)


@pytest.mark.parametrize("name", ["qwen2_gqa_tied", "qwen3_qk_norm_wide_heads"])
def test_fused_projections_compute_the_same_logits(tiny_models, name):
    # The engine runs q/k/v and gate/up as one matmul each; a wrong split (order, bias, GQA
    # widths) would change every logit.
    directory, hf_model = tiny_models[name]
    model = load_model(directory).model
    before = _batch_last_logits(model, PROMPTS)
    ModelStep(model)  # fuses its own copy of the layers, not the caller's
    assert model.layers[0].self_attn.q_proj is not None and model.layers[0].mlp.gate_up_proj is None
    model.fuse_projections()
    assert model.layers[0].self_attn.q_proj is None and model.layers[0].mlp.up_proj is None
    after = _batch_last_logits(model, PROMPTS)
    np.testing.assert_allclose(after, before, atol=1e-5, rtol=0)
    np.testing.assert_allclose(after[0], _hf_last_logits(hf_model, PROMPTS[0]), atol=1e-4, rtol=0)
