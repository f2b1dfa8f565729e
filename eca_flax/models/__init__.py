"""The networks: ECA-ResNet and ECA-MobileNetV2 (NNX), their layers, and the model registry."""
