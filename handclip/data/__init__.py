"""Datasets: sources (11k Hands, HD, caption CSV, Hugging Face image folder, synthetic hands),
readers, splits, the resized image cache and loading."""
