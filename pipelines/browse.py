"""Serve the code browser for a code store on 127.0.0.1.

    python pipelines/browse.py --store stores/shakespeare      # then open http://127.0.0.1:8765

Search codes by regex or token, read a code's contexts (firing token highlighted), its
precision/recall for the last regex, similar codes, per-site usage, and try steering (prompt +
codes -> baseline vs steered greedy text). There is no authentication: keep --host 127.0.0.1
unless you put it behind one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codebook.errors import ConfigError  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True)
    p.add_argument("--model", help="model folder for steering (default: the store's model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    args = p.parse_args(argv)
    import uvicorn

    from codebook.browser import create_app

    try:
        app = create_app(args.store, args.model)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    print(f"code browser on http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
