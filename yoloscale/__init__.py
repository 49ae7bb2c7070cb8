"""yoloscale: train Ultralytics YOLO detectors on many GPUs with Hugging Face Accelerate."""

__version__ = "0.1.0"
