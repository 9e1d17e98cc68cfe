"""Rich tables a person reads at the end of a run: the protocol's runs, and the language side."""

from __future__ import annotations

from handclip.eval.protocol import METRICS, PROTOCOLS


def print_tables(console, results: dict[str, dict], galleries: dict[str, str], stated: dict | None = None) -> None:
    """The protocol's tables, the headline evaluation first (`stated`: handclip.eval.protocol.statement), then the
    language side when the last result has it; validation's table when no test evaluation ran."""
    final = list(results.values())[-1]["metrics"]
    head = (stated or {}).get("headline", "test")
    order = dict.fromkeys((head, "test", "test_all", f"{head}_reranked", "test_reranked", "test_all_reranked"))
    shown = [prefix for prefix in order if f"{prefix}/rank1" in final] or ["val"]
    for prefix in shown:
        console.print(protocol_table(results, prefix, galleries, stated if prefix == head else None))
    if any(k.startswith("verify/") for k in final):
        console.print(verification_table(results))
    if any(k.startswith(("zeroshot/", "retrieval/")) for k in final):
        console.print(text_table(results))


def verification_table(results: dict[str, dict]):
    """Verification figures (handclip.eval.verification), one cell per result: `first → second → ...`."""
    from rich.table import Table

    labels = list(results)
    table = Table(title=f"verification: the headline test runs' pairs ({' → '.join(labels)})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    names = [k for k in results[labels[-1]]["metrics"] if k.startswith("verify/")]
    for name in names:
        percent = not name.startswith("verify/calibration") and "brier" not in name
        cells = [r["metrics"][name] for r in results.values() if name in r["metrics"]]
        table.add_row(name + (" (%)" if percent else ""),
                      " → ".join(f"{100 * v:.2f}" if percent else f"{v:.4f}" for v in cells))  # fmt: skip
    return table


def protocol_table(results: dict[str, dict], prefix: str = "test", galleries: dict[str, str] | None = None,
                   stated: dict | None = None):  # fmt: skip
    """A rich table of each run and the mean ± std; with several results (e.g. baseline and
    fine-tuned) every cell reads `first → second → ...`. `galleries`: what each evaluation's gallery is, in the
    data's words (DataSource.galleries); `stated`: the protocol, named in the title of its headline table."""
    from rich.table import Table

    title = dict(galleries or {})
    base = prefix.removesuffix("_reranked")
    if base != prefix:
        title[prefix] = f"{title.get(base, base)}, k-reciprocal re-ranked"
    present = {label: r for label, r in results.items() if prefix in r["runs"]}
    labels = " → ".join(present)
    named = f"headline of {PROTOCOLS.get(stated['name'], stated['name'])}, " if stated else ""
    table = Table(title=f"{prefix}: {title.get(prefix, prefix)}, {named}% ({labels})")
    table.add_column("run", justify="right")
    for name in METRICS:
        table.add_column(name.replace("rank", "Rank-"), justify="right")
    if not present:
        return table
    first = next(iter(present.values()))["runs"][prefix]
    for i, run in enumerate(first):
        cells = [" → ".join(f"{100 * r['runs'][prefix][i][n]:.1f}" for r in present.values()) for n in METRICS]
        table.add_row("-" if run["run"] is None else str(run["run"]), *cells)
    means = [
        " → ".join(
            f"{100 * r['metrics'][f'{prefix}/{n}']:.1f}±{100 * r['metrics'].get(f'{prefix}/{n}_std', 0.0):.1f}"
            for r in present.values()
        )
        for n in METRICS
    ]
    table.add_row("mean±std", *means, style="bold")
    return table


def text_table(results: dict[str, dict]):
    """Zero-shot attribute accuracy and retrieval recall, baseline → fine-tuned."""
    from rich.table import Table

    labels = list(results)
    table = Table(title=f"language side: zero-shot prompts and retrieval, % ({' → '.join(labels)})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("chance / majority", justify="right")
    names = [
        k
        for k in results[labels[-1]]["metrics"]
        if k.startswith(("zeroshot/", "retrieval/")) and not k.endswith(("_majority", "_chance"))
    ]
    for name in names:
        values = " → ".join(f"{100 * r['metrics'][name]:.1f}" for r in results.values() if name in r["metrics"])
        final = results[labels[-1]]["metrics"]
        chance, majority = (final.get(name.replace("_accuracy", suffix)) for suffix in ("_chance", "_majority"))
        reference = " / ".join(f"{100 * v:.1f}" for v in (chance, majority) if v is not None)
        table.add_row(name, values, reference if name.endswith("_accuracy") else "")
    return table
