"""summary.md of a benchmarks/gpu.sh run: the device, torch, each part's status, and every GPU
goal of the package with its measured figure and pass/fail.

    python benchmarks/gpu_summary.py OUT_DIR [--total-seconds S]

Reads what gpu.sh wrote into OUT_DIR (environment.json, parts.jsonl, pytest.xml and the
benchmarks' JSON); a part that failed or ran out of time leaves its goals "not measured".
In a dry run (CPU, toy sizes) the figures are shown and no goal is judged.
"""
import argparse
import json
import math
import os
import re
import xml.etree.ElementTree as ET

PASS, FAIL, MISSING, DRY = "pass", "FAIL", "not measured", "n/a (dry run)"


def _load(out, name):
    path = os.path.join(out, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _parts(out):
    path = os.path.join(out, "parts.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _is_cuda_case(name: str, cuda_only: bool) -> bool:
    """A CUDA case by its parameter id: "cuda" as one of the dash-separated ids in [...] (a test
    named for CUDA graphs with a [cpu-...] id is not one). Under IWAE_EXT_TESTS=cuda every case
    collected is one (the selection also keeps the cuda-marked tests, which have no id)."""
    if cuda_only:
        return True
    ids = re.search(r"\[(.*)\]$", name)
    return ids is not None and "cuda" in ids.group(1).split("-")


def test_counts(out, cuda_only=False):
    """Counts from pytest.xml: total, failed, skipped, CUDA cases run and skipped, failing names."""
    path = os.path.join(out, "pytest.xml")
    if not os.path.isfile(path):
        return None
    root = ET.parse(path).getroot()
    c = {"tests": 0, "failed": 0, "skipped": 0, "cuda_run": 0, "cuda_skipped": 0, "failures": [],
         "skip_reasons": {}}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        cuda = _is_cuda_case(case.get("name", ""), cuda_only)
        c["tests"] += 1
        bad = case.find("failure") is not None or case.find("error") is not None
        skip = case.find("skipped")
        if bad:
            c["failed"] += 1
            c["failures"].append(name)
        if skip is not None:
            c["skipped"] += 1
            reason = (skip.get("message") or "").strip()[:100]
            c["skip_reasons"][reason] = c["skip_reasons"].get(reason, 0) + 1
        if cuda:
            c["cuda_skipped" if skip is not None else "cuda_run"] += 1
    return c


def _verdict(ok, dry):
    if dry:
        return DRY
    return PASS if ok else FAIL


def goals(out, dry):
    """[(area, goal, measured, verdict)]"""
    rows = []
    tests_part = next((p for p in _parts(out) if p["part"] == "tests"), None)
    cuda_only = not dry
    t = test_counts(out, cuda_only)
    goal = "the CUDA cases pass (the tests part exits 0 within its limit)"
    if t is None:
        rows.append(("tests", goal, "no pytest.xml", MISSING))
    else:
        rc = None if tests_part is None else tests_part["rc"]
        ok = rc == 0 and t["failed"] == 0 and t["tests"] > 0 and t["cuda_run"] > 0
        status = "time limit" if rc == 124 else f"exit status {rc}"
        rows.append(("tests", goal,
                     f"{status}; {t['tests']} tests, {t['failed']} failed, {t['skipped']} skipped; CUDA cases: "
                     f"{t['cuda_run']} ran, {t['cuda_skipped']} skipped", _verdict(ok, dry)))

    lme = _load(out, "logmeanexp.json")
    big = "10000x5000"
    if lme is None:
        for g in ("forward at [10000, 5000] >= 85% of the copy bandwidth",
                  "forward+backward at [10000, 5000] >= 3.5x eager", "one kernel per direction"):
            rows.append(("logmeanexp", g, "-", MISSING))
    else:
        cases = {"x".join(map(str, c["shape"])): c for c in lme["results"]}
        tag = big if big in cases else max(cases, key=lambda k: math.prod(map(int, k.split("x"))))
        c = cases[tag]
        frac = c.get("forward_fraction_of_copy_bandwidth")
        bw = lme.get("copy_bandwidth_bytes_per_s")
        rows.append(("logmeanexp", "forward at [10000, 5000] >= 85% of the copy bandwidth",
                     f"{frac:.0%} at [{tag.replace('x', ', ')}] (copy {bw / 1e12:.2f} TB/s, read+write); "
                     f"{c['iwae_ext_forward_s'] * 1e6:.0f} us" if frac is not None else
                     f"{c['iwae_ext_forward_s'] * 1e6:.1f} us at [{tag.replace('x', ', ')}] (no copy bandwidth on a CPU)",
                     _verdict(frac is not None and frac >= 0.85 and tag == big, dry)))
        sp = c["speedup_vs_eager_forward+backward"]
        rows.append(("logmeanexp", "forward+backward at [10000, 5000] >= 3.5x eager",
                     f"{sp:.2f}x at [{tag.replace('x', ', ')}]; forward {c['speedup_vs_eager_forward']:.2f}x",
                     _verdict(sp >= 3.5 and tag == big, dry)))
        kf, kb = lme.get(f"kernels_forward_{tag}"), lme.get(f"kernels_backward_{tag}")
        rows.append(("logmeanexp", "one kernel per direction",
                     f"forward {kf}, backward {kb}" if kf is not None else "not counted (CPU)",
                     _verdict(kf == 1 and kb == 1, dry)))

    bl = _load(out, "bayes-linear.json")
    if bl is None:
        rows.append(("bayes_linear", "within 1.3x of the cuBLAS matmuls of the same shapes", "-", MISSING))
        rows.append(("bayes_linear", ">= 2x the eager twin at M = 100,000", "-", MISSING))
    else:
        res = bl["results"]
        vm = [c["vs_matmuls"] for c in res if c.get("vs_matmuls") is not None]
        rows.append(("bayes_linear", "within 1.3x of the cuBLAS matmuls of the same shapes",
                     ", ".join(f"{c['vs_matmuls']:.2f}x (M={c['rows']}, {c['in']}->{c['out']})" for c in res
                               if c.get("vs_matmuls") is not None) or "not timed (CPU)",
                     _verdict(bool(vm) and max(vm) <= 1.3, dry)))
        big_m = [c for c in res if c["rows"] == 100000] or [max(res, key=lambda c: c["rows"])]
        rows.append(("bayes_linear", ">= 2x the eager twin at M = 100,000",
                     ", ".join(f"{c['speedup_vs_eager']:.2f}x (M={c['rows']}, {c['in']}->{c['out']})" for c in big_m),
                     _verdict(big_m[0]["rows"] == 100000 and min(c["speedup_vs_eager"] for c in big_m) >= 2, dry)))

    dec = _load(out, "decoder.json")
    goal = "bernoulli_log_prob within 1.2x of the bare matmul h W^T (every forward shape)"
    if dec is None:
        rows.append(("decoder", goal, "-", MISSING))
    else:
        fw = {n: r["op_over_matmul"] for n, r in dec["op"].items() if "op_over_matmul" in r}
        e2e = dec.get("end_to_end", {})
        extra = "; ".join(f"{n} x{r['speedup']:.2f} the reference path" for n, r in e2e.items())
        rows.append(("decoder", goal, ", ".join(f"{v:.2f}x ({n})" for n, v in fw.items())
                     + (f"; {extra}" if extra else ""), _verdict(bool(fw) and max(fw.values()) <= 1.2, dry)))

    ais = _load(out, "ais.json")
    if ais is None:
        rows.append(("ais", ">= 10x the authors' AIS loop at 4,096 chains", "-", MISSING))
        rows.append(("ais", "whole test set, Wu et al.'s protocol, <= 10 minutes", "-", MISSING))
    else:
        res = ais["results"]
        top = [r for r in res if r["chains"] == 4096] or [max(res, key=lambda r: r["chains"])]
        r = top[0]
        rows.append(("ais", ">= 10x the authors' AIS loop at 4,096 chains",
                     f"{r['speedup_vs_authors']:.1f}x at {r['chains']} chains (range "
                     f"{r['speedup_vs_authors_range'][0]:.1f}-{r['speedup_vs_authors_range'][1]:.1f}); "
                     f"{r['speedup_vs_eager']:.1f}x the careful eager loop; "
                     f"{r['iwae_ext_grad_evals_per_s']:.3g} grad evals/s; agreement: "
                     f"{ais.get('agreement', 'not recorded')}",
                     _verdict(r["chains"] == 4096 and r["speedup_vs_authors"] >= 10, dry)))
        if "bf16_speedup" in r:
            rows.append(("ais", "bf16 interior gradients: speedup over float32 (the same estimator)",
                         f"{r['bf16_speedup']:.2f}x at {r['chains']} chains; floors' ratio "
                         f"{r['matmuls_vs_matmuls_bf16']:.2f}x; acceptance {r['acceptance_bf16']:.4f} vs "
                         f"{r['acceptance_float32']:.4f}", "measured"))
        est = ais["full_test_set_estimate"]["iwae_ext_seconds"]
        rows.append(("ais", "whole test set, Wu et al.'s protocol, <= 10 minutes",
                     f"{est / 60:.1f} min (extrapolated from {ais['full_test_set_estimate']['from_chains']} chains)",
                     _verdict(r["chains"] == 4096 and est <= 600, dry)))

    tr = _load(out, "train.json")
    goal = "IWAE k=50, batch 20: compiled trainer step <= 0.2 ms (3,280 epochs in < 35 min)"
    if tr is None:
        rows.append(("train step", goal, "-", MISSING))
    else:
        r = tr["results"][0]
        rows.append(("train step", goal,
                     f"k={r['k']} batch {r['batch_size']}: compiled {r['compiled_step_s'] * 1e3:.3f} ms/step, eager "
                     f"{r['eager_step_s'] * 1e3:.3f} (x{r['compiled_speedup']:.2f}); plain PyTorch "
                     f"{r.get('plain_step_s', float('nan')) * 1e3:.3f}",
                     _verdict(r["k"] == 50 and r["batch_size"] == 20 and r["compiled_step_s"] <= 2e-4, dry)))
        for name, data in (("bf16", r), ("tf32", (_load(out, "train-tf32.json") or {"results": [{}]})["results"][0])):
            if "bf16_speedup" in data:  # the low-precision row of that run (bf16, or tf32 with --tf32)
                rows.append(("train step", f"{data.get('low_precision', name)} step against float32, eager",
                             f"x{data['bf16_speedup']:.2f} ({data['bf16_step_s'] * 1e3:.3f} ms/step)", "measured"))
    return rows, t


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--total-seconds", type=float)
    args = p.parse_args()
    env = _load(args.out, "environment.json") or {}
    dry = bool(env.get("dry_run"))
    rows, t = goals(args.out, dry)
    lines = ["# gpu.sh summary" + (" (dry run: CPU, toy sizes; no goal is judged)" if dry else ""), ""]
    device = env.get("gpu") or "CPU"
    lines.append(f"- device: **{device}**" + (f" ({env.get('multiprocessors')} SMs, {env.get('memory_gib')} GiB, "
                                                 f"capability {env.get('capability')})" if env.get("gpu") else ""))
    if env.get("nvidia_smi"):
        lines.append(f"- nvidia-smi: {env['nvidia_smi']}")
    lines.append(f"- torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), Python {env.get('python')}, "
                 f"date {env.get('date')}")
    if args.total_seconds is not None:
        lines.append(f"- wall time of gpu.sh: {args.total_seconds:.0f} s")
    lines += ["", "| part | exit status | seconds (limit) |", "| --- | ---: | ---: |"]
    for part in _parts(args.out):
        status = "time limit" if part["rc"] == 124 else str(part["rc"])
        lines.append(f"| {part['part']} | {status} | {part['seconds']} ({part['limit']}) |")
    lines += ["", "| area | goal | measured | verdict |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {g} | {m} | {v} |" for a, g, m, v in rows]
    if t and t["failures"]:
        lines += ["", f"Failing tests ({len(t['failures'])}):", ""]
        lines += [f"- `{name}`" for name in t["failures"][:30]]
    if t and t["skip_reasons"]:
        lines += ["", "Skip reasons:", ""]
        lines += [f"- {n} x {reason or '(none given)'}" for reason, n in
                  sorted(t["skip_reasons"].items(), key=lambda kv: -kv[1])[:8]]
    lines += ["", "Logs and JSON beside this file: <part>.log, pytest.xml, logmeanexp.json, "
              "bayes-linear.json, ais.json, train.json, train-tf32.json."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
