"""ND for detectors: the norm-and-direction term on a Faster R-CNN's RoI box features (KD++ for detection).

Wang et al., "Improving Knowledge Distillation via Regularizing Feature Norm and Direction" (ICCV 2023,
arXiv 2305.17007), Eq. 7, as its official detection code applies it (WangYZ1608/Knowledge-Distillation-via-ND
`Detection/model/utils.py` `DirectNormLoss`, called from `Detection/model/rcnn.py` with `num_class=81`): every
RoI the student sampled, background included, is pulled towards the unit teacher centre of its matched label.
"""

from collections.abc import Iterable

import torch
from torch import nn

from kd_experiments.detection.features import DetectorOutput
from kd_experiments.errors import UserError
from kd_experiments.losses import nd_loss
from kd_experiments.methods.detection import DetectionObjective, _check_widths


class RoINormDirection(DetectionObjective):
    """ND on the RoI box-head embeddings (`roi_embedding`, D wide) of the RoIs the student sampled
    (`losses.nd_loss`, which is exactly the detection formula):

        L_nd = (1/N) * sum_i [1 - <s_i, e_{c_i}> / max(|s_i|, |t_i|)],   e_c = m_c / |m_c|,

    s_i and t_i the student's and the teacher's embedding of RoI i (the teacher runs on the student's RoIs,
    `detection.features.teacher_pass`), c_i its matched label from the student's sampling (`roi_labels`:
    0 = background, 1..K the classes), and m_c (`class_centers`, (K + 1) x D) the mean teacher embedding of
    label c. Background RoIs count too and have a centre of their own (row 0), as in ND's code (its
    Detectron2 label 80); the mean is over all N RoIs of the batch, the weight (ND's `ND_WEIGHT`) is the
    term's. There is no projector: ND asserts equal widths, and `setup` refuses unequal ones.

    Teacher statistics (`statistics_name`): the centres, computed once by `detection.statistics` over the
    training split and cached beside the teacher; not saved in checkpoints (a resumed run reads the cache)."""

    student_features = frozenset({"roi_embedding"})
    teacher_features = frozenset({"roi_embedding"})
    statistics_name = "roi_class_centers"
    statistics_features = frozenset({"roi_embedding"})  # what the statistics pass hands over, with labels

    def __init__(self):
        super().__init__()
        self.width: int | None = None
        self.register_buffer("class_centers", torch.empty(0), persistent=False)

    def setup(self, student_probe: DetectorOutput, teacher_probe: DetectorOutput) -> None:
        self.width = _check_widths(student_probe.roi_embedding, teacher_probe.roi_embedding, "roi_embedding")

    def compute_teacher_statistics(
        self, teacher: nn.Module, batches: Iterable[tuple[DetectorOutput, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """Per label 0..K (K + 1 = the teacher's RoI classifier outputs), the mean of the teacher's RoI
        embeddings of that label over `batches` (each: the teacher's `roi_embedding`, R x D, and the RoIs'
        labels, R). ND's collector (`rcnn.py` `emb_fea_distribution`) keeps a running sum and count per
        label; here the sums are float64, since a COCO pass adds some 60 million RoIs."""
        labels_count = teacher.roi_heads.box_predictor.cls_score.out_features
        sums = counts = None
        for output, labels in batches:
            embedding = output.roi_embedding
            if sums is None:
                wide = {"dtype": torch.float64, "device": embedding.device}
                sums = torch.zeros(labels_count, embedding.shape[1], **wide)
                counts = torch.zeros(labels_count, **wide)
            labels = labels.to(embedding.device)
            sums.index_add_(0, labels, embedding.double())
            counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        if sums is None:
            raise UserError("ND RoI class centres: the training split gave no RoIs; check the dataset.* keys")
        missing = (counts == 0).nonzero().flatten().tolist()
        if missing:
            raise UserError(
                f"ND RoI class centres: no sampled RoI of labels {missing[:10]} (0 = background) in the "
                "training split; every class needs a training object"
            )
        return {"class_centers": (sums / counts[:, None]).float()}

    def set_teacher_statistics(self, statistics: dict[str, torch.Tensor]) -> None:
        centres = statistics["class_centers"]
        if centres.dim() != 2 or (self.width is not None and centres.shape[1] != self.width):
            raise ValueError(
                f"ND RoI class centres are {tuple(centres.shape)}, not (K + 1) x {self.width} (the RoI "
                "embedding width)"
            )
        self.class_centers = centres

    def forward(self, student: DetectorOutput, teacher: DetectorOutput, targets) -> torch.Tensor:
        centres, labels = self.class_centers, student.roi_labels
        if centres.numel() == 0:
            if self.training:
                raise RuntimeError(
                    "RoINormDirection has no class centres: "
                    "detection.statistics.prepare_detection_statistics gives them before training"
                )
            # The runner's dry run on the probe batch (eval mode) comes before the teacher's weights, so
            # before its centres: each RoI's own teacher embedding stands in for its centre, so that the
            # formula still runs on the real shapes.
            centres = teacher.roi_embedding
            labels = torch.arange(len(centres), device=centres.device)
        return nd_loss(student.roi_embedding, teacher.roi_embedding, labels, centres)
