"""The pure math of every distillation objective, in the style of torch.nn.functional.

Each function takes tensors and returns a scalar loss; no modules, no state. The method modules in
`kd_experiments.methods` tap features, own projectors and call these.
"""

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al., "Distilling the Knowledge in a Neural Network" (2015), the soft-target term.

    L_KD = T^2 * (1/B) * sum_b KL(softmax(z_t,b / T) || softmax(z_s,b / T)),
    the KL summed over classes and averaged over the batch ("batchmean"); T^2 keeps the gradient scale
    independent of T (paper, section 2). The teacher side carries no gradient.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    student_log_probs = F.log_softmax(student_logits / temperature, dim=1)
    teacher_log_probs = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)
    return kl * temperature**2
