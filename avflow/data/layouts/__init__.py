"""One reader per on-disk dataset layout; each yields segment records at the streams' native rates."""
