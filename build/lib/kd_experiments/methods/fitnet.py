"""FitNet: the student regresses a teacher feature (a stage map, or the pooled embedding) with L2."""

from typing import Literal

import torch
from torch import nn

from kd_experiments.losses import feature_mse
from kd_experiments.methods.base import DistillationMethod
from kd_experiments.models.features import NetworkOutput


class ConvRegressor(nn.Sequential):
    """The hint regressor of mdistiller's FitNet (`ConvReg`, megvii-research/mdistiller
    `mdistiller/distillers/FitNet.py` and `_common.py`): a conv that maps the student
    map B×C_s×H_s×W_s to the teacher's B×C_t×H_t×W_t, then BN + ReLU (the teacher maps are post-ReLU).

    The conv depends on the spatial sizes: H_s = 2 H_t: 3×3, stride 2, pad 1; 2 H_s = H_t: 4×4 transposed,
    stride 2, pad 1; H_s >= H_t otherwise: kernel (1 + H_s - H_t, 1 + W_s - W_t), so 1×1 when equal.
    """

    def __init__(self, student_shape: torch.Size, teacher_shape: torch.Size):
        _, student_channels, student_h, student_w = student_shape
        _, teacher_channels, teacher_h, teacher_w = teacher_shape
        if student_h == 2 * teacher_h:
            conv = nn.Conv2d(student_channels, teacher_channels, 3, stride=2, padding=1)
        elif 2 * student_h == teacher_h:
            conv = nn.ConvTranspose2d(student_channels, teacher_channels, 4, stride=2, padding=1)
        elif student_h >= teacher_h and student_w >= teacher_w:
            kernel = (1 + student_h - teacher_h, 1 + student_w - teacher_w)
            conv = nn.Conv2d(student_channels, teacher_channels, kernel)
        else:
            raise ValueError(
                f"FitNet: cannot regress a {student_h}×{student_w} student map onto a "
                f"{teacher_h}×{teacher_w} teacher map (only equal, halved, doubled or larger student maps); "
                "choose another hint_layer"
            )
        super().__init__(conv, nn.BatchNorm2d(teacher_channels), nn.ReLU(inplace=True))


class FitNet(DistillationMethod):
    """Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015), the hint loss of Sec. 2.2 (Eq. 3) in
    mdistiller's single-stage form (`mdistiller/distillers/FitNet.py`).

    Term `fitnet` = MSE_mean(r(F_s), F_t) (`losses.feature_mse`), where
      - `target="stage"`: F = `stages[hint_layer]` of both networks (mdistiller's feats[2] by default) and r
        a `ConvRegressor`;
      - `target="embedding"`: F = the pooled penultimate embedding and r a Linear(D_s, D_t) (LSHFM's "L2"
        baseline; LSHFM puts it inside the student before the classifier, here it is a side branch).
    mdistiller weights the shared CE 1 and the hint 100, with no warm-up; the YAML holds them.
    """

    def __init__(self, target: Literal["stage", "embedding"] = "stage", hint_layer: int = 2):
        super().__init__()
        if target not in ("stage", "embedding"):
            raise ValueError(f"FitNet target must be 'stage' or 'embedding', got {target!r}")
        self.target, self.hint_layer = target, hint_layer
        feature = "stages" if target == "stage" else "embedding"
        self.student_features = frozenset({"logits", feature})
        self.teacher_features = frozenset({feature})
        self.regressor: nn.Module = nn.Identity()

    def _hint(self, network: NetworkOutput) -> torch.Tensor:
        if self.target == "embedding":
            return network.embedding
        if not -len(network.stages) <= self.hint_layer < len(network.stages):
            raise ValueError(
                f"FitNet hint_layer {self.hint_layer} is out of range: {len(network.stages)} stages"
            )
        return network.stages[self.hint_layer]

    def setup(self, student_probe: NetworkOutput, teacher_probe: NetworkOutput | None) -> None:
        student_hint, teacher_hint = self._hint(student_probe), self._hint(teacher_probe)
        if self.target == "embedding":
            self.regressor = nn.Linear(student_hint.shape[1], teacher_hint.shape[1])
        else:
            self.regressor = ConvRegressor(student_hint.shape, teacher_hint.shape)

    def forward(
        self, student: NetworkOutput, teacher: NetworkOutput | None, targets: torch.Tensor
    ) -> torch.Tensor:
        return feature_mse(self.regressor(self._hint(student)), self._hint(teacher))
