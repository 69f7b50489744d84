"""Image sources: each module turns one kind of origin into images in the store."""
