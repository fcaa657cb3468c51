"""Explaining decisions: Prediction Difference Analysis heat maps and their overlays."""
