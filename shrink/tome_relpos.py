"""Token merging for relative-position-bias attention (BEiT, RelPos ViTs): filled in by the relative-position work."""
