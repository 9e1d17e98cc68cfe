"""Datasets: readers (11k Hands, HD, CSV), the synthetic generator, splits and loading."""
