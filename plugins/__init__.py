"""Task plugins: the hook specification, the loader and the built-in plugins."""
