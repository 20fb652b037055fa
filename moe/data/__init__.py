"""Data: clip manifests, the Cholec80 importer, video files, ROI masks and the latent cache."""
