"""The settings: model (the frozen dataclasses), load (read, substitute, validate), validate (the
typed getters), file (management writes to settings.yaml), live (a worker's running config and its
reload), last_good (the instance's last valid copy), exposure (the development key on a public address).

Imports point one way: model <- validate <- load <- file, last_good, exposure <- live.
"""
