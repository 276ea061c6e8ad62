"""List the paper recipes in conf/experiment/ as a Markdown table: `python -m kd_experiments.recipes`.

The README's recipe table is this output (a test keeps the two in sync).
"""

from pathlib import Path

from omegaconf import OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def recipe_rows(conf_dir: Path = CONF_DIR) -> list[tuple[str, float, str]]:
    """(recipe name, the paper's top-1, its source) for every recipe with a `paper` block."""
    rows = []
    for path in sorted((conf_dir / "experiment").glob("*.yaml")):
        paper = OmegaConf.load(path).get("paper")
        if paper is not None and paper.get("top1") is not None:
            rows.append((path.stem, float(paper.top1), str(paper.get("source", ""))))
    return rows


def markdown_table(conf_dir: Path = CONF_DIR) -> str:
    lines = ["| recipe | paper top-1 | command |", "|---|---|---|"]
    for name, top1, _ in recipe_rows(conf_dir):
        lines.append(f"| `{name}` | {top1:.2f} | `python -m kd_experiments experiment={name}` |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
