"""Write cache C: the values of cache VAL, in the keypoint order of cache ORDER (same keypoint sets)."""
import glob, os, sys
import numpy as np
val, order, dst = sys.argv[1:4]
for f in glob.glob(os.path.join(val, "*", "*.npz")):
    V = dict(np.load(f)); O = np.load(os.path.join(order, os.path.relpath(f, val)))
    key = lambda p, s: tuple(np.round(p, 1)) + (round(float(s), 3),)
    pos = {key(p, s): i for i, (p, s) in enumerate(zip(V["keypoints"], V["scales"]))}
    idx = np.array([pos[key(p, s)] for p, s in zip(O["keypoints"], O["scales"])], int)
    for k in ("keypoints", "scales", "scores", "descriptors"):
        V[k] = V[k][idx]
    out = os.path.join(dst, os.path.relpath(f, val)); os.makedirs(os.path.dirname(out), exist_ok=True)
    np.savez(out, **V)
