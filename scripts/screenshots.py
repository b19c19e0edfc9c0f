"""Screenshots of each main view of a run for the README, taken in headless Chromium against a
live server on the run (``docs/screenshots/*.png``).

    .venv/bin/python scripts/screenshots.py ~/.cache/headscope/runs/demo docs/screenshots
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from urllib.parse import urlencode

from playwright.sync_api import sync_playwright

from headscope.server.serve import serve
from headscope.store import open_run

ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def views(run_dir: Path) -> list[tuple[str, str]]:
    run = open_run(run_dir)
    m = run.metrics
    prev = m.nlargest(1, "prev_token_score")["name"].iloc[0]
    induction = m.nlargest(1, "prefix_matching_score")["name"].iloc[0]
    pairs = [
        a
        for a in run.manifest.get("attributions", [])
        if a.startswith(f"{induction}/") and a.endswith("_qk.json")
    ]
    out = [
        (
            "heads",
            "#/heads?"
            + urlencode({"x": "prev_token_score", "y": "prefix_matching_score", "c": "layer"}),
        ),
        ("head", f"#/head/{induction}"),
        ("pca", f"#/head/{prev}/pca"),
        ("similar", f"#/head/{induction}/similar"),
    ]
    if pairs:
        seq, q, k = (int(x) for x in pairs[0].split("/")[1].split("_")[:3])
        head = json.loads((run_dir / "heads" / f"{induction}.json").read_text())
        ex = next(i for i, e in enumerate(head["examples"]) if e["sequence"] == seq)
        out.append(("attribution", f"#/head/{induction}?" + urlencode({"ex": ex, "q": q, "k": k})))
    text = "The cat sat on the mat. The cat sat on the"
    out += [
        # query " the" (12) -> key " mat" (6), the token after the earlier " the": induction
        ("custom", "#/custom?" + urlencode({"text": text, "head": induction, "q": 12, "k": 6})),
        (
            "sweep",
            "#/sweep?"
            + urlencode(
                {
                    "tpl": "In {} the war ended.",
                    "vals": "1000..2000:20",
                    "heads": prev,
                    "q": "slot:-1",
                    "k": "slot:-2",
                }
            ),
        ),
        (
            "geometry",
            "#/geometry?"
            + urlencode(
                {
                    "queries": "\n".join(
                        f"The country [[{c}]]" for c in ("France", "Germany", "Italy", "Spain")
                    ),
                    "keys": "\n".join(
                        f"The city [[{c}]] is well known"
                        for c in ("Paris", "Berlin", "Rome", "Madrid")
                    ),
                    "heads": induction,
                }
            ),
        ),
    ]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("run", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--model", default="default")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    handle = serve(args.run, args.model)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path="/usr/bin/chromium", headless=True, args=ARGS
            )
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            for name, fragment in views(args.run):
                page.goto(handle.url + fragment)
                page.wait_for_load_state("networkidle")
                time.sleep(1.0)
                # live views show a spinner until the server answers (slow on a busy machine)
                page.wait_for_function("!document.querySelector('.loading')", timeout=300_000)
                panel = page.locator("section.attribution")
                if name == "attribution" and panel.count():
                    panel.first.evaluate(
                        "e => { e.scrollIntoView({block: 'start'}); window.scrollBy(0, -110); }"
                    )
                page.screenshot(path=str(args.out / f"{name}.png"), full_page=False)
                print(f"{name}: {args.out / f'{name}.png'}")
            browser.close()
    finally:
        handle.stop()


if __name__ == "__main__":
    main()
