"""Calibration: which real images, which observers, and the loop that feeds them."""
from .loop import CalibrationResult, check_observers, observers_of, run
from .observers import PercentileObserver, activation_observer, quantization_config
from .subset import CalibrationSet, from_folder, stratified_indices

__all__ = ["CalibrationResult", "check_observers", "CalibrationSet", "PercentileObserver", "activation_observer", "from_folder",
           "observers_of", "quantization_config", "run", "stratified_indices"]
