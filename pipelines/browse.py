"""Serve the code browser for a code store on 127.0.0.1.

    python pipelines/browse.py --store stores/shakespeare      # then open http://127.0.0.1:8765

Search codes by regex or token, read a code's contexts (firing token highlighted), its
precision/recall for the last regex, similar codes, per-site usage, and try steering (prompt +
codes -> baseline vs steered greedy text). There is no authentication: keep --host 127.0.0.1
unless you put it behind one. Requests must name localhost, 127.0.0.1, [::1] or --host in their
Host header (DNS-rebinding guard); a proxy or another name needs --allowed-hosts NAME ...
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
    p.add_argument("--allowed-hosts", nargs="+", default=[], metavar="HOST",
                   help="more Host header names to accept besides localhost, 127.0.0.1, [::1] "
                        "and --host (e.g. the name a reverse proxy forwards; '*' accepts any)")
    args = p.parse_args(argv)
    import uvicorn

    from codebook.browser import create_app
    from codebook.checkpoint import resolve_local
    from codebook.store import CodeStore

    try:
        model = resolve_local(args.model) if args.model else None
        if model is None:  # the store's model: browsing works without it, steering does not
            stored = CodeStore(args.store).meta.model
            try:
                resolve_local(stored, "the store's model")
            except ConfigError as err:
                print(f"warning: {err} (steering and similar codes need it; or pass --model)",
                      file=sys.stderr, flush=True)
        app = create_app(args.store, model, host=args.host, allowed_hosts=args.allowed_hosts)
        app.state.warm()  # the store's query engine and the model, before the first page
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    print(f"code browser on http://{args.host}:{args.port} (Host header: "
          f"{', '.join(app.state.allowed_hosts)})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
