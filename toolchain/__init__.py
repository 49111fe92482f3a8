"""Dataset validation, training, export, quantization, compilation and signed bundles."""
