"""Fine-tune a local Hugging Face causal LM over pipeline stages on a text file.

Needs the extra: ``pip install 'stagewise[hf]'``. Run it under torchrun::

    torchrun --nproc_per_node 2 examples/finetune_hf.py MODEL_DIR corpus.txt --steps 200

``MODEL_DIR`` is a directory written by ``save_pretrained``: ``config.json`` and
``*.safetensors`` of a GPT-2, Llama, Mistral or Qwen2 causal LM (nothing is
downloaded). Its tokenizer is the directory's own (``AutoTokenizer``, e.g.
``tokenizer.json``); a directory without one falls back to UTF-8 bytes as
token ids, which needs ``vocab_size >= 256``.

The text is tokenized once, held out 5% at its end for validation, and each
data-parallel rank trains on its own random windows of ``--seq-len`` tokens
(labels = the inputs; the loss shifts them). Rank 0 shows a progress bar and
writes, under ``--out``::

    losses.json     training loss per step, validation loss before and after
    loss.png        the loss curve
    checkpoints/    stagewise checkpoints (every --save-every steps and at the end)
    hf/             the final model as a from_pretrained directory (with the tokenizer)

``--stages`` defaults to the world size; more processes than stages become
data-parallel replicas (``--nproc_per_node 4 ... --stages 2``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import stagewise
import stagewise.hf

logger = logging.getLogger("finetune_hf")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(model_dir: str) -> Any:
    """The directory's own tokenizer, or None when it has none (bytes are used then)."""
    if not any(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def encode_text(text: str, tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """Token ids ``(N,)`` int64: the tokenizer's, or UTF-8 bytes without one."""
    if tokenizer is None:
        if vocab_size < 256:
            raise ValueError(
                f"the model directory has no tokenizer and its vocab_size is {vocab_size}; "
                "byte-level fallback needs vocab_size >= 256: save a tokenizer into the "
                "directory (tokenizer.save_pretrained(MODEL_DIR))"
            )
        ids = list(text.encode("utf-8"))
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    tokens = torch.tensor(ids, dtype=torch.long)
    if tokens.numel() and int(tokens.max()) >= vocab_size:
        raise ValueError(
            f"the tokenizer produced id {int(tokens.max())} but the model's vocab_size is "
            f"{vocab_size}; use the model's own tokenizer"
        )
    return tokens


def random_windows(
    tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int
) -> Any:  # an endless iterator of (input_ids (B, T), labels (B, T))
    if tokens.numel() <= seq_len:
        raise ValueError(
            f"the text has {tokens.numel()} tokens, too few for --seq-len {seq_len}; give a "
            "longer text or a shorter --seq-len"
        )
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, tokens.numel() - seq_len + 1, (batch_size,), generator=gen)
        ids = torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])  # (B, T)
        yield ids, ids.clone()


def plot_losses(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, color="#4878cf", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="a save_pretrained directory (config + safetensors)")
    parser.add_argument("text", help="a UTF-8 text file to fine-tune on")
    parser.add_argument("--out", default="finetune_out", help="where results go")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--stages", type=int, default=None, help="default: the world size")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=4, help="per optimizer step")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--save-every", type=int, default=0, help="0: only at the end")
    parser.add_argument("--val-batches", type=int, default=4)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    stagewise.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(args.out)
    model = stagewise.hf.pipeline_module(args.model_dir, num_stages=args.stages or world)
    vocab_size = int(model.checkpoint_metadata["hf"]["config"]["vocab_size"])
    tokenizer = load_tokenizer(args.model_dir)
    tokens = encode_text(Path(args.text).read_text(encoding="utf-8"), tokenizer, vocab_size)
    split = int(tokens.numel() * 0.95)
    train_tokens, val_tokens = tokens[:split], tokens[split:]

    engine, _, _, _ = stagewise.initialize(
        model=model,
        config={
            "train_micro_batch_size_per_gpu": args.micro_batch_size,
            "gradient_accumulation_steps": args.micro_batches,
            "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "weight_decay": 0.0}},
            "gradient_clipping": 1.0,
            "steps_per_print": 10**9,
            "pipeline": {"schedule": args.schedule},
        },
    )
    dp_rank = engine.grid.get_data_parallel_rank()
    train = random_windows(train_tokens, args.seq_len, args.micro_batch_size, seed=dp_rank)

    def validate() -> float:
        # The same windows every time, on every data-parallel rank.
        windows = random_windows(val_tokens, args.seq_len, args.micro_batch_size, seed=10**6)
        data = [next(windows) for _ in range(args.val_batches)]
        return float(engine.eval_batch(iter(data), num_micro_batches=len(data)))

    ckpt_dir = out / "checkpoints"
    start_val = validate()
    bar: Any = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        logger.info("validation loss %.4f before fine-tuning", start_val)
        if not args.no_progress:
            from tqdm import tqdm

            bar = tqdm(total=args.steps, desc="fine-tuning", unit="step")
    losses: list[float] = []
    for step in range(1, args.steps + 1):
        losses.append(float(engine.train_batch(train)))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if args.save_every and step % args.save_every == 0 and step < args.steps:
            engine.save_checkpoint(ckpt_dir)
    if bar is not None:
        bar.close()
    end_val = validate()
    engine.save_checkpoint(ckpt_dir)
    if rank == 0:
        shutil.rmtree(out / "hf", ignore_errors=True)  # this script's own earlier export
        hf_dir = stagewise.hf.export_hf(ckpt_dir, out / "hf")
        if tokenizer is not None:
            tokenizer.save_pretrained(hf_dir)
        (out / "losses.json").write_text(
            json.dumps({"train": losses, "validation": [start_val, end_val]}) + "\n"
        )
        plot_losses(losses, out / "loss.png", f"fine-tuning {Path(args.model_dir).name}")
        logger.info(
            "validation loss %.4f -> %.4f in %d steps; model in %s",
            start_val,
            end_val,
            args.steps,
            hf_dir,
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
