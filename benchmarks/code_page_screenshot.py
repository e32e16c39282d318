"""A screenshot of a code's page in headless Chromium (the browser app on 127.0.0.1), and the
page's load time as the browser sees it.

    python benchmarks/code_page_screenshot.py --store STORE --out page.png [--code SITE.G.C]

Without ``--code`` it shows the labelled code with the best held-out label precision among
codes firing at least ``--min-count`` times (labels.parquet from pipelines/label.py).
Needs Debian's chromium and chromium-driver (scripts/setup.sh installs them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pick_code(store_root: str, min_count: int) -> str:
    """The labelled code with the best held-out precision (ties: more firings)."""
    from codebook.store.autolabel import read_labels

    labels = [v | {"code": k} for k, v in read_labels(store_root).items()
              if v.get("precision") is not None and v["count"] >= min_count]
    if not labels:
        sys.exit(f"no labelled code fires {min_count}+ times in {store_root}: run "
                 "pipelines/label.py first, or pass --code")
    return max(labels, key=lambda r: (r["precision"], r["count"]))["code"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--code")
    p.add_argument("--min-count", type=int, default=50)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=2400)
    args = p.parse_args()
    from selenium.webdriver.common.by import By

    from codebook.browser import create_app
    from codebook.browser.serve import chromium, serving

    code = args.code or pick_code(args.store, args.min_count)
    drv = chromium(args.width, args.height)
    try:
        app = create_app(args.store)
        app.state.warm()  # as pipelines/browse.py does
        with serving(app) as url:
            timings = []
            for _ in range(2):  # the first load opens DuckDB and the model
                t0 = time.perf_counter()
                drv.get(f"{url}/code/{code}")
                while not drv.find_elements(By.CSS_SELECTOR, "tr.example"):
                    if time.perf_counter() - t0 > 60:
                        sys.exit("the page did not render in 60 s")
                    time.sleep(0.02)
                timings.append(time.perf_counter() - t0)
            drv.save_screenshot(args.out)
    finally:
        drv.quit()
    print(json.dumps({"code": code, "screenshot": args.out, "first_load_s": round(timings[0], 3),
                      "load_s": round(timings[1], 3)}), flush=True)


if __name__ == "__main__":
    main()
