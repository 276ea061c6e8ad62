"""The GPU fast path: channels_last memory format and torch.compile of each network's feature extraction.

Both are opt-in (`channels_last: true`; `compile.student` / `compile.teacher: true`) and change the numbers
by floating-point rounding only. Mixed precision is Lightning's (`trainer.precision=bf16-mixed`): its
autocast wraps the whole training and validation step, the teacher's forward included.

How it works without touching the training step: `FastPath.install` gives the student and the teacher
network each a `FeatureRoute`, and `models.features.extract_features(network, images, needs)` hands every
call for that network to its route (the training step's, the teacher-output cache's): the batch converted to
channels_last, then the compiled extraction for the method's feature set (or the plain one for any other
set). Compiling the feature extraction, not `model.forward`, keeps every tap a method reads (logits,
embedding, stage maps, ViT tokens, the second head) inside the compiled graph. Nothing is wrapped: the
student stays `module.student` and the teacher stays outside the module tree, so state_dict keys are the
same as without compile (no `_orig_mod.` prefixes) and a checkpoint loads into an uncompiled run. A copy of
a network (an EMA of the student, a pickled model) is a plain network again.
"""

import dataclasses
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn

from kd_experiments.errors import UserError
from kd_experiments.models.features import ROUTE_ATTRIBUTE, NetworkOutput, extract_features_eager

COMPILE_KEYS = ("student", "teacher", "backend", "mode")
# torch.compile's modes (inductor only); null = torch's default.
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
OUTPUT_FIELDS = tuple(field.name for field in dataclasses.fields(NetworkOutput))


@dataclass(frozen=True)
class FastPath:
    """The run's fast-path options (`channels_last`, `compile.*` in conf/config.yaml), checked."""

    channels_last: bool = False
    compile_student: bool = False
    compile_teacher: bool = False
    backend: str = "inductor"
    mode: str | None = None

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "FastPath":
        """The options of a run's config; a bad value is one line naming its key."""
        compile_cfg = dict(cfg.get("compile") or {})
        unknown = sorted(set(compile_cfg) - set(COMPILE_KEYS))
        if unknown:
            raise UserError(f"compile takes {', '.join(COMPILE_KEYS)}, not {', '.join(unknown)}")
        values = {
            "channels_last": cfg.get("channels_last", False),
            "compile.student": compile_cfg.get("student", False),
            "compile.teacher": compile_cfg.get("teacher", False),
        }
        for key, value in values.items():
            if not isinstance(value, bool):
                raise UserError(f"{key} must be true or false, got {value!r}")
        backend = compile_cfg.get("backend", "inductor")
        backends = torch._dynamo.list_backends(exclude_tags=())
        if backend not in backends:
            raise UserError(
                f"compile.backend={backend!r} is not a torch.compile backend; use inductor (GPU), or "
                "aot_eager / eager to check a compiled run quickly"
            )
        mode = compile_cfg.get("mode")
        if mode not in COMPILE_MODES:
            raise UserError(
                f"compile.mode must be null or one of {', '.join(COMPILE_MODES[1:])}, got {mode!r}"
            )
        if mode is not None and backend != "inductor":
            raise UserError(
                f"compile.mode is inductor's; set compile.mode=null for compile.backend={backend}"
            )
        return cls(
            values["channels_last"], values["compile.student"], values["compile.teacher"], backend, mode
        )

    def check_data(self, sample_images: torch.Tensor, dataset: str) -> None:
        """channels_last is a layout of 4-D (B x C x H x W) batches: refuse samples that are not C x H x W."""
        if self.channels_last and (not isinstance(sample_images, torch.Tensor) or sample_images.dim() != 3):
            shape = tuple(getattr(sample_images, "shape", ()))
            raise UserError(
                f"channels_last=true needs image batches (B x C x H x W), but {dataset} gives samples of "
                f"shape {shape}; set channels_last=false"
            )

    def install(self, module: nn.Module) -> None:
        """Apply the options to a `DistillationModule`: channels_last weights (student, the method's
        projectors and, through the module's `_apply`, the teacher), and a `FeatureRoute` on each network that
        needs one. Called once, when the module is built, before Lightning moves it to its device."""
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        networks = ((module.student, module.method.student_features, self.compile_student),)
        if module.teacher is not None and module.method.teacher_features:
            networks += ((module.teacher, module.method.teacher_features, self.compile_teacher),)
        for network, needs, compiled in networks:
            if self.channels_last or compiled:
                options = {"backend": self.backend, "mode": self.mode} if compiled else None
                route = FeatureRoute(network, frozenset(needs), self.channels_last, options)
                network.__dict__[ROUTE_ATTRIBUTE] = route  # a plain attribute: not a submodule, not state


class FeatureRoute:
    """What `extract_features(network, images, needs)` runs for one network on the fast path: the images in
    channels_last (when on; a no-op for a batch already in it), then the compiled extraction of `needs` (the
    method's feature set, compiled once per batch shape: `dynamic=False`, so a ragged last batch compiles once
    more instead of every shape running a slower dynamic-shape graph), or the plain one for any other set."""

    def __init__(
        self, network: nn.Module, needs: frozenset[str], channels_last: bool, compile_options: dict | None
    ):
        self.needs = needs
        self.channels_last = channels_last
        self.compiled = None
        if compile_options is not None:

            def extract(images: torch.Tensor) -> dict:  # what torch.compile traces: one network, one set
                output = extract_features_eager(network, images, needs)
                return {name: getattr(output, name) for name in OUTPUT_FIELDS}

            self.compiled = torch.compile(extract, dynamic=False, **compile_options)

    def __call__(self, network: nn.Module, images: torch.Tensor, needs: frozenset[str]) -> NetworkOutput:
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.compiled is not None and needs == self.needs:
            return NetworkOutput(**self.compiled(images))
        return extract_features_eager(network, images, needs)

    def __reduce__(self):
        """A copied or pickled network (timm's EMA deep-copies the student) gets no route: it runs plain."""
        return _no_route, ()


def _no_route() -> None:
    return None
