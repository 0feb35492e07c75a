"""The resumable work directory (exlq.quant.job) and the final model directory writer (exlq.quant.writer)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from exlq.errors import ExlqError
from exlq.quant.job import Job, fingerprint
from exlq.quant.writer import INDEX_FILE, SINGLE_SHARD, quantization_config, write_model_dir
from exlq.runtime.weights import WeightStore

OPTIONS = {"bpw": 4.0, "head_bits": 6, "calibration": {"rows": 8, "length": 64, "fingerprint": "abc"}}
COPIED = {
    "tokenizer.json": '{"model": {}}',
    "tokenizer_config.json": '{"chat_template": "{{ messages }}"}',
    "generation_config.json": '{"do_sample": true}',
    "README.md": "# tiny\n",
}


def make_input_dir(root: Path) -> Path:
    """A fake HF model directory: weights in several formats, non-weight files, a subdirectory."""
    model = root / "model"
    model.mkdir()
    config = {"model_type": "llama", "hidden_size": 8, "tie_word_embeddings": True}
    (model / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, name in enumerate(("model.embed_tokens.weight", "lm_head.weight")):
        weight_map[name] = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({name: torch.randn(16, 8, generator=gen)}, str(model / weight_map[name]))
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (model / "pytorch_model.bin").write_bytes(b"\0" * 16)
    for name, text in COPIED.items():
        (model / name).write_text(text)
    (model / ".git").mkdir()
    (model / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return model


def tree_hash(root: Path) -> str:
    """Hash of every path, file content and mtime under `root`, to prove it was not written."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
            digest.update(str(path.stat().st_mtime_ns).encode())
    return digest.hexdigest()


def quant_tensors() -> dict[str, torch.Tensor]:
    """EXL2-like output tensors in their on-disk dtypes (I32, I16, F16); one is a view of a bigger tensor."""
    gen = torch.Generator().manual_seed(1)
    fused = torch.randn(32, 8, generator=gen).half()
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=gen).half(),
        "model.layers.0.self_attn.q_proj.weight": fused[:16],  # a view: must still save on its own
        "lm_head.q_weight": torch.randint(-(2**31), 2**31 - 1, (12, 32), dtype=torch.int32, generator=gen),
        "lm_head.q_groups": torch.tensor([6, 0, 4, 6], dtype=torch.int16),
        "lm_head.q_scale_max": torch.rand(2, generator=gen).half(),
        "model.norm.weight": torch.ones(8, dtype=torch.float16),
    }


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return make_input_dir(tmp_path)


# ---------------------------------------------------------------------------------------------
# fingerprint


def test_fingerprint_is_stable_and_ignores_option_order(model_dir):
    first = fingerprint(model_dir, OPTIONS)
    assert fingerprint(model_dir, dict(reversed(list(OPTIONS.items())))) == first
    (model_dir / "tokenizer.json").touch()  # mtimes and non-weight files are not covered
    assert fingerprint(model_dir, OPTIONS) == first
    assert len(first) == 64


def test_fingerprint_changes_with_config_options_and_weights(model_dir):
    base = fingerprint(model_dir, OPTIONS)
    assert fingerprint(model_dir, {**OPTIONS, "bpw": 4.5}) != base
    assert fingerprint(model_dir, {**OPTIONS, "calibration": {**OPTIONS["calibration"], "fingerprint": "abd"}}) != base

    config = model_dir / "config.json"
    original = config.read_text()
    config.write_text(original.replace('"hidden_size": 8', '"hidden_size": 8 '))
    assert fingerprint(model_dir, OPTIONS) != base
    config.write_text(original)
    assert fingerprint(model_dir, OPTIONS) == base

    # Same header and size, different values (another fine-tune of the same base): caught by sampling.
    shard = model_dir / "model-00002-of-00002.safetensors"
    save_file({"lm_head.weight": torch.zeros(16, 8)}, str(shard))
    assert fingerprint(model_dir, OPTIONS) != base


def test_fingerprint_needs_a_model_dir(tmp_path):
    with pytest.raises(ExlqError, match="config.json"):
        fingerprint(tmp_path, OPTIONS)


# ---------------------------------------------------------------------------------------------
# Job


def test_job_resumes_same_fingerprint(tmp_path):
    work = tmp_path / "work"
    with Job(work, "fp1") as job:
        assert not job.done("layer.0")
        job.save_tensors("layer.0", {"w": torch.arange(6, dtype=torch.int32).reshape(2, 3)}, {"err": 0.5})
        job.save_json("measurement", {"a": [1, 2]})
        job.mark_done("layer.0", {"err": 0.5})
    meta = json.loads((work / "job.json").read_text())
    assert meta["fingerprint"] == "fp1" and meta["state"] == "running" and "exlq_version" in meta

    with Job(work, "fp1") as job:
        assert job.done("layer.0") and not job.done("layer.1")
        assert job.step_info("layer.0") == {"err": 0.5}
        assert torch.equal(job.load_tensors("layer.0")["w"], torch.arange(6, dtype=torch.int32).reshape(2, 3))
        assert job.load_metadata("layer.0") == {"err": 0.5}
        assert job.load_json("measurement") == {"a": [1, 2]}
        assert job.load_tensors("missing") is None and job.load_json("missing") is None
        job.set_state("finished")
    with Job(work, "fp1") as job:
        assert job.state == "finished"


def test_job_refuses_other_fingerprint_and_restart_clears(tmp_path):
    work = tmp_path / "work"
    with Job(work, "fp1") as job:
        job.save_tensors("layer.0", {"w": torch.zeros(2)})
        job.mark_done("layer.0")
    (work / "notes").mkdir()  # a user's things: restart must leave them
    (work / "notes" / "a.json").write_text("{}")

    with pytest.raises(ExlqError, match="--restart"):
        Job(work, "fp2")
    assert (work / "layer.0.safetensors").exists()  # refusing touched nothing

    with Job(work, "fp2", restart=True) as job:
        assert not job.done("layer.0")
        assert job.load_tensors("layer.0") is None
    assert (work / "notes" / "a.json").exists()
    assert json.loads((work / "job.json").read_text())["fingerprint"] == "fp2"

    with Job(work, "fp2") as job:  # restart with the same fingerprint discards progress too
        job.mark_done("x")
    with Job(work, "fp2", restart=True) as job:
        assert not job.done("x")


def test_job_refuses_foreign_nonempty_dir_and_a_second_process(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "important.json").write_text("{}")
    with pytest.raises(ExlqError, match="not an exlq work directory"):
        Job(foreign, "fp", restart=True)
    assert (foreign / "important.json").exists() and not (foreign / ".lock").exists()

    with Job(tmp_path / "work", "fp"):
        with pytest.raises(ExlqError, match="in use"):
            Job(tmp_path / "work", "fp")


def test_crash_before_mark_done_redoes_the_step_and_tmp_files_are_cleaned(tmp_path):
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        with Job(work, "fp") as job:
            job.save_tensors("layer.3", {"w": torch.ones(4)})
            raise KeyboardInterrupt  # killed after the checkpoint, before mark_done
    stale = work / ".layer.4.safetensors.tmp-abc123"  # a write cut short by a kill
    stale.write_bytes(b"half a file")

    with Job(work, "fp") as job:
        assert not job.done("layer.3")  # the step is redone
        assert not stale.exists()
        assert job.load_tensors("layer.4") is None
        job.save_tensors("layer.3", {"w": torch.full((4,), 2.0)})
        job.mark_done("layer.3")
    assert not [p for p in work.iterdir() if ".tmp-" in p.name]
    with Job(work, "fp") as job:
        assert job.done("layer.3") and torch.equal(job.load_tensors("layer.3")["w"], torch.full((4,), 2.0))


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    with Job(tmp_path / "work", "fp") as job:
        job.save_json("state", {"v": 1})
        with pytest.raises(TypeError):
            job.save_json("state", {"v": object()})  # fails midway through serialization
        assert job.load_json("state") == {"v": 1}
        assert not [p for p in job.work_dir.iterdir() if ".tmp-" in p.name]
        with pytest.raises(ValueError):
            job.save_json("../escape", {})
        with pytest.raises(ValueError):
            job.save_json("job", {})


# ---------------------------------------------------------------------------------------------
# writer


def assert_loads_back(out: Path, expected: dict[str, torch.Tensor]) -> None:
    store = WeightStore(out)
    assert sorted(store.names()) == sorted(expected)
    for name, tensor in expected.items():
        got = store.get(name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name


def test_single_shard_config_and_copied_files(model_dir, tmp_path):
    before = tree_hash(model_dir)
    tensors = quant_tensors()
    update = quantization_config(4.0, 6, {"rows": 8, "length": 64, "dataset": "(default)"})
    out = write_model_dir(tmp_path / "out", model_dir, tensors.items(), update)

    assert tree_hash(model_dir) == before
    assert sorted(p.name for p in out.iterdir()) == sorted([SINGLE_SHARD, "config.json", *COPIED])
    assert_loads_back(out, tensors)
    for name in COPIED:
        assert (out / name).read_bytes() == (model_dir / name).read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert list(config)[:3] == ["model_type", "hidden_size", "tie_word_embeddings"]
    assert config["quantization_config"] == {
        "quant_method": "exl2",
        "version": config["quantization_config"]["version"],
        "quantizer": "exlq",
        "bits": 4.0,
        "head_bits": 6,
        "calibration": {"rows": 8, "length": 64, "dataset": "(default)"},
    }
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_multiple_shards_with_index(model_dir, tmp_path):
    tensors = quant_tensors()
    shard_size = 1024  # the q_weight alone (1.5 KiB) is bigger: it gets a shard of its own
    lazy = lambda: iter(tensors.items())  # noqa: E731 - the callable form of `tensors`
    out = write_model_dir(tmp_path / "out", model_dir, lazy, {"quantization_config": {}}, shard_size)

    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2
    count = len(shards)
    assert [p.name for p in shards] == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    index = json.loads((out / INDEX_FILE).read_text())
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for shard in shards:
        in_shard = [n for n, f in index["weight_map"].items() if f == shard.name]
        sizes = [tensors[n].numel() * tensors[n].element_size() for n in in_shard]
        assert sum(sizes) <= shard_size or len(in_shard) == 1
    assert_loads_back(out, tensors)


def test_refuses_nonempty_out_and_out_inside_input(model_dir, tmp_path):
    tensors = quant_tensors()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExlqError, match="not empty"):
        write_model_dir(out, model_dir, tensors.items(), {})
    assert (out / "keep.txt").read_text() == "mine"

    before = tree_hash(model_dir)
    for bad in (model_dir, model_dir / "exl2"):
        with pytest.raises(ExlqError, match="inside the input"):
            write_model_dir(bad, model_dir, tensors.items(), {}, overwrite=True)
    with pytest.raises(ExlqError, match="contains the input"):
        write_model_dir(tmp_path, model_dir, tensors.items(), {}, overwrite=True)
    assert tree_hash(model_dir) == before

    write_model_dir(out, model_dir, tensors.items(), {}, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / SINGLE_SHARD).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_failure_midway_leaves_no_output(model_dir, tmp_path):
    def tensors():
        yield "a", torch.zeros(300, dtype=torch.float16)
        yield "b", torch.zeros(300, dtype=torch.float16)  # with shard_size 600, "a" is already on disk
        raise RuntimeError("quantization failed")

    with pytest.raises(RuntimeError, match="quantization failed"):
        write_model_dir(tmp_path / "out", model_dir, tensors, {}, shard_size_bytes=600)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    with pytest.raises(ValueError, match="twice"):
        write_model_dir(tmp_path / "out", model_dir, [("a", torch.zeros(1)), ("a", torch.zeros(1))], {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
