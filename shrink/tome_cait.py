"""Token merging for CaiT (talking-heads self-attention, class attention) and NaFlexVit: filled in by that work."""
