"""Peak memory of loading a Hugging Face model as 2 pipeline stages vs. as a whole.

A randomly initialised Llama-layout causal LM of about 300M parameters (untied
head, float32) is saved with ``save_pretrained`` into a temporary directory.
Then, each in a fresh process (so each peak is its own):

* ``whole``: ``AutoModelForCausalLM.from_pretrained(DIR)``, the whole model;
* ``rank 0``, ``rank 1``: ``stagewise.hf.pipeline_module(DIR, num_stages=2)``
  over a 2-process gloo group: each rank builds only its own layers and reads
  only their tensors.

Each process then reads every parameter once (as a first forward pass would):
``from_pretrained`` maps the safetensors file and reads pages lazily, so its
memory is only paid when the weights are used (stagewise.hf copies its own
layers' tensors out of the file as it reads them). It prints each process's
peak resident set size (``ru_maxrss``; interpreter, torch and transformers
included in every one), also right after loading, and the ratio of each
rank's peak to the whole model's::

    python benchmarks/hf_memory.py            # about 2.5 GB of disk and 1-2 minutes
    python benchmarks/hf_memory.py --layers 4 --hidden 256   # a quick smaller run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _touch(module: Any) -> None:
    """Read every parameter once, as a forward pass does (mapped file pages become resident)."""
    for param in module.parameters():
        float(param.detach().sum())


def _config(args: argparse.Namespace) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def _create(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(args))
    model.save_pretrained(args.dir)
    params = sum(p.numel() for p in model.parameters())
    size = sum(
        os.path.getsize(os.path.join(args.dir, f))
        for f in os.listdir(args.dir)
        if f.endswith(".safetensors")
    )
    return {"params": params, "bytes": size}


def _whole(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    before = _peak_mib()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.float32)
    seconds = time.perf_counter() - start
    loaded = _peak_mib()
    _touch(model)
    params = sum(p.numel() for p in model.parameters())
    return {
        "peak_mib": _peak_mib(),
        "loaded_mib": loaded,
        "before_mib": before,
        "params": params,
        "seconds": seconds,
    }


def _rank(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    import stagewise.hf

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=args.rank, world_size=2)
    before = _peak_mib()
    start = time.perf_counter()
    module = stagewise.hf.pipeline_module(args.dir, num_stages=2)
    seconds = time.perf_counter() - start
    loaded = _peak_mib()
    _touch(module)
    params = sum(p.numel() for p in module.parameters())
    dist.barrier()
    result = {
        "peak_mib": _peak_mib(),
        "loaded_mib": loaded,
        "before_mib": before,
        "params": params,
        "seconds": seconds,
        "layers": module.local_layer_ids(),
    }
    dist.destroy_process_group()
    return result


def _run(role: str, args: argparse.Namespace, extra: list[str], env: dict[str, str]) -> Any:
    cmd = [sys.executable, __file__, "--role", role, "--dir", args.dir, *_shape_args(args), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)


def _shape_args(args: argparse.Namespace) -> list[str]:
    return [
        "--layers", str(args.layers), "--hidden", str(args.hidden),
        "--intermediate", str(args.intermediate), "--vocab", str(args.vocab),
    ]  # fmt: skip


def _result(proc: Any, what: str) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed with exit code {proc.returncode}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["create", "whole", "rank"], help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help="model directory (default: a temporary one, removed)")
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    if args.role is not None:
        roles = {"create": _create, "whole": _whole, "rank": _rank}
        print(json.dumps(roles[args.role](args)))
        return

    owned = args.dir is None
    args.dir = args.dir or tempfile.mkdtemp(prefix="hf_memory-")
    try:
        created = _result(_run("create", args, [], ENV), "creating the model")
        whole = _result(_run("whole", args, [], ENV), "from_pretrained")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs = [_run("rank", args, ["--rank", str(r)], env) for r in range(2)]
        ranks = [_result(p, f"rank {r}") for r, p in enumerate(procs)]
    finally:
        if owned:
            shutil.rmtree(args.dir, ignore_errors=True)

    print(
        f"model: Llama layout, {created['params'] / 1e6:.1f}M parameters, "
        f"{created['bytes'] / 2**20:.0f} MiB of float32 safetensors"
    )
    print(
        f"whole model, from_pretrained:   peak RSS {whole['peak_mib']:7.0f} MiB "
        f"(after imports {whole['before_mib']:.0f}, after loading {whole['loaded_mib']:.0f} "
        f"MiB, {whole['seconds']:.1f} s)"
    )
    for r, rank in enumerate(ranks):
        print(
            f"rank {r} of 2 stages (layers {rank['layers'][0]}..{rank['layers'][-1]}, "
            f"{rank['params'] / 1e6:.1f}M parameters): peak RSS {rank['peak_mib']:7.0f} MiB "
            f"(after imports {rank['before_mib']:.0f}, after loading {rank['loaded_mib']:.0f} "
            f"MiB, {rank['seconds']:.1f} s), "
            f"ratio {rank['peak_mib'] / whole['peak_mib']:.3f}"
        )


if __name__ == "__main__":
    main()
