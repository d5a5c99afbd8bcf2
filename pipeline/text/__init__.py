"""Normalise, mask and segment text: what every later step reads is normalised and masked."""
