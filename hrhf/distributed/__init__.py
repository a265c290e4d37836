"""Ray layer: distributed synthesis and training."""
