"""Export: checkpoint -> ONNX / TorchScript / pt2, and the parity gate (needs the [train] extra)."""
