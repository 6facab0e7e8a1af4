"""cnnx: train a CNN image classifier, export it with a parity gate, classify folders."""

__version__ = "0.1.0"
