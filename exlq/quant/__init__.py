"""Calibration, Hessians, GPTQ-style quantizer, measurement, bit allocation and EXL2 writer (issue 3)."""
