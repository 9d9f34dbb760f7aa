"""From fetched images to a curated extra set: CLIP, embeddings, detectors, extrapolation, report."""
