"""The benchmark's results as text: one line (or table) per section."""

from __future__ import annotations


def _generation_lines(rows: list[dict]) -> list[str]:
    nan = float("nan")
    head = ("model", "dtype", "N", "GEMM GF/s", "vLLM", "eff", "HF", "eff", "ratio")
    lines = ["generation (tokens/s; FLOP efficiency = 2 N tokens/s / measured matmul rate)"]
    lines.append("  {:10} {:9} {:>7} {:>9} {:>9} {:>6} {:>9} {:>6} {:>6}".format(*head))
    for r in rows:
        g = r.get
        cells = [
            f"{r['model']:10}",
            f"{r['dtype']:9}",
            f"{r['matmul_parameters'] / 1e6:6.1f}M",
            f"{r['matmul_gflops']:9.1f}",
            f"{g('vllm_tokens_per_s', nan):9.0f}",
            f"{g('vllm_flop_efficiency', nan):6.1%}",
            f"{g('transformers_tokens_per_s', nan):9.0f}",
            f"{g('transformers_flop_efficiency', nan):6.1%}",
            f"{g('vllm_over_transformers', nan):6.2f}x",
        ]
        lines.append("  " + " ".join(cells))
    return lines


def report(results: dict) -> str:
    """The results as text."""
    lines = _generation_lines(results["generation"]) if results.get("generation") else []
    for r in results.get("labelling", []):
        lines.append(
            f"labelling {r['model']}: batched {r['batched_samples_per_s']:.0f}/s vs pipeline one "
            f"at a time {r['pipeline_samples_per_s']:.0f}/s = {r['ratio']:.1f}x "
            f"(rewards agree within {r['max_abs_reward_difference']:.1e}); a reward function "
            f"(the gold judge) {r['function_samples_per_s']:.0f}/s"
        )
    if u := results.get("update"):
        d = u["dpo"]
        lines.append(
            f"update {u['model']}: DPO step cached {d['cached_step_s'] * 1e3:.0f} ms vs recompute "
            f"{d['recompute_step_s'] * 1e3:.0f} ms = {d['ratio']:.2f}x; "
            f"peak RSS {d['cached_peak_rss_mb']:.0f} vs {d['recompute_peak_rss_mb']:.0f} MB"
        )
        for name, v in u["rl"]["variants"].items():
            lines.append(
                f"update {u['rl_model']} {name}: {v['step_s']:.2f} s/step "
                f"({v['step_s_over_first']:.2f}x), peak RSS {v['peak_rss_mb']:.0f} MB "
                f"({v['peak_rss_over_first']:.2f}x), {v['responses']} responses"
            )
    for kind, r in results.get("backends", {}).items():
        if isinstance(r, dict):
            lines.append(
                f"{kind} {results['backends']['model']}: vLLM {r['vllm_s']:.2f} vs transformers "
                f"{r['transformers_s']:.2f} {r['unit']} = {r['transformers_over_vllm']:.2f}x"
            )
    if sy := results.get("sync"):
        m, lo = sy["merged"], sy["lora"]
        lines.append(
            f"sync {sy['model']}: merged weights in place {m['sync_s']:.3f} s/sync, "
            f"{m['tokens_per_s']:.0f} tok/s vs LoRA adapter by id {lo['sync_s']:.3f} s/sync, "
            f"{lo['tokens_per_s']:.0f} tok/s"
        )
    for name, b in results.get("iteration", {}).items():
        stages = "  ".join(f"{k} {v:.1f}" for k, v in b["stage_seconds"].items())
        fixed = ", ".join(f"{k} {v:.2f}" for k, v in b["fixed"].items())
        lines.append(
            f"iteration ({name}): {b['total_s']:.1f}s = {stages}; "
            f"fixed overheads {b['fixed_s']:.1f}s = {b['fixed_share']:.0%} ({fixed})"
        )
    if w := results.get("workers"):
        t, g, u = w["threads"], w["generation"], w["update"]
        lines.append(
            f"workers {w['model']}: generation 1x{t} threads {g[f'1x{t}_tokens_per_s']:.0f} tok/s "
            f"vs {t}x1 {g[f'{t}x1_tokens_per_s']:.0f} tok/s = {g['ratio']:.2f}x; DPO update "
            f"1x{t} {u[f'1x{t}_step_s']:.3f} vs {t}x1 {u[f'{t}x1_step_s']:.3f} s/step = "
            f"{u['step_ratio']:.2f}x (stage with launch: {u['stage_ratio']:.2f}x)"
        )
    if sc := results.get("scale"):
        lines += _scale_lines(sc)
    for r in results.get("dedup", []):
        lines.append(
            f"dedup, {r['known']} known prompts: {r['prefix_per_s']:.0f} candidates/s with the "
            f"prefix filter vs {r['every_shared_gram_per_s']:.0f}/s scanning every prompt that "
            f"shares a gram = {r['speedup']:.1f}x (near-duplicates found: {r['prefix_near']} "
            f"and {r['every_shared_gram_near']})"
        )
    if pa := results.get("padding"):
        lines.append(
            f"padding: a DPO epoch over {pa['pairs']} pairs of mixed lengths ({pa['model']})"
        )
        for name, v in pa["variants"].items():
            lines.append(
                f"  {name}: {v['padding']:.0%} of the tokens fed are padding, "
                f"{v['train_s_per_1k_pairs']:.0f} s per 1,000 pairs "
                f"({v['train_s_over_first']:.2f}x), peak {v['peak_rss_mb']:.0f} MB "
                f"({v['peak_rss_over_first']:.2f}x)"
            )
    if pe := results.get("peers"):
        lines += _peers_lines(pe)
    if ld := results.get("ladder"):
        from iterate.bench import ladder

        lines += ladder.lines(ld)
    return "\n".join(lines)


def _scale_lines(sc: dict) -> list[str]:
    """The scale section as a table: per stage, seconds at each size, seconds per 1,000
    responses at the largest, and the growth exponent between the two largest sizes; then
    the main process's and the engine's peak memory per size."""
    sizes = list(sc["runs"])
    stages = list(sc["runs"][sizes[-1]]["stages"])
    head = ["stage", *(f"N={s} s" for s in sizes), "s/1k resp", "exponent"]
    rows = [head]
    for st in stages:
        per = [sc["runs"][s]["stages"][st] for s in sizes]
        k = (sc.get("exponents") or {}).get(st)
        rows.append(
            [
                st,
                *(f"{p['seconds']:.1f}" for p in per),
                f"{per[-1]['s_per_1k_responses']:.3f}",
                "-" if k is None else f"{k:.2f}",
            ]
        )
    for key, name in (("main_peak_rss_mb", "main MB"), ("engine_peak_rss_mb", "engine MB")):
        rows.append([name, *(str(sc["runs"][s][key]) for s in sizes), "", ""])
    widths = [max(len(r[j]) for r in rows) for j in range(len(head))]
    out = [f"scale: one toy iteration, n={sc['n']} samples per prompt"]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    if "main_peak_ratio" in sc:
        a, b = sc["exponent_between"]
        out.append(
            f"exponents between N={a} and N={b}; main peak memory {sc['main_peak_ratio']:.2f}x"
        )
    return out


def _peers_lines(pe: dict) -> list[str]:
    """Seconds per optimiser step, ours against TRL's; then each profile's FLOP rate and
    its top operators."""
    peer = f"TRL {pe['trl']}" if pe["trl"] else "TRL (not installed)"
    out = [f"peers: seconds per optimiser step, ours against {peer}"]
    for r in pe["rows"]:
        cells = [
            f"{k} {v:.2f} s" + (f" ({r['trl_over'][k]:.2f}x)" if k in r.get("trl_over", {}) else "")
            for k, v in r["step_s"].items()
        ]
        out.append(f"  {r['model']} {r['dtype']} {r['step']}: " + ", ".join(cells))
        for engine, p in r["profile"].items():
            out.append(
                f"    {engine}: {p['step_gflop']:.1f} GFLOP a step, {p['achieved_gflops']:.1f} "
                f"GFLOP/s = {p['share_of_matmul_rate']:.0%} of the {r['dtype']} matmul rate "
                f"({p['matmul_gflops']:.0f} GFLOP/s); top operators by self time:"
            )
            for o in p["operators"]:
                out.append(
                    f"      {o['share']:6.1%} {o['self_s']:8.3f} s {o['calls']:6d}x "
                    f"{o['gflop']:9.1f} GFLOP  {o['name']}"
                )
    return out
