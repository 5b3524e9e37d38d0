"""A stand-in for the few torchvision transforms diffusers' example training scripts use.

PyPI's torchvision does not import beside the CPU torch this project pins, so the peer benchmark
puts this folder on PYTHONPATH for the peer's process only. The transforms are the same PIL
operations torchvision performs for PIL images.
"""
