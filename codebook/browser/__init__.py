"""The code browser web app over a code store: the FastAPI app (``app``), the caps and regex
checks of one request (``limits``), the budgeted regex search (``bounded_search``), and a
local server helper (``serve``).

On the store's floor: may import ``codebook.store`` and everything below it; never
``codebook.ray_glue``, Ray or the entry points.
"""

from codebook.browser.app import create_app

__all__ = ["create_app"]
