"""Figures for an evaluation: per-query AP bars and the worst queries beside their top wrong hits."""

from __future__ import annotations

from pathlib import Path



def ap_bars(result: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(result["per_query"], key=lambda r: r["ap"])
    fig, ax = plt.subplots(figsize=(10, 3.6))
    colours = ["#cc3311" if r["kind"].startswith("paris6k") else "#4477aa" for r in rows]
    ax.bar(range(len(rows)), [100 * r["ap"] for r in rows], color=colours)
    ax.set_xticks(range(len(rows)), [r["query_id"] for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel("AP (%)")
    ax.set_title(f"{result['label']}: mAP {result['mAP']:.1f}, R@1 {result['R@1']:.1f} "
                 f"({result['database_images']} images + {result['distractors']} distractors)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def worst_queries(result: dict, gt, settings, extractor, out: Path, count: int = 3, wrong: int = 2) -> Path:
    """For the ``count`` lowest-AP queries: the query beside its top wrong hits, match lines drawn."""
    from PIL import Image

    from delf_es.draw import draw_matches, stack_vertically
    from delf_es.eval.gt import query_pixels
    from delf_es.imageio import load_image
    from delf_es.verify import verify

    queries = {q.id: q for q in gt.queries}
    panels = []
    for row in sorted(result["per_query"], key=lambda r: r["ap"])[:count]:
        query = queries[row["query_id"]]
        positives, junk = set(query.positives), set(query.junk)
        q_pixels = query_pixels(gt, query, settings)
        q_feats = extractor.extract(q_pixels, query.id)
        wrong_hits = [h for h in row["top10"] if h[0] not in positives and h[0] not in junk][:wrong]
        for image_id, _, _ in wrong_hits:
            path = gt.resolve(image_id) if not image_id.startswith("distractor:") else None
            if path is None:
                continue
            pixels = load_image(path, settings).pixels
            feats = extractor.extract(pixels, image_id)
            panel = out.with_suffix(f".{len(panels)}.png")
            draw_matches(q_pixels, pixels, q_feats.keypoints, feats.keypoints, verify(q_feats, feats, settings), panel,
                         max_height=300)
            panels.append(Image.open(panel).convert("RGB"))
            panel.unlink()
    if not panels:
        return out
    return stack_vertically(panels, out)
