"""SimCLR self-supervised pretraining and fine-tuning on face images with PyTorch Lightning."""

__version__ = "0.1.0"
