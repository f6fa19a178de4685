"""Process set-up shared by the entry points, and the flag table both sides declare their flags in."""
