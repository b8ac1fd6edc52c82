"""scripts/device/issue9_runs.sh (issue 9's GPU jobs) and its helper, checked on the CPU.

- shell syntax;
- the scheduler in its dry-run mode: every job ends, none starts before the jobs it depends on
  ended, two jobs never hold the same GPU at once, TP=2 jobs hold both; with one GPU the TP=2
  jobs are skipped and the rest run on GPU 0; collect copies at most 8 files;
- the split export (calibration in one process, encoding in another, one amax for FP8 and INT8)
  writes exactly the bytes of one plain ``w4a8-quantize`` run.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device" / "issue9_runs.sh"
HELPER = ROOT / "scripts" / "device" / "issue9_helper.py"


def _helper():
    spec = importlib.util.spec_from_file_location("issue9_helper", HELPER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shell_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def _jobs(w: Path) -> dict:
    jobs = {}
    for line in (w / "jobs.list").read_text().splitlines():
        name, res, deps, _ = line.split("\t")
        d = w / "jobs" / name
        read = lambda f: (d / f).read_text().strip() if (d / f).exists() else ""  # noqa: E731
        jobs[name] = {"res": res, "deps": [] if deps == "-" else deps.split(","),
                      "state": read("state"), "gpus": read("gpus"),
                      "start": int(read("start") or 0), "end": int(read("end") or 0)}
    return jobs


@pytest.mark.parametrize("ngpu", [2, 1])
def test_dry_run_schedule(tmp_path, ngpu):
    env = dict(os.environ, W4A8_ISSUE9_DRYRUN="1", W4A8_ISSUE9_DRY_SLEEP="0.2",
               W4A8_ISSUE9_TICK="0.2", W4A8_ISSUE9_NGPU=str(ngpu))
    w = tmp_path / "work"
    subprocess.run(["bash", str(SCRIPT), "start", str(w)], env=env, cwd=ROOT, check=True,
                   capture_output=True, timeout=120)
    status = subprocess.run(["bash", str(SCRIPT), "status", str(w), "150"], env=env, cwd=ROOT,
                            check=True, capture_output=True, text=True, timeout=200)
    assert (w / "sched.state").read_text().strip() == "finished", status.stdout
    jobs = _jobs(w)
    for name, j in jobs.items():
        if ngpu == 1 and j["res"] == "g0+g1":
            assert j["state"] == "skipped", name
            continue
        assert j["state"] == "done", (name, j)
        for dep in j["deps"]:
            assert j["start"] >= jobs[dep.lstrip("~")]["end"], (name, dep)
        if j["res"] == "cpu":
            assert j["gpus"] == ""
        elif j["res"] == "g0+g1":
            assert j["gpus"] == "0,1"
        elif ngpu == 1:
            assert j["gpus"] == "0"
    ran = [(n, j) for n, j in jobs.items() if j["state"] == "done" and j["gpus"]]
    for a, ja in ran:
        for b, jb in ran:
            if a < b and set(ja["gpus"].split(",")) & set(jb["gpus"].split(",")):
                assert ja["end"] <= jb["start"] or jb["end"] <= ja["start"], (a, b)
    out = tmp_path / "out"
    subprocess.run(["bash", str(SCRIPT), "collect", str(w), str(out)], env=env, cwd=ROOT,
                   check=True, capture_output=True, timeout=60)
    files = sorted(p.name for p in out.iterdir())
    assert "summary.md" in files and len(files) <= 8
    summary = (out / "summary.md").read_text()
    assert "bench_e2e.py run --model" in summary and "--quantization w4a8_mxfp4" in summary


def test_split_export_is_byte_identical(tmp_path):
    import tiny_models
    from w4a8_backend.tools import quantize as q

    helper = _helper()
    src = tmp_path / "llama"
    tiny_models.make_tiny_llama(src)
    args = ["--calibration", "static", "--calib-max-length", "32", "--calib-device", "cpu",
            "--no-progress"]
    amax = tmp_path / "amax.pt"
    assert helper.calib(str(src), str(amax), ["--activations", "fp8", *args]) == 0
    assert q.calibrate.__name__ == "calibrate"  # restored
    assert amax.exists() and not (tmp_path / "amax.pt.unused-out").exists()
    for act in ("fp8", "int8"):
        split, plain = tmp_path / f"split_{act}", tmp_path / f"plain_{act}"
        assert helper.encode(str(src), str(split), str(amax), ["--activations", act, *args]) == 0
        assert q.main([str(src), str(plain), "--activations", act, *args]) == 0
        names = sorted(p.name for p in plain.iterdir())
        assert sorted(p.name for p in split.iterdir()) == names
        for name in names:
            assert (split / name).read_bytes() == (plain / name).read_bytes(), (act, name)
    # An amax measured with other calibration settings is refused.
    other = ["--calibration", "static", "--calib-max-length", "16", "--no-progress"]
    assert helper.encode(str(src), str(tmp_path / "bad"), str(amax), ["--activations", "fp8", *other]) == 1


def test_smoke_kernel_names_survive_long_moe_log_lines():
    """vllm_gpu_smoke parses the dispatcher's log; a long MoE line must keep its kernel name."""
    path = Path(__file__).resolve().parent / "gpu" / "vllm_gpu_smoke.py"
    spec = importlib.util.spec_from_file_location("vllm_gpu_smoke", path)
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    moe = ("(EngineCore pid=7) INFO w4a8_mxfp4: MoE W4A8_MXFP4_FP8 static_per_tensor experts=128 "
           "top_k=8 hidden=2048 intermediate=768 out=torch.bfloat16 activation=silu on "
           "cuda sm_90 (NVIDIA H200) uses kernel sm90_triton (passed over: sm100_flashinfer: "
           "needs sm_100)")
    dense = "INFO w4a8_mxfp4: linear FP8 4096x4096 on cuda sm_90 uses kernel sm90_triton"
    lines = smoke.kernel_log_lines("\n".join([moe, dense, "unrelated line"]))
    assert len(lines) == 2 and len(moe.split("w4a8_mxfp4: ", 1)[1]) > 160
    assert smoke._kinds(lines) == {"sm90_triton"}
