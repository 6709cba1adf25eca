"""Copy a feature cache adding float32-rounding-size noise (1e-7 relative) to every descriptor and
global vector, re-normalised: what a second float32 runtime changes.  Measures the mAP spread that
such perturbations alone cause (the OpenVINO vs PyTorch question)."""
import glob, os, sys
import numpy as np
src, dst, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = np.random.default_rng(seed)
for f in glob.glob(os.path.join(src, "*", "*.npz")):
    z = dict(np.load(f))
    for key in ("descriptors", "global_desc"):
        v = z[key].astype(np.float64)
        v = v + rng.normal(0, 2e-7, v.shape)
        n = np.linalg.norm(v, axis=-1, keepdims=True)
        z[key] = (v / np.where(n > 0, n, 1)).astype(np.float32)
    out = os.path.join(dst, os.path.relpath(f, src))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    np.savez(out, **z)
