"""Multi-label classification (`dataset.task: multilabel`): the classification module with a macro mAP
validation, the summary fields and the closing table. Everything else (networks, features, methods,
teachers, caches) is the classification task's."""

import torch
from rich.table import Table
from torchmetrics import Metric, SumMetric

from kd_experiments.errors import UserError
from kd_experiments.module import DistillationModule
from kd_experiments.multilabel.data import IGNORED  # a target entry that counts neither way
from kd_experiments.reporting import print_table_and_footer

INTERPOLATIONS = ("none", "envelope")


def average_precision(scores: torch.Tensor, targets: torch.Tensor, interpolation: str = "none") -> float:
    """The AP of one class from its scores and targets (1 positive, 0 negative, -1 ignored), in [0, 1].

    `none`: sum over the ranks of the positives of the precision there, divided by the positives
    (sklearn's `average_precision_score` up to ties; LSHFM's COCO metric). `envelope`: the area under the
    precision envelope (the precision at a recall level is the best precision at any higher recall), as the
    VOC2010+ devkit's `VOCap` and LSHFM's VOC metric. Scores are ranked with a stable sort (ties keep the
    data order). A class without positives has AP 0."""
    keep = targets != IGNORED
    scores, positives = scores[keep], targets[keep] == 1
    total = int(positives.sum())
    if total == 0:
        return 0.0
    order = torch.sort(scores, descending=True, stable=True).indices
    hits = positives[order].double()
    true_positives = hits.cumsum(0)
    precision = true_positives / torch.arange(1, len(hits) + 1, dtype=torch.float64)
    if interpolation == "envelope":
        precision = precision.flip(0).cummax(0).values.flip(0)
    return float((precision * hits).sum() / total)


class MultiLabelMAP(Metric):
    """Macro mAP (%) over the classes that have a positive: each class's `average_precision` of the
    sigmoid scores, averaged. The states are the whole split's scores and targets, concatenated across
    DDP ranks (the AP of a class is not a mean of per-batch values)."""

    full_state_update = False

    def __init__(self, interpolation: str = "none", **kwargs):
        super().__init__(**kwargs)
        if interpolation not in INTERPOLATIONS:
            raise UserError(
                f"the multi-label AP interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}"
            )
        self.interpolation = interpolation
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.scores.append(logits.detach().float().sigmoid())
        self.targets.append(targets.detach().round().long())

    def compute(self) -> float:
        if not self.scores or (isinstance(self.scores, list) and not self.scores):
            return 0.0
        scores = torch.cat(self.scores) if isinstance(self.scores, list) else self.scores
        targets = torch.cat(self.targets) if isinstance(self.targets, list) else self.targets
        scores, targets = scores.cpu().double(), targets.cpu()
        present = [k for k in range(targets.shape[1]) if bool((targets[:, k] == 1).any())]
        if not present:
            return 0.0
        aps = [average_precision(scores[:, k], targets[:, k], self.interpolation) for k in present]
        return 100.0 * sum(aps) / len(aps)


class MultiLabelModule(DistillationModule):
    """The classification module scoring a multi-label student by its mAP. The teacher is scored once,
    at the first real validation, on every rank together (its metric syncs)."""

    def __init__(self, *args, ap_interpolation: str = "none", **kwargs):
        self.ap_interpolation = ap_interpolation  # read by _add_metrics, which the base __init__ calls
        super().__init__(*args, **kwargs)

    def _add_metrics(self, terms: tuple[str, ...], num_classes: int) -> None:
        super()._add_metrics(terms, num_classes)
        del self.val_top1, self.val_top5, self.teacher_val_top1
        self.val_map = MultiLabelMAP(self.ap_interpolation)
        self.teacher_val_map = MultiLabelMAP(self.ap_interpolation)
        self.val_image_count = SumMetric()
        self.teacher_map: float | None = None

    def on_fit_start(self) -> None:
        """Nothing to broadcast: the teacher's mAP is measured by all ranks at the first validation."""

    def on_validation_epoch_start(self) -> None:
        self._measuring_teacher = (
            self.teacher is not None and self.teacher_map is None and not self.trainer.sanity_checking
        )

    def validation_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        self.val_map.update(self.student(images), targets)
        self.val_image_count.update(targets.shape[0])
        if self._measuring_teacher:
            self.teacher_val_map.update(self.teacher(self.teacher_input(images)), targets)

    def on_validation_epoch_end(self) -> None:
        score = self.val_map.compute()
        images = int(self.val_image_count.compute().item())
        self.val_map.reset()
        self.val_image_count.reset()
        synced = {"sync_dist": True, "reduce_fx": "max"}
        self.log("val/student_map", score, prog_bar=True, **synced)
        if self._measuring_teacher:
            self.teacher_map = self.teacher_val_map.compute()
            self.teacher_val_map.reset()
            self._measuring_teacher = False
        if self.teacher_map is not None:
            self.log("val/teacher_map", self.teacher_map, **synced)
        if not self.trainer.sanity_checking:
            self.val_images = images
            self.validation_history.append({"epoch": self.current_epoch, "map": score})

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["teacher_map"] = self.teacher_map

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.teacher_map = checkpoint.get("teacher_map", self.teacher_map)


def summary_fields(report: str, history: list[dict], teacher_map: float | None, paper, dataset: str) -> dict:
    """summary.json's numbers of a multi-label run: the last / best epoch's mAP, the reported one
    (`report`: last or best), the teacher's, and the gap to the recipe's `paper.map` on its data set."""
    last = history[-1]["map"] if history else None
    best = max(entry["map"] for entry in history) if history else None
    reported = best if report == "best" else last
    fields = {"task": "multilabel", "report": report, "report_map": "map"}
    fields |= {"student_map": last, "student_map_best": best, "student_map_reported": reported}
    fields["teacher_map"] = teacher_map
    paper_map = (paper or {}).get("map")
    if paper_map is not None and reported is not None and (paper or {}).get("dataset") == dataset:
        fields["gap_to_paper"] = round(reported - paper_map, 2)
    return fields


def print_result_table(summary: dict) -> None:
    table = Table(title=f"{summary['method']} on {summary['dataset']} (seed {summary['seed']})")
    table.add_column("")
    table.add_column("mAP", justify="right")
    rows = [
        (f"teacher {summary['teacher']} ({summary.get('teacher_source')})", summary.get("teacher_map")),
        (f"student {summary['student']}, last epoch", summary.get("student_map")),
        (f"student {summary['student']}, best epoch", summary.get("student_map_best")),
    ]
    paper = summary.get("paper") or {}
    if paper.get("map") is not None:
        gap = summary.get("gap_to_paper")
        where = (
            f"{gap:+.2f} points from it" if gap is not None else f"not comparable: on {paper.get('dataset')}"
        )
        rows.append((f"paper ({paper.get('source', 'published')}); this run is {where}", paper["map"]))
    for label, value in rows:
        table.add_row(label, "-" if value is None else f"{value:.2f}")
    print_table_and_footer(table, summary)
