"""Shared by the studies' collect.py scripts: read a study's commands.txt, the summary.json of each of
its runs (outputs/experiments/<study>/<label>/, written by llmlab.run), and write the raw results
(results.json, results.csv) and a markdown table (results.md) next to the study's README."""
from __future__ import annotations

import csv
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUTPUTS = ROOT / "outputs" / "experiments"


def read_commands(study: str) -> list[tuple[str, list[str]]]:
    """(label, overrides) per line of experiments/<study>/commands.txt: `label | overrides`; `#` comments.
    Overrides are split on white space only, exactly as run_study.sh passes them (quotes kept: Hydra
    reads `precision='32'` as the string choice '32')."""
    rows = []
    for line in (HERE / study / "commands.txt").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        label, _, overrides = line.partition("|")
        rows.append((label.strip(), overrides.split()))
    return rows


def summaries(study: str) -> dict[str, dict]:
    """label -> that run's summary.json (runs not done yet are left out)."""
    out = {}
    for label, _ in read_commands(study):
        path = OUTPUTS / study / label / "summary.json"
        if path.exists():
            out[label] = json.loads(path.read_text())
    return out


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1 else f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value)


def write_results(study: str, rows: list[dict], columns: list[str]) -> str:
    """results.json + results.csv (all columns, raw numbers) + results.md (a table); returns the table."""
    folder = HERE / study
    (folder / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    table += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    loads = OUTPUTS / study / "loads.txt"
    if loads.exists():  # when each run started/ended and the 1-min load then: the noise context
        (folder / "loads.txt").write_text(loads.read_text())
    text = "\n".join(table) + "\n"
    (folder / "results.md").write_text(text)
    return text
