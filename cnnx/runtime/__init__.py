"""The torch-free half of cnnx: image decoding (the one preprocess implementation) and
onnxruntime inference. Nothing in this package may import torch, cnnx.train or cnnx.export."""
