"""List the paper recipes in conf/experiment/ as a Markdown table: `python -m kd_experiments.recipes`.

The README's recipe table is this output (a test keeps the two in sync).
"""

from pathlib import Path
from typing import NamedTuple

from omegaconf import OmegaConf

CONF_DIR = Path(__file__).resolve().parent / "conf"
# The number a recipe's `paper` block holds, by key, and how the table names it: a classification paper's
# top-1, or a detection paper's mAP (the key its `report_map` names: map, map50 or voc07_map50). The first
# key present wins.
PAPER_METRICS = {"top1": "top-1", "map": "mAP", "map50": "mAP@.5", "voc07_map50": "VOC07 mAP@.5"}


class RecipeRow(NamedTuple):
    name: str
    metric: str  # the PAPER_METRICS label of the number, e.g. "top-1"
    number: float | None  # None: a row the paper shows only in a figure (`paper.top1: null`)
    source: str


def recipe_rows(conf_dir: Path = CONF_DIR) -> list[RecipeRow]:
    """One row per recipe with a `paper` block: its published number (top-1, or an mAP for a detection
    recipe, PAPER_METRICS) and source. The number is None for a row the paper shows only in a figure
    (`paper.top1: null`, e.g. ND's larger-teacher study)."""
    rows = []
    for path in sorted((conf_dir / "experiment").glob("*.yaml")):
        paper = OmegaConf.load(path).get("paper")
        if paper is None:
            continue
        key = next((key for key in PAPER_METRICS if key in paper), "top1")
        number = paper.get(key)
        rows.append(
            RecipeRow(
                path.stem,
                PAPER_METRICS[key],
                None if number is None else float(number),
                str(paper.get("source", "")),
            )
        )
    return rows


def markdown_table(conf_dir: Path = CONF_DIR) -> str:
    lines = ["| recipe | paper number | command |", "|---|---|---|"]
    for row in recipe_rows(conf_dir):
        number = "figure only" if row.number is None else f"{row.metric} {row.number:.2f}"
        lines.append(f"| `{row.name}` | {number} | `python -m kd_experiments experiment={row.name}` |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
