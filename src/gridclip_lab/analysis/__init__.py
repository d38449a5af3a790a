"""The paper's analyses as tools (``gridclip-lab analyze``): AP vs training frequency (frequency.py), CLIP
image-level recall@k (recall.py), transfer to a new vocabulary (transfer.py), docs/results.md (results_doc.py)."""
