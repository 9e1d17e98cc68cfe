"""Command-line tools: export, features, benchmark (also run as `python -m handclip.NAME`)."""
