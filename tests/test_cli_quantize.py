"""`exlq measure` and `exlq convert` from the command line, on tiny models (CPU)."""

from __future__ import annotations

import json

import pytest

from exlq.cli.app import main


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exc.value.code or 0, out, err


SMALL = ("--rows", 4, "--length", 64, "--device", "cpu")


def test_measure_then_convert_with_the_measurement(capsys, tiny_model_dirs, tmp_path):
    source = tiny_model_dirs["qwen2"]
    measurement = tmp_path / "measurement.json"
    code, out, _ = cli(capsys, "measure", source, "-o", measurement, *SMALL, "--json")
    assert code == 0 and json.loads(out)["matrices"] == 14
    data = json.loads(measurement.read_text())
    assert data["format"] == "exlq-measurement" and len(data["matrices"]) == 14
    assert not list(tmp_path.glob(".*exlq-work"))  # the default work dir is removed after success

    for bpw in (4.0, 6.0):  # tiny matrices carry ~0.5 bpw of index overhead: 3.79 is their floor
        out_dir = tmp_path / f"q{bpw}"
        code, out, err = cli(capsys, "convert", source, out_dir, "--bpw", bpw, "--measurement", measurement, *SMALL, "--json")
        assert code == 0, err
        summary = json.loads(out)
        assert abs(summary["decoder_bpw"] - bpw) < 0.25 and summary["decoder_bpw"] <= bpw
        assert len(summary["choices"]) == 14
        assert "measure" not in err  # the measurement was reused, not redone
        assert "quantize 2/2, elapsed" in err  # stderr is no terminal here: progress comes as plain lines
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time there was a little model that could count tokens. " * 40)
    code, out, err = cli(capsys, "eval-ppl", tmp_path / "q6.0", "--data", text, "--rows", 1, "--length", 64,
                         "--kl-ref", source, "--device", "cpu", "--json")
    result = json.loads(out)
    assert "scoring windows 1/1" in err
    assert code == 0 and result["kl_divergence"] > 0 and 0 < result["top1_agreement"] <= 1


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--bpw", 1.5], "--bpw"),
        (["--bpw", 8.5], "--bpw"),
        (["--head-bits", 7], "--head-bits"),
        (["--refine-sweeps", 17], "--refine-sweeps"),
        (["--refine-sweeps", -1], "--refine-sweeps"),
        (["--tune-epochs", 65], "--tune-epochs"),
        (["--tune-epochs", -1], "--tune-epochs"),
        (["--tune-lr", 0], "--tune-lr"),
        (["--tune-lr", 1.5], "--tune-lr"),
        (["--grid", "exllamav2"], "--grid"),
    ],
)
def test_convert_bad_options(capsys, tiny_llama_dir, tmp_path, args, needle):
    code, out, err = cli(capsys, "convert", tiny_llama_dir, tmp_path / "out", *args, *SMALL)
    assert code == 2 and out == "" and needle in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "args, needle",
    [
        (["measure", "{model}", "-o", "{model}/m.json"], "overlaps the input model directory"),
        (["measure", "{model}", "-o", "{tmp}/m.json", "--work-dir", "{model}/work"], "overlaps the input model directory"),
        (["convert", "{model}", "{tmp}/out", "--work-dir", "{model}/work"], "overlaps the input model directory"),
        (["convert", "{model}", "{tmp}/out", "--work-dir", "{tmp}"], "overlaps the input model directory"),
        (["convert", "{model}", "{tmp}/out", "--work-dir", "{tmp}/out"], "overlaps the output"),
        (["convert", "{model}", "{tmp}/out", "--work-dir", "{tmp}/out/work"], "overlaps the output"),
        (["convert", "{model}", "{tmp}/out", "--calibration", "{tmp}/missing.txt"], "no such file; pass 'builtin'"),
        (["measure", "{model}", "-o", "{tmp}/m.json", "--rows", "0"], "rows >= 1"),
    ],
)
def test_requests_that_would_fail_late_or_write_the_input_are_refused_before_loading(capsys, tmp_path, args, needle):
    """Paths into the input model (never written), a work directory the output would replace, a missing calibration
    file: one error line before the model loads, not after the job; the input untouched."""
    from tiny_models import make_tiny_model_dir

    model = make_tiny_model_dir(tmp_path / "model", "llama")  # {tmp}/model: a work dir of {tmp} would hold it
    before = sorted(p.name for p in model.iterdir())
    command, *rest = (a.format(model=model, tmp=tmp_path) for a in args)
    code, out, err = cli(capsys, command, *SMALL, *rest)  # the case's own options after SMALL's
    assert code == 2 and out == "" and needle in err and err.count("\n") == 1, err
    assert sorted(p.name for p in model.iterdir()) == before


def test_convert_refuses_non_empty_output_and_foreign_measurement(capsys, tiny_model_dirs, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    code, _, err = cli(capsys, "convert", tiny_model_dirs["llama"], busy, *SMALL)
    assert code == 2 and "not empty" in err
    measurement = tmp_path / "m.json"
    assert cli(capsys, "measure", tiny_model_dirs["llama"], "-o", measurement, *SMALL)[0] == 0
    bigger = tiny_model_dirs["mistral-window"]
    code, _, err = cli(capsys, "convert", bigger, tmp_path / "o", "--measurement", measurement, *SMALL)
    assert code == 0 or "another model" in err  # same shapes would be accepted; names must match
    # A measurement of the rotated model does not describe the unrotated one (and vice versa).
    code, _, err = cli(capsys, "convert", tiny_model_dirs["llama"], tmp_path / "o2", "--measurement", measurement, "--no-rotate", *SMALL)
    assert code == 2 and "with rotation" in err and not (tmp_path / "o2").exists()


def test_convert_resumes_after_interrupt(capsys, tiny_llama_dir, tmp_path, monkeypatch):
    import exlq.quant.convert as convert_module

    original = convert_module.quantize_layer
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(convert_module, "quantize_layer", flaky)
    code, _, err = cli(capsys, "convert", tiny_llama_dir, tmp_path / "out", *SMALL)
    assert code == 130 and not (tmp_path / "out").exists()
    assert list(tmp_path.glob(".out.exlq-work"))  # progress kept for the rerun
    code, out, err = cli(capsys, "convert", tiny_llama_dir, tmp_path / "out", *SMALL)
    assert code == 0 and (tmp_path / "out" / "model.safetensors").exists()
    assert calls["n"] == 3  # layer 0 came from the checkpoint; layer 1 was quantized on the rerun


def test_measure_grid_and_holdout(capsys, tiny_model_dirs, tmp_path):
    """The default measurement tries the dense grid and scores it on held-out rows; `--grid reference --no-holdout`
    measures the reference converter's options on the rows the Hessians saw. The CLI's defaults are the library's."""
    import inspect

    from exlq.cli.quantize import convert, measure
    from exlq.quant.measure import ERROR_METRIC, HOLDOUT_ERROR_METRIC
    from exlq.quant.options import DEFAULT_GRID

    for command in (measure, convert):
        parameters = inspect.signature(command).parameters
        assert parameters["grid"].default == DEFAULT_GRID and parameters["holdout"].default is True
    source, files = tiny_model_dirs["llama"], {}
    for name, args in (("default", ()), ("reference", ("--grid", "reference", "--no-holdout"))):
        files[name] = tmp_path / f"{name}.json"
        code, _, err = cli(capsys, "measure", source, "-o", files[name], *SMALL, *args)
        assert code == 0, err
    dense, reference = (json.loads(files[n].read_text()) for n in ("default", "reference"))
    assert dense["error_metric"] == HOLDOUT_ERROR_METRIC and reference["error_metric"] == ERROR_METRIC
    counts = [(len(a["options"]), len(b["options"])) for a, b in zip(dense["matrices"], reference["matrices"])]
    assert all(d >= r for d, r in counts) and any(d > r for d, r in counts)
    code, out, err = cli(capsys, "measure", source, "-o", tmp_path / "x.json", "--grid", "exllamav2", *SMALL)
    assert code == 2 and "--grid" in err and not (tmp_path / "x.json").exists()


def test_convert_help_lists_the_tuning(capsys):
    code, out, _ = cli(capsys, "convert", "--help")
    assert code == 0 and "--tune-epochs" in out and "--tune-lr" in out


def test_convert_with_tuning_reports_it(capsys, tiny_llama_dir, tmp_path):
    code, out, err = cli(capsys, "convert", tiny_llama_dir, tmp_path / "out", "--bpw", 4.0, "--tune-epochs", 2,
                         "--tune-lr", 0.01, *SMALL, "--json")
    assert code == 0, err
    tune = json.loads(out)["tune"]
    assert tune["settings"] == {"epochs": 2, "lr": 0.01, "steps": 16, "seed": 0}
    assert tune["heldout_kl_after"] <= tune["heldout_kl_before"] and len(tune["history"]) == 2
    code, out, err = cli(capsys, "convert", tiny_llama_dir, tmp_path / "out2", "--bpw", 4.0, "--tune-epochs", 1, *SMALL)
    assert code == 0 and "end-to-end tuning" in out and "held-out calibration KL" in out


def test_log_progress_counts_the_rate_from_this_runs_first_report_and_throttles(monkeypatch):
    from exlq.cli import progress

    clock = iter([40.0, 100.0, 130.0, 190.0])  # the start, then three reports
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    lines: list[str] = []
    report = progress.LogProgress(lines.append, memory=lambda: "peak RAM 1.0 GB")
    for done in (10, 11, 13):  # resumed at layer 10 of 24: 30 s, then 60 s for two layers
        report("measure", done, 24)
    assert lines == [
        "measure 10/24, elapsed 0:01:00, peak RAM 1.0 GB",
        "measure 11/24, elapsed 0:01:30, ETA 0:06:30, peak RAM 1.0 GB",
        "measure 13/24, elapsed 0:02:30, ETA 0:05:30, peak RAM 1.0 GB",
    ]
    clock = iter([0.0, 0.0, 4.0, 8.0, 12.0, 13.0])
    throttled = progress.LogProgress(lines.append, every=10.0)
    for done in range(1, 6):  # a first line, one 10 s later, and the last
        throttled("scoring", done, 5)
    assert lines[3:] == ["scoring 1/5, elapsed 0:00:00", "scoring 4/5, elapsed 0:00:12, ETA 0:00:04",
                         "scoring 5/5, elapsed 0:00:13, ETA 0:00:00"]
