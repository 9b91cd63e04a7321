"""The benchmark's Markdown table and plots, from the report dict that bench.json holds."""

from __future__ import annotations

import os

PEER_NAMES = {"hf_greedy": "transformers greedy", "hf_lookup": "transformers prompt lookup",
              "vllm": "vLLM greedy", "vllm_ngram": "vLLM prompt lookup (ngram)",
              "vllm_mtp": "vLLM + our draft layer (MTP)"}


def _fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def markdown(report: dict) -> str:
    meta, modes = report["meta"], report["modes"]
    ar = modes["ar"]
    he = "pass_at_1" in ar
    cols = ["mode", "tokens/s", "speedup", "speedup e2e", "tokens/pass", "head acceptance", "exact match",
            "rep-2/3/4"] + (["pass@1"] if he else []) + ["drafts fed per pass (0/1/..)", "cost/token", "compile s",
                                                       "memory GB"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for label, m in modes.items():
        name = PEER_NAMES.get(label, label)
        acc = " ".join(f"{a:.2f}" for a in m.get("head_acceptance", [])) if label != "ar" else ""
        row = [name, _fmt(m["tokens_per_s"]), _fmt(m["speedup"]) + ("" if "compile_seconds" in m else " (e2e)"),
               _fmt(m["speedup_e2e"]), _fmt(m["tokens_per_pass"]), acc or "-", _fmt(m["exact_match"]),
               "/".join(f"{m[f'rep{n}']:.2f}" for n in (2, 3, 4))]
        if he:
            row.append(_fmt(m.get("pass_at_1")))
        pol = m.get("policy")
        row += [_fed(pol) if label.startswith("verify") else "-", _fmt(pol and pol["cost_per_token"], ".3f"),
                _fmt(m.get("compile_seconds"), ".1f"),
                _fmt(m["memory_bytes"] / 1e9 if "memory_bytes" in m else None)]
        lines.append("| " + " | ".join(row) + " |")
    sets = list(ar["sets"])
    lines += ["", "Per prompt set (speedup / tokens per pass / exact match; drafting modes: first-draft acceptance "
              "in decoding; verify: share of ar-cost passes, drafts fed per pass):", "", "| mode | " + " | ".join(sets) + " |", "|" + "---|" * (len(sets) + 1)]
    for label, m in modes.items():
        cells = []
        for name in sets:
            x = m["sets"][name]
            cell = f"{x['speedup']:.2f}x / {_fmt(x.get('tokens_per_pass'))} / {x['exact_match']:.2f}"
            if x.get("head_acceptance"):
                cell += f"; first draft {x['head_acceptance'][0]:.2f}"
            if label.startswith("verify") and x.get("policy"):
                cell += f"; ar-cost {100 * x['policy']['ar_cost_share']:.0f}%, {x['policy']['drafts_per_pass']:.2f}"
                sib = x["policy"].get("siblings")
                if sib:
                    cell += f", siblings {sib['per_pass']:.2f} ({100 * sib['accepted']:.0f}% right)"
            cells.append(cell)
        lines.append(f"| {PEER_NAMES.get(label, label)} | " + " | ".join(cells) + " |")
    if report.get("drafts"):
        lines += ["", "The drafter at every generated position of `ar`'s output (teacher forced: draft j given drafts "
                  "1..j-1 right; then the first draft along the anchors of a plain chain `verify` over the same "
                  "text): " + "; ".join(
                      f"{name} {' '.join(f'{a:.2f}' for a in d['every_position'])} ({d['positions']} positions), "
                      f"at chain anchors {d['chain_accepted'][0]:.2f}" for name, d in report["drafts"].items()) + "."]
    rf = meta["roofline"]
    mach = meta["machine"]
    prompts = ", ".join(f"{n} {name}" for name, n in meta["prompts"].items())
    foot = [
        "",
        f"`{meta['command'] or 'clp_jax.bench.run.measure'}` on {meta['date']}: {mach['device']} ({mach['processor']}, {mach['cpu_count']} "
        f"cores), jax {mach['jax']}; backbone {os.path.basename(str(meta['backbone']))} ({meta['dtype']}), "
        f"k={meta['k']}, {prompts} prompts, {meta['max_new_tokens']} new tokens, batch 1, greedy.",
        "Speedup = decode tokens/s over `ar`'s (transformers peers: end to end, marked e2e); exact match = "
        "prompts whose tokens equal `ar`'s; memory = XLA's arguments + temporaries of the decoding loop; "
        "drafts fed per pass = share of passes feeding 0, 1, .. drafts (0 = an ar-cost pass); cost/token = "
        "the loop's cost per generated token in one-slot passes from the pass-cost table (ar: 1.000).",
        f"`ar` roofline: {rf['weight_bytes_per_pass'] / 1e9:.2f} GB of weights per pass / "
        f"{rf['bandwidth_gb_s']:.1f} GB/s measured read bandwidth (median; p10-p90 "
        f"{rf['bandwidth_p10_p90_gb_s'][0]:.1f}-{rf['bandwidth_p10_p90_gb_s'][1]:.1f}) = {rf['roofline_ms_per_pass']:.1f} ms; "
        f"measured {rf['measured_ms_per_pass']:.1f} ms per pass = {100 * rf['fraction_of_roofline']:.0f}% of the roofline "
        f"({100 * rf['fraction_p10_p90'][0]:.0f}-{100 * rf['fraction_p10_p90'][1]:.0f}% across the bandwidth's spread).",
    ]
    if meta.get("pass_costs"):
        pc = meta["pass_costs"]
        at = f", a {pc['cache_len']}-slot cache, the one most prompts needed" if pc.get("cache_len") else ""
        foot.append(f"Pass costs (this machine, batch 1{at}): " + pc["text"].replace("\n", "; ") + "."
                    + (f" `ar` ran at {pc['ar_ms']:.1f} ms per pass there in this run." if pc.get("ar_ms") else "")
                    + (f" {pc['stale'][0].upper()}{pc['stale'][1:]}." if pc.get("stale") else ""))
    clocks = [(label, m["clock"]) for label, m in modes.items() if m.get("clock")]
    if clocks:
        foot.append("Ms per loop pass, clock / modelled by the pass-cost table in units of the `ar` pass of the same "
                    "prompt, timed beside it (the table's per-pass overhead, measured from earlier runs' clocks, "
                    "included): " + "; ".join(
                        f"{label} {c['clock_ms_per_pass']:.1f} / {c['modelled_ms_per_pass']:.1f} "
                        f"({100 * c['error']:+.1f}%, overhead {c['overhead_ms_per_pass']:.1f})" for label, c in clocks)
                    + ".")
    return "\n".join(lines + foot) + "\n"


def _fed(pol: dict | None) -> str:
    if not pol:
        return "-"
    return "/".join(f"{100 * x:.0f}" for x in pol["fed_share"]) + "%"


def plots(report: dict, out_dir: str) -> list[str]:
    """speedup_vs_quality.png and acceptance.png; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = report["modes"]
    he = "pass_at_1" in modes["ar"]
    fig, axes = plt.subplots(1, 2 if he else 1, figsize=(11 if he else 5.5, 4.2), squeeze=False)
    panels = [("rep3", "rep-3 (lower is less repetitive)")] + ([("pass_at_1", "HumanEval pass@1")] if he else [])
    for ax, (key, xlabel) in zip(axes[0], panels):
        for label, m in modes.items():
            ax.scatter(m[key], m["speedup"], s=40, marker="s" if label in PEER_NAMES else "o")
            ax.annotate(PEER_NAMES.get(label, label), (m[key], m["speedup"]), fontsize=8,
                        xytext=(4, 3), textcoords="offset points")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("speedup over ar")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Speed against quality ({os.path.basename(str(report['meta']['backbone']))})")
    fig.tight_layout()
    paths = [os.path.join(out_dir, "speedup_vs_quality.png")]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for label, m in modes.items():
        acc = m.get("head_acceptance")
        if label != "ar" and acc:
            ax.plot(range(1, len(acc) + 1), acc, marker="o", label=label)
    ax.set_xlabel("head position j (token n+1+j; gate: n+j)")
    ax.set_ylabel("acceptance (committed / offered)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Per-head acceptance")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "acceptance.png"))
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths
