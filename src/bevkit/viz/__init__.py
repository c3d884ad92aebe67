"""Headless visualisation: previews, BEV maps, predictions against ground truth."""
