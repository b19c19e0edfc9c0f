"""Checks and timings on a CUDA GPU: precompute, live attribution, dictionary training and the
all-heads ablation, each compared with the CPU and timed, in one command.

    python benchmarks/gpu.py --out DIR                 # on a machine with a GPU
    python benchmarks/gpu.py --out DIR --device cpu --quick   # the same plumbing on a CPU

Each step runs in its own process with its own time limit, so one failure or hang costs only that
step; a step whose limit does not fit in what is left of ``--budget`` is skipped. Every step's
output goes to ``DIR/<step>.txt`` as it runs, and a summary table (one line per step) is printed
last and written to ``DIR/summary.json``.

Equality checks (CPU fp32 against ``--device`` fp32 on the same tokens):
  precompute-equal   the run's metrics table (largest absolute difference over every metric of
                     every head) and the stored example sequences of every head; also the device's
                     bf16 run against fp32 (Spearman rank correlation of each metric over heads)
  live-equal         QK attribution score, total and top terms, and rank-heads attention, for
                     random heads of every layer on random texts
  dict-equal         ``headscope train-resid`` on two layers with the same seed: held-out EV and L0
Timings (the existing benchmark scripts with ``--device``, so their ratios are read the same way):
  precompute-speed   benchmarks/precompute.py (whole command, plain and base forward passes)
  live-speed         benchmarks/live.py (new-text and seen-text QK attribution next to a forward)
  ablate-speed       benchmarks/ablate.py (270 heads against 270 plain passes, 32 x 256)
  train-resid        ``headscope train-resid`` on every layer (table of EV, L0, dead, error share)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ----- the steps that run in a child process of this script ---------------------------------------
def _precompute(
    model: str, out: Path, device: str, dtype: str, sequences: int, seq_len: int
) -> float:
    cmd = [sys.executable, "-m", "headscope", "precompute", "--json", "--model", model]
    cmd += ["--device", device, "--dtype", dtype, "--sequences", str(sequences)]
    cmd += ["--seq-len", str(seq_len), "--batch-size", "8", "--out", str(out)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def step_precompute_equal(args: argparse.Namespace) -> dict:
    import pandas as pd

    from headscope.store.run import open_run

    n, t = (4, 64) if args.quick else (16, 256)
    work = args.work
    runs = {}
    for name, device, dtype in [
        ("cpu-fp32", "cpu", "fp32"),
        ("dev-fp32", args.device, "fp32"),
        ("dev-bf16", args.device, "bf16"),
    ]:
        wall = _precompute(args.model, work / name, device, dtype, n, t)
        runs[name] = open_run(work / name)
        print(f"{name}: {n} x {t} tokens in {wall:.1f} s (command, model load included)")
    a, b, c = (runs[k].metrics.set_index("name") for k in ("cpu-fp32", "dev-fp32", "dev-bf16"))
    cols = [k for k in a.columns if pd.api.types.is_float_dtype(a[k])]
    diff = (a[cols] - b[cols]).abs().max()
    worst = diff.sort_values(ascending=False)
    print(f"fp32 {args.device} vs cpu, largest |difference| per metric (of {len(cols)}):")
    print(worst.head(8).to_string())
    spearman = {k: float(a[k].corr(c[k], method="spearman")) for k in cols if a[k].std() > 0}
    low = sorted(spearman.items(), key=lambda kv: kv[1])[:5]
    print(f"bf16 {args.device} vs fp32 cpu, lowest Spearman rank correlation over heads: {low}")
    heads = list(a.index)
    same = 0
    for h in heads:
        ea, eb = runs["cpu-fp32"].head(h), runs["dev-fp32"].head(h)
        same += [e["sequence"] for e in ea["examples"]] == [e["sequence"] for e in eb["examples"]]
    print(f"heads whose stored example sequences are identical: {same} / {len(heads)}")
    return {
        "max_abs_metric_diff": float(worst.iloc[0]),
        "worst_metric": str(worst.index[0]),
        "heads_same_examples": f"{same}/{len(heads)}",
        "bf16_min_spearman": float(low[0][1]) if low else None,
    }


def _text(rng: random.Random, n_words: int) -> str:
    words = [
        "the",
        "river",
        "of",
        "Paris",
        "in",
        "1776",
        "was",
        "quickly",
        "seen",
        "by",
        "seventeen",
        "mountain",
        "people",
        "who",
    ]
    return " ".join(rng.choice(words) for _ in range(n_words))


def step_live_equal(args: argparse.Namespace) -> dict:
    import torch

    from headscope.analysis.attribution import qk_attribution, rank_heads
    from headscope.analysis.session import Session
    from headscope.model import ModelAdapter

    cpu = Session(ModelAdapter.load(args.model, device="cpu"))
    dev = Session(ModelAdapter.load(args.model, device=args.device))
    spec = cpu.adapter.spec
    rng = random.Random(0)
    worst_score = worst_total = worst_term = worst_attn = 0.0
    n = 0
    for _ in range(2 if args.quick else 5):
        text = _text(rng, 60 if args.quick else 200)
        n_tok = len(cpu.state(text, through=0).tokens)
        for _ in range(2 if args.quick else 6):
            layer, h = rng.randrange(spec.n_layers), rng.randrange(spec.n_heads)
            q = rng.randrange(n_tok // 2, n_tok)
            k = rng.randrange(0, q + 1)
            a = qk_attribution(cpu, text, f"L{layer}H{h}", q, k, top=50)
            b = qk_attribution(dev, text, f"L{layer}H{h}", q, k, top=50)
            scale = max(abs(a.score), 1.0)
            worst_score = max(worst_score, abs(a.score - b.score) / scale)
            worst_total = max(worst_total, abs(a.total - b.total) / scale)
            bt = {(t.query, t.key): t.value for t in b.terms}
            for t in a.terms[:10]:
                if (t.query, t.key) in bt:
                    worst_term = max(worst_term, abs(t.value - bt[(t.query, t.key)]) / scale)
            n += 1
        ra, rb = rank_heads(cpu, text, n_tok - 1, 0), rank_heads(dev, text, n_tok - 1, 0)
        att_b = {r.head: r.attention for r in rb.heads}
        worst_attn = max(worst_attn, max(abs(r.attention - att_b[r.head]) for r in ra.heads))
    print(f"{n} QK attributions, CPU fp32 vs {args.device} fp32 ({torch.__version__}):")
    print(f"  score: largest difference / max(|score|, 1) = {worst_score:.2e}")
    print(f"  total of all terms: {worst_total:.2e};  top-10 terms: {worst_term:.2e}")
    print(f"  rank-heads attention of every head, largest |difference|: {worst_attn:.2e}")
    return {
        "attributions": n,
        "score_rel": worst_score,
        "total_rel": worst_total,
        "term_rel": worst_term,
        "attention_abs": worst_attn,
    }


def _train_resid(
    model: str, out: Path, device: str, layers: list[int] | None, extra: list[str]
) -> float:
    cmd = [sys.executable, "-m", "headscope", "train-resid", "--json", "--model", model]
    cmd += ["--device", device, "--dtype", "fp32", "--out", str(out), *extra]
    if layers:
        cmd += ["--layers", *map(str, layers)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    (out / "result.json").write_text(res.stdout)
    return time.perf_counter() - t0


def step_dict_equal(args: argparse.Namespace) -> dict:
    small = ["--tokens", "8192" if args.quick else "40000", "--n-features", "512", "--k", "32"]
    small += ["--epochs", "1", "--n-eval", "1024", "--label-tokens", "1024", "--edges", "4"]
    rows = {}
    for name, device in [("cpu", "cpu"), ("dev", args.device)]:
        out = args.work / f"dict-{name}"
        wall = _train_resid(args.model, out, device, [1, 2] if args.quick else [3, 16], small)
        rows[name] = {
            r["layer"]: r for r in json.loads((out / "result.json").read_text())["layers"]
        }
        print(f"train-resid on {device}: {wall:.1f} s")
    worst_ev = worst_l0 = 0.0
    for layer in rows["cpu"]:
        a, b = rows["cpu"][layer], rows["dev"][layer]
        ev, l0 = "explained_variance", "mean_l0"
        print(f"  layer {layer}: EV {a[ev]:.4f} vs {b[ev]:.4f}, L0 {a[l0]:.1f} vs {b[l0]:.1f}")
        worst_ev = max(worst_ev, abs(a[ev] - b[ev]))
        worst_l0 = max(worst_l0, abs(a[l0] - b[l0]))
    return {"ev_abs": worst_ev, "l0_abs": worst_l0}


def step_train_resid(args: argparse.Namespace) -> dict:
    extra = ["--tokens", "16384" if args.quick else "200000", "--epochs", "2"]
    out = args.work / "train-resid"
    layers = [0, 1] if args.quick else None
    wall = _train_resid(args.model, out, args.device, layers, extra)
    rows = json.loads((out / "result.json").read_text())["layers"]
    for r in rows:
        print(json.dumps(r))
    evs = [r["explained_variance"] for r in rows]
    print(
        f"{len(rows)} layers in {wall:.1f} s; EV min {min(evs):.3f}, mean {sum(evs) / len(evs):.3f}"
    )
    return {
        "layers": len(rows),
        "wall_s": round(wall, 1),
        "ev_min": min(evs),
        "ev_below_0.9": sum(e < 0.9 for e in evs),
    }


STEPS = {
    "precompute-equal": step_precompute_equal,
    "live-equal": step_live_equal,
    "dict-equal": step_dict_equal,
    "train-resid": step_train_resid,
}


def script_steps(args: argparse.Namespace) -> dict[str, list[str]]:
    """The timing steps that are the project's own benchmark scripts."""
    py, b = sys.executable, str(ROOT / "benchmarks")
    model = ["--model", args.model]
    seqs = ["--sequences", "8", "--seq-len", "128"] if args.quick else []
    return {
        "precompute-speed": [
            py,
            f"{b}/precompute.py",
            "--device",
            args.device,
            "--dtype",
            "bf16",
            *model,
        ]
        + (
            seqs + ["--batch-size", "4"]
            if args.quick
            else ["--sequences", "128", "--batch-size", "16"]
        ),
        "live-speed": [py, f"{b}/live.py", "--device", args.device, *model]
        + (["--reps", "3", "--tokens", "64"] if args.quick else []),
        "ablate-speed": [py, f"{b}/ablate.py", "--device", args.device, *model]
        + (["--sequences", "2", "--seq-len", "32", "--plain-passes", "4"] if args.quick else []),
    }


# ----- the driver ---------------------------------------------------------------------------------
LIMITS = {  # seconds per step, in the order they run
    "precompute-equal": 150,
    "live-equal": 120,
    "dict-equal": 150,
    "precompute-speed": 150,
    "live-speed": 100,
    "train-resid": 200,
    "ablate-speed": 100,
}


def environment(device: str) -> str:
    import torch

    lines = [f"python {sys.version.split()[0]}, torch {torch.__version__}, {os.cpu_count()} CPUs"]
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(
            f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs"
        )
        smi = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=driver_version,clocks.sm,temperature.gpu",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
        )
        lines.append(f"nvidia-smi: {smi.stdout.strip()}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the logs and summary.json")
    p.add_argument("--device", default="cuda", help="the device checked against the CPU")
    p.add_argument("--model", default="default", help="default, or a model folder / .gguf")
    p.add_argument("--work", type=Path, help="folder for runs and dictionaries (default OUT/work)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the plumbing only")
    p.add_argument("--budget", type=float, default=540, help="seconds for all the steps")
    p.add_argument("--only", nargs="+", choices=[*LIMITS], help="run only these steps")
    p.add_argument("--step", choices=[*STEPS], help=argparse.SUPPRESS)  # a child's one step
    args = p.parse_args()
    args.work = args.work or args.out / "work"
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.step:
        result = STEPS[args.step](args)
        (args.work / f"{args.step}.json").write_text(json.dumps(result))
        return 0

    t_start = time.perf_counter()
    print(environment(args.device), flush=True)
    summary: dict[str, dict] = {}
    scripts = script_steps(args)
    for name, limit in LIMITS.items():
        if args.only and name not in args.only:
            continue
        left = args.budget - (time.perf_counter() - t_start)
        if left < min(limit, 30):
            summary[name] = {"status": f"skipped ({left:.0f} s left of the budget)"}
            continue
        if name in STEPS:
            cmd = [
                sys.executable,
                __file__,
                "--out",
                str(args.out),
                "--work",
                str(args.work),
                "--device",
                args.device,
                "--step",
                name,
                "--model",
                args.model,
            ] + (["--quick"] if args.quick else [])
        else:
            cmd = scripts[name]
        t0 = time.perf_counter()
        with open(args.work / f"{name}.txt", "w") as log:
            # its own process group, so a timeout also stops the commands the step started
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                rc = proc.wait(timeout=min(limit, left))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = "timeout"
        wall = time.perf_counter() - t0
        entry = {"status": "ok" if rc == 0 else f"failed ({rc})", "wall_s": round(wall, 1)}
        result = args.work / f"{name}.json"
        if result.is_file():
            entry.update(json.loads(result.read_text()))
        summary[name] = entry
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
        text = (args.work / f"{name}.txt").read_text()
        with open(args.out / "gpu_log.txt", "a") as all_logs:  # one file: $OUT returns few
            all_logs.write(f"\n===== {name}: {entry}\n{text}")
        tail = text.splitlines()[-14:]
        print(f"\n== {name}: {entry['status']} in {wall:.1f} s", *tail, sep="\n", flush=True)
    print("\n== summary")
    for name, entry in summary.items():
        print(f"{name:<18} {json.dumps(entry)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
