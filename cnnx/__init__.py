"""cnnx: train a CNN image classifier, export it with a parity gate, classify folders."""

import os

__version__ = "0.1.0"

# onnxruntime 1.29 and later, on Linux, keep a telemetry event a process in a SQLite file under
# ~/.cache/Microsoft/DeveloperTools and upload them to Microsoft. cnnx turns that off unless the
# user set one of these variables (ORT_DISABLE_TELEMETRY=0 keeps it on): a deployment tool should
# open no connection nobody asked for, and the decode processes, forked from a server that
# imported onnxruntime, would all inherit its open SQLite file (which SQLite says never to use
# across a fork). Set on import of cnnx, before any of it imports onnxruntime, which reads them
# once, at its own import. Two names: 1.31 reads the first, later releases the second.
ONNXRUNTIME_TELEMETRY_OFF = {"ORT_DISABLE_TELEMETRY": "1", "ORT_TELEMETRY_DISABLED": "1"}
if not any(name in os.environ for name in ONNXRUNTIME_TELEMETRY_OFF):
    os.environ.update(ONNXRUNTIME_TELEMETRY_OFF)
