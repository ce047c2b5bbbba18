"""A span of decoder layers built from transformers' own modules, loaded from only its store files.

The first span also owns the embedding; the last also owns the final norm and lm_head. Modules are
created on the meta device and materialised with ``load_state_dict(assign=True)``, so memory holds
nothing but this span's weights. The span computes in the store's compute dtype (bfloat16 for int8
weights, whose linears run :class:`common.int8.Int8Linear`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask

from common.int8 import Int8Embedding, Int8Linear, embedding_from, is_quantized, load_module
from common.model_config import config_from_manifest
from common.model_store import EMBED_ROLE, HEAD_ROLE, StoredModel, layer_role
from common.spans import Span
from node_agent.batched_cache import BatchedDecodeCache, SessionCache, padding_mask, settle


class SegmentRunner:
    """Runs ``span`` for any number of sessions; each session owns a cache from :meth:`new_cache`."""

    def __init__(self, model: StoredModel, span: Span) -> None:
        if span.end > model.num_layers:
            raise ValueError(f"span {span} exceeds the model's {model.num_layers} layers")
        self.span = span
        self.model_digest = model.digest
        self.is_first = span.start == 0
        self.is_last = span.end == model.num_layers
        self.config: PretrainedConfig = config_from_manifest(model.manifest.config)
        self.dtype: torch.dtype = getattr(torch, model.manifest.compute_dtype)
        self.hidden_size = int(self.config.hidden_size)
        self.vocab_size = int(self.config.vocab_size)
        # Positions (and so KV cache length) a session may reach: rotary tables are not valid beyond them.
        self.max_positions = int(getattr(self.config, "max_position_embeddings", 2048))
        self.loaded_roles: list[str] = []
        needs_table = self.is_first or (self.is_last and model.manifest.tied_embeddings)
        roles = [*(layer_role(i) for i in span.layers()), *([EMBED_ROLE] if needs_table else []),
                 *([HEAD_ROLE] if self.is_last else [])]
        # The store files load (an encrypted store's decryption releases the GIL) while this thread builds
        # the skeleton (about 20 ms of Python for the embedded model): a re-split waits for the longer of the two.
        with ThreadPoolExecutor(1, thread_name_prefix="segment-load") as loader:
            pending = loader.submit(model.load_many, roles)
            with torch.device("meta"):  # thread-local: the loader's tensors stay on the CPU
                skeleton = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype)  # type: ignore[no-untyped-call]
            files = pending.result()
        self.layers = nn.ModuleList()
        for local, index in enumerate(span.layers()):
            layer = skeleton.model.layers[index]
            self._load(layer, files, layer_role(index))
            layer.self_attn.layer_idx = local  # caches are per segment, indexed from 0
            self.layers.append(layer)
        self.rotary = type(skeleton.model.rotary_emb)(config=self.config)
        self.embed: nn.Module | None = None
        self.norm: nn.Module | None = None
        self.lm_head: nn.Module | None = None
        if self.is_first:
            self.embed = self._embedding(skeleton.model.embed_tokens, files)
        if self.is_last:
            head = files[HEAD_ROLE]
            self.loaded_roles.append(HEAD_ROLE)
            self.norm = skeleton.model.norm
            self.norm.load_state_dict({"weight": head["norm.weight"]}, assign=True, strict=True)
            if model.manifest.tied_embeddings:
                table = self.embed if self.embed is not None else self._embedding(skeleton.model.embed_tokens, files)
                self.lm_head = self._tied_head(skeleton.lm_head, table)
            else:
                self.lm_head = skeleton.lm_head
                load_module(self.lm_head, {k.removeprefix("lm_head."): v for k, v in head.items()
                                           if k.startswith("lm_head.")}, self.dtype)
        del skeleton, files
        self.eval()

    def _load(self, module: nn.Module, files: Mapping[str, Mapping[str, torch.Tensor]], role: str) -> None:
        load_module(module, files[role], self.dtype)
        self.loaded_roles.append(role)

    def _embedding(self, skeleton_table: nn.Module, files: Mapping[str, Mapping[str, torch.Tensor]]) -> nn.Module:
        """The token table from the ``embed`` file: transformers' own, or its int8 twin when quantized."""
        tensors = files[EMBED_ROLE]
        self.loaded_roles.append(EMBED_ROLE)
        if is_quantized(tensors):
            return embedding_from(tensors, self.dtype)
        skeleton_table.load_state_dict(tensors, assign=True, strict=True)
        return skeleton_table

    @staticmethod
    def _tied_head(skeleton_head: nn.Linear, table: nn.Module) -> nn.Module:
        """lm_head over the embedding's own storage (one copy of the table per node)."""
        if isinstance(table, Int8Embedding):
            head: Int8Linear = table.as_linear()
            return head
        assert isinstance(table, nn.Embedding)
        skeleton_head.weight = table.weight
        return skeleton_head

    def eval(self) -> None:
        for module in (*self.layers, self.embed, self.norm, self.lm_head):
            if module is not None:
                module.eval()
                module.requires_grad_(False)

    def new_cache(self) -> SessionCache:
        return SessionCache()

    def weight_tensors(self) -> Iterator[torch.Tensor]:
        """Every parameter and buffer of the segment (int8 weights and scales are buffers)."""
        for module in (*self.layers, self.embed, self.norm, self.lm_head):
            if module is not None:
                yield from module.parameters()
                yield from module.buffers()

    def parameter_bytes(self) -> int:
        return weight_bytes([self])

    def run(self, cache: DynamicCache, inputs: torch.Tensor, position: int) -> torch.Tensor:
        """Token ids ``[1, n]`` (first span) or hidden states ``[1, n, H]`` -> hidden states ``[1, n, H]``."""
        return self.run_timed(cache, inputs, position)[0]

    @torch.inference_mode()
    def run_timed(self, cache: DynamicCache, inputs: torch.Tensor, position: int) -> tuple[torch.Tensor, float]:
        """:meth:`run`, plus the seconds spent in the decoder layers alone.

        The cost model scales a per-layer figure by the layers a plan puts on a node; the per-run set-up
        (embedding, mask, rotary tables) would inflate that figure most on the shortest segments.
        """
        settle(cache)  # a session that decoded in a batch holds its own history again
        hidden = self.embed(inputs) if self.embed is not None else inputs.to(self.dtype)
        n = hidden.shape[1]
        position_ids = torch.arange(position, position + n).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=None,
                                  past_key_values=cache, position_ids=position_ids)
        rope = self.rotary(hidden, position_ids)
        return self._layers_timed(hidden, mask, position_ids, cache, rope)

    @torch.inference_mode()
    def run_batch_timed(self, caches: list[DynamicCache], inputs: torch.Tensor,
                        positions: list[int]) -> tuple[torch.Tensor, float]:
        """One decode step of ``len(caches)`` sessions as one forward: token ids ``[B, 1]`` (first span) or
        hidden states ``[B, 1, H]`` -> ``[B, 1, H]``; row ``b`` is at ``positions[b]`` with its own history."""
        hidden = self.embed(inputs) if self.embed is not None else inputs.to(self.dtype)
        cache = BatchedDecodeCache(caches)
        position_ids = torch.tensor(positions).unsqueeze(1)
        mask = padding_mask(cache.lengths, self.dtype, self.attn_implementation)
        rope = self.rotary(hidden, position_ids)
        out = self._layers_timed(hidden, mask, position_ids, cache, rope)
        cache.group.advance()
        return out

    @torch.inference_mode()
    def run_prefill_batch_timed(self, caches: list[DynamicCache],
                                inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
        """The first prefill chunk of several sessions as one forward: each ``inputs[b]`` (token ids ``[1, n_b]``
        or hidden states ``[1, n_b, H]``) starts at position 0 on the empty ``caches[b]``; returns each session's
        ``[1, n_b, H]``. Rows are right-padded to the longest: under the causal mask a real position never
        attends to a later one, so the padding changes nothing but the matrix shapes (and with them, possibly,
        the rounding). Each session's keys and values are then copied out of the batch into its own cache."""
        lengths = [int(x.shape[1]) for x in inputs]
        width = max(lengths)
        rows = [torch.nn.functional.pad(x, (0, width - n) if x.dim() == 2 else (0, 0, 0, width - n))
                for x, n in zip(inputs, lengths, strict=True)]
        batch = torch.cat(rows)
        hidden = self.embed(batch) if self.embed is not None else batch.to(self.dtype)
        position_ids = torch.arange(width).unsqueeze(0).expand(len(inputs), -1)
        shared = DynamicCache()
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=None,
                                  past_key_values=shared, position_ids=position_ids)
        rope = self.rotary(hidden, position_ids)
        hidden, seconds = self._layers_timed(hidden, mask, position_ids, shared, rope)
        for index, layer in enumerate(shared.layers):
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            assert isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor)
            for row, (cache, n) in enumerate(zip(caches, lengths, strict=True)):
                cache.update(keys[row:row + 1, :, :n].clone(), values[row:row + 1, :, :n].clone(), index)
        return [hidden[row:row + 1, :n] for row, n in enumerate(lengths)], seconds

    def _layers_timed(self, hidden: torch.Tensor, mask: object, position_ids: torch.Tensor, cache: Cache,
                      rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, float]:
        """The decoder layers alone over prepared inputs, and the seconds they took."""
        started = time.perf_counter()
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                           use_cache=True, position_embeddings=rope)
        return hidden, time.perf_counter() - started

    @property
    def attn_implementation(self) -> str | None:
        """The attention function the layers call (it decides the mask's form)."""
        config = getattr(self.layers[0].self_attn, "config", self.config) if len(self.layers) else self.config
        implementation = getattr(config, "_attn_implementation", None)
        return implementation if isinstance(implementation, str) else None

    def warm_up(self) -> None:
        """One prefill and one decode step on a throwaway cache, so the first real token pays no set-up."""
        cache = self.new_cache()
        for position, rows in ((0, 8), (8, 1)):
            inputs = (torch.zeros(1, rows, dtype=torch.long) if self.is_first
                      else torch.zeros(1, rows, self.hidden_size, dtype=self.dtype))
            hidden = self.run(cache, inputs, position)
        if self.is_last:
            self.last_logits(hidden)

    @torch.inference_mode()
    def last_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head on the last row only: logits ``[vocab]`` in float32."""
        if self.norm is None or self.lm_head is None:
            raise RuntimeError(f"span {self.span} is not the last span: it has no head")
        logits: torch.Tensor = self.lm_head(self.norm(hidden[:, -1:, :]))
        return logits[0, -1].float()

    @torch.inference_mode()
    def last_logits_batch(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head on the last row of every session of a batch: logits ``[B, vocab]``."""
        if self.norm is None or self.lm_head is None:
            raise RuntimeError(f"span {self.span} is not the last span: it has no head")
        logits: torch.Tensor = self.lm_head(self.norm(hidden[:, -1:, :]))
        return logits[:, -1].float()


def weight_bytes(runners: Iterable[SegmentRunner]) -> int:
    """Bytes of the weights of ``runners``, each tensor once (overlapping spans share their layers)."""
    seen: set[int] = set()
    total = 0
    for runner in runners:
        for tensor in runner.weight_tensors():
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total
