"""Supervised fine-tuning datasets."""
