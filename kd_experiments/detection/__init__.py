"""The detection task: data, detectors, metrics, module (torchvision Faster R-CNN teachers and students)."""
