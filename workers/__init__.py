"""GPU/CPU worker processes: model packages, the UNet-328 engine, the socket runtime."""
