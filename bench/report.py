#!/usr/bin/python3
"""Turns bench/run.sh's raw folder into bench/results/bench.{md,png,json}.

    /usr/bin/python3 bench/report.py WORK_DIR --out-dir bench/results [--rounds N] [...]

Every comparison (engine vs peer, engine vs peak, end-to-end vs echo) is a ratio computed within
one round, and the report quotes the median over rounds of each ratio and of each time.
"""

import argparse
import datetime
import json
import os
import statistics
import sys

CASES = ["a", "b", "c", "d"]  # The chain cases (profile parts, numpy peer).
PEER_CASES = CASES + ["e"]  # Every case PyTorch runs too.
CASE_LABEL = {
    "a": "(a) batch 8, Linear 4→2, MSE",
    "b": "(b) batch 256, 784-1024-1024-10 ReLU, cross-entropy",
    "c": "(c) batch 1024, 8 × (Linear 1024², ReLU), MSE",
    "d": "(d) batch 128, 64 × (Linear 256², tanh), MSE",
    "d_sqrt": "(d) SQRT checkpointing",
    "d_budget": "(d) MEMORY_BUDGET = SQRT's peak",
    "e": "(e) GPT-2 decoder: batch 8, T 128, V 1024, d 256, 4 heads, 4 blocks",
}
PARTS = ["linear_fwd", "linear_bwd", "act", "loss", "diag"]
PART_LABEL = {
    "linear_fwd": "Linear fwd (GEMM + bias)",
    "linear_bwd": "Linear bwd (dW, db, dx)",
    "act": "activations fwd+bwd",
    "loss": "loss",
    "diag": "diagnostics (norms)",
}

TO_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
MAX_OTHER_CPU = 25  # % of one core


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def load_gbench(path):
    """name -> entry, with entry['seconds'] the real time per iteration."""
    with open(path) as f:
        data = json.load(f)
    out = {}
    for b in data["benchmarks"]:
        if b.get("run_type", "iteration") != "iteration" or b.get("error_occurred"):
            continue
        b["seconds"] = b["real_time"] * TO_SECONDS[b["time_unit"]]
        name = b["name"]
        if name.endswith("/real_time"):  # UseRealTime() appends it.
            name = name[: -len("/real_time")]
        out[name] = b
    return out, data.get("context", {})


# perf symbol groups, first match wins: (name, regex on "dso symbol").
PERF_CATEGORIES = [
    ("benchmark set-up", r"gradserve::bench::|benchmark::|mersenne|normal_distribution"),
    ("GEMM kernel (oneDNN, JIT code)", r"^\[JIT\]"),
    ("graph ops (softmax, LayerNorm, GELU, shapes, ...)", r"engine::graph::"),
    ("oneDNN driver (packing, threading)", r"libdnnl"),
    ("GEMM kernel (Eigen gebp)", r"gebp_kernel"),
    ("small products (engine::Gemm on Eigen, TinyGemm)", r"engine::(Gemm|EigenGemm|TinyGemm)<|"
     r"generic_product_impl|lazyProduct"),
    ("GEMM packing", r"gemm_pack_(lhs|rhs)"),
    ("libm tanh/exp/log (scalar)", r"^libm|tanhf|expm1|__ieee754|expf|logf|erff"),
    ("element-wise loops (activations)", r"ForEachElement|ElementwiseBackward"),
    ("diagnostics (Measure)", r"Measure<|SumSquares<"),
    ("executor (RunBackprop self)", r"RunBackprop<|Executor<"),
    ("LinearBackward self (db; small products inlined)", r"LinearBackward<"),
    ("LayerForward self (bias; small products inlined)", r"LayerForward<"),
    ("loss", r"Loss(Value|Gradient)<"),
    ("memset / memcpy", r"__mem(set|move|cpy)"),
    ("malloc / free", r"malloc|free|_int_|cfree|operator new|operator delete"),
    ("clock_gettime", r"clock_gettime|vdso|steady_clock"),
    ("OpenMP runtime", r"libgomp|GOMP|omp_"),
    ("kernel (page faults, ...)", r"\[kernel|\[k\]"),
]


def perf_categories(path):
    """perf report --sort dso,symbol text -> {category: % of non-set-up samples}."""
    import re
    if not os.path.exists(path):
        return None
    totals, samples = {}, None
    for line in open(path, errors="replace"):
        if line.startswith("# Samples:"):
            m = re.search(r"Samples:\s*([0-9.]+)([KM]?)", line)
            if m:
                samples = float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6}[m.group(2)]
        # The dso may hold spaces ("[JIT] tid 1234": oneDNN's generated kernels).
        m = re.match(r"\s*([0-9.]+)%\s+(.+?)\s+(\[.\])\s+(.*)", line)
        if not m:
            continue
        pct, text = float(m.group(1)), f"{m.group(2)} {m.group(3)} {m.group(4)}"
        cat = next((name for name, rx in PERF_CATEGORIES if re.search(rx, text)), "other")
        totals[cat] = totals.get(cat, 0.0) + pct
    setup = totals.pop("benchmark set-up", 0.0)
    rest = sum(totals.values())
    if rest <= 0:
        return None
    scaled = {k: 100 * v / rest for k, v in totals.items()}
    scaled["_samples"] = int((samples or 0) * (100 - setup) / 100)
    return scaled


def median_profile(folders):
    """name -> {seconds, cpu_share (CPU / wall time)}, each the median over the rounds."""
    runs = {}
    for folder in folders:
        path = os.path.join(folder, "profile.json")
        if os.path.exists(path):
            for name, b in load_gbench(path)[0].items():
                runs.setdefault(name, []).append(b)
    return {name: {"seconds": median([b["seconds"] for b in bs]),
                   "cpu_share": median([b["cpu_time"] / b["real_time"] for b in bs])}
            for name, bs in runs.items()}


def fmt_time(seconds):
    if seconds is None:
        return "–"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.2f} µs" if seconds < 1e-5 else f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms" if seconds < 0.1 else f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.3f} s"


def fmt_x(ratio, digits=2):
    return "–" if ratio is None else f"{ratio:.{digits}f}×"


def fmt_pct(frac):
    return "–" if frac is None else f"{100 * frac:.0f}%"


def fmt_bytes(n):
    if n is None:
        return "–"
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def yes(ok):
    return "–" if ok is None else ("**met**" if ok else "**missed**")


class Round:
    def __init__(self, folder, variants):
        self.folder = folder
        self.engine, self.context = load_gbench(os.path.join(folder, "engine.json"))
        self.peers = {}  # (variant, threads) -> json
        for variant in variants:
            for threads in (1, 2):
                path = os.path.join(folder, f"peers-{variant}-{threads}.json")
                if os.path.exists(path):
                    with open(path) as f:
                        self.peers[(variant, threads)] = json.load(f)
        path = os.path.join(folder, "service.json")
        self.service = json.load(open(path)) if os.path.exists(path) else {}
        self.load = float(open(os.path.join(folder, "load")).read())
        path = os.path.join(folder, "other_cpu")
        self.other_cpu = int(open(path).read()) if os.path.exists(path) else None
        self.seconds = int(open(os.path.join(folder, "end")).read()) - int(
            open(os.path.join(folder, "start")).read())

    def cpu_share(self):
        shares = [b["cpu_time"] / b["real_time"] for name, b in self.engine.items()
                  if name.startswith("engine/") and name.endswith("/threads:1")]
        return median(shares)

    def eng(self, case, threads):
        b = self.engine.get(f"engine/{case}/threads:{threads}")
        return b

    def eng_time(self, case, threads):
        b = self.eng(case, threads)
        return b["seconds"] if b else None

    def eng_best(self, case):
        times = {t: self.eng_time(case, t) for t in (1, 2)}
        times = {t: v for t, v in times.items() if v is not None}
        if not times:
            return None, None
        t = min(times, key=times.get)
        return times[t], t

    def peak(self, threads):
        b = self.engine.get(f"peak/fma/threads:{threads}")
        return b["GFLOPs"] if b else None

    def eigen_gemm(self, threads):
        b = self.engine.get(f"gemm/eigen1024/threads:{threads}")
        return b["GFLOPs"] if b else None

    def engine_gemm(self, threads):
        b = self.engine.get(f"gemm/engine1024/threads:{threads}")
        return b["GFLOPs"] if b else None

    def peer_time(self, who, case, variant, threads):
        p = self.peers.get((variant, threads))
        if not p or case not in p["cases"]:
            return None
        return p["cases"][case].get(f"{who}_s")

    def peer_best(self, who, case, variants=None):
        best = None
        for (variant, threads), _ in self.peers.items():
            if variants and variant not in variants:
                continue
            t = self.peer_time(who, case, variant, threads)
            if t is not None and (best is None or t < best[0]):
                best = (t, variant, threads)
        return best

    def sgemm_best(self, key):
        vals = [p["sgemm"][key] for p in self.peers.values() if "sgemm" in p]
        return max(vals) if vals else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--quick", default="0")
    ap.add_argument("--seconds", type=int, default=0)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--cpu", default="")
    ap.add_argument("--cores", default="")
    ap.add_argument("--server", default="")
    ap.add_argument("--coretype", default="<not set>")
    ap.add_argument("--l2size", default="<not set>")
    a = ap.parse_args()

    env_set = a.coretype != "<not set>" or a.l2size != "<not set>"
    variants = ["set", "unset"] if env_set else ["set"]
    all_rounds = [Round(os.path.join(a.work, f"round{r}"), variants)
                  for r in range(1, a.rounds + 1)]
    # Rounds during which other processes took more than MAX_OTHER_CPU % of a core are left out
    # of the medians, unless every round was (then all are used and the report says so).
    clean = [r for r in all_rounds if r.other_cpu is None or r.other_cpu <= MAX_OTHER_CPU]
    rounds = clean or all_rounds
    profile = median_profile([r.folder for r in rounds])
    lines = []
    out = lines.append

    def med(fn):
        return median([fn(r) for r in rounds])

    # ---- Per-round ratios ----------------------------------------------------------------------
    def ratio(num, den):
        return num / den if num is not None and den else None

    def eng_best_t(case):
        return lambda r: r.eng_best(case)[0]

    def torch_best_t(case):
        return lambda r: (r.peer_best("torch", case) or (None,))[0]

    def numpy_best_t(case):
        return lambda r: (r.peer_best("numpy", case) or (None,))[0]

    def peer_best_t(case):
        return lambda r: min([t for t in (torch_best_t(case)(r), numpy_best_t(case)(r))
                              if t is not None], default=None)

    def gflops(case, seconds):
        flops = rounds[0].eng(case, 1)["flops"] if rounds[0].eng(case, 1) else None
        return flops / seconds * 1e-9 if flops and seconds else None

    vs_torch = {c: med(lambda r, c=c: ratio(torch_best_t(c)(r), eng_best_t(c)(r)))
                for c in PEER_CASES}
    vs_numpy = {c: med(lambda r, c=c: ratio(numpy_best_t(c)(r), eng_best_t(c)(r))) for c in CASES}
    vs_peer = {c: med(lambda r, c=c: ratio(peer_best_t(c)(r), eng_best_t(c)(r))) for c in CASES}

    def frac_peak(case):
        def per_round(r):
            t, threads = r.eng_best(case)
            g = gflops(case, t)
            return ratio(g, r.peak(threads))
        return med(per_round)

    def frac_gemm(case):
        def per_round(r):
            t, threads = r.eng_best(case)
            return ratio(gflops(case, t), r.engine_gemm(threads))
        return med(per_round)

    # Checkpointing on (d).
    def eng_counter(case, name):
        vals = [r.eng(case, t)[name] for r in rounds for t in (1, 2) if r.eng(case, t)]
        return vals[0] if vals else None

    sqrt_time_ratio = med(lambda r: ratio(eng_best_t("d_sqrt")(r), eng_best_t("d")(r)))
    budget_time_ratio = med(lambda r: ratio(eng_best_t("d_budget")(r), eng_best_t("d")(r)))
    none_peak = eng_counter("d", "peak_bytes")
    sqrt_peak = eng_counter("d_sqrt", "peak_bytes")
    budget_peak = eng_counter("d_budget", "peak_bytes")
    sqrt_mem_ratio = ratio(sqrt_peak, none_peak)

    def torch_ckpt(key):
        vals = []
        for r in rounds:
            for p in r.peers.values():
                d = p["cases"].get("d")
                if d and key in d:
                    vals.append(d[key])
        return vals

    def torch_ckpt_time_ratio(r):
        best = None
        for (variant, threads), p in r.peers.items():
            d = p["cases"].get("d")
            if d and "ckpt_s" in d:
                rr = d["ckpt_s"] / d["torch_s"]
                best = rr if best is None else min(best, rr)
        return best

    torch_ckpt_ratio = med(torch_ckpt_time_ratio)
    torch_held = torch_ckpt("ckpt_held_bytes")
    torch_none_held = torch_ckpt("none_held_bytes")
    torch_mem_ratio = ratio(torch_held[0], torch_none_held[0]) if torch_held else None

    # Service.
    def svc(case, key):
        return med(lambda r: r.service.get(case, {}).get(key))

    def svc_b_ratio(r):
        s = r.service.get("b")
        if not s:
            return None
        engine = r.eng_time("b", s["server_threads"]) * 1e6
        return s["e2e_p50_us"] / (engine + 1.5 * s["echo_p50_us"])

    def svc_a_ratio(r):
        s = r.service.get("a")
        return s["e2e_p50_us"] / (2 * s["echo_p50_us"]) if s else None

    b_service_ratio = med(svc_b_ratio)
    a_service_ratio = med(svc_a_ratio)

    # Case (e) at each thread count: engine vs PyTorch's faster variant (eager or traced) at the
    # same count, within the round.
    def torch_at(case, threads):
        return lambda r: min([t for t in (r.peer_time("torch", case, v, threads) for v in variants)
                              if t is not None], default=None)

    e_vs_torch_at = {t: med(lambda r, t=t: ratio(torch_at("e", t)(r), r.eng_time("e", t)))
                     for t in (1, 2)}

    # ---- Targets -------------------------------------------------------------------------------
    a_best = med(eng_best_t("a"))
    c_peak = frac_peak("c")
    targets = [
        ("(b) engine ≥ 1.1× best peer (PyTorch or numpy, best config)",
         fmt_x(vs_peer["b"]), None if vs_peer["b"] is None else vs_peer["b"] >= 1.1),
        ("(c) engine ≥ 1.1× PyTorch", fmt_x(vs_torch["c"]),
         None if vs_torch["c"] is None else vs_torch["c"] >= 1.1),
        ("(c) engine ≥ 80% of measured FMA peak (same thread count)", fmt_pct(c_peak),
         None if c_peak is None else c_peak >= 0.8),
        ("(d) engine ≥ 2.5× PyTorch", fmt_x(vs_torch["d"]),
         None if vs_torch["d"] is None else vs_torch["d"] >= 2.5),
        ("(e) GPT-2 decoder: engine ≥ 1.0× PyTorch (to land)", fmt_x(vs_torch["e"]),
         None if vs_torch["e"] is None else vs_torch["e"] >= 1.0),
        ("(e) GPT-2 decoder: engine ≥ 1.3× PyTorch (target)", fmt_x(vs_torch["e"]),
         None if vs_torch["e"] is None else vs_torch["e"] >= 1.3),
        ("(a) engine ≤ 1 µs per step", fmt_time(a_best),
         None if a_best is None else a_best <= 1e-6),
        ("(d) SQRT: cached activations ≤ 25% of NONE's", fmt_pct(sqrt_mem_ratio),
         None if sqrt_mem_ratio is None else sqrt_mem_ratio <= 0.25),
        ("(d) SQRT: time ≤ 1.2× NONE's", fmt_x(sqrt_time_ratio),
         None if sqrt_time_ratio is None else sqrt_time_ratio <= 1.2),
        ("(d) MEMORY_BUDGET at SQRT's peak recomputes ≤ SQRT's layers",
         f"{eng_counter('d_budget', 'recomputed'):.0f} vs {eng_counter('d_sqrt', 'recomputed'):.0f}"
         if eng_counter("d_budget", "recomputed") is not None else "–",
         None if eng_counter("d_budget", "recomputed") is None else
         eng_counter("d_budget", "recomputed") <= eng_counter("d_sqrt", "recomputed")),
        ("service (b): p50 ≤ engine time + 1.5× echo p50 (ratio ≤ 1)", fmt_x(b_service_ratio),
         None if b_service_ratio is None else b_service_ratio <= 1.0),
        ("service (a): p50 ≤ 2× echo p50 (ratio ≤ 1)", fmt_x(a_service_ratio),
         None if a_service_ratio is None else a_service_ratio <= 1.0),
    ]

    # ---- Markdown ------------------------------------------------------------------------------
    now = datetime.datetime.now(datetime.timezone.utc)
    used = [i for i, r in enumerate(all_rounds, 1) if r in rounds]
    out("# gradserve engine vs peers, peak and transport (`bench/run.sh`)")
    out("")
    out(f"- {now:%Y-%m-%d %H:%M} UTC, commit `{a.commit}`, {a.cores} cores ({a.cpu}); "
        f"{'**quick smoke run** (`--quick`), ' if a.quick == '1' else ''}"
        f"{len(all_rounds)} round(s) in {a.seconds} s; CPU other processes took during each "
        "round, in % of one core: "
        f"{', '.join('?' if r.other_cpu is None else str(r.other_cpu) for r in all_rounds)}.")
    if clean and len(clean) < len(all_rounds):
        out(f"- **Medians over rounds {', '.join(map(str, used))} only**: the others shared the "
            f"machine with more than {MAX_OTHER_CPU}% of a core of other work (their figures are "
            "in the Rounds table).")
    elif not clean:
        out(f"- **Every round shared the machine with other work** (> {MAX_OTHER_CPU}% of a "
            "core): all figures below are suspect, 2-thread ones most.")
    out("- Every figure is the **median over rounds**; every ratio is computed within a round "
        "(engine and peers ran minutes apart at most) and then the median taken. float32, one "
        "training step = forward + loss + backward with dW, db and dx; GFLOP/s counts "
        "6·B·in·out per Linear layer.")
    out(f"- OpenBLAS environment: `OPENBLAS_CORETYPE={a.coretype}`, "
        f"`OPENBLAS_L2_SIZE={a.l2size}`" +
        ("; peers ran both with these (**as set**) and with both removed for the peer command "
         "only (**unset**, `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE`)." if env_set else
         "; **neither is set on this machine**, so \"as set\" and \"unset\" are the same run "
         "and the peers ran once per thread count."))
    out("")

    out("## Targets")
    out("")
    out("| target | measured | |")
    out("|---|---:|---|")
    for name, value, ok in targets:
        out(f"| {name} | {value} | {yes(ok)} |")
    out("")

    # What bounds (b)-(d): the GEMMs timed alone, against the engine's own best GEMM and the peak.
    out("What bounds each case, at the engine's best thread count (from the profile below): the "
        "three GEMMs of every Linear timed alone, how fast they run against the engine's 1024³ "
        "GEMM and the FMA peak, and what the step would reach if everything but the GEMMs took "
        "no time.")
    out("")
    out("| case | threads | GEMMs alone / whole step | GEMM GFLOP/s | of engine 1024³ GEMM "
        "| engine 1024³ GEMM of FMA peak | ceiling: of FMA peak | ceiling: vs PyTorch |")
    out("|---|---:|---:|---:|---:|---:|---:|---:|")
    for c in ("b", "c", "d"):
        threads = rounds[0].eng_best(c)[1]
        if threads is None:
            continue
        step = med(lambda r: r.eng_time(c, threads))
        gemm = (profile.get(f"profile/{c}/gemm/threads:{threads}") or {}).get("seconds")
        if not step or not gemm:
            continue
        g = gflops(c, gemm)
        en = med(lambda r: r.engine_gemm(threads))
        pk = med(lambda r: r.peak(threads))
        torch = med(torch_best_t(c))
        out(f"| {CASE_LABEL[c]} | {threads} | {fmt_time(gemm)} / {fmt_time(step)} "
            f"({fmt_pct(ratio(gemm, step))}) | {g:.1f} | {fmt_pct(ratio(g, en))} | "
            f"{fmt_pct(ratio(en, pk))} | {fmt_pct(ratio(g, pk))} | {fmt_x(ratio(torch, gemm))} |")
    out("")

    # Engine vs peers.
    out("## Engine vs peers (time per training step)")
    out("")
    out("| case | engine 1 thr | engine 2 thr | engine GFLOP/s | of FMA peak | of engine GEMM "
        "| PyTorch best | numpy best | engine vs PyTorch | engine vs numpy |")
    out("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in CASES + ["d_sqrt", "d_budget", "e"]:
        e1 = med(lambda r: r.eng_time(c, 1))
        e2 = med(lambda r: r.eng_time(c, 2))
        best = med(eng_best_t(c))
        g = gflops(c, best)
        if c in PEER_CASES:
            tb = rounds[0].peer_best("torch", c)
            nb = rounds[0].peer_best("numpy", c)
            tt, nt = med(torch_best_t(c)), med(numpy_best_t(c))

            def cfg(b):
                if not b:
                    return ""
                return f" ({b[2]} thr{', ' + b[1] if env_set else ''})"
            torch_cell = fmt_time(tt) + cfg(tb)
            if c == "e" and tb:  # Which of Gpt's variants was fastest there.
                variant = rounds[0].peers[(tb[1], tb[2])]["cases"]["e"].get("torch_variant")
                torch_cell += f", {variant}" if variant else ""
            numpy_cell = fmt_time(nt) + cfg(nb)
            row = [fmt_x(vs_torch[c]), fmt_x(vs_numpy.get(c))]
        else:
            torch_cell = numpy_cell = ""
            row = ["", ""]
        out(f"| {CASE_LABEL[c]} | {fmt_time(e1)} | {fmt_time(e2)} | "
            f"{'–' if g is None else f'{g:.1f}'} | {fmt_pct(frac_peak(c))} | "
            f"{fmt_pct(frac_gemm(c))} | {torch_cell} | {numpy_cell} | {row[0]} | {row[1]} |")
    out("")
    out("\"of FMA peak\" / \"of engine GEMM\": the engine's best configuration against the FMA "
        "peak and the engine's own 1024³ GEMM at the same thread count, measured in the same "
        "round. Peer "
        "configuration (threads) shown is the best in round 1.")
    out("")

    # Case (e).
    out("## (e) GPT-2-style decoder through the graph engine")
    out("")
    out("| threads | engine | PyTorch eager | PyTorch jit.trace | PyTorch eager, intra-op 1 "
        "| PyTorch jit.trace, intra-op 1 | engine vs fastest PyTorch | engine GFLOP/s |")
    out("|---:|---:|---:|---:|---:|---:|---:|---:|")

    def torch_variant_t(variant, threads):
        def per_round(r):
            vals = []
            for (v, t), p in r.peers.items():
                e = p["cases"].get("e")
                if t == threads and e and variant in e.get("torch_variants", {}):
                    vals.append(e["torch_variants"][variant][0])
            return min(vals, default=None)
        return per_round

    for t in (1, 2):
        et = med(lambda r: r.eng_time("e", t))
        g = gflops("e", et)
        cells = [fmt_time(med(torch_variant_t(v, t)))
                 for v in ("eager", "jit", "eager, intra-op 1", "jit, intra-op 1")]
        out(f"| {t} | {fmt_time(et)} | {' | '.join(cells)} | {fmt_x(e_vs_torch_at[t])} | "
            f"{'–' if g is None else f'{g:.1f}'} |")
    e_eng = [r.eng("e", t) for r in rounds for t in (1, 2) if r.eng("e", t)]
    e_torch = [p["cases"]["e"] for r in rounds for p in r.peers.values() if "e" in p["cases"]]
    if e_eng and e_torch:
        le, lt = e_eng[0]["loss"], e_torch[0]["loss"]
        ge, gt = e_eng[0]["grad_norm"], e_torch[0]["grad_norm"]
        out("")
        out(f"Same model, same numbers: at the same weights and tokens (bench/engine_bench.cc Note "
            f"[Case (e) data]; bench/peers.py `gpt_data`) the engine's loss is {le:.7f} and "
            f"PyTorch's {lt:.7f} (relative difference {abs(le - lt) / abs(lt):.1e}); the norm "
            f"of all parameter gradients {ge:.7f} and {gt:.7f} "
            f"({abs(ge - gt) / abs(gt):.1e}). float32 both.")
        best_t = rounds[0].eng_best("e")[1]
        ops = {}
        for r in rounds:
            b = r.eng("e", best_t)
            for k, v in (b or {}).items():
                if k.startswith("op_us:"):
                    ops.setdefault(k[len("op_us:"):], []).append(v)
        step = med(lambda r: r.eng_time("e", best_t))
        if ops and step:
            out("")
            out(f"Engine time by op type at {best_t} thread(s) (forward + backward node times "
                "from `GraphRunResult`, median over rounds; the rest is the loss, diagnostics "
                "and the executor):")
            out("")
            out("| op | time per step | of step |")
            out("|---|---:|---:|")
            for op, vals in sorted(ops.items(), key=lambda kv: -median(kv[1])):
                v = median(vals) * 1e-6
                if v >= 0.005 * step:
                    out(f"| {op} | {fmt_time(v)} | {fmt_pct(v / step)} |")
            # What bounds the step: the products' FLOPs (PyTorch's nominal count: 6 x tokens x
            # matrix parameters plus attention's two batched products, x3) over MatMul's time.
            mm = median(ops.get("MatMul", [])) if ops.get("MatMul") else None
            gemm_flops = e_torch[0].get("flops")
            torch_best = med(torch_best_t("e"))
            if mm and gemm_flops:
                mm_s = mm * 1e-6
                g = gemm_flops / mm_s * 1e-9
                pk = med(lambda r: r.peak(best_t))
                en = med(lambda r: r.engine_gemm(best_t))
                out("")
                out(f"What bounds (e): the MatMul nodes take {fmt_pct(mm_s / step)} of the step "
                    f"and run their {gemm_flops * 1e-9:.1f} GFLOP at {g:.0f} GFLOP/s "
                    f"({fmt_pct(ratio(g, pk))} of the FMA peak, {fmt_pct(ratio(g, en))} of the "
                    f"engine's 1024³ GEMM at {best_t} thread(s), bias and diagnostics of their "
                    f"gradients included); with everything else free the step would be "
                    f"{fmt_x(ratio(torch_best, mm_s))} PyTorch's best.")
        out("")
        out("PyTorch: `class Gpt` in bench/peers.py, nn.Module blocks of plain torch ops "
            "(attention as matmul, scale, masked_fill, softmax, matmul: torch 1.13 has no "
            "scaled_dot_product_attention), run eager and as `torch.jit.trace`; at 2 threads "
            "also with torch's own thread pool at 1 (`torch.set_num_threads(1)`, OpenBLAS's "
            "pool still at 2). The fastest at each thread count is compared; the targets "
            "compare the engine's best thread count with PyTorch's best configuration.")
    out("")

    # Peers in detail.
    out("## Peers by configuration")
    out("")
    hdr = ["case"]
    for variant in variants:
        for who in ("PyTorch", "numpy"):
            for t in (1, 2):
                label = f"{who} {t} thr"
                if env_set:
                    label += f", CORETYPE {variant}"
                hdr.append(label)
    out("| " + " | ".join(hdr) + " |")
    out("|---|" + "---:|" * (len(hdr) - 1))
    for c in PEER_CASES:
        cells = [CASE_LABEL[c]]
        for variant in variants:
            for who in ("torch", "numpy"):
                for t in (1, 2):
                    cells.append(fmt_time(med(lambda r: r.peer_time(who, c, variant, t))))
        out("| " + " | ".join(cells) + " |")
    out("")
    p0 = rounds[0].peers
    torch_threads_note = ", ".join(
        f"{t} thr → torch.get_num_threads() = {p0[(variants[0], t)]['torch_num_threads']}"
        for t in (1, 2) if (variants[0], t) in p0)
    out(f"Each peer process sets `OPENBLAS_NUM_THREADS`, `OMP_NUM_THREADS`, "
        f"`torch.set_num_threads` to its thread count and `OMP_WAIT_POLICY=PASSIVE` "
        f"({torch_threads_note}). numpy is the textbook manual backprop (forward matmuls; "
        "dW = δᵀa, db = Σδ, δ ← δW).")
    checks = [p["cases"][c].get("numpy_vs_torch_max_rel_err_f64")
              for p in p0.values() for c in CASES if c in p["cases"]]
    checks = [x for x in checks if x is not None]
    if checks:
        out(f"numpy's gradients agree with torch's to {max(checks):.1e} (max relative, float64, "
            "every tensor of every case), so the numpy peer computes the same thing.")
    out("")
    out("BLAS used by the peers (threadpoolctl):")
    out("")
    for (variant, t), p in sorted(p0.items()):
        libs = "; ".join(
            f"{lib.get('internal_api')} {lib.get('version') or ''} "
            f"{('kernel ' + lib['architecture']) if lib.get('architecture') else ''} "
            f"{lib.get('threading_layer') or ''} threads={lib.get('num_threads')} "
            f"(`{os.path.basename(lib.get('filepath', ''))}`)".replace("  ", " ")
            for lib in p.get("blas", []))
        env_note = f"CORETYPE {variant}, " if env_set else ""
        out(f"- {env_note}{t} thread(s), torch {p['torch_version']}, numpy "
            f"{p['numpy_version']}: {libs}")
    out("")

    # Peak and GEMM.
    out("## Machine peak and best GEMM (1024³ float32)")
    out("")
    out("| | 1 thread | 2 threads |")
    out("|---|---:|---:|")
    pk1, pk2 = med(lambda r: r.peak(1)), med(lambda r: r.peak(2))
    eg1, eg2 = med(lambda r: r.eigen_gemm(1)), med(lambda r: r.eigen_gemm(2))
    label = rounds[0].engine.get("peak/fma/threads:1", {}).get("label", "")
    out(f"| FMA peak ({label}, 16 independent chains), GFLOP/s | {pk1:.1f} | {pk2:.1f} |")
    en1, en2 = med(lambda r: r.engine_gemm(1)), med(lambda r: r.engine_gemm(2))
    kernel = rounds[0].engine.get("gemm/engine1024/threads:1", {}).get("label", "?")
    if en1 is not None and en2 is not None:
        out(f"| engine GEMM (engine::Gemm: {kernel}), GFLOP/s "
            f"| {en1:.1f} ({fmt_pct(ratio(en1, pk1))} of peak) "
            f"| {en2:.1f} ({fmt_pct(ratio(en2, pk2))}) |")
    eigen = rounds[0].context.get("eigen", "?")
    out(f"| Eigen's own GEMM (Eigen {eigen}), GFLOP/s "
        f"| {eg1:.1f} ({fmt_pct(ratio(eg1, pk1))} of peak) "
        f"| {eg2:.1f} ({fmt_pct(ratio(eg2, pk2))}) |")
    for key, name in (("numpy_gflops", "OpenBLAS sgemm via numpy"),
                      ("torch_gflops", "torch.mm (same BLAS)")):
        cells = []
        for t in (1, 2):
            v = med(lambda r: max([p["sgemm"][key] for (vv, tt), p in r.peers.items() if tt == t],
                                  default=None))
            pk = pk1 if t == 1 else pk2
            cells.append("–" if v is None else f"{v:.1f} ({fmt_pct(ratio(v, pk))})")
        out(f"| {name}, GFLOP/s (best CORETYPE variant) | {cells[0]} | {cells[1]} |")
    out("")

    # Checkpointing.
    out("## Checkpointing on (d)")
    out("")
    out("| | time per step | vs no checkpointing | cached activations | vs NONE "
        "| layers recomputed |")
    out("|---|---:|---:|---:|---:|---:|")
    d_best = med(eng_best_t("d"))
    out(f"| engine NONE | {fmt_time(d_best)} | 1.00× | {fmt_bytes(none_peak)} (peak) | 100% | 0 |")
    out(f"| engine SQRT ({eng_counter('d_sqrt', 'segments'):.0f} segments) | "
        f"{fmt_time(med(eng_best_t('d_sqrt')))} | {fmt_x(sqrt_time_ratio)} | "
        f"{fmt_bytes(sqrt_peak)} (peak) | {fmt_pct(sqrt_mem_ratio)} | "
        f"{eng_counter('d_sqrt', 'recomputed'):.0f} |")
    out(f"| engine MEMORY_BUDGET = {fmt_bytes(eng_counter('d_budget', 'budget_bytes'))} "
        f"({eng_counter('d_budget', 'segments'):.0f} segments) | "
        f"{fmt_time(med(eng_best_t('d_budget')))} | {fmt_x(budget_time_ratio)} | "
        f"{fmt_bytes(budget_peak)} (peak) | {fmt_pct(ratio(budget_peak, none_peak))} | "
        f"{eng_counter('d_budget', 'recomputed'):.0f} |")
    torch_d = med(torch_best_t("d"))
    out(f"| PyTorch, no checkpointing | {fmt_time(torch_d)} | 1.00× | "
        f"{fmt_bytes(torch_none_held[0] if torch_none_held else None)} (after forward) "
        "| 100% | 0 |")
    ck = med(lambda r: min([p["cases"]["d"]["ckpt_s"] for p in r.peers.values()
                            if "d" in p["cases"]], default=None))
    out(f"| PyTorch checkpoint_sequential, 8 segments, use_reentrant=False | {fmt_time(ck)} | "
        f"{fmt_x(torch_ckpt_ratio)} | {fmt_bytes(torch_held[0] if torch_held else None)} "
        f"(after forward) | {fmt_pct(torch_mem_ratio)} | 112 (all but the last segment) |")
    out("")
    out("Engine bytes are `RunResult::peak_activation_bytes`, the measured peak over the whole "
        "call (recomputation included); the caller's input is not counted. PyTorch's are the "
        "distinct storages autograd holds once the forward pass is done (saved tensors plus the "
        "segment inputs checkpoint keeps; parameters, input and target excluded); its peak "
        "during backward is higher by one recomputed segment. Debian's torch 1.13 "
        "`checkpoint_sequential` has no `use_reentrant` argument, so the peer runs its loop with "
        "`checkpoint(..., use_reentrant=False)`. PyTorch time ratio: within one process and "
        "round, best configuration.")
    out("")

    # Service.
    out("## Service: end-to-end through gRPC vs a bare echo of the same bytes "
        "(p50, 1 call in flight)")
    out("")
    out("| case | request / response bytes | echo p50 | ComputeGradients p50 | server compute p50 "
        "| engine bench (same threads) | target | ratio |")
    out("|---|---:|---:|---:|---:|---:|---|---:|")
    for c in ("a", "b"):
        s0 = rounds[0].service.get(c)
        if not s0:
            continue
        eng_t = med(lambda r: r.eng_time(c, r.service[c]["server_threads"])
                    if c in r.service else None)
        target = ("≤ 2 × echo" if c == "a" else "≤ engine + 1.5 × echo")
        out(f"| {CASE_LABEL[c]} | {s0['request_bytes']:,} / {s0['response_bytes']:,} | "
            f"{fmt_time(svc(c, 'echo_p50_us') * 1e-6)} | {fmt_time(svc(c, 'e2e_p50_us') * 1e-6)} | "
            f"{fmt_time(svc(c, 'server_compute_p50_us') * 1e-6)} ({s0['server_threads']} thr) | "
            f"{fmt_time(eng_t)} | {target} | "
            f"{fmt_x(a_service_ratio if c == 'a' else b_service_ratio)} |")
    out("")
    out(f"Server: `{a.server}` with default flags on a free loopback port; client: "
        "`gradserve_service_bench` (C++, the `gradserve::client` library, one channel); echo: "
        "`gradserve_echo_server` (gRPC callback API, `bench/echo/echo.proto`, one bytes field each "
        "way, sized to the ComputeGradients request and response). Echo and ComputeGradients "
        "calls alternate in blocks of 20 on the same client.")
    out("")

    # Profile.
    out("## Profile: where a step's time goes (parts timed alone, median of the rounds' passes)")
    out("")
    out("Each part is the engine's own kernel (`LayerForward`, `LinearBackward`, "
        "`ElementwiseBackward`, `LossGradient`) run over every layer of the case on buffers of "
        "the same shapes, timed alone; \"diagnostics\" is a copy of the executor's norm loop "
        "over every activation, gradient and dW. \"rest\" = whole step − sum of "
        "parts: the executor's own work, plus the difference between running the parts alone "
        "(warm caches) and in sequence; negative when the parts alone ran slower. GEMM-only = "
        "the three products per Linear (engine::Gemm), without bias or db (not part of the sum). \"parts' "
        "CPU / wall\": the lowest, among a row's parts, of the calling thread's CPU time over "
        "wall time (median over rounds); a row marked ⚠ (below 90%) mostly ran while other "
        "work shared its cores — distrust its figures.")
    out("")
    out("| case, threads | whole step | fwd / bwd (RunResult) | " +
        " | ".join(PART_LABEL[p] for p in PARTS) + " | rest | GEMM-only | GEMM-only GFLOP/s "
        "| allocs / step | page faults / step | parts' CPU / wall |")
    out("|---|" + "---:|" * (len(PARTS) + 8))
    breakdown = {}
    for c in CASES:
        for t in (1, 2):
            step = med(lambda r: r.eng_time(c, t))
            if step is None:
                continue
            fwd = med(lambda r: (r.eng(c, t) or {}).get("forward_us"))
            bwd = med(lambda r: (r.eng(c, t) or {}).get("backward_us"))
            parts = {p: (profile.get(f"profile/{c}/{p}/threads:{t}") or {}).get("seconds")
                     for p in PARTS}
            total = sum(v for v in parts.values() if v)
            gemm = (profile.get(f"profile/{c}/gemm/threads:{t}") or {}).get("seconds")
            eb = rounds[0].eng(c, t)
            breakdown[(c, t)] = (step, parts)
            cells = [f"({c}) {t} thr", fmt_time(step),
                     f"{fmt_time(fwd * 1e-6) if fwd else '–'} / "
                     f"{fmt_time(bwd * 1e-6) if bwd else '–'}"]
            cells += [f"{fmt_time(parts[p])} ({fmt_pct(ratio(parts[p], step))})" if parts[p]
                      else "–" for p in PARTS]
            cells.append(f"{fmt_time(step - total)} ({fmt_pct(ratio(step - total, step))})")
            cells.append(f"{fmt_time(gemm)} ({fmt_pct(ratio(gemm, step))})" if gemm else "–")
            cells.append(f"{gflops(c, gemm):.1f}" if gemm else "–")
            cells.append(f"{eb['allocs']:.0f}" if eb else "–")
            cells.append(f"{eb['minflt']:.0f}" if eb else "–")
            shares = [b["cpu_share"] for name, b in profile.items()
                      if name.startswith(f"profile/{c}/") and name.endswith(f"/threads:{t}")]
            low = min(shares) if shares else None
            cells.append("–" if low is None else
                         f"{fmt_pct(low)}{' ⚠' if low < 0.9 else ''}")
            out("| " + " | ".join(cells) + " |")
    out("")
    out("The three GEMMs of every Linear layer, timed alone, against the engine's 1024³ GEMM and "
        "the FMA peak at the same thread count:")
    out("")
    out("| case, threads | 3 GEMMs | GEMM GFLOP/s | of engine 1024³ | of FMA peak |")
    out("|---|---:|---:|---:|---:|")
    for c in CASES:
        for t in (1, 2):
            gemm = (profile.get(f"profile/{c}/gemm/threads:{t}") or {}).get("seconds")
            if not gemm:
                continue
            g = gflops(c, gemm)
            eg = med(lambda r: r.engine_gemm(t))
            pk = med(lambda r: r.peak(t))
            out(f"| ({c}) {t} thr | {fmt_time(gemm)} | {g:.1f} | {fmt_pct(ratio(g, eg))} | "
                f"{fmt_pct(ratio(g, pk))} |")

    perf = {c: perf_categories(os.path.join(a.work, f"perf-{c}.txt")) for c in PEER_CASES}
    if any(perf.values()):
        out("")
        out("Sampling profile of the whole step at 1 thread (`perf record -e cpu-clock`, self "
            "time by symbol, grouped; benchmark set-up samples left out):")
        out("")
        cats = [k for k, _ in PERF_CATEGORIES] + ["other"]
        used = [k for k in cats
                if any(perf[c] and perf[c].get(k, 0) >= 0.5 for c in PEER_CASES)]
        out("| case | " + " | ".join(used) + " | samples |")
        out("|---|" + "---:|" * (len(used) + 1))
        for c in PEER_CASES:
            if not perf[c]:
                continue
            out(f"| ({c}) 1 thr | " + " | ".join(f"{perf[c].get(k, 0):.1f}%" for k in used) +
                f" | {perf[c]['_samples']:,} |")

    fj = {t: (profile.get(f"profile/omp_fork_join/threads:{t}") or {}).get("seconds")
          for t in (1, 2)}
    if fj[2]:
        out("")
        out(f"Waking the OpenMP team (an empty `#pragma omp parallel`): {fmt_time(fj[2])} with 2 "
            f"threads ({fmt_time(fj[1])} with 1).")
    out("")

    # Rounds.
    out("## Rounds (drift check)")
    out("")
    out("| round | other CPU | used | load avg | seconds | CPU / wall, engine 1 thr "
        "| engine b / c / d / e (best) | PyTorch b / c / d / e (best) | FMA peak 2 thr GFLOP/s "
        "| echo (a) p50 |")
    out("|---:|---:|---|---:|---:|---:|---|---|---:|---:|")
    for i, r in enumerate(all_rounds, 1):
        eng_cells = " / ".join(fmt_time(r.eng_best(c)[0]) for c in ("b", "c", "d", "e"))
        torch_cells = " / ".join(fmt_time((r.peer_best("torch", c) or (None,))[0])
                                 for c in ("b", "c", "d", "e"))
        echo = r.service.get("a", {}).get("echo_p50_us")
        other = "?" if r.other_cpu is None else f"{r.other_cpu}%"
        out(f"| {i} | {other} | {'yes' if r in rounds else 'no'} | {r.load:.2f} | {r.seconds} "
            f"| {fmt_pct(r.cpu_share())} | {eng_cells} "
            f"| {torch_cells} | "
            f"{r.peak(2):.1f} | {fmt_time(echo * 1e-6) if echo else '–'} |")
    out("")
    out("other CPU: what processes other than the benchmark's took during the round, in % of "
        f"one core (/proc/stat); rounds above {MAX_OTHER_CPU}% are left out of the medians "
        "when at least one round is below. CPU / wall: CPU time over wall time of the "
        "single-threaded engine runs; below ~95% they shared their core. A 2-thread FMA peak "
        "well under twice the 1-thread one also means a busy core.")
    out("")
    out("Chart: `bench/results/bench.png`; raw figures of every round: `bench/results/bench.json`.")

    os.makedirs(a.out_dir, exist_ok=True)
    md_path = os.path.join(a.out_dir, "bench.md")
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")

    raw = {
        "meta": vars(a),
        "rounds": [{"engine": r.engine, "peers": {f"{v}-{t}": p for (v, t), p in r.peers.items()},
                    "service": r.service, "load": r.load, "seconds": r.seconds,
                    "other_cpu": r.other_cpu, "used_in_medians": r in rounds}
                   for r in all_rounds],
        "profile": profile,
        "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in targets],
    }
    with open(os.path.join(a.out_dir, "bench.json"), "w") as f:
        json.dump(raw, f, indent=1, default=str)

    chart(a, rounds, pk1, pk2, en2 if en2 is not None else eg2, gflops, med, eng_best_t, torch_best_t, numpy_best_t, svc,
          breakdown)
    print("\n".join(lines))
    print(f"written to {md_path}, bench.png and bench.json", file=sys.stderr)


def chart(a, rounds, pk1, pk2, eg2, gflops, med, eng_best_t, torch_best_t, numpy_best_t, svc,
          breakdown):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    colors = {"engine": "#1f77b4", "PyTorch": "#ff7f0e", "numpy": "#2ca02c"}

    # Throughput of b, c, d.
    ax = axes[0][0]
    cases = ["b", "c", "d", "e"]
    width = 0.26
    for i, (who, fn) in enumerate((("engine", eng_best_t), ("PyTorch", torch_best_t),
                                   ("numpy", numpy_best_t))):
        vals = [gflops(c, med(fn(c))) or 0 for c in cases]
        xs = [j + (i - 1) * width for j in range(len(cases))]
        ax.bar(xs, vals, width, label=who, color=colors[who])
        for x, v in zip(xs, vals):
            ax.text(x, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(pk2, color="k", linestyle="--", linewidth=1, label=f"FMA peak 2 thr ({pk2:.0f})")
    ax.axhline(pk1, color="gray", linestyle=":", linewidth=1, label=f"FMA peak 1 thr ({pk1:.0f})")
    ax.axhline(eg2, color="#9467bd", linestyle="-.", linewidth=1,
               label=f"engine GEMM 1024³ 2 thr ({eg2:.0f})")
    ax.set_xticks(range(len(cases)),
                  ["(b) 784-1024-1024-10", "(c) 8 × 1024²", "(d) 64 × 256² tanh",
                   "(e) GPT-2, 4 blocks"])
    ax.set_ylabel("GFLOP/s (6·B·in·out per Linear; (e): the plan's FLOPs)")
    ax.set_title("Training step throughput, best thread count (median of rounds)")
    ax.legend(fontsize=8, loc="upper right")

    # Case a.
    ax = axes[0][1]
    labels, vals, cols = [], [], []
    for t in (1, 2):
        v = med(lambda r: r.eng_time("a", t))
        labels.append(f"engine {t} thr")
        vals.append(v * 1e6 if v else 0)
        cols.append(colors["engine"])
    for who, fn in (("PyTorch", torch_best_t), ("numpy", numpy_best_t)):
        v = med(fn("a"))
        labels.append(f"{who} best")
        vals.append(v * 1e6 if v else 0)
        cols.append(colors[who])
    ax.bar(labels, vals, color=cols)
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color="red", linestyle="--", linewidth=1, label="target 1 µs")
    ax.set_yscale("log")
    ax.set_ylabel("µs per step (log)")
    ax.set_title("(a) batch 8, Linear 4→2, MSE")
    ax.legend(fontsize=8)

    # Service.
    ax = axes[1][0]
    labels, vals, cols = [], [], []
    for c in ("a", "b"):
        echo, e2e = svc(c, "echo_p50_us"), svc(c, "e2e_p50_us")
        if echo is None:
            continue
        if c == "a":
            budget = 2 * echo
        else:
            threads = rounds[0].service["b"]["server_threads"]
            budget = med(lambda r: r.eng_time("b", threads)) * 1e6 + 1.5 * echo
        labels += [f"({c})\necho", f"({c})\ntarget", f"({c})\ngradserve"]
        vals += [echo / 1e3, budget / 1e3, e2e / 1e3]
        cols += ["#7f7f7f", "#d62728", colors["engine"]]
    ax.bar(labels, vals, color=cols)
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("p50 latency, ms (log)")
    ax.set_title("Service: ComputeGradients vs bare gRPC echo of the same bytes")

    # Profile.
    ax = axes[1][1]
    keys = []
    for c in ("a", "b", "c", "d"):  # Each case at its faster thread count.
        options = [(breakdown[(c, t)][0], t) for t in (1, 2) if (c, t) in breakdown]
        if options:
            keys.append((c, min(options)[1]))
    bottoms = [0.0] * len(keys)
    cmap = plt.get_cmap("tab10")
    for i, p in enumerate(PARTS + ["rest"]):
        vals = []
        for c, t in keys:
            step, parts = breakdown[(c, t)]
            if p == "rest":
                v = max(0.0, step - sum(x for x in parts.values() if x))
            else:
                v = parts.get(p) or 0.0
            vals.append(100 * v / step)
        ax.bar([f"({c}) {t} thr" for c, t in keys], vals, bottom=bottoms, color=cmap(i),
               label=PART_LABEL.get(p, "rest (executor overhead)"))
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    ax.set_ylabel("% of a whole step (parts timed alone)")
    ax.set_title("Where a step's time goes (faster thread count)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))

    fig.suptitle(f"gradserve bench — {a.cpu}, {a.cores} cores, commit {a.commit}"
                 f"{' (quick)' if a.quick == '1' else ''}", fontsize=11)
    fig.tight_layout()
    fig.savefig(os.path.join(a.out_dir, "bench.png"), dpi=110)


if __name__ == "__main__":
    main()
