"""Tiny transformers causal LMs on disk, their batches, and the two ways to run them.

Every stagewise.hf test builds a randomly initialised model from a tiny config,
saves it with ``save_pretrained`` into a temporary directory (nothing is
downloaded), and compares the pipeline against that same model run by
``transformers`` in one process.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

import stagewise
import stagewise.hf

# Dropout off everywhere: the pipeline and the reference then compute the same thing.
_COMMON = {"vocab_size": 61, "bos_token_id": 1, "eos_token_id": 2}
_LLAMA = {
    **_COMMON,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def _gpt2(**over: Any) -> Any:
    from transformers import GPT2Config

    args = {
        **_COMMON,
        "n_positions": 32,
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 2,
        "attn_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
    }
    return GPT2Config(**{**args, **over})


def _llama(**over: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**{**_LLAMA, **over})


def _mistral(**over: Any) -> Any:
    from transformers import MistralConfig

    return MistralConfig(**{**_LLAMA, "sliding_window": 3, **over})


def _qwen2(**over: Any) -> Any:
    from transformers import Qwen2Config

    args = {
        **_LLAMA,
        "num_hidden_layers": 3,
        "use_sliding_window": True,
        "sliding_window": 3,
        "max_window_layers": 1,
    }
    return Qwen2Config(**{**args, **over})


#: name -> a tiny config; "gpt2" ties its head to the embedding, "llama" does not.
CONFIGS: dict[str, Callable[..., Any]] = {
    "gpt2": _gpt2,
    "gpt2_untied": lambda **o: _gpt2(tie_word_embeddings=False, **o),
    "llama": _llama,
    "llama_tied": lambda **o: _llama(tie_word_embeddings=True, pad_token_id=0, **o),
    "mistral": _mistral,
    "qwen2": _qwen2,
}


def make_model_dir(
    name: str, path: str | os.PathLike[str], seed: int = 0, shard_size: str | None = None
) -> str:
    """Save a randomly initialised ``CONFIGS[name]`` model into ``path``; return it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[name]())
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(os.fspath(path), **kwargs)
    return os.fspath(path)


def hf_model(path: str) -> Any:
    """The reference: ``from_pretrained`` in one process, float32, eval mode."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# -- batches ------------------------------------------------------------------------------

VOCAB = _COMMON["vocab_size"]


def micro_batch(step: int, index: int, size: int = 2, seq: int = 7, padded: bool = True) -> Any:
    """Micro-batch ``index`` of batch ``step``, the same on every rank and in the reference.

    Padded batches mix right and left padding; labels are the ids with -100 at padding.
    """
    gen = torch.Generator().manual_seed(1000 * step + index)
    ids = torch.randint(3, VOCAB, (size, seq), generator=gen)  # (B, T)
    if not padded:
        return ids, ids.clone()
    mask = torch.ones(size, seq, dtype=torch.long)  # (B, T)
    for row in range(size):
        cut = int(torch.randint(1, seq // 2 + 1, (1,), generator=gen))
        if (row + index) % 2:
            mask[row, seq - cut :] = 0  # right padding
        else:
            mask[row, :cut] = 0  # left padding
    labels = ids.masked_fill(mask == 0, stagewise.hf.IGNORE_INDEX)
    return (ids, mask), labels


def batches(step: int, micro_batches: int, dp: int, dp_rank: int, padded: bool) -> list[Any]:
    return [micro_batch(step, k * dp + dp_rank, padded=padded) for k in range(micro_batches)]


# -- the pipeline -------------------------------------------------------------------------


def engine_config(case: dict[str, Any]) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": case.get("micro_batches", 2),
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": case.get("lr", 1e-2), "weight_decay": 0.01},
        },
        "gradient_clipping": case.get("clip", 1.0),
        "steps_per_print": 1000,
        "pipeline": {"timeout_s": 60},
    }


def build_engine(model_dir: str, case: dict[str, Any]) -> Any:
    module = stagewise.hf.pipeline_module(
        model_dir,
        num_stages=case["stages"],
        partition_method=case.get("partition", "uniform"),
        activation_checkpoint_interval=case.get("ckpt_interval", 0),
    )
    engine, _, _, _ = stagewise.initialize(model=module, config=engine_config(case))
    return engine


def pipeline_run(rank: int, world_size: int, model_dir: str, case: dict[str, Any]) -> Any:
    """One rank of the pipeline, evaluated before (and after) training.

    Returns, per ``padded`` in (False, True), the eval_batch result (mean loss, the last
    stage's logits of every micro-batch); ``"read"``: the tensor names this rank read
    from the directory and ``"held"``: those its layers hold. With ``case["save"]``
    the untrained model is saved there; with ``case["train_steps"]`` it then trains,
    saves to ``case["trained_save"]`` and ``"trained"`` is the eval_batch of batch 99.
    """
    from stagewise.hf.weights import SafetensorsWeights

    read: list[str] = []
    original = SafetensorsWeights.read_stored

    def spy(self: SafetensorsWeights, names: Any) -> dict[str, torch.Tensor]:
        read.extend(names)
        return original(self, names)

    SafetensorsWeights.read_stored = spy  # type: ignore[method-assign]
    try:
        engine = build_engine(model_dir, case)
    finally:
        SafetensorsWeights.read_stored = original  # type: ignore[method-assign]
    module = engine.module
    held: set[str] = set()
    for idx in module.local_layer_ids():
        layer = module.layer_module(idx)
        if isinstance(layer, stagewise.hf.HFLayer):
            held.update(layer.hf_names().values())
    out: dict[Any, Any] = {"read": read, "held": held}
    m = case.get("micro_batches", 2)
    for padded in (False, True):
        out[padded] = engine.eval_batch(iter(batches(0, m, 1, 0, padded)), return_logits=True)
    if case.get("save"):
        engine.save_checkpoint(case["save"])
    if case.get("train_steps"):
        for step in range(case["train_steps"]):
            engine.train_batch(iter(batches(step, m, 1, 0, True)))
        engine.save_checkpoint(case["trained_save"])
        out["trained"] = engine.eval_batch(iter(batches(99, m, 1, 0, True)), return_logits=True)
    return out


def pipeline_train(rank: int, world_size: int, model_dir: str, case: dict[str, Any]) -> Any:
    """Train ``case["steps"]`` batches; the losses."""
    engine = build_engine(model_dir, case)
    dp, dp_rank = case.get("dp", 1), engine.grid.get_data_parallel_rank()
    m = case.get("micro_batches", 2)
    return [
        float(engine.train_batch(iter(batches(step, m, dp, dp_rank, case.get("padded", True)))))
        for step in range(case["steps"])
    ]


def reference_train(model_dir: str, case: dict[str, Any]) -> list[float]:
    """The same training in one process: transformers' own loss, AdamW, clipping."""
    model = hf_model(model_dir).train()
    opt = torch.optim.AdamW(model.parameters(), lr=case.get("lr", 1e-2), weight_decay=0.01)
    m, dp = case.get("micro_batches", 2), case.get("dp", 1)
    losses = []
    for step in range(case["steps"]):
        total = 0.0
        for d in range(dp):
            for inputs, labels in batches(step, m, dp, d, case.get("padded", True)):
                ids, mask = inputs if isinstance(inputs, tuple) else (inputs, None)
                loss = model(ids, attention_mask=mask, labels=labels).loss
                (loss / (m * dp)).backward()
                total += float(loss.detach())
        if case.get("clip", 1.0):
            torch.nn.utils.clip_grad_norm_(model.parameters(), case.get("clip", 1.0))
        opt.step()
        opt.zero_grad()
        losses.append(total / (m * dp))
    return losses


def reference_logits(model: Any, data: list[Any]) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for inputs, _ in data:
            ids, mask = inputs if isinstance(inputs, tuple) else (inputs, None)
            out.append(model(ids, attention_mask=mask).logits)
    return out
