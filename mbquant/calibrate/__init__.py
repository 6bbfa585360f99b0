"""Calibration: which real images (``subset``), which observers (``observers``), and the loop that feeds them."""
from .loop import CalibrationResult, check_observers, observers_of, run
from .observers import activation_observer, percentile_observer, quantization_config
from .subset import CalibrationSet, calibration_set, from_folder, stratified_indices

__all__ = ["CalibrationResult", "CalibrationSet", "activation_observer", "calibration_set", "check_observers", "from_folder",
           "observers_of", "percentile_observer", "quantization_config", "run", "stratified_indices"]
