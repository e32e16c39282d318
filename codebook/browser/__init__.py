"""The code browser web app (see app.py)."""

from codebook.browser.app import create_app

__all__ = ["create_app"]
