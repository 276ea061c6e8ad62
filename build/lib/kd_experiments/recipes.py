"""List the paper recipes in conf/experiment/ as a Markdown table: `python -m kd_experiments.recipes`.

The README's recipe table is this output (a test keeps the two in sync).
"""

from pathlib import Path

from omegaconf import OmegaConf

CONF_DIR = Path(__file__).resolve().parent / "conf"


def recipe_rows(conf_dir: Path = CONF_DIR) -> list[tuple[str, float | None, str]]:
    """(recipe name, the paper's top-1, its source) for every recipe with a `paper` block. The top-1 is None
    for a row the paper shows only in a figure (`paper.top1: null`, e.g. ND's larger-teacher study)."""
    rows = []
    for path in sorted((conf_dir / "experiment").glob("*.yaml")):
        paper = OmegaConf.load(path).get("paper")
        if paper is not None:
            top1 = paper.get("top1")
            rows.append((path.stem, None if top1 is None else float(top1), str(paper.get("source", ""))))
    return rows


def markdown_table(conf_dir: Path = CONF_DIR) -> str:
    lines = ["| recipe | paper top-1 | command |", "|---|---|---|"]
    for name, top1, _ in recipe_rows(conf_dir):
        number = "figure only" if top1 is None else f"{top1:.2f}"
        lines.append(f"| `{name}` | {number} | `python -m kd_experiments experiment={name}` |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
