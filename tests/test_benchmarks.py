"""The benchmark suite's own code, on a tiny sweep: rows for every provider, the JSON schema, the report files, and
providers that cannot run reported with their reason instead of stopping the sweep."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

import grpo_kernels
from benchmarks import report, runner
from benchmarks.__main__ import main, parse_shape
from benchmarks.providers import OP_MODES, PROVIDERS, Bound, Case, Provider, make_inputs
from benchmarks.runner import busy_span, idle_sources, run_sweep

ROW_KEYS = {
    "op", "provider", "label", "role", "mode", "B", "T", "N", "H", "V", "dtype", "device_type", "inputs", "device",
    "time_ms", "time_p20_ms", "time_p80_ms", "time_min_ms", "time_max_ms", "repeats", "peak_mib", "grads_mib",
    "tflops", "gb_per_s", "floor_fraction", "speedup_vs", "skipped", "profile", "profile_file", "profile_busy",
    "versions",
}  # fmt: skip


def tiny_cases(device: str) -> list[Case]:
    dtype = "bfloat16" if device == "cuda" else "float32"
    return [
        Case("fused_linear", 2, 8, 16, 64, dtype, device),
        Case("fused_linear", 2, 16, 16, 64, dtype, device),
        Case("linear_logprobs", 2, 8, 16, 64, dtype, device),
        Case("loss_from_logits", 2, 8, None, 64, dtype, device),
        Case("advantages", 16, 1, None, None, "float32", device),
    ]


def _oom_bind(case: Case, inputs: dict) -> Bound:
    def forward() -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 PiB")

    return Bound(forward)


def _broken_bind(case: Case, inputs: dict) -> Bound:
    raise ValueError("no such argument")


def odd_providers() -> list[Provider]:
    """A provider whose package is missing, one that would not fit in memory, one that runs out of memory while
    measured and one that raises when bound."""
    eager = next(p for p in PROVIDERS if p.name == "eager" and p.op == "fused_linear")
    return [
        dataclasses.replace(eager, name="missing", module="no_such_package_for_grpo_benchmarks"),
        dataclasses.replace(eager, name="huge", memory=lambda case: 1 << 62),
        dataclasses.replace(eager, name="oom", bind=_oom_bind),
        dataclasses.replace(eager, name="broken", bind=_broken_bind),
    ]


@pytest.fixture(scope="module")
def sweep_out(tmp_path_factory):
    """One tiny CPU sweep of every provider and the odd ones, written out as the CLI does."""
    out = tmp_path_factory.mktemp("bench")
    rows = run_sweep(tiny_cases("cpu"), [*PROVIDERS, *odd_providers()], repeats=1, progress=False)
    meta = {"command": "test", "sweep": "tiny", "date": "today", "timing": "t", "device": "cpu", "versions": {}}
    written = report.write_all(out, rows, meta)
    return out, rows, written


def test_every_installed_provider_gives_a_row_per_shape_and_mode(sweep_out):
    _, rows, _ = sweep_out
    for provider in PROVIDERS:
        if provider.unavailable("cpu") is not None:
            continue
        for case in tiny_cases("cpu"):
            if case.op != provider.op:
                continue
            has_backward = provider.role != "floor" or provider.op == "fused_linear"
            for mode in OP_MODES[case.op] if has_backward else ("forward",):
                found = [
                    r for r in rows
                    if (r["provider"], r["op"], r["N"], r["mode"]) == (provider.name, case.op, case.N, mode)
                ]  # fmt: skip
                assert len(found) == 1, (provider.name, case, mode)
                row = found[0]
                assert row["skipped"] is None, (provider.name, case, mode, row["skipped"])
                assert row["time_ms"] > 0 and row["repeats"] == 1 and row["peak_mib"] >= 0


def test_providers_that_cannot_run_are_reported_with_the_reason(sweep_out, capsys):
    _, rows, _ = sweep_out
    reasons = {r["provider"]: r["skipped"] for r in rows if r["op"] == "fused_linear"}
    assert reasons["missing"] == "no_such_package_for_grpo_benchmarks is not installed"
    assert reasons["huge"].startswith("needs about")
    assert reasons["oom"] == "out of memory"
    assert reasons["broken"] == "ValueError: no such argument"
    assert reasons["ours-triton"] == "runs on cuda only"
    for name in ("missing", "huge", "oom", "broken"):  # a row for each mode all the same, with no numbers
        skipped = [r for r in rows if r["provider"] == name]
        assert len(skipped) == 2 * 3 and all(r["time_ms"] is None and r["peak_mib"] is None for r in skipped)
    capsys.readouterr()
    again = run_sweep(tiny_cases("cpu")[:1], odd_providers()[:1], repeats=1, progress=False)
    printed = capsys.readouterr()
    assert "skipped missing (fused_linear): no_such_package_for_grpo_benchmarks is not installed" in printed.out
    assert len(again) == 3


def test_results_json_holds_the_schema(sweep_out):
    out, rows, _ = sweep_out
    data = json.loads((out / "results.json").read_text())
    assert data["schema"] == report.SCHEMA and data["rows"] == rows
    for row in data["rows"]:
        assert set(row) == ROW_KEYS
        assert row["op"] in OP_MODES and row["mode"] in OP_MODES[row["op"]]
        assert row["N"] == row["B"] * row["T"] and row["versions"]["torch"] == torch.__version__
        assert row["role"] in ("ours", "baseline", "floor")
        if row["skipped"] is None:
            assert row["time_p20_ms"] <= row["time_ms"] <= row["time_p80_ms"]
            assert row["floor_fraction"] > 0
            rate = row["tflops"] if row["op"] in ("fused_linear", "linear_logprobs") else row["gb_per_s"]
            assert rate > 0
        else:
            assert isinstance(row["skipped"], str) and row["time_ms"] is None


def test_floor_fraction_and_speedups_come_from_the_other_rows(sweep_out):
    _, rows, _ = sweep_out
    timed = [r for r in rows if r["op"] == "fused_linear" and r["N"] == 16 and r["skipped"] is None]
    for mode in OP_MODES["fused_linear"]:
        by_name = {r["provider"]: r for r in timed if r["mode"] == mode}
        floor, ours, eager = by_name["floor"], by_name["ours-torch"], by_name["eager"]
        assert floor["floor_fraction"] == 1.0
        assert ours["floor_fraction"] == pytest.approx(floor["time_ms"] / ours["time_ms"])
        assert ours["speedup_vs"]["eager"] == pytest.approx(eager["time_ms"] / ours["time_ms"])
        assert "eager" not in eager["speedup_vs"] and "floor" not in ours["speedup_vs"]


def test_log_prob_providers_compute_the_same_log_probs():
    """The providers of the no-gradient log-probs op do the same work: each one's output matches fp64 log-probs (Cut
    Cross-Entropy aside: a third-party kernel whose fp32 accuracy is not under test here)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = Case("linear_logprobs", 2, 16, 32, 256, "float32", device)
    x = make_inputs(case)
    assert not x["hidden"].requires_grad and not x["weight"].requires_grad
    want = torch.log_softmax(x["hidden"].double() @ x["weight"].double().T, -1)
    want = want.gather(-1, x["ids"].unsqueeze(-1)).squeeze(-1)
    checked = set()
    for provider in PROVIDERS:
        if provider.op != "linear_logprobs" or provider.role == "floor" or provider.name == "cce":
            continue
        if provider.unavailable(device):
            continue
        got = provider.bind(case, x).forward()
        assert got.shape == (2, 16) and not got.requires_grad, provider.name
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, msg=provider.name)
        checked.add(provider.name)
    assert {"eager", "ours-torch" if device == "cpu" else "ours-triton"} <= checked


def test_compiled_provider_gives_the_eager_loss_and_gradients():
    """`ours-compiled` (CUDA) binds the loss inside `torch.compile`; here on the PyTorch path, against the same
    provider without it, forward and backward twice (the second call runs the compiled graph)."""
    from benchmarks.providers import _ours_linear

    torch._dynamo.reset()
    case = Case("fused_linear", 2, 8, 16, 64, "float32", "cpu")
    x = make_inputs(case)
    results = []
    for compiled in (True, False):
        bound = _ours_linear("torch", compiled=compiled)(case, x)
        for _ in range(2):
            for t in bound.grads:
                t.grad = None
            loss = bound.forward()
            bound.backward(loss)
        results.append((loss.detach(), *(t.grad.clone() for t in bound.grads)))
    for name, a, b in zip(("loss", "d_hidden", "d_weight"), *results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_markdown_has_a_table_per_op_and_mode(sweep_out):
    out, _, written = sweep_out
    text = (out / "results.md").read_text()
    assert out / "results.md" in written
    headings = ("## Fused linear GRPO loss", "## Log-probs from hidden states", "## GRPO loss from logits",
                "## Group advantages")  # fmt: skip
    for heading in headings:
        assert heading in text
    assert "### forward+backward, float32, V = 64, H = 16" in text and "### backward, float32, V = 64" in text
    assert "| N (B × T) | grpo_kernels (CPU path) | eager PyTorch |" in text and "**" in text
    assert "no_such_package_for_grpo_benchmarks is not installed" in text


def test_plots_are_written_for_ops_measured_at_several_sizes(sweep_out):
    pytest.importorskip("matplotlib")
    out, _, written = sweep_out
    png = out / "fused_linear.png"  # the tiny sweep has two N for this op, one for the others
    assert png in written and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "advantages.png").exists()


def test_command_line_writes_the_results_and_remakes_the_report(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--device", "cpu", "--ops", "fused_linear", "--shapes", "1x4x8x32", "2x4x8x32", "--providers",
            "ours-torch", "floor", "--repeats", "2", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {(r["provider"], r["N"]) for r in rows} == {(p, n) for p in ("ours-torch", "floor") for n in (4, 8)}
    assert all(r["repeats"] == 2 for r in rows)
    (out / "results.md").unlink()
    assert main(["--report-only", "--out", str(out)]) == 0
    assert "### forward+backward, float32, V = 32, H = 8" in (out / "results.md").read_text()
    late = tmp_path / "late"
    capsys.readouterr()
    assert (
        main(["--device", "cpu", "--ops", "advantages", "--shapes", "16", "--time-limit", "1e-9", "--out", str(late)])
        == 0
    )
    assert json.loads((late / "results.json").read_text())["rows"] == []
    assert "not measured: advantages B=16 T=1 float32" in (late / "results.md").read_text()
    assert "time limit of 1e-09 s reached: 1 case not measured" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "--quick" in capsys.readouterr().out


def test_profile_says_where_the_time_goes(tmp_path, capsys):
    """--profile: one more run per row under torch.profiler; its top ops in the row and in results.md, the full table
    in profiles/. Rows measured without it carry no profile."""
    out = tmp_path / "prof"
    args = ["--device", "cpu", "--ops", "fused_linear", "--shapes", "2x8x16x256", "--providers", "ours-torch",
            "floor", "--repeats", "1", "--no-progress", "--no-memory", "--profile", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 2 * 3
    text = (out / "results.md").read_text()
    assert "## Where the time goes" in text
    for row in rows:
        top = row["profile"]
        assert 0 < len(top) <= 8 and all(e["ms"] > 0 and e["calls"] >= 1 and 0 < e["fraction"] <= 1 for e in top)
        assert {e["clock"] for e in top} == {"cpu"}
        assert [e["ms"] for e in top] == sorted((e["ms"] for e in top), reverse=True)
        assert sum(e["fraction"] for e in top) <= 1 + 1e-9
        table = (out / "profiles" / row["profile_file"]).read_text()
        assert top[0]["name"] in table and "Self CPU" in table
        assert f"### {row['label']}: Fused linear GRPO loss, {row['mode']}, float32, N = 16, H = 16, V = 256" in text
        assert row["profile_busy"] is None  # no device: no device busy time
    assert "The device was busy" not in text
    floor_ops = {e["name"] for r in rows if r["provider"] == "floor" for e in r["profile"]}
    assert "aten::mm" in floor_ops  # the floor is matrix products
    broken = tmp_path / "broken"
    with mock.patch("benchmarks.runner.profile_run", side_effect=RuntimeError("CUPTI is not available")):
        assert main([*args[:-1], str(broken)]) == 0
    kept = json.loads((broken / "results.json").read_text())["rows"]
    assert all(r["skipped"] is None and r["time_ms"] > 0 and r["profile"] is None for r in kept)
    assert "no profile for ours-torch (fused_linear B=2 T=8 H=16 V=256 float32, forward): RuntimeError: CUPTI" in (
        capsys.readouterr().out
    )
    plain = tmp_path / "plain"
    assert main([*args[:-3], "--out", str(plain)]) == 0
    assert all(r["profile"] is None for r in json.loads((plain / "results.json").read_text())["rows"])
    assert "Where the time goes" not in (plain / "results.md").read_text() and not (plain / "profiles").exists()


def test_busy_span_counts_overlapping_device_events_once():
    """The device's busy time in a profiled run: the union of its events' intervals, within the span from the first
    host op to the last event; a report line says it for each profiled GPU row."""
    host = [(100.0, 400.0), (150.0, 160.0)]
    device = [(200.0, 300.0), (250.0, 350.0), (1000.0, 1500.0), (1100.0, 1200.0)]  # 150 + 500 us busy
    assert busy_span(host, device) == {"span_ms": 1.4, "device_busy_ms": 0.65}
    assert busy_span(host, []) is None
    row = {"op": "fused_linear", "mode": "forward", "dtype": "bfloat16", "N": 8, "H": 4, "V": 16, "label": "x",
           "profile": [{"name": "k", "ms": 0.5, "calls": 1, "fraction": 1.0, "clock": "device"}],
           "profile_busy": {"span_ms": 1.4, "device_busy_ms": 0.65}}  # fmt: skip
    assert "The device was busy 0.65 ms of the profiled run's 1.4 ms (46%)" in "\n".join(report._profiles([row]))


def test_idle_sources_credit_the_host_frame_and_op_under_way():
    """The device's idle time in a profiled run, credited to the innermost grpo_kernels frame running then and to the
    op or runtime call under way (or the Python between ops), largest first; report tables under the busy line."""
    loss, run = "grpo_kernels/fused_linear.py(1150): fused_linear_loss", "grpo_kernels/validation.py(66): run"
    host = [
        (0.0, 1000.0, "torch/autograd/function.py(575): apply"),  # not ours
        (0.0, 900.0, loss),
        (100.0, 300.0, "aten::nonzero"),  # the device idle from 0 to 360
        (150.0, 290.0, "cudaStreamSynchronize"),
        (350.0, 360.0, "<built-in method mm of type object at 0x7f60e8ecea40>"),
        (600.0, 700.0, run),  # idle from 500 to 800
        (950.0, 1200.0, "aten::copy_"),  # idle from 1000 to 1200, outside grpo_kernels
    ]
    device = [(360.0, 400.0), (400.0, 500.0), (800.0, 1000.0)]
    idle = idle_sources(host, device)
    frames = {e["where"]: e["ms"] for e in idle["frames"]}
    ops = {e["where"]: e["ms"] for e in idle["ops"]}
    want_frames = {"fused_linear.py(1150): fused_linear_loss": 0.56, "(none)": 0.2, "validation.py(66): run": 0.1}
    # (Python): 0-100, 300-350, 500-800 within a frame; nonzero: 100-150 and 290-300
    want_ops = {"(Python)": 0.45, "aten::copy_": 0.2, "cudaStreamSynchronize": 0.14, "aten::nonzero": 0.06,
                "<built-in method mm>": 0.01}  # fmt: skip
    for got, want in ((frames, want_frames), (ops, want_ops)):
        assert got.keys() == want.keys() and all(got[k] == pytest.approx(v, abs=0.006) for k, v in want.items()), got
        assert sum(got.values()) == pytest.approx(0.36 + 0.3 + 0.2)  # every idle microsecond, once
        assert list(got) == sorted(got, key=got.get, reverse=True)
    assert idle_sources(host, []) == {"frames": [], "ops": []}
    few = idle_sources(host, device, top=2)
    assert [e["where"] for e in few["ops"]] == ["(Python)", "aten::copy_", "(elsewhere)"]
    assert sum(e["ms"] for e in few["ops"]) == pytest.approx(0.86)
    row = {"op": "fused_linear", "mode": "forward", "dtype": "bfloat16", "N": 8, "H": 4, "V": 16, "label": "x",
           "profile": [{"name": "k", "ms": 0.5, "calls": 1, "fraction": 1.0, "clock": "device"}],
           "profile_busy": {"span_ms": 1.2, "device_busy_ms": 0.34, "idle": few}}  # fmt: skip
    text = "\n".join(report._profiles([row]))
    assert "| `fused_linear.py(1150): fused_linear_loss` | " in text and "| `(elsewhere)` | " in text


def test_bad_shapes_are_refused_with_the_expected_form():
    assert parse_shape("loss_from_logits", "2x8x64", "float32", "cpu") == Case(
        "loss_from_logits", 2, 8, None, 64, "float32", "cpu"
    )
    with pytest.raises(SystemExit, match="fused_linear shapes are BxTxHxV"):
        parse_shape("fused_linear", "2x8x64", "float32", "cpu")
    with pytest.raises(SystemExit, match="needs exactly one --ops"):
        main(["--shapes", "4", "--device", "cpu"])
    examples = {"fused_linear": "8x1024x512x65536", "linear_logprobs": "8x1024x512x65536",
                "loss_from_logits": "8x1024x65536", "advantages": "65536"}  # fmt: skip
    for op, example in examples.items():  # each op's own form
        with pytest.raises(SystemExit, match=rf"{op} shapes are .*\(e\.g\. {example}\)$"):
            parse_shape(op, "2x3", "float32", "cpu")


def test_command_line_refuses_bad_options_in_one_line(tmp_path):
    """Options that cannot be carried out, or that would be ignored, are a one-line error (SystemExit with the
    message), not a traceback or a run that does something else."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    run = ["--device", "cpu", "--ops", "advantages", "--providers", "eager", "--shapes", "16", "--repeats", "1",
           "--no-progress", "--no-memory"]  # fmt: skip
    refused = [
        ([*run, "--out", str(a_file)], f"--out {a_file} is a file, not a folder"),
        ([*run, "--resume", "--out", str(a_file)], f"--out {a_file} is a file, not a folder"),
        ([*run, "--out", str(a_file / "sub")], f"--out {a_file / 'sub'} ({a_file}) is a file, not a folder"),
        (["--report-only", "--out", str(a_file)], f"--out {a_file} is a file, not a folder"),
        (["--report-only", "--out", str(empty)],
         f"--report-only: {empty / 'results.json'} not found (run the benchmarks first)"),
        ([*run, "--time-limit", "0", "--out", str(empty)], "--time-limit must be a positive number of seconds; got 0"),
        ([*run, "--time-limit", "-5", "--out", str(empty)], "--time-limit must be a positive number"),
        (["--device", "cpu", "--quick", "--dtype", "bfloat16"], "--dtype applies to --shapes"),
        (["--device", "cpu", "--dtype", "float32"], "--dtype applies to --shapes"),
        ([*run, "--quick"], "--quick is a sweep; --shapes measures the shapes it names instead"),
        ([*run, "--dtype", "bfloat16"], "--dtype bfloat16: the advantages op's rewards are always float32"),
        (["--report-only", "--quick", "--out", str(empty)], "--quick does not apply to --report-only"),
        (["--report-only", "--dtype", "bfloat16", "--out", str(empty)], "--dtype does not apply to --report-only"),
    ]  # fmt: skip
    for argv, message in refused:
        with pytest.raises(SystemExit, match=re.escape(message)):
            main(argv)
    (empty / "results.json").write_text("{")
    with pytest.raises(SystemExit, match=r"results\.json is not a results\.json of the benchmarks \(JSONDecodeError"):
        main(["--report-only", "--out", str(empty)])
    assert a_file.read_text() == "x" and [p.name for p in empty.iterdir()] == ["results.json"]
    # where they do apply: --dtype float32 for the advantages' shapes, --dtype with the shapes of another op
    assert main([*run, "--dtype", "float32", "--out", str(tmp_path / "adv")]) == 0
    rows = report.load(tmp_path / "adv" / "results.json")[1]
    assert {r["dtype"] for r in rows} == {"float32"}
    logits = ["--device", "cpu", "--ops", "loss_from_logits", "--providers", "eager", "--shapes", "1x4x32", "--modes",
              "forward", "--dtype", "bfloat16", "--repeats", "1", "--no-progress", "--no-memory"]  # fmt: skip
    assert main([*logits, "--out", str(tmp_path / "bf16")]) == 0
    assert {r["dtype"] for r in report.load(tmp_path / "bf16" / "results.json")[1]} == {"bfloat16"}


@pytest.mark.gpu
def test_the_sweep_runs_on_cuda(capsys, tmp_path):
    """do_bench, the CUDA backward timing, the allocator's peak and the profiler's kernels on every provider; a
    third-party provider that fails here is reported (printed), not failed: its library is not under test."""
    rows = run_sweep(tiny_cases("cuda"), PROVIDERS, repeats=1, progress=False, profiles=tmp_path)
    for provider in PROVIDERS:
        mine = [r for r in rows if r["provider"] == provider.name and r["op"] == provider.op]
        assert mine, provider.name
        if provider.name in ("ours-triton", "eager", "floor"):
            assert all(r["skipped"] is None and r["time_ms"] > 0 and r["peak_mib"] >= 0 for r in mine), mine
            assert all(r["profile"] and (tmp_path / r["profile_file"]).exists() for r in mine), mine
            if provider.name == "ours-triton":  # its Triton kernels, seen on the device's clock, not the ops
                assert any(e["clock"] == "device" and "kernel" in e["name"] for r in mine for e in r["profile"]), mine
                assert not any(e["name"].startswith("aten::") for r in mine for e in r["profile"]), mine
                assert all(0 < r["profile_busy"]["device_busy_ms"] <= r["profile_busy"]["span_ms"] for r in mine)
                # the idle time credited to the host's frames: some of it to grpo_kernels' own files
                ours = Path(grpo_kernels.__file__).parent
                assert all(any((ours / e["where"].split("(")[0]).is_file() for e in r["profile_busy"]["idle"]["frames"])
                           for r in mine), mine  # fmt: skip
    with capsys.disabled():
        print(capsys.readouterr().out)


def test_peaked_inputs_for_gradient_filtering(tmp_path):
    """Peaked inputs: a low-entropy softmax whose sampled tokens are likely under it; a table of their own; refused
    for ops other than fused_linear and for the sweeps."""
    from benchmarks.providers import make_inputs

    cases = {k: Case("fused_linear", 4, 64, 32, 2048, "float32", "cpu", k) for k in ("random", "peaked")}
    stats = {}
    for kind, case in cases.items():
        x = make_inputs(case)
        logp = torch.log_softmax(x["hidden"].detach() @ x["weight"].detach().T, -1)
        entropy = -(logp.exp() * logp).sum(-1).mean().item()
        stats[kind] = entropy, logp.gather(-1, x["ids"][..., None]).mean().item()
    assert stats["random"][0] > 6.5 and stats["peaked"][0] < 3.5, stats
    assert stats["peaked"][1] > stats["random"][1] + 3, stats  # sampled tokens are the likely ones
    assert cases["peaked"].label().endswith(" peaked")
    out = tmp_path / "peaked"
    args = ["--device", "cpu", "--ops", "fused_linear", "--shapes", "1x16x8x256", "--inputs", "peaked",
            "--providers", "ours-torch", "ours-filter", "--repeats", "1", "--no-progress", "--no-memory",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["inputs"] for r in rows} == {"peaked"} and {r["provider"] for r in rows} == {"ours-torch", "ours-filter"}
    assert all(r["skipped"] is None for r in rows)
    assert "### forward+backward, float32, V = 256, H = 8, peaked inputs" in (out / "results.md").read_text()
    with pytest.raises(SystemExit, match="--inputs peaked is for the fused_linear op only"):
        main(["--device", "cpu", "--ops", "loss_from_logits", "--shapes", "1x4x32", "--inputs", "peaked"])
    with pytest.raises(SystemExit, match="--inputs applies to --shapes"):
        main(["--device", "cpu", "--quick", "--inputs", "peaked"])


def test_max_run_ms_skips_the_larger_shapes_of_a_slow_provider(capsys):
    """A provider whose run at the smaller N already takes longer than the budget is skipped at the larger N, with
    the projection as the reason; a fast one is measured at both. (The fast one sums a few numbers, far inside the
    budget on a loaded machine too, where a real provider's run may not be.)"""
    import time

    def bind(seconds: float):
        def bound(case: Case, inputs: dict) -> Bound:
            def forward() -> torch.Tensor:
                time.sleep(seconds)
                return inputs["hidden"].sum()

            return Bound(forward, grads=(inputs["hidden"],))

        return bound

    eager = next(p for p in PROVIDERS if p.name == "eager" and p.op == "fused_linear")
    slow = dataclasses.replace(eager, name="slow", bind=bind(0.05))
    fast = dataclasses.replace(eager, name="fast", bind=bind(0.0))
    rows = run_sweep(tiny_cases("cpu")[:2], [slow, fast], modes=("forward",), repeats=1, memory=False,
                     progress=False, max_run_ms=40.0)  # fmt: skip
    got = {(r["provider"], r["N"]): r["skipped"] for r in rows}
    assert got[("slow", 16)] is None and got[("fast", 16)] is None and got[("fast", 32)] is None
    assert got[("slow", 32)].startswith("projected ") and got[("slow", 32)].endswith("over --max-run-ms")
    assert "skipped slow" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--max-run-ms must be a positive number"):
        main(["--device", "cpu", "--quick", "--max-run-ms", "0"])


def test_tile_tuner_tries_every_candidate_and_restores_the_tiles(tmp_path, device, monkeypatch):
    """`python -m benchmarks.tune_fused`: a row per candidate of each kernel (timed, or the reason it was not), the
    configuration in use among them and matching itself, the tiles in use unchanged afterwards, and its files."""
    from benchmarks import tune_fused
    from grpo_kernels.ops import linear

    tiles_before = dict(linear.TILES)
    if device == "cuda":  # the tile in use and one other: each candidate is a compilation
        monkeypatch.setattr(tune_fused, "FWD_CANDIDATES", tune_fused.FWD_CANDIDATES[:2])
        monkeypatch.setattr(tune_fused, "BWD_CANDIDATES", tune_fused.BWD_CANDIDATES[:2])
    out = tmp_path / "tune"
    args = ["--shape", "1x16x32x64", "--dtype", "float32", "--device", device, "--runs", "1", "--out", str(out)]
    assert tune_fused.main(args) == 0
    assert dict(linear.TILES) == tiles_before
    rows = json.loads((out / "tune.json").read_text())["rows"]
    assert len(rows) == len(tune_fused.FWD_CANDIDATES) + len(tune_fused.BWD_CANDIDATES)
    for kernel in ("fwd", "bwd"):
        in_use = [r for r in rows if r["kernel"] == kernel and r["in_use"]]
        assert len(in_use) == 1 and in_use[0]["error"] is None and in_use[0]["max_diff"] <= 1e-6, in_use
    for row in rows:
        assert (row["time_ms"] is not None and row["time_ms"] > 0) != (row["error"] is not None), row
    text = (out / "tune.md").read_text()
    assert "## Forward (log-sum-exp statistics)" in text and "(in use)" in text
    assert ("Triton's interpreter" in text) == (device == "cpu")
    with pytest.raises(SystemExit, match="expected BxTxHxV"):
        tune_fused.main(["--shape", "8x1024", "--out", str(out)])
    # compiled (not interpreted), the kernels launch with the table's tiles, which the tuner swaps
    monkeypatch.setattr(linear, "interpreting", lambda: False)
    for key, tiles in linear.TILES.items():
        kernel, kind, *arch = key
        dtype = torch.float32 if kind == "fp32" else torch.bfloat16
        props = SimpleNamespace(major=arch[0] if arch else 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a, props=props, **k: props)
        assert linear._tiles(kernel, 4096, 32_000, 4096, dtype, torch.device("cpu")) is tiles
    ref = (torch.tensor([2.0, -4.0]), None, torch.tensor([1.0]))
    assert tune_fused._diff((torch.tensor([2.0, -4.02]), None, torch.tensor([1.0])), ref) == pytest.approx(0.005)
    assert tune_fused._diff((torch.tensor([2.0, -4.0]), None, torch.tensor([0.5])), ref) > tune_fused.MISMATCH


def test_chunk_products_times_each_product_and_projects_the_chunks(tmp_path, monkeypatch):
    """`python -m benchmarks.chunk_products`: per chunk size, the three products, the split `d_hidden` (correct, or
    the reason it was not run), the Triton `d_weight` addition (interpreted here) under the configuration in use and
    under each of `--add-tiles`' (correct, or the error a configuration fails with) and the projections onto N tokens;
    its files."""
    from benchmarks import chunk_products
    from grpo_kernels.ops.weight_grad import Tiles

    out = tmp_path / "cp"
    bad = Tiles(100, 16, 16, 4, 2)  # not a power of two: Triton refuses it
    monkeypatch.setattr(chunk_products, "ADD_TILES", {**chunk_products.ADD_TILES, "bad": bad})
    args = ["--shape", "100x16x100", "--tokens", "10", "30", "--dtype", "float32", "--device", "cpu", "--runs", "1",
            "--add-tiles", "--out", str(out)]  # fmt: skip
    assert chunk_products.main(args) == 0
    rows = json.loads((out / "chunk_products.json").read_text())["rows"]
    assert [r["tokens"] for r in rows] == [10, 30] and [r["chunks"] for r in rows] == [10, 4]
    for r in rows:
        assert set(r["ms"]) == {"logits", "d_hidden", "d_weight_write", "d_weight_add", "d_weight_add_triton"}
        assert all(t > 0 for t in r["ms"].values())
        assert r["projected_ms"] == pytest.approx(r["chunks"] * (r["ms"]["logits"] + r["ms"]["d_hidden"]
                                                                 + r["ms"]["d_weight_add"]))  # fmt: skip
        assert r["projected_triton_ms"] == pytest.approx(r["chunks"] * (r["ms"]["logits"] + r["ms"]["d_hidden"]
                                                                        + r["ms"]["d_weight_add_triton"]))  # fmt: skip
        assert 0 <= r["add_triton_error_vs_addmm"] < 4  # fp32 sums either way
        splits = r["split_d_hidden"]
        assert splits["8"]["error"] == "V = 100 is not a multiple of 8"
        for s in ("2", "4"):  # fp32 products summed in fp32: as accurate as one product, give or take
            assert 0 <= splits[s]["error_vs_plain"] < 4, splits[s]
        assert "error" in splits["4 fp32"]  # no fp32 output of 32-bit products on the CPU
        tried = r["add_tiles"]
        assert set(tried) == set(chunk_products.ADD_TILES) | {"bad"} and "error" in tried.pop("bad")
        for name, x in tried.items():
            assert x["ms"] > 0 and 0 <= x["error_vs_addmm"] < 4, (name, x)
    text = (out / "chunk_products.md").read_text()
    assert "| 30 |" in text and "128x128 w8 s3 p1" in text
    seen = []  # what a run cut short keeps: each configuration's result as it comes, then the whole row
    tiles = {"a": Tiles(32, 16, 16, 4, 2), "b": Tiles(32, 16, 16, 4, 2, per_sm=1)}
    chunk_products.measure(100, 16, 100, [10], torch.float32, "cpu", 1, tiles, lambda r: seen.append(json.dumps(r)))
    seen = [json.loads(x) for x in seen]
    assert [list(r[-1]["add_tiles"]) for r in seen] == [["a"], ["a", "b"], ["a", "b"]], seen
    assert [r[-1].get("partial", False) for r in seen] == [True, True, False]

    def row(addmm, partial=False, **tried):
        out = {"ms": {"d_weight_add": addmm}, "add_tiles": {k: {"ms": t, "error_vs_addmm": e} for k, (t, e) in
                                                             tried.items()}}  # fmt: skip
        return {**out, "partial": True} if partial else out

    best = chunk_products.best_tiles
    assert best([row(1.0, a=(0.8, 1.0), b=(0.7, 1.0)), row(2.0, a=(1.5, 1.0), b=(1.7, 1.0))]) == "a"  # summed
    assert best([row(1.0, a=(0.8, 1.0), b=(0.7, 3.0))]) == "a"  # b: three times addmm_'s error
    assert best([row(1.0, a=(1.2, 1.0))]) is None  # slower than addmm_
    assert best([row(1.0, a=(0.8, 1.0)), row(1.0, True, a=(9.0, 1.0))]) == "a"  # a partial row does not count
    assert best([]) is None and best([row(1.0, True, a=(0.5, 1.0))]) is None
    dz, w = torch.randn(6, 12), torch.randn(12, 5)
    assert_close = torch.testing.assert_close
    assert_close(chunk_products.split_product(dz, w, 3, torch.empty(6, 5)), dz @ w, rtol=1e-5, atol=1e-5)
    with pytest.raises(SystemExit):
        chunk_products.main(["--shape", "8x1024", "--out", str(out)])


def test_kernel_resources_counts_registers_and_limits():
    from benchmarks.kernel_resources import Build

    ok = Build(90, "s", "k", "bf16", "", num_warps=8, registers=255, shared_bytes=227 * 1024)
    assert ok.problems == []  # 255 registers round up to 256 per thread: 8 warps use the whole register file
    big = Build(89, "s", "k", "bf16", "", num_warps=4, registers=32, shared_bytes=100 * 1024)  # 99 KiB on sm_89
    assert "shared memory" in big.problems[0]
    assert "registers" in Build(90, "s", "k", "bf16", "", num_warps=16, registers=255).problems[0]
    broken = Build(90, "s", "k", "bf16", "", error="CompilationError: x")
    assert broken.problems == ["does not compile: CompilationError: x"]
    assert broken.blocks_per_sm == 0
    # 127 registers take 16 x 256 per warp: 16 warps of 8 fit the register file twice; 3 x (72 + 1) KiB fit in 228
    assert Build(90, "s", "k", "bf16", "", num_warps=8, registers=127, shared_bytes=72 * 1024).blocks_per_sm == 2
    assert Build(90, "s", "k", "bf16", "", num_warps=8, registers=64, shared_bytes=72 * 1024).blocks_per_sm == 3
    assert ok.blocks_per_sm == 1
    assert Build(89, "s", "k", "fp32", "", num_warps=8, registers=32).blocks_per_sm == 6  # 48 warps per SM
    assert Build(90, "s", "k", "fp32", "", num_warps=4, registers=32).blocks_per_sm == 16  # at most 16 counted


def test_every_kernel_builds_for_hopper_and_ada(tmp_path):
    """Each Triton kernel of the package, with each of its compile-time options, compiles for sm_90 (H100, H200) and
    sm_89 (RTX 4090, L40S) with the GPU's launch settings, and fits their shared memory and register files: what the
    interpreter cannot tell (it neither compiles nor allocates)."""
    import importlib
    import os
    import pkgutil
    import subprocess
    import sys

    import grpo_kernels.ops
    from benchmarks.kernel_resources import available

    if torch.cuda.is_available():
        pytest.skip("with a GPU the other tests compile and run the kernels (and this build takes minutes)")
    reason = available()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ, TRITON_INTERPRET="0")
    cmd = [sys.executable, "-m", "benchmarks.kernel_resources", "--arch", "90", "89", "--dtypes", "bf16", "fp32",
           "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    builds = json.loads((tmp_path / "resources.json").read_text())["builds"]
    kernels = {
        name
        for info in pkgutil.iter_modules(grpo_kernels.ops.__path__)
        for name in dir(importlib.import_module(f"grpo_kernels.ops.{info.name}"))
        if name.startswith("_") and name.endswith("_kernel")
    }
    assert len(kernels) >= 6
    for arch in (89, 90):
        assert {b["kernel"] for b in builds if b["arch"] == arch} == kernels
        for dtype in ("bf16", "fp32"):
            assert {b["kernel"] for b in builds if b["arch"] == arch and b["dtype"] == dtype} >= {
                "_linear_fwd_kernel", "_linear_bwd_kernel", "_logprobs_fwd_kernel", "_logprobs_bwd_kernel"}  # fmt: skip
    assert all(b["registers"] > 0 and b["problems"] == [] for b in builds)
    # the tiles forward's blocks of columns: a row's first, middle and last block are variants of the forward kernel
    forward = [b["options"] for b in builds if b["kernel"] == "_logprobs_fwd_kernel"]
    folds = {re.search(r"FIRST=\d LAST=\d", options).group() for options in forward}
    assert {"FIRST=1 LAST=0", "FIRST=0 LAST=0", "FIRST=0 LAST=1", "FIRST=1 LAST=1"} <= folds, folds
    # fp32 inputs: no multiply-add fused by the compiler (it breaks the cancellation of a row's maximum; see
    # `ops._common.math_options`), and libdevice's exp
    for b in builds:
        if b["dtype"] == "fp32" and b["kernel"].startswith(("_linear", "_logprobs")):
            assert "enable_fp_fusion=0" in b["options"] and "PRECISE=1" in b["options"], b
        if b["dtype"] == "bf16":
            assert "enable_fp_fusion=0" not in b["options"], b
    assert "## sm_90" in (tmp_path / "resources.md").read_text()


def test_tiles_per_architecture(monkeypatch):
    """A GPU whose architecture has its own `TILES` entry uses it, any other the general one; the tuner's swap puts
    back what it found, an absent entry included."""
    from benchmarks.tune_fused import tiles_in_use
    from grpo_kernels.ops import linear

    major = {"value": 9}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a, **k: SimpleNamespace(major=major["value"]))
    cpu = torch.device("cpu")
    assert linear.tiles_key("fwd", torch.bfloat16, cpu) == ("fwd", "low", 9)
    assert linear.tiles_key("bwd", torch.float16, cpu) == ("bwd", "low", 9)
    assert linear.tiles_key("fwd", torch.float32, cpu) == ("fwd", "fp32")  # no fp32 entry for Hopper
    major["value"] = 8
    assert linear.tiles_key("fwd", torch.bfloat16, cpu) == ("fwd", "low")
    before = dict(linear.TILES)
    with tiles_in_use(("fwd", "low", 8), linear.Tiles(16, 16, 16, 4, 2)):
        assert linear.tiles_key("fwd", torch.bfloat16, cpu) == ("fwd", "low", 8)
    assert before == linear.TILES


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_profile_says_where_the_memory_goes(tmp_path, dev):
    """--profile with the memory runs: each row also says where the memory live at its peak was allocated (lines of
    grpo_kernels for ours), in the row and in results.md: the CPU counter's stacks, the CUDA allocator's history."""
    out = tmp_path / "mem"
    provider = "ours-torch" if dev == "cpu" else "ours-triton"
    args = ["--device", dev, "--ops", "fused_linear", "--shapes", "2x8x16x256", "--providers", provider,
            "--modes", "forward+backward", "--repeats", "1", "--no-progress", "--profile",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    places = row["peak_detail"]
    assert places and all(e["mib"] > 0 for e in places)
    assert [e["mib"] for e in places] == sorted((e["mib"] for e in places), reverse=True)
    assert sum(e["mib"] for e in places) <= row["peak_mib"] * (1 + 1e-9)
    assert any(e["where"].startswith("grpo_kernels/fused_linear.py:") for e in places), places
    assert "Live at the peak" in (out / "results.md").read_text()


def test_live_at_peak_replays_allocator_events():
    """The CUDA allocator's recorded events replayed: the peak, and the blocks live then, per place."""
    from grpo_kernels.memory import live_at_peak

    here = [{"filename": "/x/site-packages/torch/nn/functional.py", "line": 9, "name": "linear"},
            {"filename": "/x/benchmarks/providers.py", "line": 40, "name": "run"}]  # fmt: skip
    events = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": here},
        {"action": "alloc", "addr": 2, "size": 50, "frames": here[1:]},
        {"action": "free_requested", "addr": 1, "size": 100},
        {"action": "free_completed", "addr": 1, "size": 100},
        {"action": "alloc", "addr": 3, "size": 70, "frames": []},
        {"action": "alloc", "addr": 4, "size": 10, "frames": here},
        {"action": "free_completed", "addr": 9, "size": 5},  # allocated before the recording: not counted
    ]
    peak, places = live_at_peak(events)
    assert peak == 150
    assert places == [(150, "providers.py:40 (run)")]
    assert live_at_peak(events[:1]) == (100, [(100, "providers.py:40 (run)")])


def test_results_say_the_package_settings_of_the_environment(tmp_path, monkeypatch):
    """A run under GRPO_KERNELS_CHUNK_MIB (or another of the package's settings) says so in its meta and results.md;
    a run with none says nothing."""
    for key in [k for k in os.environ if k.startswith("GRPO_KERNELS_")]:
        monkeypatch.delenv(key)
    args = ["--device", "cpu", "--ops", "advantages", "--providers", "eager", "--shapes", "1024", "--repeats", "1",
            "--no-progress", "--no-memory", "--out"]  # fmt: skip
    assert main([*args, str(tmp_path / "plain")]) == 0
    assert report.load(tmp_path / "plain" / "results.json")[0]["environment"] == {}
    assert "Environment:" not in (tmp_path / "plain" / "results.md").read_text()
    monkeypatch.setenv("GRPO_KERNELS_CHUNK_MIB", "48")
    monkeypatch.setenv("GRPO_KERNELS_TEST_DEADLINE", "1")  # the test harness's, not the package's
    assert main([*args, str(tmp_path / "budget")]) == 0
    assert report.load(tmp_path / "budget" / "results.json")[0]["environment"] == {"GRPO_KERNELS_CHUNK_MIB": "48"}
    assert "Environment: GRPO_KERNELS_CHUNK_MIB=48." in (tmp_path / "budget" / "results.md").read_text()


def test_resume_measures_only_what_is_missing(tmp_path, capsys):
    """--resume after a sweep that measured part of the shapes: those keep their rows (not measured again), the rest
    are measured, and a file from another device is refused."""
    out = tmp_path / "resume"
    common = ["--device", "cpu", "--ops", "advantages", "--providers", "eager", "--repeats", "1", "--no-progress",
              "--no-memory", "--out", str(out)]  # fmt: skip
    base = [*common, "--quick"]
    assert main([*common, "--shapes", "1024"]) == 0  # the quick sweep's first shape
    meta, first = report.load(out / "results.json")
    assert {r["N"] for r in first} == {1024}
    assert main([*base, "--resume"]) == 0
    assert "--resume: 1 of" in capsys.readouterr().out
    first_meta = meta
    meta, rows = report.load(out / "results.json")
    assert meta["not_measured"] == [] and len({r["N"] for r in rows}) > 1
    assert [r for r in rows if r["N"] == first[0]["N"]] == first  # kept as they were
    # where the kept rows came from, in the meta and in results.md
    assert meta["earlier"] == [{"command": first_meta["command"], "date": first_meta["date"],
                                "versions": first_meta["versions"], "shapes_kept": 1}]  # fmt: skip
    assert f"Resumed: the rows of 1 shape come from `{first_meta['command']}`" in (out / "results.md").read_text()
    data = json.loads((out / "results.json").read_text())
    data["meta"]["device"] = "another GPU"
    (out / "results.json").write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="was measured on 'another GPU'"):
        main([*base, "--resume"])


def test_resume_keeps_the_rows_it_does_not_measure_again(tmp_path, capsys):
    """--resume with fewer ops, shapes or providers than the file holds: the file's other rows stay in results.json,
    results.md and the plots, and the rows measured again replace theirs. A shape counts as measured only with a row
    for every chosen provider in every chosen mode it has (the copy floor of the loss from logits has no backward). No
    results.json: one line says so, and everything is measured."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "resume"
    common = ["--device", "cpu", "--repeats", "1", "--no-progress", "--no-memory", "--out", str(out)]
    logits = [*common, "--ops", "loss_from_logits", "--providers", "eager", "floor", "--shapes", "1x4x32"]
    assert main([*common, "--resume", "--ops", "advantages", "--providers", "eager", "--shapes", "16", "32"]) == 0
    assert f"--resume: no results.json in {out}: measuring everything" in capsys.readouterr().out
    advantages = report.load(out / "results.json")[1]
    assert len(advantages) == 2 and (out / "advantages.png").exists()
    assert main([*logits, "--modes", "forward", "--resume"]) == 0
    assert "--resume: 0 of 1 shape already measured" in capsys.readouterr().out
    rows = report.load(out / "results.json")[1]
    assert [r for r in rows if r["op"] == "advantages"] == advantages  # kept as they were
    assert {(r["provider"], r["mode"]) for r in rows if r["op"] == "loss_from_logits"} == {
        ("eager", "forward"), ("floor", "forward")}  # fmt: skip
    text = (out / "results.md").read_text()
    assert "## Group advantages" in text and "## GRPO loss from logits" in text
    assert (out / "advantages.png").exists()
    # every mode now: the forward-only rows do not make the shape measured
    assert main([*logits, "--resume"]) == 0
    assert "--resume: 0 of 1 shape already measured" in capsys.readouterr().out
    meta, rows = report.load(out / "results.json")
    assert {(r["provider"], r["mode"]) for r in rows if r["op"] == "loss_from_logits"} == {
        ("eager", "forward"), ("eager", "backward"), ("eager", "forward+backward"), ("floor", "forward")}  # fmt: skip
    assert len(rows) == 2 + 4 and [r for r in rows if r["op"] == "advantages"] == advantages
    assert meta["earlier"][-1]["shapes_kept"] == 2  # the two shapes of rewards
    assert main([*logits, "--resume"]) == 0
    assert "--resume: 1 of 1 shape already measured" in capsys.readouterr().out
    assert report.load(out / "results.json")[1] == rows
    # fewer providers: the others' rows of a shape measured again stay
    assert main([*common, "--ops", "advantages", "--providers", "floor", "--shapes", "16", "--resume"]) == 0
    rows = report.load(out / "results.json")[1]
    assert {(r["provider"], r["N"]) for r in rows if r["op"] == "advantages"} == {
        ("eager", 16), ("eager", 32), ("floor", 16)}  # fmt: skip
    # a run without --resume replaces the file, and the plot of an op it has no rows of goes with it
    assert main(logits) == 0
    assert {r["op"] for r in report.load(out / "results.json")[1]} == {"loss_from_logits"}
    assert not (out / "advantages.png").exists()


def test_providers_say_whether_they_have_a_backward():
    """`Provider.has_backward`, which --resume reads, matches what the provider's bind gives."""
    for provider in PROVIDERS:
        if provider.unavailable("cpu") is not None or OP_MODES[provider.op] == ("forward",):
            continue
        case = Case(provider.op, 1, 4, 8 if provider.op == "fused_linear" else None, 32, "float32", "cpu")
        bound = provider.bind(case, make_inputs(case))
        assert (bound.backward is not None) == provider.has_backward, provider.name


def test_console_and_plot_show_the_modes_measured(tmp_path, capsys):
    """--modes forward or backward alone on an op with a backward: the console shows that mode's tables and the plot
    is drawn from it."""
    pytest.importorskip("matplotlib")
    for mode in ("forward", "backward"):
        out = tmp_path / mode
        args = ["--device", "cpu", "--ops", "loss_from_logits", "--providers", "eager", "--shapes", "1x4x32", "1x8x32",
                "--modes", mode, "--repeats", "1", "--no-progress", "--no-memory", "--out", str(out)]  # fmt: skip
        assert main(args) == 0
        printed = capsys.readouterr().out
        assert f"### {mode}, float32, V = 32" in printed and "| N (B × T) | eager PyTorch |" in printed
        assert f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'loss_from_logits.png'}" in printed
        assert (out / "loss_from_logits.png").read_bytes()[:4] == b"\x89PNG"


def test_no_fraction_of_the_floor_below_the_floor():
    """A time below the floor's (the fused linear backward of a provider that forms its gradients in the forward)
    gets no fraction in the tables; a time above it keeps its fraction."""
    case = Case("fused_linear", 1, 4, 8, 32, "float32", "cpu")
    env = {"device": "cpu", "versions": {}}
    eager, ours, floor = (next(p for p in PROVIDERS if p.op == "fused_linear" and p.name == n)
                          for n in ("eager", "ours-torch", "floor"))  # fmt: skip
    rows = []
    for provider, ms, fraction in ((eager, 2.0, 0.5), (ours, 0.002, 500.0), (floor, 1.0, 1.0)):
        row = runner._row(case, provider, "backward", env)
        row.update(time_ms=ms, time_min_ms=ms, time_max_ms=ms, floor_fraction=fraction)
        rows.append(row)
    table = "\n".join(report._table(rows, "time_ms"))
    assert "| 4 (1 × 4) | 2 (0.50) | **0.002** | 1 |" in table, table
    assert "No fraction where the time is below the floor" in report.NOTES
