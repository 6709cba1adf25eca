"""Per-image agreement of two feature caches of the same model (same pixel-hash file names)."""
import glob, os, sys, json
import numpy as np
a_root, b_root = sys.argv[1], sys.argv[2]
rows = []
for fa in sorted(glob.glob(os.path.join(a_root, "*", "*.npz"))):
    fb = os.path.join(b_root, os.path.relpath(fa, a_root))
    if not os.path.exists(fb):
        continue
    A, B = np.load(fa), np.load(fb)
    ka = {tuple(np.round(p, 1)) + (round(float(s), 3),): i for i, (p, s) in enumerate(zip(A["keypoints"], A["scales"]))}
    same = [(ka[k], j) for j, k in enumerate(tuple(np.round(p, 1)) + (round(float(s), 3),) for p, s in zip(B["keypoints"], B["scales"])) if k in ka]
    ia, ib = (np.array(x) for x in zip(*same)) if same else (np.array([], int), np.array([], int))
    cos = (A["descriptors"][ia] * B["descriptors"][ib]).sum(1) if len(ia) else np.array([np.nan])
    g = float(A["global_desc"] @ B["global_desc"])
    rows.append((len(same) / max(len(A["keypoints"]), 1), float(np.median(cos)), float(cos.min()), g, len(A["keypoints"]), len(B["keypoints"])))
r = np.array(rows)
print(json.dumps({"images": len(r), "kept_same_median": float(np.median(r[:, 0])), "kept_same_min": float(r[:, 0].min()),
                  "kept_same_mean": float(r[:, 0].mean()),
                  "desc_cos_median": float(np.median(r[:, 1])), "desc_cos_min": float(np.nanmin(r[:, 2])),
                  "global_cos_median": float(np.median(r[:, 3])), "global_cos_min": float(r[:, 3].min()),
                  "count_differs": int((r[:, 4] != r[:, 5]).sum())}))
