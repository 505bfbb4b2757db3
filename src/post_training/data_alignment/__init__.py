"""Alignment data pipeline (reference completions, rewards, reference log-probs): own issue."""
