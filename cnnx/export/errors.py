"""The exporter's user-facing failures. Each message is one line; the command turns them
into click exceptions (exit 1), library callers catch ExportError."""

from __future__ import annotations


class ExportError(Exception):
    """An export that cannot be done (bad checkpoint, format, opset, folder, data)."""


class ParityError(ExportError):
    """The exported model disagrees with the checkpoint beyond a bound; `report` says how."""

    def __init__(self, message: str, report):
        super().__init__(message)
        self.report = report
