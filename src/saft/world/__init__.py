"""The embedded world: generated data, the tiny CLIP pre-trained on it, and its benchmark."""
