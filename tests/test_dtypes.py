"""Weight dtypes: imports record them, segments compute in them, and split runs equal ``generate`` in them."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from common.chat import chat_token_ids
from common.dtypes import activation_bytes, compute_dtype_name
from common.int8 import Int8Linear, quantize_rows
from common.model_import import EMBEDDED_MODEL_NAME, import_random, import_stored
from common.model_store import EMBED_ROLE, HEAD_ROLE, TOKENIZER_PREFIX, ModelStore, StoredModel, StoreError, layer_role
from common.reference_model import load_reference_model
from common.spans import Span
from node_agent.segment import SegmentRunner
from tests.conftest import reference_greedy
from tests.test_split_equals_generate import PROMPTS, SPLITS

DTYPES = ("float32", "bfloat16", "float16", "int8")
SPLIT_TOKENS = 12


def _layer_bytes(model: StoredModel) -> int:
    return model.manifest.files[layer_role(0)].size


def test_import_records_dtype_and_quantization(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    models = {d: store.open(import_random(store, "tiny-llama", f"tiny-{d}", seed=5, dtype=d)) for d in DTYPES}
    for dtype, model in models.items():
        assert model.manifest.dtype == dtype
        assert model.manifest.config["dtype"] == model.manifest.compute_dtype == compute_dtype_name(dtype)
        assert (model.manifest.quantization is not None) == (dtype == "int8")
    q = models["int8"].load_tensors(layer_role(3))
    assert q["self_attn.q_proj.weight"].dtype == torch.int8 and q["self_attn.q_proj.scale"].dtype == torch.bfloat16
    assert q["input_layernorm.weight"].dtype == torch.bfloat16 and "input_layernorm.scale" not in q
    assert models["int8"].load_tensors(EMBED_ROLE)["weight"].dtype == torch.int8
    assert (models["int8"].manifest.quantization or {})["method"] == "int8-weight-only"
    # bf16 halves each layer file; int8 keeps a quarter plus one scale per row (safetensors headers aside)
    fp32, bf16, int8 = (_layer_bytes(models[d]) for d in ("float32", "bfloat16", "int8"))
    assert 0.49 < bf16 / fp32 < 0.52 and int8 / fp32 < 0.30
    assert import_random(store, "tiny-llama", "tiny-int8", seed=5, dtype="int8") == models["int8"].digest


def test_float_manifests_keep_their_digest(embedded: StoredModel, store: ModelStore) -> None:
    """A manifest without quantization serialises as before, so stores made earlier keep their digests."""
    assert embedded.manifest.quantization is None
    assert b"quantization" not in embedded.manifest.to_bytes()
    assert embedded.digest == store.resolve(EMBEDDED_MODEL_NAME)


def test_same_seed_gives_the_same_weights_in_every_dtype(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    fp32 = store.open(import_random(store, "tiny-llama", "a", seed=2, dtype="float32"))
    bf16 = store.open(import_random(store, "tiny-llama", "b", seed=2, dtype="bfloat16"))
    key = "mlp.up_proj.weight"
    assert torch.equal(fp32.load_tensors(layer_role(1))[key].to(torch.bfloat16), bf16.load_tensors(layer_role(1))[key])


def test_converting_a_quantized_model_is_refused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    int8 = store.open(import_random(store, "tiny-llama", "q", seed=2, dtype="int8"))
    with pytest.raises(StoreError, match="already quantized"):
        import_stored(store, int8, "q2", "bfloat16")


def test_int8_rows_round_trip_within_half_a_step() -> None:
    weight = torch.randn(64, 96) * torch.logspace(-3, 0, 64).unsqueeze(1)  # rows of very different scales
    q, scale = quantize_rows(weight, torch.float32)
    step = scale.unsqueeze(1)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert bool(((q.float() * step - weight).abs() <= step / 2 + 1e-6).all())
    linear = Int8Linear(96, 64, torch.bfloat16)
    linear.weight, linear.scale = q, scale.to(torch.bfloat16)
    x = torch.randn(3, 5, 96, dtype=torch.bfloat16)
    expected = x.float() @ (q.float() * scale.to(torch.bfloat16).float().unsqueeze(1)).T
    torch.testing.assert_close(linear(x).float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_segments_compute_in_the_store_dtype(dtype_store: ModelStore, embedded: StoredModel, dtype: str) -> None:
    model = dtype_store.open(f"{EMBEDDED_MODEL_NAME}-{dtype}")
    first, last = SegmentRunner(model, Span(0, 2)), SegmentRunner(model, Span(2, 30))
    hidden = first.run(first.new_cache(), torch.tensor([[1, 504, 3575]]), 0)
    assert hidden.dtype == torch.bfloat16 and hidden.element_size() == activation_bytes(dtype) == 2
    assert last.last_logits(last.run(last.new_cache(), hidden, 0)).dtype == torch.float32
    full = SegmentRunner(model, Span(0, 30))
    fp32_bytes = sum(e.size for r, e in embedded.manifest.files.items() if not r.startswith(TOKENIZER_PREFIX))
    assert full.parameter_bytes() / fp32_bytes < (0.51 if dtype == "bfloat16" else 0.27)


@pytest.fixture(scope="module")
def expected_greedy(dtype_store: ModelStore, tokenizer: PreTrainedTokenizerBase) -> dict[str, dict[str, list[int]]]:
    """``generate`` on the same weights in the same dtype: per dtype, per prompt of the oracle test set."""
    out: dict[str, dict[str, list[int]]] = {}
    for dtype in ("bfloat16", "int8"):
        reference = load_reference_model(dtype_store.open(f"{EMBEDDED_MODEL_NAME}-{dtype}"))
        out[dtype] = {p: reference_greedy(reference, chat_token_ids(tokenizer, [{"role": "user", "content": p}]),
                                          SPLIT_TOKENS) for p in PROMPTS}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("split", ["uneven, ring closes at head"])  # every split runs live in test_dtype_mesh.py
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_split_greedy_equals_generate_in_dtype(dtype_store: ModelStore, tokenizer: PreTrainedTokenizerBase,
                                               expected_greedy: dict[str, dict[str, list[int]]], dtype: str,
                                               split: str) -> None:
    """An in-process chain of uneven segments: the same greedy ids as ``generate`` for every oracle prompt."""
    model = dtype_store.open(f"{EMBEDDED_MODEL_NAME}-{dtype}")
    boundaries = SPLITS[split][0]
    runners = [SegmentRunner(model, Span(a, b)) for a, b in itertools.pairwise(boundaries)]
    for prompt in PROMPTS:
        ids = chat_token_ids(tokenizer, [{"role": "user", "content": prompt}])
        caches = [r.new_cache() for r in runners]
        tokens: list[int] = []
        step, position = torch.tensor([ids]), 0
        while len(tokens) < len(expected_greedy[dtype][prompt]):
            hidden = step
            for runner, cache in zip(runners, caches, strict=True):
                hidden = runner.run(cache, hidden, position)
            position += step.shape[1]
            tokens.append(int(runners[-1].last_logits(hidden).argmax()))
            step = torch.tensor([[tokens[-1]]])
        assert tokens == expected_greedy[dtype][prompt], f"{dtype}, {split}: {prompt!r}"


def test_cli_import_takes_a_dtype(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "splitmesh", "model", "import", "--random", "tiny-llama",
                             "--dtype", "int8", "--store", str(tmp_path)], capture_output=True, text=True, timeout=120,
                            env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    described = json.loads(result.stdout.strip().splitlines()[-1])
    assert described["dtype"] == "int8" and described["name"] == "tiny-llama-int8"
    bad = subprocess.run([sys.executable, "-m", "splitmesh", "model", "import", "--random", "tiny-llama",
                          "--dtype", "int4", "--store", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid choice: 'int4'" in bad.stderr
    assert HEAD_ROLE in ModelStore(tmp_path).open("tiny-llama-int8").manifest.files


def test_a_node_that_cannot_run_the_dtype_nacks_before_loading(tmp_path: Path) -> None:
    from common.plan_signing import key_id, sign_plan
    from node_agent.plan_state import PlanState, UnsupportedDtype
    from node_agent.segment_pool import SegmentPool
    from tests.test_plan_attacks import CLUSTER, KEY, _plan

    store = ModelStore(tmp_path / "store")
    digest = import_random(store, "tiny-llama", "tiny", seed=0, dtype="int8")
    pool = SegmentPool(store)
    plans = PlanState("me", tmp_path / "state", store, pool, dtypes=("float32", "bfloat16"))
    plans.trust_key(key_id(KEY.public_key()), KEY.public_key(), CLUSTER)
    signed = sign_plan(_plan(digest, 1), KEY)
    view = plans.verify(signed)
    assert view is not None
    with pytest.raises(UnsupportedDtype, match=r"stored in int8; this node runs only float32, bfloat16 \(--dtypes\)"):
        plans.prepare_blocking(view, signed)
    assert pool.spans() == [] and not plans.commit(1)
    able = PlanState("me", tmp_path / "state2", store, SegmentPool(store))
    able.trust_key(key_id(KEY.public_key()), KEY.public_key(), CLUSTER)
    able.prepare_blocking(view, signed)
    assert able.commit(1)


def test_node_config_refuses_unknown_dtypes() -> None:
    from common.config import ConfigError
    from node_agent.config import NodeConfig

    assert NodeConfig(dtypes="bfloat16, int8").dtypes == "bfloat16, int8"
    with pytest.raises(ConfigError, match="expected some of float32"):
        NodeConfig(dtypes="int4")


@pytest.mark.parametrize("dtype", ["int8"])
def test_prefill_logits_over_many_rows(dtype_store: ModelStore, dtype: str) -> None:
    """Every prompt row through the int8 lm_head: store files hold tensors at unaligned offsets, on which torch's
    int8 kernel crashed the process for more than a few rows; the loader hands it aligned copies."""
    model = dtype_store.open(f"{EMBEDDED_MODEL_NAME}-{dtype}")
    reference = load_reference_model(model)
    with torch.inference_mode():
        logits = reference(torch.arange(1, 41).unsqueeze(0)).logits
    assert logits.shape == (1, 40, 49152) and bool(torch.isfinite(logits).all())
    assert all(b.data_ptr() % 64 == 0 for b in reference.buffers() if b.dtype == torch.int8)


def test_activations_travel_in_the_compute_dtype(dtype_store: ModelStore) -> None:
    """bf16 halves a decode step's payload (hidden x 2 bytes) and the chunks of a prefill."""
    from common.tensor_codec import TensorAssembler, encode_tensor

    model = dtype_store.open(f"{EMBEDDED_MODEL_NAME}-int8")
    runner = SegmentRunner(model, Span(0, 1))
    cache = runner.new_cache()
    prefill = runner.run(cache, torch.arange(1, 1001).unsqueeze(0), 0)
    step = runner.run(cache, torch.tensor([[7]]), 1000)
    chunks = encode_tensor(step)
    assert [c.dtype for c in chunks] == ["bfloat16"] and len(chunks[0].data) == 576 * 2
    assert len(encode_tensor(prefill)) == 2 and len(encode_tensor(prefill.float())) == 3  # 1 MiB chunks
    assembler = TensorAssembler()
    decoded = [assembler.add(c) for c in encode_tensor(prefill)][-1]
    assert decoded is not None and decoded.dtype == torch.bfloat16 and torch.equal(decoded, prefill)
