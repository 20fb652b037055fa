"""Data: clip manifests, the synthetic surgical set, the Cholec80 importer and the latent cache."""
