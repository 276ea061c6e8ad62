"""A teacher with its own input normalisation (teacher.input_mean / input_std): the batch is re-normalised
for the teacher only, exactly."""

import torch
from torch import nn

from kd_experiments.data.base import Renormalize
from kd_experiments.methods.ce import CrossEntropy
from kd_experiments.methods.compose import LossWeights, Objectives
from kd_experiments.methods.kd import HintonKD
from kd_experiments.module import DistillationModule
from kd_experiments.teachers import Teacher
from tests.conftest import QUICK, refusal_line

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_renormalize_turns_one_normalisation_into_the_other():
    raw = torch.rand(2, 3, 4, 4)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGENET)
    as_data = (raw - mean) / std
    torch.testing.assert_close(Renormalize(IMAGENET, HALF)(as_data), (raw - 0.5) / 0.5)
    torch.testing.assert_close(Renormalize(IMAGENET, IMAGENET)(as_data), as_data)


class InputRecorder(nn.Module):
    """A stand-in teacher that remembers the images it was given."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.seen: list[torch.Tensor] = []

    def forward(self, images):
        self.seen.append(images.clone())
        return self.linear(images.mean((2, 3)))


def test_only_the_teacher_sees_its_own_normalisation():
    teacher, student = InputRecorder(), InputRecorder()
    module = DistillationModule(
        student=student, method=Objectives({"ce": CrossEntropy(), "kd": HintonKD()}),
        loss_weights=LossWeights({"ce": 1.0, "kd": 1.0}), num_classes=3,
        optimizer=torch.optim.SGD, teacher=Teacher(teacher, Renormalize(IMAGENET, HALF)),
    )  # fmt: skip
    images = torch.zeros(2, 3, 4, 4)  # the data's mean colour
    module.log = lambda *args, **kwargs: None
    module.training_step((images, torch.tensor([0, 1])), 0)
    expected = ((torch.tensor(IMAGENET[0]) - 0.5) / 0.5).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    torch.testing.assert_close(teacher.seen[0], expected)
    torch.testing.assert_close(student.seen[0], images)


def test_teacher_normalisation_errors_are_one_line(workdir, monkeypatch, capsys):
    io = {"cwd": workdir, "monkeypatch": monkeypatch, "capsys": capsys}
    # the digits data set does not declare a normalisation to convert from
    line = refusal_line(*QUICK, "+teacher.input_mean=[0.5]", "+teacher.input_std=[0.5]", **io)
    assert "does not declare its own normalisation" in line
    line = refusal_line(*QUICK, "+teacher.input_mean=[0.5]", **io)
    assert "set both teacher.input_mean and teacher.input_std" in line
