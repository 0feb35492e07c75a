"""`exlq bench` pieces that run without a GPU: synthetic models and the bit mix; the command's errors."""

from __future__ import annotations

import pytest
import torch

from exlq.eval.speed import _linear_bytes, decoder_bits_per_weight, measure_speed
from exlq.quant.synthetic import SHAPES, SyntheticStore, bit_mix, synthetic_config
from exlq.runtime.architectures.registry import model_class_for
from exlq.runtime.config import config_from_dict
from exlq.runtime.exl2 import Exl2Linear
from exlq.runtime.linear import DenseLinear
from test_cli import run_cli


def small_synthetic(shape: str, bpw: float, group_size: int = 128, device: str = "cpu", dtype=torch.float32):
    raw = {**synthetic_config(shape), "num_hidden_layers": 2, "vocab_size": 512}  # real layer shapes, small vocab
    model_class = model_class_for(raw)
    store = SyntheticStore(raw, bpw, torch.device(device), group_size=group_size)
    return model_class(config_from_dict(model_class.config_class, raw), store, dtype=dtype, device=torch.device(device))


@pytest.mark.parametrize("shape", ["qwen2.5-0.5b", "smollm2-135m", "llama3.2-1b", "qwen2.5-1.5b"])
def test_synthetic_models_run_at_the_target_bpw(shape):
    model = small_synthetic(shape, 4.0)
    layers = [m for m in model.model.layers.modules() if isinstance(m, Exl2Linear)]
    assert len(layers) == 14
    shape_ = SHAPES[shape]
    kv_width = shape_["num_key_value_heads"] * shape_["hidden_size"] // shape_["num_attention_heads"]
    # k/v of 256 columns or fewer: their permutation's 32/N bits a weight make the two widths' mix coarser
    assert abs(decoder_bits_per_weight(model) - 4.0) < (0.1 if kv_width <= 256 else 0.03)
    logits = model(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 1, 512) and torch.isfinite(logits).all()
    dense = small_synthetic(shape, 16)
    dense_layers = [m for m in dense.model.layers.modules() if isinstance(m, DenseLinear)]
    assert len(dense_layers) == 14 and not any(isinstance(m, Exl2Linear) for m in dense.modules())
    ratio = sum(map(_linear_bytes, dense_layers)) / sum(map(_linear_bytes, layers))  # fp32 on the CPU vs ~4 bits
    assert 7.5 < ratio < 8.1


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_bench_step_launches_are_the_models_linears(shape):
    """`bench/gemv.py --step` and `bench/dram_pattern.py --step` time the launches `step_launches` lists, against the
    issue's roofline: together they must be the synthetic model's EXL2 linears, each once a step (the head at the
    6 bits the model gives it, tied to the embedding or not), each launch's matrices of one input."""
    import sys
    from collections import Counter
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.gemv import step_launches

    store = SyntheticStore(synthetic_config(shape), 4.0, torch.device("cpu"))
    linears = Counter()
    for name in store.names():
        if name.endswith(".q_weight"):
            out_features, in_features = store.shape(name.removesuffix(".q_weight") + ".weight")
            linears[in_features, out_features] += 1
    launched = Counter()
    for label, in_features, outs, bpw, count in step_launches(shape):
        assert bpw == (6.0 if label == "head" else None)
        for out_features in outs:
            launched[in_features, out_features] += count
    assert launched == linears


@pytest.mark.parametrize("shape", ["qwen2.5-0.5b", "llama3-8b"])
def test_synthetic_heads_are_exl2_like_a_conversions(shape):
    """At an EXL2 bpw the head is 6-bit EXL2 whether the shape ties it to the embedding or not (the converter writes a
    quantized head for tied models too, spec §10.1); at 16 bits a tied head is the embedding itself."""
    exl2 = small_synthetic(shape, 4.0)
    assert isinstance(exl2.lm_head, Exl2Linear) and abs(exl2.lm_head.bits_per_weight - 6.0) < 0.2
    dense = small_synthetic(shape, 16)
    tied = synthetic_config(shape)["tie_word_embeddings"]
    assert isinstance(dense.lm_head, DenseLinear)
    assert (dense.lm_head.weight.data_ptr() == dense.model.embed_tokens.weight.data_ptr()) == tied


def test_synthetic_groups_of_32_keep_the_target_bpw():
    model = small_synthetic("llama3.2-1b", 4.0, group_size=32)
    layers = [m for m in model.model.layers.modules() if isinstance(m, Exl2Linear)]
    assert all(rows == 32 for layer in layers for _, rows in layer.layout)
    assert abs(decoder_bits_per_weight(model) - 4.0) < 0.03


@pytest.mark.parametrize("bpw", [2.0, 2.5, 3.0, 4.0, 4.65, 6.0, 8.0])
def test_bit_mix_averages_to_the_target(bpw):
    bits, props = bit_mix(bpw, 4096)
    assert bits == sorted(bits, reverse=True) and abs(sum(props) - 1) < 1e-9
    average = sum(b * p for b, p in zip(bits, props))
    assert abs(average - max(2.0, bpw - 4 / 128 - 32 / 4096)) < 1e-9


# (arguments after `bench`, what its one error line says): options are checked before the GPU, and what is wrong
# with the request itself (shape, bitrate, model directory) is said before the missing GPU.
BENCH_ERRORS = [
    ([], "MODEL"),
    (["--synthetic", "llama3-8b"], "needs a CUDA GPU"),
    (["--synthetic", "llama3-8b", "--cache", "q5"], "unknown --cache"),
    (["--synthetic", "llama3-8b", "--group-size", "48"], "--group-size"),
    (["--synthetic", "llama3-8b", "--batch", "33"], "--batch must be between 1 and 32"),
    (["--synthetic", "llama3-8b", "--sample"], "needs a CUDA GPU"),
    (["--synthetic", "llama9-1t"], "unknown synthetic shape 'llama9-1t'; known: llama3-8b"),
    (["--synthetic", "llama3-8b", "--bpw", "12"], "--bpw must be in [2, 8] for EXL2 (or 16 for FP16), got 12"),
    (["--synthetic", "llama3-8b", "--bpw", "16"], "needs a CUDA GPU"),
    (["{tmp}/no-model"], "no-model does not exist"),
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
@pytest.mark.parametrize("args, message", BENCH_ERRORS)
def test_bench_command_errors(args, message, tmp_path):
    result = run_cli(["bench", *(arg.format(tmp=tmp_path) for arg in args)], tmp_path)
    assert result.returncode == 2 and message in result.stderr



@pytest.mark.gpu
def test_bench_decodes_a_batch_a_step():
    """--batch B: B sequences a step (through the CUDA graphs); tokens/s counts all of them, GB/s reads the weights
    once a step."""
    from exlq.runtime.sampler import Sampler

    rows = []

    class Counting(Sampler):  # greedy, as the default; records the rows of every step's logits
        def sample(self, logits, history=None):
            rows.append(logits.shape[0])
            return super().sample(logits, history)

    model = small_synthetic("llama3.2-1b", 4.0, device="cuda", dtype=torch.float16).eval()
    report = measure_speed(model, cache_tokens=128, prefill_lengths=(32,), new_tokens=8, batch=4, sampler=Counting())
    assert report.batch == 4 and report.decode_tokens_per_second > 0
    assert rows and set(rows) == {4}, "every decode step drew a token for each of the 4 sequences"
    assert any(key[1] == 4 and key[4] == 1 for key in model.decode_graphs._graphs), "one-token steps of 4 rows replayed"
    per_step = report.decode_tokens_per_second / 4
    assert report.decode_weight_gbps == pytest.approx(report.weight_bytes_per_token * per_step / 1e9)
    assert report.roofline_fraction == pytest.approx(report.decode_weight_gbps / report.copy_bandwidth_gbps)


@pytest.mark.gpu
def test_bench_decodes_with_infer_sampling(monkeypatch):
    """--sample: the decode test draws tokens as `exlq infer` does (the sampler's kernels between steps) and says so."""
    from exlq.cli.common import INFER_SAMPLING
    from exlq.runtime.kernels import sampling_ops
    from exlq.runtime.sampler import Sampler, SamplerSettings

    calls = []

    def counted(name):
        run = getattr(sampling_ops, name)
        return lambda *args, **kwargs: calls.append(name) or run(*args, **kwargs)

    for name in ("sample_rows", "argmax_rows"):
        monkeypatch.setattr(sampling_ops, name, counted(name))
    model = small_synthetic("qwen2.5-0.5b", 4.0, device="cuda", dtype=torch.float16).eval()
    sampler = Sampler(SamplerSettings(**INFER_SAMPLING, seed=0))
    report = measure_speed(model, cache_tokens=128, prefill_lengths=(32,), new_tokens=8, sampler=sampler)
    assert report.sampling == "temperature 0.8, top-p 0.95, min-p 0.05" and report.decode_tokens_per_second > 0
    assert set(calls) == {"sample_rows"}, "the decode drew every token with the sampling kernels"
    calls.clear()
    assert measure_speed(model, cache_tokens=128, prefill_lengths=(32,), new_tokens=8).sampling == "greedy"
    assert set(calls) == {"argmax_rows"}


def _bench_module(name: str):
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    return importlib.import_module(f"bench.{name}")


def test_skip_probe_leaves_out_the_launches_of_todays_kernels(monkeypatch):
    """bench/skip_probe.py's settings name kernels by instance-name prefix: each prefix names instances the catalog
    builds (a renamed kernel fails here, not silently on the GPU), exl2_finish's not the norm's, and inside
    `skipped` exactly the launches of matching instances are left out and counted, every module restored after."""
    from exlq.runtime.kernels import catalog, fused_ops

    probe = _bench_module("skip_probe")
    instances = [i for sets in catalog.SOURCES.values() for s in sets for i in s]
    for group, prefixes in probe.GROUPS.items():
        for prefix in prefixes:
            assert any(i.startswith(prefix) for i in instances), (group, prefix)
    assert not "exl2_finish_norm<fp16_t>".startswith(probe.prefixes_of("finish"))
    assert probe.prefixes_of("none") == () and probe.prefixes_of("rope+attention") == (
        probe.GROUPS["rope"] + probe.GROUPS["attention"])
    launched = []
    monkeypatch.setattr(fused_ops, "kernel", lambda source, instances, name, device: hash(name))
    monkeypatch.setattr(fused_ops, "launch", lambda function, *args, **kwargs: launched.append(function))
    originals = [(m, m.kernel, m.launch) for m in probe.MODULES]
    counts = {}
    with probe.skipped(probe.prefixes_of("norm+rope"), counts):
        for name in ("finish_rope_store<fp16_t>", "silu_mul<fp16_t>", "finish_add_rms_norm<bf16_t>"):
            fused_ops.launch(fused_ops.kernel("fused.cu", (), name, None), (1,), (1,), ())
    assert launched == [hash("silu_mul<fp16_t>")]
    assert counts == {"finish_rope_store<fp16_t>": 1, "finish_add_rms_norm<bf16_t>": 1}
    assert all(m.kernel is kernel and m.launch is launch for m, kernel, launch in originals)


def test_switch_ab_takes_boolean_runtime_switches():
    """bench/switch_ab.py flips module flags the runtime reads at every call: the prepared ones resolve; anything
    not a boolean flag is refused before a model is built."""
    from exlq.runtime import rope
    from exlq.runtime.kernels import attention_ops, exl2_ops

    ab = _bench_module("switch_ab")
    assert ab.resolve("kernels.attention_ops.ROPE_ATTENTION") == (attention_ops, "ROPE_ATTENTION")
    assert ab.resolve("kernels.exl2_ops.GATED_SUMS_STREAM") == (exl2_ops, "GATED_SUMS_STREAM")
    assert ab.resolve("rope.TABLE") == (rope, "TABLE")
    for wrong in ("kernels.exl2_ops.MMA_ROWS", "rope.NOT_A_SWITCH"):
        with pytest.raises(SystemExit):
            ab.resolve(wrong)


def _timeline_records(blocks: int, wait):
    """Records of one launch with the fields bench/timeline_blocks.py reads (common.cuh's TimelineRecord): blocks
    0..blocks-1, each waiting at `wait`; their SMs and marks are the test's to fill."""
    import numpy as np

    records = np.zeros(blocks, np.dtype([("wait", "<u8"), ("block", "<u4"), ("sm", "<u4"), ("marks", "<u8", (3,))]))
    records["wait"] = wait
    records["block"] = np.arange(blocks)
    return records


def test_timeline_blocks_finds_a_consistently_slow_sm_and_the_crowded_ones(tmp_path):
    """bench/timeline_blocks.py on records built here: 16 launches of 64 blocks on 10 SMs, SM 3 always 4 µs late, SMs
    holding 7 of a launch's blocks 1 µs later than those holding 6; the report names SM 3 slowest, finds the per-SM
    times consistent between the launches' halves, splits the times by blocks on the SM and by K split, and the
    script reads the same from an .npz as step_timeline.py --records-out writes it."""
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    blocks_module = _bench_module("timeline_blocks")
    rng = np.random.default_rng(0)
    sms = np.repeat(np.arange(10), [7, 7, 7, 7, 6, 6, 6, 6, 6, 6])  # 64 blocks: SMs 0-3 hold 7, 4-9 hold 6
    launches = []
    for layer in range(16):
        base = 1_000_000 * (layer + 1)
        rs = _timeline_records(64, base + rng.integers(0, 60, 64))
        rs["sm"] = rng.permutation(sms)  # which block lands where changes from launch to launch
        done = 10_000 + 1_000 * (np.bincount(sms)[rs["sm"]] == 7) + 4_000 * (rs["sm"] == 3) + rng.integers(0, 200, 64)
        rs["marks"][:, 1] = base + done
        launches.append(rs)
    report = blocks_module.straggler_report(launches, mark=1, tiles=16)
    assert report["blocks"] == 16 * 64
    assert report["slowest_sms"][0][0] == 3 and 14.9 < report["slowest_sms"][0][1] < 15.3
    assert report["sm_consistency"] > 0.9
    by_load = report["by_blocks_on_sm"]
    assert set(by_load) == {6, 7} and by_load[6][0] == 16 * 36 and 10.0 < by_load[6][1] < 10.3 < 11.0 < by_load[7][1]
    assert sorted(report["by_split"]) == [0, 1, 2, 3]
    assert 10.0 < report["percentiles"]["p10"] < report["percentiles"]["p50"] < report["percentiles"]["max"] < 15.3

    path = tmp_path / "rec.npz"
    np.savez_compressed(path, instances=np.array(["exl2_gemv_group<fp16_t, 1, 2>", "other"] * 8),
                        **{f"records_{i}": rs for i, rs in enumerate(launches)})
    script = Path(__file__).resolve().parents[1] / "bench" / "timeline_blocks.py"
    out = subprocess.run([sys.executable, str(script), str(path), "exl2_gemv_group<fp16_t, 1, 2>", "--tiles", "16"],
                         capture_output=True, text=True, check=True).stdout
    assert "8 launches, 512 blocks" in out and "slowest SMs 3:" in out and "by K split: 0:" in out


def test_timeline_blocks_orders_each_sms_blocks_by_their_arrival():
    """Records where each SM's blocks end 0.5 µs apart in the order of their indices (the order the hardware deals them
    out), on SMs otherwise alike: the report's per-rank means climb by 0.5 µs, most of the variance lies within the
    SMs, and each SM's last block ends after the launch's median."""
    import numpy as np

    blocks_module = _bench_module("timeline_blocks")
    rng = np.random.default_rng(1)
    launches = []
    for layer in range(8):
        base = 1_000_000 * (layer + 1)
        rs = _timeline_records(60, base)
        rs["sm"] = np.arange(60) % 10  # round robin: block b is the (b // 10)-th on its SM
        rs["marks"][:, 1] = base + 10_000 + 500 * (np.arange(60) // 10) + rng.integers(0, 50, 60)
        launches.append(rs)
    report = blocks_module.straggler_report(launches, mark=1)
    steps = np.diff(report["by_rank_on_sm"])
    assert len(report["by_rank_on_sm"]) == 6 and np.all((0.45 < steps) & (steps < 0.55))
    assert report["variance_within_sms"] > 0.7 > 0.01 > report["variance_between_sms"]
    assert 1.15 < report["sm_last_after_median"]["p50"] < 1.35
