"""Self-contained HTML reports (one file each, no network requests): the training /
evaluation page and the page of a classify job.

Torch-free (numpy, Pillow, stdlib): `cnnx classify --report` runs where torch is not
installed, so nothing here may import torch, cnnx.train or cnnx.export.
"""

from cnnx.report.classify import ReportError, write_classify_report
from cnnx.report.page import report_replaceable
from cnnx.report.training import Predictions, write_training_report

__all__ = ["Predictions", "ReportError", "report_replaceable", "write_classify_report", "write_training_report"]
