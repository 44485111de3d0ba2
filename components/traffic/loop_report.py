"""The loop benchmark's report: learning curves, the loop's gain, learning speed, and whether
interleaving agrees with the evaluation split (`loop_benchmark.run_loop_benchmark`'s rows).

Writes `loop.json` (every row, decision and comparison), `loop.md` (the tables and the targets,
each met or missed by how much) and `learning_curves.png` (test ndcg@10 against clicks collected).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from components.evaluate.significance import RunDetail, paired_test
from components.evaluate.subsets import ALL, IMAGE_ONLY
from components.figures import new_figure, save_figure
from components.registry.config import PromoteConfig
from components.traffic.config import LoopBenchmarkConfig

JSON_FILE, MARKDOWN_FILE, PLOT_FILE = "loop.json", "loop.md", "learning_curves.png"
AGREEMENT_TARGET = 0.9
# "final": two systems' final champions; "challenger": a round's challenger against its champion.
AGREEMENT_KINDS = ("final", "challenger")
METRICS = ("ndcg@10", f"{IMAGE_ONLY}/ndcg@10")


@dataclasses.dataclass
class LoopBenchmarkResult:
    """What `loop_benchmark.run_loop_benchmark` measured: rows per (system, seed, round), the
    promotion decisions, every interleaved comparison, and where the report files went."""

    rows: list[dict]
    decisions: list[dict]
    comparisons: list[dict]
    details: dict[tuple[str, int, int], RunDetail]  # (system, seed, round) -> the champion's
    seconds: float
    timings: dict[str, float]
    paths: dict[str, Path] = dataclasses.field(default_factory=dict)


def learning_curves(rows: pd.DataFrame) -> pd.DataFrame:
    """Per system and round, means over seeds: clicks collected, the champion's test numbers,
    promotions, seconds."""
    grouped = rows.groupby(["system", "round"], sort=False)
    out = grouped.agg(seeds=("seed", "nunique"), clicks=("clicks", "mean"), searches=("searches", "mean"),
                      ndcg=("ndcg@10", "mean"), ndcg_sd=("ndcg@10", "std"),
                      image_only=("image_only/ndcg@10", "mean"), decide=("decide_ndcg@10", "mean"),
                      people=("people_ndcg@10", "mean"),
                      seconds=("seconds", "mean"),
                      promoted=("outcome", lambda o: int((o == "promoted").sum())))
    return out.reset_index()


def loop_gain(result: LoopBenchmarkResult, system: str, last: int, samples: int) -> dict[str, dict]:
    """The champion after round `last` against round 0, paired over test queries, seeds pooled."""
    seeds = sorted({seed for s, seed, _ in result.details if s == system})
    out = {}
    for subset in (ALL, IMAGE_ONLY):
        out[subset] = paired_test([result.details[(system, seed, last)] for seed in seeds],
                                  [result.details[(system, seed, 0)] for seed in seeds], subset, "ndcg@10",
                                  samples=samples)
    return out


def clicks_to_reach(curves: pd.DataFrame, system: str, target: float) -> float | None:
    """Mean clicks `system` had collected when its mean test ndcg@10 first reached `target`."""
    mine = curves[curves["system"] == system].sort_values("round")
    reached = mine[mine["ndcg"] >= target]
    return None if reached.empty else float(reached.iloc[0]["clicks"])


def agreement(comparisons: pd.DataFrame, min_delta: float, delta: str = "test_delta") -> dict:
    """Of the interleaved comparisons whose models differ by >= `min_delta` in `delta` (test
    ndcg@10, or `people_delta`: ndcg@10 on the training queries the simulated people search): how
    often the online verdict is significant and picks the better one, how often the win share
    leans the right way, and the impressions the sign test needed (counted for test's better)."""
    apart = comparisons[comparisons[delta].abs() >= min_delta]
    better = np.sign(apart[delta])
    significant_right = int((apart["online_sign"] == better).sum())
    significant_wrong = int(((apart["online_sign"] != 0) & (apart["online_sign"] != better)).sum())
    share_right = int((np.sign(apart["win_share"].fillna(0.5) - 0.5) == better).sum())
    needed = apart["impressions_needed"].dropna()
    return {"comparisons": int(len(comparisons)), "apart": int(len(apart)), "significant_right": significant_right,
            "reached": int(len(needed)),
            "significant_wrong": significant_wrong, "share_right": share_right,
            "agreement": significant_right / len(apart) if len(apart) else math.nan,
            "direction_agreement": share_right / len(apart) if len(apart) else math.nan,
            "impressions_needed_median": float(needed.median()) if len(needed) else math.nan,
            "impressions_needed_max": float(needed.max()) if len(needed) else math.nan,
            "impressions_per_comparison": float(apart["impressions"].mean()) if len(apart) else math.nan}


def _f(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


# Columns shown with fewer decimals than the metrics' 4 (means over seeds of counts and times).
DIGITS = {"clicks": 0, "searches": 0, "seconds/seed": 1, "impressions_needed": 0, "round": 0}


def _markdown_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * len(frame.columns) + "\n"
    return header + "".join(
        "| " + " | ".join(_f(v, DIGITS.get(c, 4)) for c, v in zip(frame.columns, row, strict=True)) + " |\n"
        for row in frame.itertuples(index=False))


def summarise(result: LoopBenchmarkResult, cfg: LoopBenchmarkConfig, promote: PromoteConfig) -> dict:
    rows = pd.DataFrame(result.rows)
    curves = learning_curves(rows)
    last = int(rows["round"].max())
    gains = {system: loop_gain(result, system, last, cfg.bootstrap_samples) for system in rows["system"].unique()}
    finals = curves[curves["round"] == last].set_index("system")["ndcg"]
    speed = {}
    if "ours" in finals and "late_fusion" in finals:
        speed = {"late_fusion_final": float(finals["late_fusion"]), "ours_final": float(finals["ours"]),
                 "ours_clicks_to_late_fusion_final": clicks_to_reach(curves, "ours", float(finals["late_fusion"])),
                 "late_fusion_clicks_to_ours_final": clicks_to_reach(curves, "late_fusion", float(finals["ours"]))}
    comparisons = pd.DataFrame(result.comparisons)
    decisions = pd.DataFrame(result.decisions)
    bad_promotions = int((decisions["promoted"] & decisions["challenger_significantly_worse"]).sum()) \
        if len(decisions) else 0
    return {"curves": curves, "gains": gains, "speed": speed,
            "agreement": {kind: agreement(part, cfg.agreement_min_delta)
                          for kind, part in [("all", comparisons),
                                             *((k, comparisons[comparisons["kind"] == k]) for k in AGREEMENT_KINDS)]
                          if len(part)},
            "agreement_people": {kind: agreement(part, cfg.agreement_min_delta, "people_delta")
                                 for kind, part in [("all", comparisons),
                                                    *((k, comparisons[comparisons["kind"] == k])
                                                      for k in AGREEMENT_KINDS)]
                                 if len(part)},
            "bad_promotions": bad_promotions, "promotions": int(decisions["promoted"].sum()) if len(decisions) else 0,
            "decisions": len(decisions), "last_round": last}


def _markdown(result: LoopBenchmarkResult, summary: dict, cfg: LoopBenchmarkConfig, promote: PromoteConfig) -> str:
    curves = summary["curves"]
    lines = [f"# Loop benchmark ({len(cfg.seeds)} seed(s): {', '.join(map(str, cfg.seeds))}; {cfg.rounds} round(s) of "
             f"{cfg.searches} searches + {cfg.online_searches} interleaved; round 0 on {cfg.start_fraction:.0%} of the "
             f"training queries' qrels; promote.online = {promote.online})", "",
             f"Took {result.seconds / 60:.1f} min. Test numbers are on the `{cfg.eval_split}` split, which the "
             f"simulated people never search; promotion reads `{cfg.decide_split}`. `clicks`: the clicks logged before "
             "the round's retraining (what it learnt from, mean over seeds; round 0 learns from the start share's "
             "qrels alone). `train-query ndcg@10`: on the training queries the simulated people search, judged by "
             "the full qrels they click by.", "",
             "## Learning curves (the champion after each round, mean over seeds)", ""]
    table = curves[["system", "round", "clicks", "ndcg", "ndcg_sd", "image_only", "decide", "people", "promoted",
                    "seconds"]].rename(
        columns={"ndcg": "test ndcg@10", "ndcg_sd": "sd", "image_only": "image-only ndcg@10",
                 "decide": f"{cfg.decide_split} ndcg@10", "people": "train-query ndcg@10",
                 "promoted": "promoted (of seeds)", "seconds": "seconds/seed"})
    lines += [_markdown_table(table), "", "## Targets", ""]
    ours = summary["gains"].get("ours")
    if ours:
        g = ours[ALL]
        met = g["p"] < 0.05 and g["delta"] > 0
        lines.append(f"- **The loop helps** (ours, round {summary['last_round']} vs round 0, test ndcg@10, paired "
                     f"bootstrap over {g['num_queries']} test queries, seeds pooled): delta {g['delta']:+.4f} "
                     f"[{g['low']:+.4f}, {g['high']:+.4f}], p = {g['p']:.4f}: **{'met' if met else 'missed'}**; "
                     f"image-only {ours[IMAGE_ONLY]['delta']:+.4f} (p = {ours[IMAGE_ONLY]['p']:.4f}).")
    for system, gain in summary["gains"].items():
        if system != "ours":
            lines.append(f"  - {system}: {gain[ALL]['delta']:+.4f} (p = {gain[ALL]['p']:.4f}), image-only "
                         f"{gain[IMAGE_ONLY]['delta']:+.4f} (p = {gain[IMAGE_ONLY]['p']:.4f})")
    speed = summary["speed"]
    if speed:
        def reach(who, target, clicks):
            if clicks is None:
                return f"{who} does not reach {target} within these rounds"
            return f"{who} reaches {target} after {clicks:.0f} clicks"

        lines.append("- **Learning speed**: "
                     + reach("ours", f"late_fusion's final test ndcg@10 ({speed['late_fusion_final']:.4f})",
                             speed["ours_clicks_to_late_fusion_final"]) + "; "
                     + reach("late_fusion", f"ours' final ({speed['ours_final']:.4f})",
                             speed["late_fusion_clicks_to_ours_final"]) + ".")
    for kind, agree in summary["agreement"].items():
        met = agree["apart"] > 0 and agree["agreement"] >= AGREEMENT_TARGET
        what = {"all": "all comparisons", "final": "the systems' final champions, pairwise",
                "challenger": "each round's challenger against its champion"}[kind]
        lines.append(f"- **Interleaving agrees with the test split**, {what} ({cfg.agreement_min_delta} or more apart on "
                     f"test ndcg@10: {agree['apart']} of {agree['comparisons']}): significant and right in "
                     f"{agree['significant_right']} ({_f(agree['agreement'], 3)}), significant and wrong in "
                     f"{agree['significant_wrong']}, win share leaning the right way in {agree['share_right']} "
                     f"({_f(agree['direction_agreement'], 3)}); the sign test settled for the better model in "
                     f"{agree['reached']} of them, after a median of {_f(agree['impressions_needed_median'], 0)} "
                     f"impressions (max {_f(agree['impressions_needed_max'], 0)}; "
                     f"{_f(agree['impressions_per_comparison'], 0)} per comparison, never fewer than "
                     f"promote.min_online_impressions = {promote.min_online_impressions}): "
                     f"**{'met' if met else 'missed'}** (target {AGREEMENT_TARGET:.0%}).")
    for kind, agree in summary["agreement_people"].items():
        lines.append(f"  - the same verdicts against what the simulated people search (ndcg@10 on the training "
                     f"queries by the full qrels), {kind}: {agree['apart']} of {agree['comparisons']} apart, "
                     f"significant and right in {agree['significant_right']} ({_f(agree['agreement'], 3)}), "
                     f"significant and wrong in {agree['significant_wrong']}.")
    lines.append(f"- **Never promotes a significantly worse challenger** (paired bootstrap p < 0.05 on test): "
                 f"{summary['bad_promotions']} of {summary['promotions']} promotions ({summary['decisions']} decisions): "
                 f"**{'met' if summary['bad_promotions'] == 0 else 'missed'}**.")
    comparisons = pd.DataFrame(result.comparisons)
    if len(comparisons):
        lines += ["", "## Interleaved comparisons", "",
                  "`kind` challenger: a round's challenger against its champion; final: two systems' final champions. "
                  "test delta = challenger - champion on test ndcg@10; verdict: the sign test at "
                  f"promote.online_alpha = {promote.online_alpha}.", ""]
        table = comparisons[["kind", "system", "seed", "round", "challenger", "champion", "test_delta", "people_delta",
                             "impressions",
                             "challenger_wins", "champion_wins", "p_value", "verdict", "impressions_needed"]]
        lines.append(_markdown_table(table))
    lines += ["", "## Promotion decisions", ""]
    for d in result.decisions:
        lines.append(f"- {d['system']} seed {d['seed']} round {d['round']}: {d['challenger']} vs {d['champion']} "
                     f"({d['challenger_ndcg@10']:.4f} vs {d['champion_ndcg@10']:.4f}): "
                     f"**{'promoted' if d['promoted'] else 'kept'}**: {d['reason']}")
    lines += ["", "## Time", "", *(f"- {k}: {v:.0f} s" for k, v in result.timings.items()), ""]
    return "\n".join(lines)


def plot_curves(curves: pd.DataFrame, out_path: Path) -> Path:
    fig = new_figure(11, 4.2)
    for ax, (column, title) in zip(fig.subplots(1, 2), (("ndcg", "test ndcg@10 (all queries)"),
                                                        ("image_only", "test ndcg@10 (image-only queries)")),
                                   strict=True):
        for system, part in curves.groupby("system", sort=False):
            part = part.sort_values("round")
            ax.plot(part["clicks"], part[column], marker="o", label=system)
        ax.set_xlabel("clicks the round's retraining learnt from (mean over seeds)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return save_figure(fig, out_path)


def write_reports(result: LoopBenchmarkResult, cfg: LoopBenchmarkConfig, promote: PromoteConfig, *,
                  out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(result, cfg, promote)
    payload = {"config": cfg.model_dump(mode="json"), "promote": promote.model_dump(mode="json"),
               "seconds": result.seconds, "timings": result.timings, "rows": result.rows,
               "decisions": result.decisions, "comparisons": result.comparisons,
               "curves": summary["curves"].to_dict("records"), "gains": summary["gains"], "speed": summary["speed"],
               "agreement": summary["agreement"], "agreement_people": summary["agreement_people"],
               "bad_promotions": summary["bad_promotions"]}
    paths = {"json": out_dir / JSON_FILE, "markdown": out_dir / MARKDOWN_FILE, "plot": out_dir / PLOT_FILE}
    paths["json"].write_text(json.dumps(payload, indent=2, default=str) + "\n")
    paths["markdown"].write_text(_markdown(result, summary, cfg, promote))
    plot_curves(summary["curves"], paths["plot"])
    return paths
