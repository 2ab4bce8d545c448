"""As in real MLC, the package version is a constant that says nothing about the build."""
__version__ = "0.1.dev0"
