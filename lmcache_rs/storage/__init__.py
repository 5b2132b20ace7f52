"""Storage tiers: L1 (Rust index over one torch buffer)."""
