"""Checkpoints over real processes: other stage counts, exact resume, crashes, DeepSpeed, export.

Every resumed run is compared with an uninterrupted one: a one-process reference
(across stage counts, to float tolerance) or the same pipeline (same layout, bit
for bit).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from checkpoint_cases import (
    ds_eval_batches,
    ds_gpt_specs,
    eval_batches,
    eval_ds_checkpoint,
    expect_load_errors,
    run_actions,
    run_many,
    train_reference_ckpt,
)
from distributed import run_distributed, run_distributed_raw
from pipeline_cases import LOSSES, SPECS
from stagewise.checkpoint import (
    CheckpointError,
    LayerTable,
    export_checkpoint,
    import_state_dict,
    layer_file_name,
)
from stagewise.cli.export import export_main
from stagewise.models.reference import build_reference

pytestmark = pytest.mark.slow

GPT = {"model": "gpt", "micro_batches": 2, "mb_size": 2, "scheduler": True, "timeout_s": 30}


# -- pure: names and the layer table ---------------------------------------------------------


def test_layer_files_follow_deepspeed() -> None:
    assert layer_file_name(0) == "layer_00-model_states.pt"
    assert layer_file_name(7, "optim") == "layer_07-optim_states.pt"
    assert layer_file_name(1, rank_repr="model_01") == "layer_01-model_01-model_states.pt"
    # GPT: the tied embedding (no forward_fn) gets a file, the head (a forward_fn) none,
    # as DeepSpeed 0.19.8 writes them.
    table = LayerTable.from_specs(SPECS["gpt"]())
    assert table.module_files == [0, 1, 2, 3]
    assert table.tied == {"embed": [0, 4]}
    assert table.owner(4) == 0
    # MLP: modules get files (an nn.ReLU an empty one, as in DeepSpeed), callables none.
    assert LayerTable.from_specs(SPECS["mlp"]()).module_files == [0, 1, 2, 4, 5, 6, 8, 9]


def test_loss_scale_state_round_trip() -> None:
    from stagewise.config import Config
    from stagewise.engine.optim import LossScaler

    fp16 = Config.from_any({"train_micro_batch_size_per_gpu": 1, "fp16": {"enabled": True}}).fp16
    scaler = LossScaler(fp16)
    for overflow in (True, True, False):
        scaler.update(overflow)
    state = scaler.state_dict()
    assert state == {"scale": 2.0**15, "good_steps": 1, "hysteresis_left": 1}
    fresh = LossScaler(fp16)
    fresh.load_state_dict(state)
    assert vars(fresh) == vars(scaler)


# -- another stage count, optimizer state included ---------------------------------------------


def test_resume_on_fewer_stages_with_sgd_and_adam(tmp_path: Path) -> None:
    """Saved at 4 stages after 2 steps, loaded at 2 stages: the losses of an unbroken run."""
    cases = [{**GPT, "stages": 4, "optimizer": opt} for opt in ("sgd", "adam")]
    dirs = [str(tmp_path / opt) for opt in ("sgd", "adam")]
    runs = [(case, [("train", 2), ("save", d)]) for case, d in zip(cases, dirs, strict=True)]
    first = run_distributed(run_many, 4, runs, timeout=120)
    runs = [
        ({**case, "stages": 2}, [("load", d, {}), ("train", 2)])
        for case, d in zip(cases, dirs, strict=True)
    ]
    second = run_distributed(run_many, 2, runs, timeout=120)
    # the scheduler came back too: WarmupLR (log warm-up over 5 steps) at step 2
    want_lr = 0.01 + 0.04 * math.log(3) / math.log(5)
    for k, case in enumerate(cases):
        ref = train_reference_ckpt(case, 4)
        for rank in range(2):
            loaded, losses = second[rank][k]["results"]
            assert loaded["steps"] == 2
            assert loaded["lr"] == pytest.approx([want_lr])
            got = first[0][k]["results"][0] + losses
            torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=1e-6)


# -- bit-exact resume, export and import ---------------------------------------------------------

EXACT = {**GPT, "stages": 2, "dp": 2, "optimizer": "adam"}


@pytest.fixture(scope="module")
def exact_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """2 stages x 2 data-parallel: train 2, save, train 2 on; fresh processes load it and train 2.

    Between the two runs the checkpoint is exported to one state dict and imported back
    as layer files; the second run also loads those (weights only) on 4 stages.
    """
    root = tmp_path_factory.mktemp("exact")
    save_dir, api_dir = str(root / "ckpt"), str(root / "imported")
    actions = [("train", 2), ("save", save_dir), ("probe",), ("train", 2)]
    unbroken = run_distributed(run_actions, 4, EXACT, actions, timeout=120)
    exported = export_checkpoint(save_dir, root / "model.safetensors")
    import_state_dict(exported, api_dir, tag="start", layers=SPECS["gpt"]())
    runs = [
        (EXACT, [("load", save_dir, {}), ("probe",), ("eval",), ("train", 2)]),
        (
            {**EXACT, "stages": 4, "dp": 1},
            [("load", api_dir, {"load_module_only": True}), ("eval",)],
        ),
    ]
    second = run_distributed(run_many, 4, runs, timeout=120)
    return {
        "root": root,
        "dir": save_dir,
        "imported": api_dir,
        "exported": exported,
        "unbroken": [r["results"] for r in unbroken],
        "resumed": [r[0]["results"] for r in second],
        "stages": [r[0]["stage"] for r in second],
        "from_import": [r[1]["results"] for r in second],
    }


def test_resume_is_bit_exact(exact_runs: dict[str, Any]) -> None:
    for rank, (before, after) in enumerate(
        zip(exact_runs["unbroken"], exact_runs["resumed"], strict=True)
    ):
        _, _, probe_before, losses_before = before
        loaded, probe_after, _, losses_after = after
        assert loaded["steps"] == 2
        assert loaded["path"] == os.path.join(exact_runs["dir"], "global_step2")
        assert loaded["client"] == {"rank": rank, "steps": 2}
        assert losses_after == losses_before  # bit for bit, not approximately
        assert probe_after == probe_before  # Python, NumPy and torch RNGs restored


def test_layout_on_disk(exact_runs: dict[str, Any]) -> None:
    root = Path(exact_runs["dir"])
    assert (root / "latest").read_text() == "global_step2"
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []
    names = sorted(p.name for p in (root / "global_step2").iterdir())
    assert names == [
        "engine_states.pt",
        "layer_00-model_states.pt",
        "layer_00-optim_states.pt",
        "layer_01-model_states.pt",
        "layer_01-optim_states.pt",
        "layer_02-model_states.pt",
        "layer_02-optim_states.pt",
        "layer_03-model_states.pt",
        "layer_03-optim_states.pt",
        "manifest.json",
        *[f"rank_{r:03d}-states.pt" for r in range(4)],
    ]
    manifest = json.loads((root / "global_step2" / "manifest.json").read_text())
    assert manifest["tied"] == {"embed": [0, 4]}
    assert manifest["files"]["layer_01-model_states.pt"] > 0
    optim = torch.load(root / "global_step2" / "layer_00-optim_states.pt", weights_only=False)
    assert set(optim["params"]) == {"wte.weight", "wpe.weight"}
    assert set(optim["params"]["wte.weight"]["state"]) == {"step", "exp_avg", "exp_avg_sq"}


def _reference_outputs(state_path: Path) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model = build_reference(SPECS["gpt"](), base_seed=4321)  # other weights until loaded
    if state_path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(state_path))
    else:
        state = torch.load(state_path, weights_only=True)
    model.load_state_dict(state, strict=True)
    data = eval_batches(EXACT)
    with torch.no_grad():
        outs = [model(x) for x, _ in data]
        loss = torch.stack([LOSSES["gpt"](o, y) for o, (_, y) in zip(outs, data, strict=True)])
    return loss.mean(), outs


def test_export_matches_the_pipeline(exact_runs: dict[str, Any], tmp_path: Path) -> None:
    assert exact_runs["stages"][-1] == 1
    evaluated = exact_runs["resumed"][-1][2]  # the last stage holds the logits
    for name in ("model.pt", "model.safetensors"):
        out = export_checkpoint(exact_runs["dir"], tmp_path / name)
        loss, outs = _reference_outputs(Path(out))
        torch.testing.assert_close(loss, torch.tensor(evaluated["loss"]))
        for got, want in zip(evaluated["logits"], outs, strict=True):
            torch.testing.assert_close(got, want)


def test_import_round_trip(exact_runs: dict[str, Any], tmp_path: Path) -> None:
    # imported layer files, loaded (weights only) on 4 stages: the same evaluation
    want = exact_runs["resumed"][-1][2]["loss"]
    for loaded, evaluated in exact_runs["from_import"]:
        assert loaded["steps"] == 0  # weights only: the counters start afresh
        assert loaded["path"] == os.path.join(exact_runs["imported"], "start")
        torch.testing.assert_close(torch.tensor(evaluated["loss"]), torch.tensor(want))
    # the command line: export, then split with the tied layers named
    exported = tmp_path / "model.safetensors"
    assert export_main([exact_runs["dir"], str(exported)]) == 0
    split_dir = tmp_path / "split"
    assert export_main(["--split", str(exported), str(split_dir), "--tied", "embed=0,4"]) == 0
    assert (split_dir / "latest").read_text() == "global_step0"
    api = Path(exact_runs["imported"]) / "start"
    for name in ("layer_00-model_states.pt", "layer_03-model_states.pt"):
        a = torch.load(split_dir / "global_step0" / name, weights_only=True)
        b = torch.load(api / name, weights_only=True)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a)
    # exporting the imported checkpoint gives back the same tensors
    again = export_checkpoint(exact_runs["imported"], tmp_path / "again.pt")
    from safetensors.torch import load_file

    original, copy = load_file(str(exported)), torch.load(again, weights_only=True)
    assert original.keys() == copy.keys()
    assert all(torch.equal(original[k], copy[k]) for k in original)


# -- a crash during a save ---------------------------------------------------------------------

KILL = {"model": "mlp", "stages": 2, "micro_batches": 2, "mb_size": 3, "timeout_s": 10}


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    save_dir = str(tmp_path)
    # step 1, save; step 2, then a save during which rank 1 SIGKILLs itself after its first file
    actions = [("train", 1), ("save", save_dir), ("train", 1), ("save", save_dir, 1)]
    crash = run_distributed_raw(run_actions, 2, KILL, actions, timeout=90)
    assert not crash[1].ok and crash[1].exit_code == -9, crash[1].error
    assert crash[0].ok, crash[0].error
    _, saved, losses_step2, failed = crash[0].value["results"]
    assert saved is True
    message = failed["error"]
    assert message.startswith(("PeerError", "CheckpointError")), message
    assert "not committed" in message or "did not finish" in message, message
    assert (tmp_path / "latest").read_text() == "global_step1"
    assert not (tmp_path / "global_step2").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".global_step2.tmp-")]
    assert len(leftovers) == 1  # the torn attempt, never named as a checkpoint

    # fresh processes resume from global_step1 and replay step 2 exactly; the next save (of
    # another tag) succeeds and clears the torn attempt
    actions = [("load", save_dir, {}), ("train", 1), ("save", save_dir, None, "after_crash")]
    again = run_distributed(run_actions, 2, KILL, actions, timeout=90)
    for result in again:
        loaded, losses, saved = result["results"]
        assert loaded["steps"] == 1
        assert loaded["path"] == os.path.join(save_dir, "global_step1")
        assert losses == losses_step2
        assert saved is True
    assert (tmp_path / "latest").read_text() == "after_crash"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# -- missing and torn files --------------------------------------------------------------------


def test_missing_and_torn_files_are_named(exact_runs: dict[str, Any], tmp_path: Path) -> None:
    source = Path(exact_runs["dir"]) / "global_step2"

    def variant(name: str) -> Path:
        root = tmp_path / name
        shutil.copytree(source, root / "global_step2")
        (root / "latest").write_text("global_step2")
        return root

    missing = variant("missing")
    (missing / "global_step2" / "layer_02-model_states.pt").unlink()
    torn = variant("torn")
    target = torn / "global_step2" / "layer_01-model_states.pt"
    target.write_bytes(target.read_bytes()[:100])
    torn_raw = variant("torn_raw")  # no manifest to compare sizes: torch.load fails
    (torn_raw / "global_step2" / "manifest.json").unlink()
    target = torn_raw / "global_step2" / "layer_01-model_states.pt"
    target.write_bytes(target.read_bytes()[:100])
    no_manifest = variant("no_manifest")
    (no_manifest / "global_step2" / "manifest.json").unlink()
    corrupt = variant("corrupt")  # the same size, other bytes: only the hash tells
    target = corrupt / "global_step2" / "layer_02-model_states.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    (tmp_path / "empty").mkdir()
    weights_only = exact_runs["imported"]  # written by import_state_dict
    optim_gone = variant("optim_gone")
    (optim_gone / "global_step2" / "layer_03-optim_states.pt").unlink()
    (optim_gone / "global_step2" / "manifest.json").write_text(
        json.dumps(
            {
                **json.loads((source / "manifest.json").read_text()),
                "files": {},  # a manifest that no longer lists it
            }
        )
    )
    attempts = [
        {"dir": str(missing)},
        {"dir": str(torn)},
        {"dir": str(torn_raw), "kwargs": {"load_module_only": True}},
        {"dir": str(no_manifest)},
        {"dir": str(weights_only)},
        {"dir": str(tmp_path / "empty")},
        {"dir": str(missing), "kwargs": {"tag": "global_step9"}},
        {"dir": str(optim_gone)},
        {"dir": str(corrupt)},
        {"dir": str(tmp_path / "nowhere")},
    ]
    results = run_distributed(
        expect_load_errors, 2, {**GPT, "stages": 2, "optimizer": "adam"}, attempts, timeout=90
    )
    patterns = [
        r"CheckpointError: checkpoint file .*missing/global_step2/layer_02-model_states\.pt is "
        r"missing \(listed in manifest\.json\)",
        r"CheckpointError: checkpoint file .*torn/global_step2/layer_01-model_states\.pt has 100 "
        r"bytes but manifest\.json records \d+; the file is torn",
        None,  # only the stage holding layer 1 reads it; checked below
        r"CheckpointError: .*no_manifest/global_step2 has engine_states\.pt but no manifest\.json",
        r"CheckpointError: .*imported/start holds weights only .*load_module_only=True",
        r"OK: None None",  # no 'latest': nothing loaded, as in DeepSpeed
        r"CheckpointError: checkpoint directory .*global_step9 does not exist",
        None,
        None,  # only the stage holding layer 2 (stage 0) reads it; checked below
        r"CheckpointError: checkpoint directory .*/nowhere does not exist; check the path",
    ]
    for rank_messages in results:
        for message, pattern in zip(rank_messages, patterns, strict=True):
            if pattern is not None:
                assert re.search(pattern, message), (pattern, message)
    # torn file without a manifest: the stage reading it names it; the other learns of it
    stage0, stage1 = results[0][2], results[1][2]
    assert re.search(
        r"CheckpointError: weights of layer 1 \(Block\): cannot read .*torn_raw/global_step2/"
        r"layer_01-model_states\.pt .*torn or corrupt",
        stage0,
    ), stage0
    assert re.search(r"CheckpointError: loading .* failed on rank\(s\) \[0\]", stage1), stage1
    # a file corrupted at the same size: its hash differs, the stage reading it names it
    assert re.search(
        r"CheckpointError: weights of layer 2 \(Block\): checkpoint file .*corrupt/global_step2/"
        r"layer_02-model_states\.pt does not match its content hash in manifest\.json",
        results[0][8],
    ), results[0][8]
    assert re.search(r"CheckpointError: loading .* failed on rank\(s\) \[0\]", results[1][8])
    # missing optimizer file: named by the stage that needs it
    assert re.search(
        r"optimizer state of layer 3: .*optim_gone/global_step2/layer_03-optim_states\.pt is "
        r"missing",
        results[1][7],
    ), results[1][7]


def test_bad_tags_and_state_dicts_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"checkpoint tag '\.\./x' is not usable"):
        import_state_dict(tmp_path / "s.pt", tmp_path / "out", tag="../x")
    state = {"0.weight": torch.zeros(2), "tied_modules.embed.w": torch.zeros(2)}
    torch.save(state, tmp_path / "s.pt")
    with pytest.raises(
        CheckpointError, match=r"tied module\(s\) \['embed'\] .* have no layer indices"
    ):
        import_state_dict(tmp_path / "s.pt", tmp_path / "out")
    torch.save({"head.weight": torch.zeros(2)}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"key 'head\.weight' of .* is neither"):
        import_state_dict(tmp_path / "bad.pt", tmp_path / "out")


# -- DeepSpeed's layer files -------------------------------------------------------------------

DS_SCRIPT = Path(__file__).parent / "interop" / "ds_save_checkpoint.py"


@pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed"
)
def test_deepspeed_layer_files_load(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(DS_SCRIPT),
        "--save-dir",
        str(tmp_path / "ckpt"),
        "--out",
        str(tmp_path / "ds.json"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ds = json.loads((tmp_path / "ds.json").read_text())
    ckpt = tmp_path / "ckpt"
    assert not (ckpt / "global_step3" / "layer_06-model_states.pt").exists()  # the head: a partial
    # DeepSpeed trained on 2 stages; stagewise reads its layer files on 3
    losses = run_distributed(eval_ds_checkpoint, 3, str(ckpt), timeout=120)
    for loss in losses:
        assert loss == pytest.approx(ds["eval_loss"], rel=1e-6, abs=1e-6), (loss, ds)
    # the consolidated export (tied files named on the command line) gives it in one process
    out = tmp_path / "ds.pt"
    assert export_main([str(ckpt), str(out), "--tied", "embed=0,6"]) == 0
    model = build_reference(ds_gpt_specs(), base_seed=5)
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    with torch.no_grad():
        loss = torch.stack([LOSSES["gpt"](model(x), y) for x, y in ds_eval_batches()]).mean()
    assert float(loss) == pytest.approx(ds["eval_loss"], rel=1e-6)
