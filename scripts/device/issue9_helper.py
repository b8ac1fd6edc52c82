"""Helpers for scripts/device/issue9_runs.sh (stdlib only, except ``calib``/``encode``).

  cpusets                      CPU sets for the two GPU lanes and the CPU-only jobs
  calib SRC AMAX -- ARGS       run only w4a8-quantize's calibration forward (ARGS as for
                               w4a8-quantize, e.g. --calib-device cuda) and save its amax; the
                               process then exits, so the GPU is free again after ~1 minute
  encode SRC OUT AMAX -- ARGS  run w4a8-quantize SRC OUT ARGS with that saved amax instead of
                               calibrating again (CPU only); the checkpoint is byte-identical to a
                               plain ``w4a8-quantize`` run with the same calibration arguments
  summary DIR                  write DIR/results/summary.md and print the progress table
  collect DIR OUTDIR           summary, then copy at most 8 result files into OUTDIR

One calibration serves both the FP8 and the INT8 export: amax does not depend on the activation
format (the scale is amax/448 or amax/127, computed by the exporter from the same amax).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

MAX_COLLECT = 8


# ---------------------------------------------------------------------------------------------
# CPU sets
# ---------------------------------------------------------------------------------------------

def cpusets() -> str:
    """``LANE0 LANE1 POOL`` as taskset lists; lanes get a quarter of the physical cores each (the
    vLLM processes of the benchmark on that GPU), the pool the other half (model making and
    export). Empty output: too few CPUs to split."""
    cpus = sorted(os.sched_getaffinity(0))
    groups: dict[str, list[int]] = {}
    for c in cpus:
        try:
            key = Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text().strip()
        except OSError:
            key = str(c)
        groups.setdefault(key, []).append(c)
    cores = list(groups.values())
    if len(cpus) < 8 or len(cores) < 4:
        return ""
    q = len(cores) // 4
    fmt = lambda gs: ",".join(str(c) for g in gs for c in g)  # noqa: E731
    return f"{fmt(cores[:q])} {fmt(cores[q:2 * q])} {fmt(cores[2 * q:])}"


# ---------------------------------------------------------------------------------------------
# Split export: calibration (GPU, short) and encoding (CPU, long) in two processes
# ---------------------------------------------------------------------------------------------

class _Calibrated(Exception):
    pass


def _texts_digest(texts) -> str:
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()


def calib(src: str, amax_path: str, args: list[str]) -> int:
    import torch

    from w4a8_backend.tools import quantize as q

    real = q.calibrate
    amax_path = Path(amax_path)

    def calibrate_and_stop(src_, texts, max_length, device="cpu", auto_class="AutoModelForCausalLM"):
        t0 = time.time()
        amax = real(src_, texts, max_length, device, auto_class=auto_class)
        meta = {"src": str(Path(src_).resolve()), "texts_sha256": _texts_digest(texts),
                "max_length": max_length, "auto_class": auto_class, "device": str(device),
                "seconds": round(time.time() - t0, 1)}
        tmp = amax_path.with_name(amax_path.name + ".partial")
        torch.save({"amax": amax, "meta": meta}, tmp)
        os.replace(tmp, amax_path)
        print(f"calibration on {device}: {len(amax)} amax values in {meta['seconds']} s -> {amax_path}",
              flush=True)
        raise _Calibrated

    q.calibrate = calibrate_and_stop
    unused = amax_path.with_name(amax_path.name + ".unused-out")  # never written: we stop first
    try:
        rc = q.main([src, str(unused), *args])
    except _Calibrated:
        return 0
    finally:
        q.calibrate = real
    print("w4a8-quantize finished without calibrating: pass --calibration static", file=sys.stderr)
    return rc or 2


def encode(src: str, out: str, amax_path: str, args: list[str]) -> int:
    import torch

    from w4a8_backend.tools import quantize as q

    saved = torch.load(amax_path, weights_only=False)

    def saved_calibration(src_, texts, max_length, device="cpu", auto_class="AutoModelForCausalLM"):
        want = {"src": str(Path(src_).resolve()), "texts_sha256": _texts_digest(texts),
                "max_length": max_length, "auto_class": auto_class}
        got = {k: saved["meta"][k] for k in want}
        if got != want:
            raise q.QuantizeError(f"{amax_path} was calibrated with {got}, this export asks {want}")
        print(f"calibration: amax from {amax_path} (measured on {saved['meta']['device']})", flush=True)
        return saved["amax"]

    real = q.calibrate
    q.calibrate = saved_calibration
    try:
        return q.main([src, out, *args])
    finally:
        q.calibrate = real


# ---------------------------------------------------------------------------------------------
# Summary and collect
# ---------------------------------------------------------------------------------------------

def _read(p: Path, default: str = "") -> str:
    try:
        return p.read_text(errors="replace").strip()
    except OSError:
        return default


def _tail(p: Path, n: int) -> list[str]:
    """Last ``n`` lines of a log, progress bars (carriage returns) reduced to their last state."""
    try:
        with open(p, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 200_000))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    lines = [ln.rsplit("\r", 1)[-1] for ln in text.replace("\r\n", "\n").split("\n")]
    return [ln[:300] for ln in lines if ln.strip()][-n:]


def _jobs(d: Path) -> list[dict]:
    order = [ln.split("\t") for ln in _read(d / "jobs.list").splitlines() if ln.strip()]
    t0 = float(_read(d / "launch_time", "0") or 0)
    now = time.time()
    out = []
    for name, res, deps, limit in order:
        jd = d / "jobs" / name
        start, end = _read(jd / "start"), _read(jd / "end")
        j = {"name": name, "res": res, "deps": deps, "limit": limit,
             "state": _read(jd / "state", "pending"), "rc": _read(jd / "rc"),
             "gpus": _read(jd / "gpus"), "cores": _read(jd / "cores"),
             "start": float(start) if start else None, "end": float(end) if end else None,
             "dir": jd}
        j["t_start"] = j["start"] - t0 if j["start"] else None
        if j["start"]:
            j["seconds"] = (j["end"] or now) - j["start"]
        else:
            j["seconds"] = None
        watch = _read(jd / "watch")
        j["watch"] = Path(watch) if watch else jd / "log"
        out.append(j)
    return out


def _fmt_s(s) -> str:
    return "-" if s is None else f"{s:.0f}"


def _log_loading_gib(log: Path):
    m = re.findall(r"Model loading took ([\d.]+) GiB", _read(log))
    return float(m[-1]) if m else None


def _run_rows(d: Path) -> list[str]:
    rows = []
    for p in sorted((d / "runs").glob("*/*.json")):
        try:
            r = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        dec = " / ".join(f"b{x['batch']}: {x['tokens_per_s']:.0f}" for x in r.get("decode", []))
        pf = r.get("prefill", {}).get("tokens_per_s")
        gib = _log_loading_gib(p.with_suffix(".log"))
        rows.append(f"| {p.parent.name} | {r.get('label')} | {r.get('tp')} | {r.get('device')} | "
                    f"{_fmt_s(r.get('engine_init_s'))} | {gib if gib is not None else '?'} | {dec} | "
                    f"{_fmt_s(pf)} |")
    return rows


def _smoke_rows(d: Path) -> list[str]:
    rows = []
    for p in sorted((d / "results").glob("smoke_*/vllm_gpu_smoke.json")):
        try:
            s = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        job = p.parent.name
        for e in s.get("llm", []):
            kinds = sorted({k.split("uses kernel ")[1].split()[0] for k in e.get("kernels", [])
                            if "uses kernel " in k})
            rows.append(f"| {job} | {e['arch']} | {e['act']} | TP={e['tp']} | steps {e['steps']} | "
                        f"argmax=ref {e['reference_argmax_agree']} | max gap {e['max_gap_nats']} | "
                        f"mean dlogprob {e['mean_abs_logprob_diff']} | {','.join(kinds) or '-'} | "
                        f"ok={e['ok']} |")
        for e in s.get("tp_agreement", []):
            rows.append(f"| {job} | {e['arch']} | {e['act']} | TP {e['tp']} same greedy tokens: "
                        f"**{e['same_tokens']}** | | | | | | |")
        for e in s.get("serve", []):
            rows.append(f"| {job} | {e['arch']} | vllm serve + openai | {e.get('checks', '')[:300]} | "
                        f"kernels {','.join(e.get('kernel_kinds', []))} | wall {e.get('wall_s')} s | | | | "
                        f"ok={e['ok']} |")
    return rows


def summary(d: Path, quiet: bool = False) -> str:
    d = Path(d)
    jobs = _jobs(d)
    t0 = float(_read(d / "launch_time", "0") or 0)
    sched = _read(d / "sched.state", "?")
    now = time.time()
    lines = ["# issue 9 device runs: progress and results", "",
             f"- written {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC, "
             f"{(now - t0) / 60:.1f} min after launch; scheduler: {sched}"]
    env = _read(d / "env.txt")
    if env:
        lines += ["- machine:", "```", env, "```"]
    try:
        st = shutil.disk_usage(d)
        lines.append(f"- disk at {d}: {st.free / 2**30:.0f} GiB free of {st.total / 2**30:.0f} GiB")
    except OSError:
        pass
    lines += ["", "## Jobs (priority order)", "",
              "| job | resources | state | rc | GPU | start (s after launch) | seconds | limit | deps |",
              "|---|---|---|---|---|---|---|---|---|"]
    for j in jobs:
        lines.append(f"| {j['name']} | {j['res']} | {j['state']} | {j['rc'] or '-'} | "
                     f"{j['gpus'] or '-'} | {_fmt_s(j['t_start'])} | {_fmt_s(j['seconds'])} | "
                     f"{j['limit']} | {j['deps'] or '-'} |")
    # What ran at the same time as each benchmark (interference is possible through the host).
    overlaps = []
    for j in jobs:
        if not (j["name"].startswith(("bench_", "tp2_")) and j["start"]):
            continue
        end = j["end"] or now
        other = [o["name"] for o in jobs if o is not j and o["start"]
                 and o["start"] < end and (o["end"] or now) > j["start"]]
        overlaps.append(f"- {j['name']}: {', '.join(other) or 'nothing else'}")
    if overlaps:
        lines += ["", "Running at the same time as each benchmark (other GPU / CPU pool):", ""] + overlaps
    runs = _run_rows(d)
    if runs:
        lines += ["", "## Raw engine numbers (every `bench_e2e.py run`, tokens/s)", "",
                  "| group | run | TP | device | engine init s | weights GiB (vLLM log) | decode | prefill |",
                  "|---|---|---|---|---|---|---|---|"] + runs
    for md in sorted((d / "results").glob("e2e_*.md")):
        lines += ["", f"## {md.name}", "", _read(md)]
    smoke = _smoke_rows(d)
    if smoke:
        lines += ["", "## Tiny MoE checkpoint: TP agreement and vllm serve (vllm_gpu_smoke.py)", "",
                  "| job | model | act | TP | steps | agree | gap | dlogprob | kernels | ok |",
                  "|---|---|---|---|---|---|---|---|---|---|"] + smoke
    cmds = []
    for j in jobs:
        cmds += [f"{j['name']}: {ln[2:]}" for ln in _read(j["dir"] / "log").splitlines()
                 if ln.startswith("+ ")]
    if cmds:
        lines += ["", "## Commands run (cwd: the repo snapshot DIR/repo)", "", "```"] + cmds + ["```"]
    bad = [j for j in jobs if j["state"] in ("failed", "timeout")]
    for j in bad:
        lines += ["", f"## {j['name']}: {j['state']} (rc {j['rc']}), log tail", "", "```"]
        lines += _tail(j["dir"] / "log", 40)
        if j["watch"] != j["dir"] / "log":
            lines += [f"--- {j['watch']}"] + _tail(j["watch"], 40)
        lines.append("```")
    text = "\n".join(lines) + "\n"
    (d / "results").mkdir(parents=True, exist_ok=True)
    (d / "results" / "summary.md").write_text(text)

    # Short progress for the terminal.
    counts: dict[str, int] = {}
    for j in jobs:
        counts[j["state"]] = counts.get(j["state"], 0) + 1
    out = [f"[issue9] {(now - t0) / 60:.1f} min since launch; scheduler {sched}; "
           + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))]
    for j in jobs:
        out.append(f"  {j['name']:<16} {j['state']:<8} rc={j['rc'] or '-':<4} gpu={j['gpus'] or '-':<4} "
                   f"t+{_fmt_s(j['t_start']):>5}s  {_fmt_s(j['seconds']):>5}s")
    for j in jobs:
        if j["state"] == "running":
            out.append(f"  --- {j['name']} ({j['watch']}):")
            out += ["    " + ln for ln in _tail(j["watch"], 4)]
    for j in bad:
        out.append(f"  --- {j['name']} {j['state']}:")
        out += ["    " + ln for ln in _tail(j["dir"] / "log", 8)]
    if runs:
        out.append("  engine numbers so far (group | run | TP | device | init s | GiB | decode | prefill):")
        out += ["    " + r for r in runs]
    if smoke:
        out += ["    " + r for r in smoke]
    report = "\n".join(out)
    if not quiet:
        print(report)
    return report


def _merge_json(paths: dict[str, Path], out: Path) -> bool:
    data = {}
    for key, p in paths.items():
        try:
            data[key] = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
    if not data:
        return False
    out.write_text(json.dumps(data, indent=1))
    return True


def collect(d: Path, outdir: Path) -> None:
    d, outdir = Path(d), Path(outdir)
    summary(d, quiet=True)
    res = d / "results"
    # Files that exist only as pieces: the tiny-MoE checks (one JSON per job) and the TP=2 runs
    # when their report could not be made (it needs the BF16 TP=2 run).
    smokes = {p.parent.name: p for p in sorted(res.glob("smoke_*/vllm_gpu_smoke.json"))}
    names = [ln.strip() for ln in _read(d / "collect.list").splitlines() if ln.strip()]
    for name in names:
        if name.startswith("vllm_gpu_moe") and smokes:
            _merge_json(smokes, res / name)
        # The TP=2 report (needs the BF16 TP=2 run) writes this JSON with its .md; until then the
        # runs made so far stand in for it.
        m = re.match(r"e2e_.*tp2.*\.json$", name)
        if m and not (res / name).with_suffix(".md").exists():
            runs = {p.stem: p for p in sorted((d / "runs" / "8b_tp2").glob("*.json"))}
            if runs:
                merged = {}
                for k, p in runs.items():
                    try:
                        r = json.loads(p.read_text())
                    except (OSError, ValueError):
                        continue
                    r["model_loading_gib"] = _log_loading_gib(p.with_suffix(".log"))
                    merged[k] = r
                if merged:
                    (res / name).write_text(json.dumps(merged, indent=1))
    outdir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in names:
        p = res / name
        if p.is_file() and len(copied) < MAX_COLLECT:
            shutil.copy2(p, outdir / name)
            copied.append(f"{name} ({p.stat().st_size} B)")
    print("[issue9] collected into", outdir, ":", ", ".join(copied) or "nothing yet")


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    extra: list[str] = []
    if "--" in rest:
        i = rest.index("--")
        rest, extra = rest[:i], rest[i + 1:]
    if cmd == "cpusets":
        print(cpusets())
        return 0
    if cmd == "calib" and len(rest) == 2:
        return calib(rest[0], rest[1], extra)
    if cmd == "encode" and len(rest) == 3:
        return encode(rest[0], rest[1], rest[2], extra)
    if cmd == "summary" and len(rest) == 1:
        summary(Path(rest[0]))
        return 0
    if cmd == "collect" and len(rest) == 2:
        collect(Path(rest[0]), Path(rest[1]))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
