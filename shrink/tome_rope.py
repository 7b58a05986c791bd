"""Token merging for rotary-embedding attention (Eva, EVA-02, DINOv3, PE, RoPE ViTs): filled in by the RoPE work."""
