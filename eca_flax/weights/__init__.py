"""Stored weights: the pretrained directory (model.json + Orbax state/), safetensors files, and
the PyTorch side (reading .pth files, converting, verifying against the reference)."""
