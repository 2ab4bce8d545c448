"""The fake's command-line modules: the library metadata reader and the TP worker."""
