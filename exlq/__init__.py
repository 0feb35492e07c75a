"""exlq: quantize LLMs to EXL2 and run them on NVIDIA GPUs (torch reference path on CPU)."""

__version__ = "0.1.0"
