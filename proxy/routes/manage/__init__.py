"""The management API under ``/v0/management`` (CLIProxyAPI-style), one module per part.

Each module makes its own Blueprint behind the management guard
(``guard.management_blueprint``) and ``web.create_app`` registers each one
by name; nothing is attached by being imported. The views
only parse and answer: changes go through ``proxy/management.py``, what the
page reads is computed in ``proxy/report.py``.
"""
