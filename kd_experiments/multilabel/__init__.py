"""Multi-label image classification (VOC 2007, COCO 2014): image-level labels, multi-hot targets."""
