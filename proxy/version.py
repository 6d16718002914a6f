"""The release version, in a module of its own so the page can show it without importing the package root
(whose ``create_app`` imports the whole app: an import cycle through ``proxy.web``)."""
__version__ = "2.0.0.dev0"  # Part 2 in progress; shown on the operator page
